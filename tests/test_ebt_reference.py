"""flex_ebt_attention (reference backend) against independent oracles of the two-stream semantics."""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex

import flexebt
from flexebt import masks, mods
from helpers import rand, rel_err, second_order
from oracles import ebt_oracle, ebt_slicing_formula

B, H, D = 2, 2, 8
TOL = 1e-12


def _streams(S_o, S_p, Hkv=H, Hq=H, Dv=D, dtype=torch.float64):
    return [rand(B, Hq, S_o, D, dtype=dtype), rand(B, Hkv, S_o, D, dtype=dtype), rand(B, Hkv, S_o, Dv, dtype=dtype),
            rand(B, Hq, S_p, D, dtype=dtype), rand(B, Hkv, S_p, D, dtype=dtype), rand(B, Hkv, S_p, Dv, dtype=dtype)]


def _random_frame_mask(F, p=0.6):
    m = torch.rand(F, F) < p
    m[3] = False  # frame row 3 keeps nothing: a fully masked row in whichever stream holds it
    return masks.generate_frame_mask(m)


MASKS = {
    "none": lambda F: None,
    "causal": lambda F: masks.ebt_causal_mask,
    "sliding_window": lambda F: masks.generate_sliding_window(3),
    "random": _random_frame_mask,
}
MODS = {
    "none": lambda c: None,
    "alibi": lambda c: mods.generate_alibi_bias(H),
    "softcap": lambda c: mods.generate_tanh_softcap(1.5),
    "frame_bias": lambda c: mods.generate_bias_score_mod(c),
}


# Every mask without a mod, and every mod under the causal and the random frame masks.
COMBOS = [(m, "none") for m in MASKS] + [(m, s) for m in ("causal", "random") for s in MODS if s != "none"]


@pytest.mark.parametrize("r", [0, 1, 3])
@pytest.mark.parametrize("mask,mod", COMBOS, ids=[f"{m}-{s}" for m, s in COMBOS])
def test_matches_oracle_first_and_second_order(r, mask, mod):
    S_p = 5
    S_o = S_p + r
    F = S_o + 1
    bias = (0.5 * torch.randn(F, F, dtype=torch.float64)).requires_grad_()
    mm, sm = MASKS[mask](F), MODS[mod](bias)
    bm = None if mm is None else flexebt.create_ebt_block_mask(mm, None, None, S_o, S_p, BLOCK_SIZE=2)
    x = _streams(S_o, S_p)
    out_o, out_p, lse_o, lse_p = flexebt.flex_ebt_attention(*x, score_mod=sm, block_mask=bm, return_lse=True)
    ref = ebt_oracle(*x, score_mod=sm, mask_mod=mm)
    for a, b in zip((out_o, out_p, lse_o, lse_p), ref):
        assert rel_err(a, b) < TOL
    inputs = x + ([bias] if mod == "frame_bias" else [])
    f1, f2 = second_order(lambda *a: flexebt.flex_ebt_attention(*a[:6], score_mod=sm, block_mask=bm), inputs)
    r1, r2 = second_order(lambda *a: ebt_oracle(*a[:6], score_mod=sm, mask_mod=mm)[:2], inputs)
    for i, (a, b) in enumerate(zip(f1 + f2, r1 + r2)):
        assert rel_err(a, b) < 1e-10, i
        assert torch.isfinite(a).all()
    if mod == "frame_bias":
        assert f1[-1].abs().sum() > 0 and f2[-1].abs().sum() > 0


@pytest.mark.parametrize("r", [0, 1])
def test_equals_ebt_reference_code_slicing(r):
    """r = 0: ar_ebt_default; r = 1: ar_ebt_time_embed (observed stream has a leading time token)."""
    S_p = 7
    S_o = S_p + r
    F = S_o + 1
    x = _streams(S_o, S_p)
    causal_additive = torch.zeros(F, F, dtype=torch.float64).masked_fill(
        ~torch.tril(torch.ones(F, F, dtype=torch.bool)), float("-inf"))
    bm = flexebt.create_ebt_block_mask(None, None, None, S_o, S_p, BLOCK_SIZE=4)
    f1, f2 = second_order(lambda *a: flexebt.flex_ebt_attention(*a, block_mask=bm), x)
    r1, r2 = second_order(lambda *a: ebt_slicing_formula(*a, causal_additive), x)
    out = flexebt.flex_ebt_attention(*x, block_mask=bm)
    ref = ebt_slicing_formula(*x, causal_additive)
    assert rel_err(out[0], ref[0]) < TOL and rel_err(out[1], ref[1]) < TOL
    for a, b in zip(f1 + f2, r1 + r2):
        assert rel_err(a, b) < 1e-10


def _concat_mask_and_mod(S_o, S_p, mask_mod, score_mod):
    """One flex_attention over [observed; predicted] encoding the two-stream structure (a test oracle)."""
    r = S_o - S_p

    def frame(c):
        return torch.where(c < S_o, c, c - S_o + r + 1)

    def concat_mask(b, h, q, kv):
        fq, fk = frame(q), frame(kv)
        user = mask_mod(b, h, fq, fk) if mask_mod is not None else (q >= 0)
        obs_q, obs_kv = q < S_o, kv < S_o
        observed_row = obs_q & obs_kv
        predicted_row = (~obs_q) & ((obs_kv & (fk != fq)) | (kv == q))
        return user & (observed_row | predicted_row)

    def concat_mod(score, b, h, q, kv):
        return score_mod(score, b, h, frame(q), frame(kv)) if score_mod is not None else score

    return concat_mask, concat_mod


