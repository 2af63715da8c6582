"""B2's causal forward (bf16 D64 S4096 H16) at B = 2, 4, 8 three ways (GPU): torch's compiled
flex_attention, flexebt's public call, and flexebt's kernel launcher alone with and without TMA
loads; plus the host time of one public call (a loop of 50 calls that the GPU does not hold
back).  It tells a slow kernel from a slow dispatch path.

    python benchmarks/tools/api_vs_launcher.py
"""
import os
import sys
import time
import warnings

import torch
import triton.testing
from torch.nn.attention.flex_attention import flex_attention as torch_flex

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
import flexebt  # noqa: E402
from flexebt import masks  # noqa: E402
from flexebt.codegen.source import get_kernels  # noqa: E402
from flexebt.kernels.flex import flex_forward, tables_from_block_mask  # noqa: E402

warnings.simplefilter("ignore")

def main():
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")  # noqa: E731
    compiled = torch.compile(torch_flex, dynamic=False)
    S, H, D = 4096, 16, 64
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cuda")
    tables = tables_from_block_mask(bm, S, S, "cuda")
    kern = get_kernels("flex_attention", None, tables.mask_mod)
    for B in (2, 4, 8):
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        t_torch = bench(lambda: compiled(q, k, v, block_mask=bm))
        t_api = bench(lambda: flexebt.flex_attention(q, k, v, block_mask=bm))
        with torch.no_grad():
            t_api_ng = bench(lambda: flexebt.flex_attention(q, k, v, block_mask=bm))
        res = []
        for tma in (0, 1):
            o = dict(USE_TMA=tma)
            res.append(bench(lambda: flex_forward(kern, q.detach(), k.detach(), v.detach(), D ** -0.5, tables, [], o)))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            flexebt.flex_attention(q, k, v, block_mask=bm)
        cpu = (time.perf_counter() - t0) / 50 * 1e3
        torch.cuda.synchronize()
        print(f"B{B}: torch {t_torch:.3f} | api {t_api:.3f} (no_grad {t_api_ng:.3f}, host {cpu:.3f} ms/call) | "
              f"launcher tma0 {res[0]:.3f} tma1 {res[1]:.3f}", flush=True)


if __name__ == "__main__":
    main()
