"""flex_attention (reference backend) against the independent float64 oracle and torch."""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex

import flexebt
from flexebt import masks, mods
from helpers import rand, rel_err, second_order
from oracles import attention_oracle

B, H, SQ, SKV, D = 2, 2, 11, 13, 8
TOL = 1e-12


def _bias():
    return (0.5 * torch.randn(H, SQ, SKV, dtype=torch.float64)).requires_grad_(True)


# name -> (score_mod factory, mask_mod factory); factories get the captured tensors dict.
VARIANTS = {
    "none": (lambda c: None, lambda c: None),
    "causal": (lambda c: None, lambda c: masks.causal_mask),
    "alibi": (lambda c: mods.generate_alibi_bias(H), lambda c: None),
    "softcap": (lambda c: mods.generate_tanh_softcap(1.5), lambda c: None),
    "learned_bias": (lambda c: mods.generate_bias_score_mod(c["bias"]), lambda c: None),
    "relative_bias": (lambda c: mods.generate_relative_position_bias(c["table"], 3), lambda c: None),
    "sliding_window": (lambda c: None, lambda c: masks.generate_sliding_window(3)),
    "prefix_lm": (lambda c: None, lambda c: masks.generate_prefix_lm_mask(4)),
    "document": (lambda c: None, lambda c: masks.generate_document_mask([4, 5, 4])),
    "alibi_causal": (lambda c: mods.generate_alibi_bias(H), lambda c: masks.causal_mask),
    "bias_sliding": (lambda c: mods.generate_bias_score_mod(c["bias"]), lambda c: masks.generate_sliding_window(4)),
}


def _captured():
    return {"bias": _bias(), "table": (0.3 * torch.randn(H, 7, dtype=torch.float64)).requires_grad_(True)}


def _block_mask(mask_mod, Sq=SQ, Skv=SKV, block=4):
    if mask_mod is None:
        return None
    return create_block_mask(mask_mod, None, None, Sq, Skv, device="cpu", BLOCK_SIZE=block)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_lse_and_grads_match_oracle(variant):
    cap = _captured()
    sm, mm = (f(cap) for f in VARIANTS[variant])
    q, k, v = rand(B, H, SQ, D), rand(B, H, SKV, D), rand(B, H, SKV, D + 3)
    bm = _block_mask(mm)
    extra = [cap["bias"]] if variant in ("learned_bias", "bias_sliding") else (
        [cap["table"]] if variant == "relative_bias" else [])

    out, lse = flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, return_lse=True)
    ref_out, ref_lse = attention_oracle(q, k, v, sm, mm)
    assert rel_err(out, ref_out) < TOL and rel_err(lse, ref_lse) < TOL
    assert lse.dtype == torch.float64

    inputs = [q, k, v, *extra]
    f1, f2 = second_order(lambda q, k, v, *e: flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm), inputs)
    r1, r2 = second_order(lambda q, k, v, *e: attention_oracle(q, k, v, sm, mm)[0], inputs)
    for name, a, b in zip(["q", "k", "v", "captured"], f1 + f2, r1 + r2):
        assert rel_err(a, b) < 1e-10, name
    if extra:
        assert f1[3].abs().sum() > 0 and f2[3].abs().sum() > 0  # the captured tensor really gets gradients


