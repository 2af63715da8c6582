"""Fused double backward on CUDA at real sizes vs the float64 reference, and memory linear in S
(pytest -m gpu)."""

import pytest
import torch

import flexebt
from flexebt import masks, mods
from helpers import rel_err

pytestmark = pytest.mark.gpu
T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("mod", ["none", "softcap"])
@pytest.mark.parametrize("dq_atomic", [0, 1])
def test_second_order_cuda(mod, dtype, tol, dq_atomic):
    """With and without g_q added by the g_k/g_v pass (one bulk reduce-add per tile through a
    tensor descriptor on Hopper); S = 600 leaves a partial last tile."""
    S, D = 600, 64
    sm = mods.generate_tanh_softcap(20.0) if mod == "softcap" else None
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cuda")
    x0 = [torch.randn(2, 4, S, D, device="cuda") for _ in range(3)]

    def grads(xd, backend):
        x = [t.to(xd).requires_grad_() for t in x0]
        out = flexebt.flex_attention(*x, score_mod=sm, block_mask=bm, kernel_options=backend)
        g = torch.autograd.grad(out.float().square().sum(), x, create_graph=True)
        return torch.autograd.grad(sum((t.float() ** 2).sum() for t in g), x)

    for a, b in zip(grads(dtype, {**T, "DBWD_DQ_ATOMIC": dq_atomic}), grads(torch.float64, R)):
        assert rel_err(a, b) < tol


def test_double_backward_memory_is_linear_in_S():
    peaks = []
    for S in (2048, 4096):
        x = [torch.randn(1, 8, S, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = flexebt.flex_attention(*x, block_mask=bm)
        g = torch.autograd.grad(out.float().square().sum(), x, create_graph=True)
        torch.autograd.grad(sum((t.float() ** 2).sum() for t in g), x)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    assert peaks[1] < 2.5 * peaks[0]  # linear: ~2x; an S x S tensor would be ~4x


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_jvp_cuda(dtype, tol):
    S = 700
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cuda")
    sm = mods.generate_tanh_softcap(20.0)
    x = tuple(torch.randn(2, 4, S, 64, device="cuda") for _ in range(3))
    t = tuple(torch.randn_like(a) for a in x)

    def f(backend):
        return lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, kernel_options=backend)

    _, got = torch.func.jvp(f(T), tuple(a.to(dtype) for a in x), tuple(a.to(dtype) for a in t))
    _, want = torch.func.jvp(f(R), tuple(a.double() for a in x), tuple(a.double() for a in t))
    assert rel_err(got, want) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_second_order_learned_bias_cuda(dtype, tol):
    """A learned bias through the fused double backward: gradients of q, k, v and of the bias."""
    S, D, H = 520, 64, 4
    bias0 = 0.3 * torch.randn(H, S, S, device="cuda")
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cuda")
    x0 = [torch.randn(2, H, S, D, device="cuda") for _ in range(3)]

    def grads(xd, backend):
        x = [t.to(xd).requires_grad_() for t in x0]
        bias = bias0.to(xd).requires_grad_()
        sm = mods.generate_bias_score_mod(bias)
        out = flexebt.flex_attention(*x, score_mod=sm, block_mask=bm, kernel_options=backend)
        g = torch.autograd.grad(out.float().square().sum(), x + [bias], create_graph=True)
        return torch.autograd.grad(sum((t.float() ** 2).sum() for t in g), x + [bias])

    for a, b in zip(grads(dtype, T), grads(torch.float64, R)):
        assert rel_err(a, b) < tol
