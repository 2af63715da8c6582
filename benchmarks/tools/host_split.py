"""Host time against GPU time of one eager call (GPU): for a flex_attention call at B2's shapes
(causal, B * S = 16k tokens, H16, bf16) and an EBT call at B1's (r = 0, causal, B8 H8, bf16), per S
and mode (fwd, fwd+bwd, fwd+bwd+dbwd), it prints

- ``do_bench``: the median time of the step as a benchmark sees it;
- ``gpu``: the summed GPU time of every kernel of one step (torch.profiler);
- ``host``: the host time of one step, from a loop of steps the GPU does not hold back (no
  synchronisation inside the loop);
- ``host/gpu``: above 1, the step is bound by the host -- the GPU idles between launches.

A step is the same as bench.py's (``prepared``: the cotangents are made once, outside the step).

    python benchmarks/tools/host_split.py --S 1024,2048 --out results/host_split.txt

With FLEXEBT_IMPORT_ROOT set (as ``ab_commits.py`` sets it), another checkout's flexebt is measured:
the GPU column compares two commits' kernels where a host-bound row's do_bench time cannot.
"""

import argparse
import os
import sys
import time

import torch
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/
from bench import _git_commit, prepared  # noqa: E402  (puts FLEXEBT_IMPORT_ROOT, or the repository, first)
import flexebt  # noqa: E402
from flexebt import masks  # noqa: E402


def gpu_ms(step) -> float:
    """Summed GPU time (ms) of the kernels of one step."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    total = 0.0
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        total += t
    return total / 1e3


def host_ms(step, n: int = 20, rounds: int = 3) -> float:
    """Host time (ms) of one step: the best of a few loops of ``n`` steps, none waiting on the GPU."""
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        best = min(best, (time.perf_counter() - t0) / n * 1e3)
        torch.cuda.synchronize()
    return best


def calls(family: str, S: int, D: int = 64):
    """(fn, inputs, shape label) of one call of the family at S."""
    dt = torch.bfloat16
    if family == "flex":
        B, H = max(1, 16384 // S), 16
        x = [torch.randn(B, H, S, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3)]
        bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cuda")
        return (lambda: flexebt.flex_attention(*x, block_mask=bm)), x, f"B{B} H{H} D{D}"
    B, H = 8, 8
    x = [torch.randn(B, H, S, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(6)]
    bm = flexebt.create_ebt_block_mask(None, None, None, S, S, device="cuda")
    return (lambda: flexebt.flex_ebt_attention(*x, block_mask=bm)), x, f"B{B} H{H} D{D}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--S", default="1024,2048", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--D", default=64, type=int, help="head dimension")
    p.add_argument("--families", default="flex,ebt", type=lambda s: s.split(","))
    p.add_argument("--modes", default="fwd,fwd+bwd,fwd+bwd+dbwd", type=lambda s: s.split(","))
    p.add_argument("--out", default=None, help="also write the table to this file")
    p.add_argument("--commit", default=os.environ.get("FLEXEBT_COMMIT"),
                   help="the commit recorded in the header (default: FLEXEBT_COMMIT, else git HEAD)")
    a = p.parse_args(argv)
    import triton

    lines = [f"# host_split.py on {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
             f"{triton.__version__}, commit {a.commit or _git_commit()}, bf16",
             f"{'family':6s} {'S':>6s} {'shape':14s} {'mode':14s} {'do_bench':>9s} {'gpu':>8s} {'host':>8s} "
             f"{'host/gpu':>8s}"]
    print("\n".join(lines), flush=True)
    rows = []
    for family in a.families:
        for S in a.S:
            fn, x, shape = calls(family, S, a.D)
            for mode in a.modes:
                step, _ = prepared(fn, mode, x)
                bench = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
                h = host_ms(step)
                rows.append((family, S, shape, mode, bench, h, step))
    # the profiler last: CUDA launches stay slower for the rest of the process after a profiler session
    for family, S, shape, mode, bench, h, step in rows:
        g = gpu_ms(step)
        line = f"{family:6s} {S:6d} {shape:14s} {mode:14s} {bench:9.3f} {g:8.3f} {h:8.3f} {h / g:8.2f}"
        print(line, flush=True)
        lines.append(line)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
