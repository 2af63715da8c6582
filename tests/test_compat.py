"""flexebt.compat.ebt_attention: ebt_flash_attention's call on flexebt."""

import math

import pytest
import torch

import flexebt
from flexebt.compat import ebt_attention
from helpers import rand, rel_err, second_order
from oracles import ebt_oracle, ebt_slicing_formula


def _x(S_o, S_p, B=1, H=2, D=8):
    return [rand(B, H, S, D) for S in (S_o, S_o, S_o, S_p, S_p, S_p)]


def test_bool_causal_mask_equals_reference_code():
    S = 6
    x = _x(S, S)
    tril = torch.tril(torch.ones(S + 1, S + 1, dtype=torch.bool))
    additive = torch.zeros(S + 1, S + 1, dtype=torch.float64).masked_fill(~tril, float("-inf"))
    ref = ebt_slicing_formula(*x, additive)
    for kwargs in ({"attn_mask": tril, "causal": True}, {"attn_mask": tril}, {"causal": True},
                   {"attn_mask": additive}):
        out = ebt_attention(*x, **kwargs)
        assert rel_err(out[0], ref[0]) < 1e-12 and rel_err(out[1], ref[1]) < 1e-12, kwargs


def test_additive_mask_is_natural_log_and_causal_ands():
    S_o, S_p = 7, 5
    x = _x(S_o, S_p)
    bias = torch.randn(S_o + 1, S_o + 1, dtype=torch.float64)
    out = ebt_attention(*x, attn_mask=bias, causal=True, sm_scale=0.4)

    def mod(score, b, h, q, kv):
        return score + bias[q, kv]

    ref = ebt_oracle(*x, score_mod=mod, mask_mod=flexebt.masks.ebt_causal_mask, scale=0.4)
    assert rel_err(out[0], ref[0]) < 1e-12 and rel_err(out[1], ref[1]) < 1e-12
    # ebt_flash_attention's base-2 additive mask is recovered by multiplying with ln 2.
    assert rel_err(ebt_attention(*x, attn_mask=bias / math.log2(math.e) * math.log2(math.e), causal=True,
                                 sm_scale=0.4)[1], out[1]) < 1e-12


def test_bool_mask_with_head_dim_and_second_order():
    S = 5
    x = _x(S, S, H=2)
    m = torch.rand(2, S + 1, S + 1) < 0.7
    out = ebt_attention(*x, attn_mask=m)

    def mask_mod(b, h, q, kv):
        return m[h, q, kv]

    ref = ebt_oracle(*x, mask_mod=mask_mod)
    assert rel_err(out[0], ref[0]) < 1e-12 and rel_err(out[1], ref[1]) < 1e-12
    f = second_order(lambda *a: ebt_attention(*a, attn_mask=m), x)
    r = second_order(lambda *a: ebt_oracle(*a, mask_mod=mask_mod)[:2], x)
    for a, b in zip(f[0] + f[1], r[0] + r[1]):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("shape", [(6, 6), (8, 7), (3, 7, 7), (7,)])
def test_bad_mask_sizes_raise(shape):
    x = _x(6, 6)  # frame is 7 x 7; heads = 2
    with pytest.raises(ValueError, match="attn_mask"):
        ebt_attention(*x, attn_mask=torch.zeros(shape, dtype=torch.bool))


def test_bad_mask_dtype_raises():
    with pytest.raises(TypeError, match="bool or floating"):
        ebt_attention(*_x(4, 4), attn_mask=torch.zeros(5, 5, dtype=torch.int64))
