"""Per-launch wall time of every Triton pass, first call (compile included) and warm.

A kernel that compiles slowly (register spills, shared-memory retries) shows up here and not in
the medians of bench.py.  Each launch prints: kernel, tiles that ran, first-call seconds and
warm milliseconds.

    python benchmarks/tools/first_call.py --dtypes float32,bfloat16 --S 600 --out launches.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
import flexebt  # noqa: E402
from flexebt import masks, mods, runtime  # noqa: E402
from flexebt.kernels import flex as flex_kernels  # noqa: E402

_LOG: list = []


def _timed_launch(original):
    def launch(kernel, plan, args, spec, options, device):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        original(kernel, plan, args, spec, options, device)
        torch.cuda.synchronize()
        _, _, cfg, key = spec()  # the pass's planned tiles; runtime.tile_fits has what ran if they did not fit
        ran = runtime.tile_fits.get((id(kernel), key, cfg), kernel, default=cfg)
        _LOG.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), ran, time.perf_counter() - t0))
    return launch


def _report(title, out):
    print(f"== {title}", file=out, flush=True)
    for name, cfg, sec in _LOG:
        print(f"   {name:<18} M{cfg.BLOCK_M:<4}N{cfg.BLOCK_N:<4}w{cfg.num_warps} s{cfg.num_stages}  {sec * 1e3:10.2f} ms",
              file=out, flush=True)
    _LOG.clear()


def _cases(S, dtype, B=2, H=4):
    x = [torch.randn(B, H, S, 64, device="cuda", dtype=dtype) for _ in range(3)]
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cuda")
    sm = mods.generate_tanh_softcap(20.0)

    def second_order():
        xs = [t.detach().requires_grad_() for t in x]
        out = flexebt.flex_attention(*xs, score_mod=sm, block_mask=bm)
        g = torch.autograd.grad(out.float().square().sum(), xs, create_graph=True)
        torch.autograd.grad(sum((t.float() ** 2).sum() for t in g), xs)

    def jvp():
        t = tuple(torch.randn_like(a) for a in x)
        torch.func.jvp(lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm), tuple(x), t)

    ebt = [torch.randn(B, H, S, 64, device="cuda", dtype=dtype) for _ in range(6)]
    ebm = flexebt.create_ebt_block_mask(None, None, None, S, S, device="cuda")

    def ebt_second_order():
        xs = [t.detach().requires_grad_() for t in ebt]
        o_obs, o_pred = flexebt.flex_ebt_attention(*xs, block_mask=ebm)
        g = torch.autograd.grad(o_pred.float().square().sum() + o_obs.float().square().sum(), xs, create_graph=True)
        torch.autograd.grad(sum((t.float() ** 2).sum() for t in g), xs)

    return {"flex second order (softcap)": second_order, "flex jvp (softcap)": jvp,
            "ebt second order (causal, r=0)": ebt_second_order}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--S", type=int, default=600)
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--cases", default="", help="comma-separated substrings of case names; empty: all")
    p.add_argument("--out", default="-")
    a = p.parse_args(argv)
    out = sys.stdout if a.out == "-" else open(a.out, "w")
    with flex_kernels.wrap_launches(_timed_launch):
        print(f"{torch.cuda.get_device_name()} torch {torch.__version__}", file=out, flush=True)
        for dt in a.dtypes.split(","):
            for name, fn in _cases(a.S, getattr(torch, dt), a.B, a.H).items():
                if a.cases and not any(c in name for c in a.cases.split(",")):
                    continue
                for rep in ("first", "warm"):
                    t0 = time.perf_counter()
                    fn()
                    torch.cuda.synchronize()
                    _report(f"{dt} S{a.S} {name} [{rep}] total {time.perf_counter() - t0:.2f} s", out)


if __name__ == "__main__":
    main()
