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
    # ebt_flash_attention's additive mask m2 is added in base 2: p ~ exp2(s * log2(e) + m2) (its kernel
    # scales the scores by sm_scale * log2(e), adds the mask, takes exp2); passed as m2 * ln 2 it is
    # the same attention.
    m2 = torch.randn(S_o + 1, S_o + 1, dtype=torch.float64) * 3

    def base2(score, b, h, q, kv):
        return (score * math.log2(math.e) + m2[q, kv]) / math.log2(math.e)

    want = ebt_oracle(*x, score_mod=base2, mask_mod=flexebt.masks.ebt_causal_mask, scale=0.4)
    got = ebt_attention(*x, m2 * math.log(2), True, 0.4)  # ebt_flash_attention's positional order
    assert rel_err(got[0], want[0]) < 1e-12 and rel_err(got[1], want[1]) < 1e-12


def test_signature_is_ebt_flash_attentions():
    """Positional (attn_mask, causal, sm_scale) as ebt_flash_attention 0.2.0; its warp_specialize /
    USE_TMA switches are accepted (flexebt schedules its own kernels)."""
    x = _x(6, 5)
    mask = torch.tril(torch.ones(7, 7, dtype=torch.bool))
    want = ebt_attention(*x, attn_mask=mask, causal=True, sm_scale=0.3)
    for got in (ebt_attention(*x, mask, True, 0.3), ebt_attention(*x, mask, True, 0.3, False, False),
                ebt_attention(*x, attn_mask=mask, causal=True, sm_scale=0.3, warp_specialize=False, USE_TMA=False)):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(TypeError, match="attn_mask must be a tensor or None, got float"):
        ebt_attention(*x, 0.3)  # the scale where the mask goes is refused, not misread


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


@pytest.mark.parametrize("backend", ["REFERENCE", pytest.param("TRITON", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("lead", ["H", "BH"])
def test_masks_that_differ_per_head_are_not_broadcast_from_head_0(backend, lead):
    """A head whose mask keeps only its own frame and a head that keeps everything: the block
    tables follow each head's mask (whole blocks one head drops are kept for the other)."""
    S, B, H = 20, 2, 2
    x = [t.float() for t in _x(S, S, B=B, H=H)]
    F = S + 1
    m = torch.zeros(H, F, F, dtype=torch.bool)
    m[0] = torch.eye(F, dtype=torch.bool)
    m[1] = True
    mask = m if lead == "H" else m.expand(B, H, F, F).clone()
    if lead == "BH":
        mask[1, 0] = torch.ones(F, F, dtype=torch.bool).tril()  # batch 1, head 0: causal
    opts = {"BACKEND": backend}
    got = ebt_attention(*x, attn_mask=mask, kernel_options=opts)
    for b in range(B):
        for h in range(H):
            one = [t[b:b + 1, h:h + 1] for t in x]
            want = ebt_attention(*one, attn_mask=mask[h] if lead == "H" else mask[b, h], kernel_options=opts)
            assert rel_err(got[0][b:b + 1, h:h + 1], want[0]) < 1e-6 and rel_err(got[1][b:b + 1, h:h + 1], want[1]) < 1e-6


def test_additive_mask_drops_whole_tiles_and_keeps_its_gradient():
    """-inf in an additive mask becomes the block mask (tiles it drops are skipped: the block mask
    is not all-full), the finite values stay a differentiable bias."""
    S = 40
    x = _x(S, S)
    F = S + 1
    tril = torch.ones(F, F, dtype=torch.bool).tril()
    bias = (0.3 * torch.randn(F, F, dtype=torch.float64)).masked_fill(~tril, float("-inf")).requires_grad_()
    seen = []
    real = flexebt.compat.flex_ebt_attention

    def spy(*a, block_mask=None, **k):
        seen.append(block_mask)
        return real(*a, block_mask=block_mask, **k)

    flexebt.compat.flex_ebt_attention = spy
    try:
        out = ebt_attention(*x, attn_mask=bias)
    finally:
        flexebt.compat.flex_ebt_attention = real
    assert seen[0].mask_mod.__name__.startswith("frame_mask")  # the -inf part is the block mask
    # at a length of several blocks, whole blocks above the diagonal are skipped
    long_mask = torch.zeros(301, 301).masked_fill(~torch.ones(301, 301, dtype=torch.bool).tril(), float("-inf"))
    flexebt.compat.flex_ebt_attention = spy
    try:
        ebt_attention(*[rand(1, 1, 300, 8) for _ in range(6)], attn_mask=long_mask.double())
    finally:
        flexebt.compat.flex_ebt_attention = real
    dense = seen[1].observed.to_dense()
    assert 0 < dense.sum() < dense.numel()

    def mod(score, b, h, q, kv):
        return score + torch.where(tril, bias, 0.0)[q, kv]

    ref = ebt_oracle(*x, score_mod=mod, mask_mod=flexebt.masks.ebt_causal_mask)
    assert rel_err(out[0], ref[0]) < 1e-12 and rel_err(out[1], ref[1]) < 1e-12
    (g,) = torch.autograd.grad(out[1].square().sum(), bias)
    assert torch.isfinite(g).all() and (g[~tril] == 0).all() and g[tril].abs().sum() > 0


def test_gqa_lse_and_kernel_options_pass_through():
    S = 6
    x = _x(S, S, H=4)
    x[1], x[2], x[4], x[5] = (t[:, :2] for t in (x[1], x[2], x[4], x[5]))  # two key/value heads
    out_o, out_p, lse_o, lse_p = ebt_attention(*x, causal=True, enable_gqa=True, return_lse=True,
                                               kernel_options={"BACKEND": "REFERENCE"})
    bm = flexebt.create_ebt_block_mask(None, None, None, S, S)
    want = flexebt.flex_ebt_attention(*x, block_mask=bm, enable_gqa=True, return_lse=True)
    for a, b in zip((out_o, out_p, lse_o, lse_p), want):
        assert rel_err(a, b) < 1e-12
    with pytest.raises(ValueError, match="unknown kernel option|BLOCK_MM"):
        ebt_attention(*x, causal=True, enable_gqa=True, kernel_options={"BLOCK_MM": 32})


def test_no_mask_and_not_causal_warns_at_the_callers_line():
    x = _x(5, 5)
    with pytest.warns(UserWarning, match="causal=True") as w:
        out = ebt_attention(*x)
    assert w[0].filename == __file__
    ref = ebt_oracle(*x)
    assert rel_err(out[1], ref[1]) < 1e-12
