"""fp32 under matmul precision "highest": IEEE-exact products (FMA) vs three tf32 products
(kernel_options FP32_PRODUCTS="tf32x3"), accuracy against float64 and speed (GPU).

    python benchmarks/tools/fp32_products.py
"""

import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
import flexebt  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def grads(x, opts, bm, second):
    xs = [t.detach().requires_grad_() for t in x]
    o = flexebt.flex_ebt_attention(*xs, block_mask=bm, kernel_options=opts)
    g = torch.autograd.grad(o, xs, [torch.ones_like(t) * 0.01 for t in o], create_graph=second)
    res = list(o) + list(g)
    if second:
        res += list(torch.autograd.grad(sum((t.float() ** 2).sum() for t in g), xs))
    return res


def main():
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(0)
    S, D = 700, 64
    x = [torch.randn(2, 4, S, D, device="cuda") for _ in range(6)]
    bm = flexebt.create_ebt_block_mask(None, None, None, S, S, device="cuda")
    ref = grads([t.double() for t in x], {"BACKEND": "REFERENCE"}, bm, True)
    eager = grads(x, {"BACKEND": "REFERENCE"}, bm, True)
    print("worst rel. error over outputs, first- and second-order grads (B2 H4 S700 D64, fp32):")
    print(f"  eager fp32 math: {max(rel(a, b) for a, b in zip(eager, ref)):.2e}")
    for mode in ("ieee", "tf32x3"):
        got = grads(x, {"FP32_PRODUCTS": mode}, bm, True)
        print(f"  {mode:7s}: {max(rel(a, b) for a, b in zip(got, ref)):.2e}", flush=True)
    for S, D in ((2048, 32), (1024, 64)):
        x = [torch.randn(8, 8, S, D, device="cuda") for _ in range(6)]
        bm = flexebt.create_ebt_block_mask(None, None, None, S, S, device="cuda")
        for mode in ("ieee", "tf32x3"):
            o = {"FP32_PRODUCTS": mode}
            t1 = triton.testing.do_bench(lambda: flexebt.flex_ebt_attention(*x, block_mask=bm, kernel_options=o),
                                         return_mode="median")
            t2 = triton.testing.do_bench(lambda: grads(x, o, bm, False), return_mode="median")
            t3 = triton.testing.do_bench(lambda: grads(x, o, bm, True), return_mode="median")
            print(f"B8 H8 S{S} D{D} {mode:7s}: fwd {t1:.3f} ms, fwd+bwd {t2:.3f} ms, +dbwd {t3:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
