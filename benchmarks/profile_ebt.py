"""Profile one EBT fwd+bwd step (GPU): top CUDA kernels and CPU-side time, to find fixed costs.

    python benchmarks/profile_ebt.py --S 1024
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import flexebt  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--S", type=int, default=1024)
    p.add_argument("--D", type=int, default=64)
    a = p.parse_args()
    x = [torch.randn(8, 8, a.S, a.D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(6)]
    bm = flexebt.create_ebt_block_mask(None, None, None, a.S, a.S, device="cuda")

    def step():
        o = flexebt.flex_ebt_attention(*x, block_mask=bm)
        torch.autograd.grad(o, x, [torch.ones_like(t) for t in o])

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
