"""piecewise_attention (reference backend) against the per-element float64 oracle."""

import pytest
import torch

import flexebt
from helpers import rand, rel_err, second_order
from oracles import piecewise_oracle

B, H, D = 1, 2, 8


@pytest.mark.parametrize("M,N", [(7, 7), (5, 9), (9, 6)])
@pytest.mark.parametrize("w", [0, 3, 2.5, 100])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_oracle_first_and_second_order(M, N, w, causal):
    q1, q2 = rand(B, H, M, D), rand(B, H, M, D)
    k1, k2, v = rand(B, H, N, D), rand(B, H, N, D), rand(B, H, N, D + 2)
    x = [q1, k1, q2, k2, v]
    out = flexebt.piecewise_attention(*x, dist_threshold=w, causal=causal)
    assert rel_err(out, piecewise_oracle(*x, w, causal)) < 1e-12
    f = second_order(lambda *a: flexebt.piecewise_attention(*a, dist_threshold=w, causal=causal), x)
    r = second_order(lambda *a: piecewise_oracle(*a, w, causal), x)
    for a, b in zip(f[0] + f[1], r[0] + r[1]):
        assert rel_err(a, b) < 1e-10
        assert torch.isfinite(a).all()


def test_threshold_extremes_reduce_to_one_pair():
    q1, k1, q2, k2, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(5))
    far_only = flexebt.piecewise_attention(q1, k1, q2, k2, v, 0, causal=True)  # every causal pair has dist >= 0
    near_only = flexebt.piecewise_attention(q1, k1, q2, k2, v, 10, causal=True)
    causal = flexebt.masks.causal_mask
    bm = flexebt.create_block_mask(causal, None, None, 6, 6, device="cpu")
    assert rel_err(far_only, flexebt.flex_attention(q2, k2, v, block_mask=bm)) < 1e-12
    assert rel_err(near_only, flexebt.flex_attention(q1, k1, v, block_mask=bm)) < 1e-12


def test_queries_with_no_key_give_zero():
    # M > N: P = -2, the first two queries have no causal key.
    x = [torch.randn(1, 1, S, 4, dtype=torch.float64, requires_grad=True) for S in (5, 3, 5, 3, 3)]
    out = flexebt.piecewise_attention(*x, dist_threshold=1, causal=True)
    assert torch.all(out[:, :, :2] == 0) and torch.isfinite(out).all()
    g = torch.autograd.grad(out.sum(), x)
    assert all(torch.isfinite(t).all() for t in g)


@pytest.mark.parametrize("w", [2 + 1e-12, 3 - 1e-12, 2**24 + 0.5])
@pytest.mark.parametrize("backend", ["REFERENCE", pytest.param("TRITON", marks=pytest.mark.interpreter)])
def test_threshold_just_past_an_integer(w, backend):
    """Distances are integers: ``dist >= 2 + 1e-12`` is ``dist >= 3``. A float threshold compared
    with a position tensor is rounded to the default dtype (float32: 2 + 1e-12 -> 2), so the
    backends compare with ceil(w); the region mask builders too."""
    M, N = 6, 9
    x = [torch.randn(1, 2, S, 8) for S in (M, N, M, N, N)]
    if backend == "REFERENCE":
        x = [t.double() for t in x]
    out = flexebt.piecewise_attention(*x, dist_threshold=w, kernel_options={"BACKEND": backend})
    assert rel_err(out, piecewise_oracle(*x, w)) < (1e-12 if backend == "REFERENCE" else 1e-5)
    near = flexebt.masks.generate_piecewise_near_mask(w, M, N)
    far = flexebt.masks.generate_piecewise_far_mask(w, M, N)
    m, n = torch.arange(M)[:, None], torch.arange(N)[None, :]
    dist = (N - M + m - n).tolist()
    assert near(0, 0, m, n).tolist() == [[d < w for d in row] for row in dist]
    assert far(0, 0, m, n).tolist() == [[d >= w for d in row] for row in dist]
