"""Train the small character-level EBT on the text beside this file.

    python examples/ebt/train.py                 # CPU: about 2 minutes (12-14 steps/s on a 2-core CPU)
    python examples/ebt/train.py --device cuda   # the same code on a GPU (fused Triton kernels)
    python examples/ebt/train.py --device cuda --compile   # the training loss under torch.compile
    torchrun --nproc-per-node 2 examples/ebt/train.py --dist ddp   # data parallel (gloo on CPU, NCCL on CUDA)

Every training step differentiates the energy with create_graph=True and back-propagates the
loss through those gradients: second-order gradients through every attention layer. A progress
bar shows the rate and the time left; the energy of a held batch -- for the first candidate and
after MCMC refinement -- is measured as training goes, and the loss and energy curves are saved
as a plot (--plot).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import CharEBT  # noqa: E402

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lighthouse.txt")


def energies(model, x, run=None) -> tuple[float, float]:
    """Mean energy of the model's first candidate and of the candidate after MCMC refinement, on the
    batch x: refinement descends the energy, so the second should be lower.  ``run(task, *args)``
    calls the model's ``energy`` / ``refine`` (through a distributed wrapper's forward)."""
    if run is None:
        def run(task, x, candidates=None):
            if task == "refine":
                return model.refine(x, create_graph=False)
            return model.energy(x, model.init_logits.expand(*x.shape, -1) if candidates is None else candidates)
    with torch.enable_grad():
        before = run("energy", x).mean().item()
        refined = run("refine", x).detach()
        after = run("energy", x, refined).mean().item()
    return before, after


def save_plot(path: str, steps: list, losses: list, evals: list) -> None:
    """The training loss and the energies before / after refinement, against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, losses, lw=1)
    ax1.set(xlabel="step", ylabel="loss (nats)", title="cross-entropy of the refined candidates")
    ax1.set_ylim(bottom=0)
    at = [e[0] for e in evals]
    ax2.plot(at, [e[1] for e in evals], label="first candidate")
    ax2.plot(at, [e[2] for e in evals], label="after MCMC refinement")
    ax2.set(xlabel="step", ylabel="mean energy", title="energy of a held batch")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    p.add_argument("--eval-every", type=int, default=100, help="steps between energy measurements on a held batch")
    p.add_argument("--plot", default="ebt_training.png",
                   help="where to save the loss and energy curves (PNG; needs matplotlib); '' for none")
    p.add_argument("--dist", default="none", choices=["none", "ddp", "fsdp2"],
                   help="data parallel under torchrun: ddp or fsdp2 (each process takes --batch sequences; see "
                        "examples/ebt/distributed.py for what the second-order step needs)")
    a = p.parse_args(argv)
    rank, world = 0, 1
    if a.dist == "fsdp2" and a.compile:
        raise SystemExit("--dist fsdp2 with --compile: the loss compiles with fullgraph=True, and FSDP2's module hooks "
                         "inside it are a graph break dynamo refuses there; run FSDP2 eagerly, or --dist ddp with "
                         "--compile.")
    if a.dist != "none":
        from distributed import finish_fsdp2_step, init_from_env, wrap_ddp, wrap_fsdp2

        rank, world, device = init_from_env(a.device)
        a.device = str(device)
    torch.manual_seed(a.seed)  # the same initial model in every process

    text = open(TEXT).read()
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    model = CharEBT(len(chars), a.context, dim=a.dim, layers=a.layers, mcmc_steps=a.mcmc_steps).to(a.device)
    loss_fn = model.loss
    if a.dist == "ddp":
        loss_fn = wrapper = wrap_ddp(model, torch.device(a.device))  # its forward is the loss; backward all-reduces
    elif a.dist == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        loss_fn = wrapper = wrap_fsdp2(model, init_device_mesh(torch.device(a.device).type, (world,)))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)  # after sharding: FSDP2 steps the shards
    if a.compile:
        # autograd.grad(create_graph=True) inside a compiled function needs this switch (torch >= 2.11);
        # flexebt's attention enters the graph as custom ops whose backward is itself differentiable
        torch._dynamo.config.trace_autograd_ops = True
        model.block_mask(a.context, a.device)  # the EBT block mask, made once and reused by every step
        compiled = torch.compile(model.loss, fullgraph=True, backend=a.compile_backend, mode=a.compile_mode)
        if a.dist != "none":
            model.loss = compiled  # the wrapper's forward calls the compiled loss

        def step_loss(x, y, run=loss_fn if a.dist != "none" else compiled):
            if a.compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are done with
            return run(x, y)
        loss_fn = step_loss

    gen = torch.Generator().manual_seed(a.seed * 1000 + 1 + rank)  # each process its own batches

    def batch():
        starts = torch.randint(0, len(data) - a.context - 1, (a.batch,), generator=gen)
        x = torch.stack([data[s:s + a.context] for s in starts]).to(a.device)
        y = torch.stack([data[s + 1:s + a.context + 1] for s in starts]).to(a.device)
        return x, y

    say = print if rank == 0 else (lambda *args, **kwargs: None)
    say(f"{len(text)} characters, vocab {len(chars)}, {sum(p.numel() for p in model.parameters())} parameters; "
        f"uniform guess = {math.log(len(chars)):.3f} nats" + (f"; {world} processes ({a.dist})" if world > 1 else ""))
    held, _ = batch()

    def fsdp2_run(task, *args):  # the model entered only through the wrapper, resharded after
        out = wrapper(*args, task=task)
        finish_fsdp2_step(wrapper)
        return out

    run = fsdp2_run if a.dist == "fsdp2" else None
    e0 = energies(model, held, run)
    say(f"energy of a held batch before training: first candidate {e0[0]:.3f}, after refinement {e0[1]:.3f}")
    history, evals = [], [(0, *e0)]
    bar = tqdm(range(1, a.steps + 1), desc="training", unit="step", disable=rank != 0)
    for i in bar:
        x, y = batch()
        loss = loss_fn(x, y)
        opt.zero_grad()
        loss.backward()
        if a.dist == "fsdp2":
            finish_fsdp2_step(wrapper)
        opt.step()
        history.append(loss.item())
        if i % a.eval_every == 0 or i == a.steps:
            evals.append((i, *energies(model, held, run)))
        bar.set_postfix(loss=f"{sum(history[-20:]) / len(history[-20:]):.3f}",
                        energy=f"{evals[-1][1]:.2f}->{evals[-1][2]:.2f}")
    bar.close()
    first, last = sum(history[:10]) / min(10, len(history)), sum(history[-10:]) / min(10, len(history))
    say(f"loss {first:.3f} -> {last:.3f}; held batch energy: first candidate {evals[-1][1]:.3f}, after "
        f"MCMC refinement {evals[-1][2]:.3f}")
    if a.plot and rank == 0:
        try:
            save_plot(a.plot, list(range(1, len(history) + 1)), history, evals)
            print(f"loss and energy curves: {a.plot}")
        except ImportError:
            print("(matplotlib is not installed: no plot)")

    # Greedy generation: each next character is the argmin-energy refinement of a candidate (every
    # process runs it: under FSDP2 gathering the parameters takes them all).
    with torch.no_grad():
        prompt = torch.tensor([chars.index(c) for c in "The keeper "], device=a.device)[None]
    out = prompt
    for _ in range(60):
        ctx = out[:, -a.context:]
        with torch.enable_grad():
            logits = run("refine", ctx) if run else model.refine(ctx, create_graph=False)
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    say("sample:", "".join(chars[t] for t in out[0].tolist()))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return first, last


if __name__ == "__main__":
    main()