@pytest.mark.parametrize("r", [0, 2])
@pytest.mark.parametrize("mask", ["none", "causal", "sliding_window"])
def test_equals_flex_attention_over_concatenated_streams(r, mask):
    S_p = 9
    S_o = S_p + r
    mm = MASKS[mask](S_o + 1)
    sm = mods.generate_alibi_bias(H)
    x = [t.detach() for t in _streams(S_o, S_p)]
    concat_mask, concat_mod = _concat_mask_and_mod(S_o, S_p, mm, sm)
    cat = [torch.cat([x[i], x[i + 3]], dim=2) for i in range(3)]
    bm_cat = create_block_mask(concat_mask, None, None, S_o + S_p, S_o + S_p, device="cpu", BLOCK_SIZE=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch_flex(*cat, score_mod=concat_mod, block_mask=bm_cat)
    bm = None if mm is None else flexebt.create_ebt_block_mask(mm, None, None, S_o, S_p, BLOCK_SIZE=4)
    out_o, out_p = flexebt.flex_ebt_attention(*x, score_mod=sm, block_mask=bm)
    assert rel_err(torch.cat([out_o, out_p], dim=2), ref) < TOL


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa(Hkv):
    x = _streams(7, 6, Hkv=Hkv, Hq=4, Dv=5)
    bm = flexebt.create_ebt_block_mask(None, None, 4, 7, 6, BLOCK_SIZE=4)
    sm = mods.generate_alibi_bias(4)
    out = flexebt.flex_ebt_attention(*x, score_mod=sm, block_mask=bm, enable_gqa=True)
    ref = ebt_oracle(*x, score_mod=sm, mask_mod=masks.ebt_causal_mask)
    assert out[1].shape == (B, 4, 6, 5)
    assert rel_err(out[0], ref[0]) < TOL and rel_err(out[1], ref[1]) < TOL
    f = second_order(lambda *a: flexebt.flex_ebt_attention(*a, score_mod=sm, block_mask=bm, enable_gqa=True), x)
    g = second_order(lambda *a: ebt_oracle(*a, score_mod=sm, mask_mod=masks.ebt_causal_mask)[:2], x)
    for a, b in zip(f[0] + f[1], g[0] + g[1]):
        assert rel_err(a, b) < 1e-10


def test_fully_masked_rows_zero_output_neg_inf_lse_finite_grads():
    S_o = S_p = 5

    def drop_frames_2_and_4(b, h, q, kv):  # frame 2 = observed row 2 and predicted row 1
        return (q != 2) & (q != 4) & (q >= kv)

    bm = flexebt.create_ebt_block_mask(drop_frames_2_and_4, None, None, S_o, S_p, BLOCK_SIZE=2)
    x = _streams(S_o, S_p)
    out_o, out_p, lse_o, lse_p = flexebt.flex_ebt_attention(*x, block_mask=bm, return_lse=True)
    assert torch.all(out_o[:, :, [2, 4]] == 0) and torch.all(out_p[:, :, [1, 3]] == 0)
    assert torch.all(lse_o[:, :, [2, 4]] == float("-inf")) and torch.all(lse_p[:, :, [1, 3]] == float("-inf"))
    first, second = second_order(lambda *a: flexebt.flex_ebt_attention(*a, block_mask=bm), x)
    for g in first + second:
        assert torch.isfinite(g).all()
    assert torch.all(first[0][:, :, [2, 4]] == 0) and torch.all(first[3][:, :, [1, 3]] == 0)


def test_block_mask_none_means_causal_and_structure():
    bm = flexebt.create_ebt_block_mask(None, 1, 1, 4, 3, BLOCK_SIZE=2)
    dense = bm.to_dense_frame().int()
    # r = 1: predicted i sits at frame i + 2, sees observed 0..i+1 and itself.
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 1, 1, 0, 0, 1, 0],
        [1, 1, 1, 1, 0, 0, 1]], dtype=torch.int32)
    assert torch.equal(dense, expected)
    assert bm.offset == 1 and "S_obs=4" in repr(bm)


def test_block_mask_none_in_attention_means_structure_only():
    """None is the bare structure (every frame pair, later frames included), and says so at the
    calling line; the same structure asked for explicitly (noop_mask) gives the same values
    silently; the causal mask differs."""
    from torch.nn.attention.flex_attention import noop_mask

    x = _streams(6, 4)
    with pytest.warns(UserWarning, match=r"block_mask=None keeps every frame pair.*not causal.*ebt_causal_mask") as w:
        out = flexebt.flex_ebt_attention(*x)
    assert w[0].filename == __file__  # attributed to the caller's line
    ref = ebt_oracle(*x)
    assert rel_err(out[0], ref[0]) < TOL and rel_err(out[1], ref[1]) < TOL
    full = flexebt.create_ebt_block_mask(noop_mask, None, None, 6, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = flexebt.flex_ebt_attention(*x, block_mask=full)
        causal = flexebt.flex_ebt_attention(*x, block_mask=flexebt.create_ebt_block_mask(masks.ebt_causal_mask, None,
                                                                                         None, 6, 4))
    assert rel_err(explicit[1], out[1]) < TOL and rel_err(causal[1], out[1]) > 1e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision(dtype, tol):
    x = [t.detach() for t in _streams(21, 19)]
    bm = flexebt.create_ebt_block_mask(None, None, None, 21, 19, BLOCK_SIZE=8)
    ref = flexebt.flex_ebt_attention(*x, block_mask=bm)
    out = flexebt.flex_ebt_attention(*[t.to(dtype) for t in x], block_mask=bm, return_lse=True)
    assert out[0].dtype == dtype and out[2].dtype == torch.float32
    assert rel_err(out[0], ref[0]) < tol and rel_err(out[1], ref[1]) < tol
