"""Sweep tile configurations of the single-stream kernels, pass by pass (GPU).

    python benchmarks/tools/tune.py --dims 64,128 --S 4096 --variant causal

Prints, per head dim: each config's median ms for fwd, dq and dk/dv separately, and torch's
compiled flex_attention fwd and fwd+bwd for reference.  Used to choose the defaults in
flexebt/kernels/configs.py; the numbers chosen are recorded in docs/design.md.
"""

import argparse
import itertools
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
import flexebt  # noqa: E402
from flexebt.codegen.source import kernels_and_buffers, position_extents  # noqa: E402
from flexebt.kernels.flex import flex_forward, tables_from_block_mask  # noqa: E402
from flexebt.kernels.plan import plan_backward, single_stream_plan  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/
from bench import b2_variant  # noqa: E402

FWD = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 4), (128, 32, 4, 3),
       (64, 32, 4, 4), (128, 128, 8, 2), (64, 128, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 128, 8, 3),
       (64, 32, 4, 3), (128, 128, 4, 3)]
DQ = [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2),
      (128, 64, 4, 3)]
DKDV = [(32, 64, 4, 3), (64, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3),
        (32, 128, 8, 2), (64, 64, 8, 3)]


def main():
    import triton.testing
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    p = argparse.ArgumentParser()
    p.add_argument("--dims", default="64,128")
    p.add_argument("--S", default="4096", help="sequence lengths, comma separated")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--tokens", type=int, default=0, help="if set, B = tokens // S (B2's shapes: 16384)")
    p.add_argument("--torch", type=int, default=1, help="0: skip torch's compiled flex_attention reference")
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--variant", default="causal")
    p.add_argument("--passes", default="fwd,dq,dkdv")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tf32", action="store_true", help="fp32 with tf32 products (matmul precision 'high')")
    p.add_argument("--configs", default="", help="'M,N,w,s;M,N,w,s;...' tried for every pass instead of the lists")
    p.add_argument("--options", default="", help="kernel_options for every run, 'KEY=int,KEY=int' (e.g. USE_TMA=1)")
    p.add_argument("--ab", default="", help="A/B one kernel option at the default tiles, 'KEY=v1,v2' (e.g. "
                   "USE_TMA=0,1 or REVERSE_Q_ORDER=0,1); LINEAR_SCORE=0,1 switches the forward's raw-max path")
    a = p.parse_args()
    base = {k: int(v) for k, v in (x.split("=") for x in a.options.split(",") if x)}
    if a.tf32:
        torch.set_float32_matmul_precision("high")
    if a.configs:
        global FWD, DQ, DKDV
        FWD = DQ = DKDV = [tuple(int(x) for x in c.split(",")) for c in a.configs.split(";")]
    dtype = getattr(torch, a.dtype)
    bench = lambda f: triton.testing.do_bench(f, warmup=20, rep=60, return_mode="median")  # noqa: E731
    for D, S in itertools.product([int(x) for x in a.dims.split(",")], [int(x) for x in a.S.split(",")]):
        torch._dynamo.reset()
        compiled = torch.compile(torch_flex, dynamic=False)
        B, H = (a.tokens // S if a.tokens else a.B), a.H
        sm, mm = b2_variant(a.variant, H, S, "cuda")
        bm = flexebt.create_block_mask(mm, None, None, S, S, device="cuda")
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype) for _ in range(3))
        tables = tables_from_block_mask(bm, S, S, "cuda")
        kern, bufs = kernels_and_buffers("flex_attention", sm, tables.mask_mod, position_extents(B, H, S, S))
        scale = D ** -0.5
        out, lse, msum = flex_forward(kern, q, k, v, scale, tables, bufs, base)
        do = torch.randn_like(out)
        single = single_stream_plan(kern, tables, len(bufs))

        def backward(options, q=q, k=k, v=v, out=out, lse=lse, do=do, bufs=bufs, scale=scale, single=single):
            return plan_backward(single, [q, k, v], [out, lse, msum], [do, None], bufs, scale, options)

        head = f"D={D} S={S} B={B} {a.variant} {a.dtype}{' tf32' if a.tf32 else ''}"
        if a.torch:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
                t_fwd = bench(lambda: compiled(q, k, v, score_mod=sm, block_mask=bm))
                t_all = bench(lambda: torch.autograd.grad(compiled(qg, kg, vg, score_mod=sm, block_mask=bm),
                                                          [qg, kg, vg], do))
            print(f"{head}: torch flex compiled fwd {t_fwd:.3f} ms, fwd+bwd {t_all:.3f} ms (bwd {t_all - t_fwd:.3f})",
                  flush=True)
        else:
            print(head, flush=True)
        if a.ab:
            key, values = a.ab.split("=")
            for val in [int(x) for x in values.split(",")] * 2:  # twice, interleaved
                o = dict(base, **{key: val})
                tf = bench(lambda: flex_forward(kern, q, k, v, scale, tables, bufs, o))
                tb = bench(lambda: backward(o))
                print(f"  {key}={val}: fwd {tf:.3f} ms, bwd {tb:.3f} ms, fwd+bwd {tf + tb:.3f} ms", flush=True)
            continue
        for m, n, w, st in (FWD if "fwd" in a.passes else []):
            opts = dict(base, BLOCK_M=m, BLOCK_N=n, fwd_num_warps=w, fwd_num_stages=st)
            try:
                t = bench(lambda: flex_forward(kern, q, k, v, scale, tables, bufs, opts))
                print(f"  fwd  M{m:<4}N{n:<4}w{w} s{st}: {t:.3f} ms", flush=True)
            except Exception as e:  # out of resources etc.
                print(f"  fwd  M{m:<4}N{n:<4}w{w} s{st}: failed {type(e).__name__}", flush=True)
        for which, table in [(w, t) for w, t in (("dq", DQ), ("dkdv", DKDV)) if w in a.passes]:
            for m, n, w, st in table:
                if which == "dq":
                    opts = dict(base, BLOCK_M2=m, BLOCK_N2=n, dq_num_warps=w, dq_num_stages=st)
                else:
                    opts = dict(base, BLOCK_M1=m, BLOCK_N1=n, dkdv_num_warps=w, dkdv_num_stages=st)
                try:
                    t = bench(lambda: backward(opts))
                    print(f"  bwd({which} varied) M{m:<4}N{n:<4}w{w} s{st}: {t:.3f} ms", flush=True)
                except Exception as e:
                    print(f"  bwd({which} varied) M{m:<4}N{n:<4}w{w} s{st}: failed {type(e).__name__}", flush=True)


if __name__ == "__main__":
    main()