@pytest.mark.parametrize("variant", ["causal", "alibi", "softcap", "sliding_window", "document", "prefix_lm",
                                     "relative_bias", "learned_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_torch_flex_attention(variant, dtype):
    cap = _captured()
    sm, mm = (f(cap) for f in VARIANTS[variant])
    q, k, v = (torch.randn(B, H, S, D, dtype=dtype) for S in (SQ, SKV, SKV))
    bm = _block_mask(mm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, ref_lse = torch_flex(q, k, v, score_mod=sm, block_mask=bm, return_lse=True)
    out, lse = flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, return_lse=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel_err(out, ref) < tol and rel_err(lse, ref_lse) < tol


def test_full_blocks_skip_mask_mod_like_the_kernels():
    """A block listed as *full* is attended entirely, whatever the mask_mod says: the semantics of
    FlexAttention's compiled kernels (and flexebt's).  torch's eager CPU path differs here -- it
    evaluates mask_mod on full blocks too -- so the expectation is written out explicitly."""
    S, blk = 8, 4
    q, k, v = (torch.randn(1, 1, S, D, dtype=torch.float64) for _ in range(3))
    causal = masks.causal_mask
    # Block row 0: block 0 partial; block row 1: blocks 0 and 1 full (although causal isn't).
    bm = BlockMask.from_kv_blocks(
        kv_num_blocks=torch.tensor([[[1, 0]]], dtype=torch.int32),
        kv_indices=torch.tensor([[[[0, 0], [0, 1]]]], dtype=torch.int32),
        full_kv_num_blocks=torch.tensor([[[0, 2]]], dtype=torch.int32),
        full_kv_indices=torch.tensor([[[[0, 0], [0, 1]]]], dtype=torch.int32),
        BLOCK_SIZE=blk, mask_mod=causal, seq_lengths=(S, S))
    out = flexebt.flex_attention(q, k, v, block_mask=bm)
    expect_top = attention_oracle(q[..., :4, :], k[..., :4, :], v[..., :4, :], mask_mod=causal)[0]
    expect_bottom = attention_oracle(q[..., 4:, :], k, v)[0]  # rows 4..7 see all 8 keys
    assert rel_err(out[..., :4, :], expect_top) < 1e-12
    assert rel_err(out[..., 4:, :], expect_bottom) < 1e-12


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_first_and_second_order(Hkv):
    Hq = 4
    q, k, v = rand(1, Hq, 7, D), rand(1, Hkv, 9, D), rand(1, Hkv, 9, D)
    sm = mods.generate_alibi_bias(Hq)
    bm = _block_mask(masks.causal_mask, 7, 9, block=4)
    out = flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, enable_gqa=True)
    assert rel_err(out, attention_oracle(q, k, v, sm, masks.causal_mask)[0]) < TOL
    f = second_order(lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, enable_gqa=True),
                     [q, k, v])
    r = second_order(lambda q, k, v: attention_oracle(q, k, v, sm, masks.causal_mask)[0], [q, k, v])
    for a, b in zip(f[0] + f[1], r[0] + r[1]):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_within_spec_tolerance(dtype, tol):
    q, k, v = (torch.randn(2, 2, 33, 32) for _ in range(3))
    sm = mods.generate_tanh_softcap(5.0)
    bm = _block_mask(masks.causal_mask, 33, 33, block=16)
    ref = flexebt.flex_attention(q.double(), k.double(), v.double(), score_mod=sm, block_mask=bm)
    qd, kd, vd = (x.to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = flexebt.flex_attention(qd, kd, vd, score_mod=sm, block_mask=bm, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    # The reference rounds only inputs and the output: its error is far under the dtype's bound.
    assert rel_err(out, ref) < tol
    do = torch.randn_like(out)
    gq = torch.autograd.grad((out * do).sum(), qd)[0]
    qr = q.double().requires_grad_()
    gq_ref = torch.autograd.grad(
        (flexebt.flex_attention(qr, kd.double(), vd.double(), score_mod=sm, block_mask=bm) * do.double()).sum(), qr)[0]
    assert not torch.isnan(gq).any() and rel_err(gq, gq_ref) < 3 * tol


def test_fully_masked_rows_give_zero_and_finite_grads():
    q, k, v = rand(1, 2, 6, D), rand(1, 2, 6, D), rand(1, 2, 6, D)
    bias = (torch.randn(6, 6, dtype=torch.float64)).requires_grad_()
    sm = mods.generate_bias_score_mod(bias)

    def none_for_rows_0_2(b, h, q_idx, kv_idx):
        return (q_idx != 0) & (q_idx != 2) & (kv_idx <= q_idx)

    bm = _block_mask(none_for_rows_0_2, 6, 6, block=2)
    out, lse = flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, return_lse=True)
    assert torch.all(out[:, :, [0, 2]] == 0) and torch.all(lse[:, :, [0, 2]] == float("-inf"))
    assert torch.isfinite(lse[:, :, [1, 3, 4, 5]]).all()
    first, second = second_order(lambda q, k, v, bias: flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm),
                                 [q, k, v, bias])
    for g in first + second:
        assert torch.isfinite(g).all()
    assert torch.all(first[0][:, :, [0, 2]] == 0)
    assert torch.all(first[3][[0, 2]] == 0)
    # lse of the empty rows is -inf; its gradient stays finite too.
    glse = torch.autograd.grad(torch.where(torch.isfinite(lse), lse, 0).sum(), q)[0]
    assert torch.isfinite(glse).all()


def test_return_lse_matches_logsumexp():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    out, lse = flexebt.flex_attention(q, k, v, return_lse=True, scale=0.3)
    assert torch.allclose(lse, torch.logsumexp(q @ k.transpose(-1, -2) * 0.3, -1), atol=1e-5)
    assert torch.allclose(out, torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v, atol=1e-5)
