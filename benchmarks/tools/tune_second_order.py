"""Sweep tiles of the double-backward passes on the EBT second-order step (GPU).

    python benchmarks/tools/tune_second_order.py --S 4096
    python benchmarks/tools/tune_second_order.py --S 2048 --D 32 --dtype float32 --fp32-products tf32x3
    python benchmarks/tools/tune_second_order.py --option DBWD_DQ_ATOMIC=1 --passes dkdv

Times every launch of fwd + bwd(create_graph) + double backward at each config (second of two
runs) and prints the summed time of the passes the config changes.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import first_call as fc  # noqa: E402

import flexebt  # noqa: E402
from flexebt.kernels import flex as fk  # noqa: E402

DKDV = [(32, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 2),
        (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3), (32, 64, 4, 2), (32, 64, 8, 2), (16, 64, 4, 2)]
DQ = [(64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3)]
# fp32 tiles take twice the registers and shared memory: smaller candidates, fewer stages
FP32 = [(32, 32, 4, 1), (32, 32, 4, 2), (16, 32, 4, 1), (32, 64, 4, 1), (64, 32, 4, 1), (32, 64, 4, 2),
        (64, 64, 4, 1), (16, 64, 4, 1)]
PASSES = ["flex_fwd", "flex_bwd_dq", "flex_bwd_dkdv", "flex_dbwd_rows", "flex_dbwd_dq", "flex_dbwd_dkdv"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--S", type=int, default=4096)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", help="float32 runs under matmul precision 'highest'")
    p.add_argument("--fp32-products", default="", help="'ieee' or 'tf32x3' (fp32 only; default: the library's)")
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--option", action="append", default=[], help="KEY=V: a kernel option of every step (an int)")
    p.add_argument("--passes", default="dkdv,dq", help="which sweeps: dkdv (key-tile passes), dq (query-tile)")
    a = p.parse_args()
    dtype = getattr(torch, a.dtype)
    extra = {"FP32_PRODUCTS": a.fp32_products} if a.fp32_products else {}
    extra.update({k: int(v) for k, v in (o.split("=") for o in a.option)})
    sweeps = a.passes.split(",")
    with fk.wrap_launches(fc._timed_launch):
        S = a.S
        x = [torch.randn(a.B, a.H, S, a.D, device="cuda", dtype=dtype) for _ in range(6)]
        bm = flexebt.create_ebt_block_mask(None, None, None, S, S, device="cuda")

        def step(opts):
            xs = [t.detach().requires_grad_() for t in x]
            o = flexebt.flex_ebt_attention(*xs, block_mask=bm, kernel_options={**opts, **extra})
            g = torch.autograd.grad(o, xs, [torch.ones_like(t) * 0.01 for t in o], create_graph=True)
            torch.autograd.grad(sum((t.float() ** 2).sum() for t in g), xs)

        def timed(opts, names):
            step(opts)
            torch.cuda.synchronize()
            fc._LOG.clear()
            step(opts)
            torch.cuda.synchronize()
            out = {n: sum(sec for name, _, sec in fc._LOG if name == n) * 1e3 for n in names}
            fc._LOG.clear()
            return " ".join(f"{n} {t:.2f}" for n, t in out.items())

        print(f"default tiles: {timed({}, PASSES)} ms", flush=True)
        for m, n, w, s in (FP32 if dtype == torch.float32 else DKDV) if "dkdv" in sweeps else ():
            o = dict(BLOCK_M1=m, BLOCK_N1=n, dbwd_dkdv_num_warps=w, dbwd_dkdv_num_stages=s)
            try:
                print(f"dkdv M{m} N{n} w{w} s{s}: {timed(o, ['flex_dbwd_dkdv', 'flex_bwd_dkdv'])} ms", flush=True)
            except Exception as e:  # out of resources
                print(f"dkdv M{m} N{n} w{w} s{s}: failed {type(e).__name__}", flush=True)
        for m, n, w, s in (FP32 if dtype == torch.float32 else DQ) if "dq" in sweeps else ():
            o = dict(BLOCK_M2=m, BLOCK_N2=n, dbwd_dq_num_warps=w, dbwd_dq_num_stages=s, dbwd_rows_num_warps=w,
                     dbwd_rows_num_stages=s)
            try:
                print(f"dq   M{m} N{n} w{w} s{s}: {timed(o, ['flex_dbwd_rows', 'flex_dbwd_dq', 'flex_bwd_dq'])} ms",
                      flush=True)
            except Exception as e:
                print(f"dq   M{m} N{n} w{w} s{s}: failed {type(e).__name__}", flush=True)


if __name__ == "__main__":
    main()
