"""Where the host time of an eager EBT call goes (GPU): cProfile over steps with real launches.

For flex_ebt_attention at B1's shape (bf16, B8 H8, r = 0, causal; S and D from the command line)
and each mode (fwd, fwd+bwd, fwd + create_graph grad + backward through it), it prints the host
time per step (a loop of steps with no synchronisation inside, best of 5) and the functions that
take it (cProfile: own time, then cumulative).  ``host_split.py`` gives the host / GPU ratio;
this says which Python (or which engine call) the host spends it in.

    python benchmarks/tools/host_profile.py --S 1024 --D 64 --out results/host_profile.txt
"""

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/
from bench import _git_commit  # noqa: E402  (puts FLEXEBT_IMPORT_ROOT, or the repository, first)
import flexebt  # noqa: E402


def python_profile(step, n: int) -> cProfile.Profile:
    """cProfile of ``n`` calls of ``step`` (the host's Python only; the GPU is waited for after)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    prof.disable()
    torch.cuda.synchronize()
    return prof


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--S", type=int, default=1024)
    p.add_argument("--D", type=int, default=64, help="head dimension")
    p.add_argument("--rows", type=int, default=30, help="functions listed per table")
    p.add_argument("--out", default="", help="also write the report to this file")
    p.add_argument("--commit", default="", help="the commit recorded in the header (default: git HEAD)")
    a = p.parse_args()
    dev, B, H, S, D = "cuda", 8, 8, a.S, a.D
    bm = flexebt.create_ebt_block_mask(flexebt.masks.ebt_causal_mask, None, None, S, S, device=dev)
    y = [torch.randn(B, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(6)]

    def fwd():
        return flexebt.flex_ebt_attention(*y, block_mask=bm)

    cts = [torch.randn_like(t) for t in fwd()]
    gg = [torch.randn_like(t) for t in y]

    def fwd_bwd():
        torch.autograd.grad(fwd(), y, cts)

    def second_order():
        g = torch.autograd.grad(fwd(), y, cts, create_graph=True)
        torch.autograd.grad(g, y, gg)

    out = io.StringIO()
    out.write(f"# host_profile.py on {torch.cuda.get_device_name()}, torch {torch.__version__}, commit "
              f"{a.commit or _git_commit()}, EBT bf16 B{B} H{H} S{S} D{D}\n")
    for name, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd), ("fwd+bwd+dbwd", second_order)):
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):  # a busy host only ever slows a round down
            t = time.perf_counter()
            for _ in range(20):
                step()
            best = min(best, (time.perf_counter() - t) / 20)
            torch.cuda.synchronize()
        out.write(f"\n## {name}: host {best * 1e3:.3f} ms per step (no synchronisation in the loop, best of 5)\n")
        prof = python_profile(step, 50)
        for order in ("tottime", "cumtime"):
            pstats.Stats(prof, stream=out).sort_stats(order).print_stats(a.rows)
    print(out.getvalue())
    if a.out:
        with open(a.out, "w") as f:
            f.write(out.getvalue())


if __name__ == "__main__":
    main()
