"""Train the small character-level EBT on the text beside this file.

    python examples/ebt/train.py                 # CPU, a couple of minutes
    python examples/ebt/train.py --device cuda   # the same code on a GPU (fused Triton kernels)
    python examples/ebt/train.py --device cuda --compile   # the training loss under torch.compile

Every training step differentiates the energy with create_graph=True and back-propagates the
loss through those gradients: second-order gradients through every attention layer.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import CharEBT  # noqa: E402

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lighthouse.txt")


def progress(i: int, n: int, loss: float, start: float, width: int = 30) -> str:
    done = int(width * i / n)
    return f"\r[{'#' * done}{'.' * (width - done)}] step {i}/{n}  loss {loss:.3f}  {time.time() - start:.0f}s"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=48)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mcmc-steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="compile the training loss with fullgraph=True; the energy's gradient taken inside it "
                        "(create_graph=True) is traced too (torch._dynamo.config.trace_autograd_ops)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode, e.g. reduce-overhead (CUDA graphs: one launch sequence per step)")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)

    text = open(TEXT).read()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    model = CharEBT(len(chars), a.context, dim=a.dim, layers=a.layers, mcmc_steps=a.mcmc_steps).to(a.device)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    loss_fn = model.loss
    if a.compile:
        # autograd.grad(create_graph=True) inside a compiled function needs this switch (torch >= 2.11);
        # flexebt's attention enters the graph as custom ops whose backward is itself differentiable
        torch._dynamo.config.trace_autograd_ops = True
        model.block_mask(a.context, a.device)  # the EBT block mask, made once and reused by every step
        compiled = torch.compile(model.loss, fullgraph=True, backend=a.compile_backend, mode=a.compile_mode)

        def loss_fn(x, y):
            if a.compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are done with
            return compiled(x, y)

    def batch():
        starts = torch.randint(0, len(data) - a.context - 1, (a.batch,))
        x = torch.stack([data[s:s + a.context] for s in starts]).to(a.device)
        y = torch.stack([data[s + 1:s + a.context + 1] for s in starts]).to(a.device)
        return x, y

    print(f"{len(text)} characters, vocab {len(chars)}, {sum(p.numel() for p in model.parameters())} parameters; "
          f"uniform guess = {math.log(len(chars)):.3f} nats")
    start, history = time.time(), []
    for i in range(1, a.steps + 1):
        x, y = batch()
        loss = loss_fn(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
        print(progress(i, a.steps, sum(history[-20:]) / len(history[-20:]), start), end="", flush=True)
    print()
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    print(f"loss {first:.3f} -> {last:.3f}")

    # Greedy generation: each next character is the argmin-energy refinement of a candidate.
    with torch.no_grad():
        prompt = torch.tensor([chars.index(c) for c in "The keeper "], device=a.device)[None]
    out = prompt
    for _ in range(60):
        ctx = out[:, -a.context:]
        with torch.enable_grad():
            logits = model.refine(ctx, create_graph=False)
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    print("sample:", "".join(chars[t] for t in out[0].tolist()))
    return first, last


if __name__ == "__main__":
    main()
