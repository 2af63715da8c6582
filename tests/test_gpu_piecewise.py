"""Piecewise attention on CUDA at real sizes vs the float64 reference (pytest -m gpu)."""

import pytest
import torch

import flexebt
from helpers import rel_err

pytestmark = pytest.mark.gpu
T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("M,N,w,causal", [(700, 700, 90, True), (500, 900, 0, True), (640, 640, 5000, False)])
def test_piecewise_second_order_cuda(M, N, w, causal, dtype, tol):
    x0 = [torch.randn(2, 4, S, 64, device="cuda") for S in (M, N, M, N, N)]

    def grads(xd, backend):
        x = [t.to(xd).requires_grad_() for t in x0]
        out = flexebt.piecewise_attention(*x, dist_threshold=w, causal=causal, kernel_options=backend)
        g = torch.autograd.grad(out.float().square().sum(), x, create_graph=True)
        return [out] + list(g) + list(torch.autograd.grad(sum((t.float() ** 2).sum() for t in g), x))

    for a, b in zip(grads(dtype, T), grads(torch.float64, R)):
        assert rel_err(a, b) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("D,M,N,w,causal", [(128, 1500, 1500, 190, True), (64, 1000, 1300, 300, False)])
def test_piecewise_first_order_cuda(D, M, N, w, causal, dtype, tol):
    """The fused first-order path (merged forward, each pass's backward with the merged out/lse)."""
    x0 = [torch.randn(2, 4, S, D, device="cuda") for S in (M, N, M, N, N)]
    do = torch.randn(2, 4, M, D, device="cuda")

    def grads(xd, backend):
        x = [t.to(xd).requires_grad_() for t in x0]
        out = flexebt.piecewise_attention(*x, dist_threshold=w, causal=causal, kernel_options=backend)
        return [out] + list(torch.autograd.grad(out, x, do.to(xd)))

    for a, b in zip(grads(dtype, T), grads(torch.float64, R)):
        assert rel_err(a, b) < tol
