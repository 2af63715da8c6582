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
