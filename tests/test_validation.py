"""Every documented input constraint raises a clear ValueError / TypeError (never assert/IndexError)."""

import pytest
import torch

import flexebt
from flexebt import masks


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def flex(**over):
    args = dict(query=t(1, 2, 8, 16), key=t(1, 2, 8, 16), value=t(1, 2, 8, 16))
    args.update(over)
    return flexebt.flex_attention(**args)


def ebt(S_o=6, S_p=6, **over):
    names = ["q_o", "k_o", "v_o", "q_p", "k_p", "v_p"]
    args = {n: t(1, 2, S_o if n.endswith("_o") else S_p, 16) for n in names}
    args.update(over)
    return flexebt.flex_ebt_attention(**args)


FLEX_CASES = {
    "rank": (dict(query=t(2, 8, 16)), ValueError, "4 dimensions"),
    "dtype_mismatch": (dict(key=t(1, 2, 8, 16, dtype=torch.float64)), ValueError, "dtype"),
    "integer_dtype": (dict(query=torch.ones(1, 2, 8, 16, dtype=torch.int64)), TypeError, "dtype"),
    "not_a_tensor": (dict(value=[1, 2]), TypeError, "torch.Tensor"),
    "head_dim": (dict(key=t(1, 2, 8, 32)), ValueError, "head dim"),
    "batch": (dict(key=t(2, 2, 8, 16), value=t(2, 2, 8, 16)), ValueError, "batch"),
    "kv_length": (dict(value=t(1, 2, 9, 16)), ValueError, "positions"),
    "heads_without_gqa": (dict(key=t(1, 1, 8, 16), value=t(1, 1, 8, 16)), ValueError, "enable_gqa"),
    "gqa_divisibility": (dict(query=t(1, 3, 8, 16), enable_gqa=True), ValueError, "multiple"),
    "kv_heads_differ": (dict(value=t(1, 1, 8, 16)), ValueError, "heads"),
    "block_mask_lengths": (dict(block_mask=flexebt.create_block_mask(masks.causal_mask, None, None, 16, 16,
                                                                     device="cpu")), ValueError, "built for"),
    "block_mask_heads": (dict(block_mask=flexebt.create_block_mask(masks.causal_mask, None, 3, 8, 8, device="cpu")),
                         ValueError, "H=3"),
    "block_mask_type": (dict(block_mask=torch.ones(8, 8)), TypeError, "BlockMask"),
    "score_mod_type": (dict(score_mod=3), TypeError, "callable"),
    "scale_type": (dict(scale="big"), TypeError, "scale"),
    "unknown_backend": (dict(kernel_options={"BACKEND": "CUDNN"}), ValueError, "Unknown backend"),
    "kernel_options_type": (dict(kernel_options="TRITON"), TypeError, "kernel_options"),
}


@pytest.mark.parametrize("case", list(FLEX_CASES))
def test_flex_attention_errors(case):
    over, exc, msg = FLEX_CASES[case]
    with pytest.raises(exc, match=msg):
        flex(**over)


def test_device_mismatch():
    meta = torch.empty(1, 2, 8, 16, device="meta")
    with pytest.raises(ValueError, match="device"):
        flex(key=meta)


EBT_CASES = {
    "predicted_longer": (dict(S_o=4, S_p=6), ValueError, "longer"),
    "q_o_rank": (dict(q_o=t(2, 6, 16)), ValueError, "4 dimensions"),
    "stream_head_dim": (dict(q_p=t(1, 2, 6, 32), k_p=t(1, 2, 6, 32)), ValueError, "head dims"),
    "stream_heads": (dict(q_p=t(1, 4, 6, 16)), ValueError, "heads"),
    "observed_lengths": (dict(k_o=t(1, 2, 7, 16), v_o=t(1, 2, 7, 16)), ValueError, "positions"),
    "predicted_lengths": (dict(k_p=t(1, 2, 5, 16), v_p=t(1, 2, 5, 16)), ValueError, "positions"),
    "batch": (dict(v_p=t(2, 2, 6, 16)), ValueError, "batch"),
    "gqa_needed": (dict(k_o=t(1, 1, 6, 16), v_o=t(1, 1, 6, 16), k_p=t(1, 1, 6, 16), v_p=t(1, 1, 6, 16)),
                   ValueError, "enable_gqa"),
    "block_mask_lengths": (dict(block_mask=flexebt.create_ebt_block_mask(None, None, None, 6, 5)), ValueError,
                           "built for"),
    "torch_block_mask": (dict(block_mask=flexebt.create_block_mask(masks.causal_mask, None, None, 7, 7,
                                                                   device="cpu")), TypeError, "create_ebt_block_mask"),
    "block_mask_type": (dict(block_mask="causal"), TypeError, "EBTBlockMask"),
    "block_mask_batch": (dict(block_mask=flexebt.create_ebt_block_mask(None, 3, None, 6, 6)), ValueError, "B=3"),
}


@pytest.mark.parametrize("case", list(EBT_CASES))
def test_flex_ebt_attention_errors(case):
    over, exc, msg = EBT_CASES[case]
    with pytest.raises(exc, match=msg):
        ebt(**over)


@pytest.mark.parametrize("args,exc,msg", [
    (dict(mask_mod=None, B=None, H=None, S_obs=4, S_pred=5), ValueError, "longer"),
    (dict(mask_mod=None, B=None, H=None, S_obs=0, S_pred=0), ValueError, "positive"),
    (dict(mask_mod=None, B=0, H=None, S_obs=4, S_pred=4), ValueError, "positive"),
    (dict(mask_mod="causal", B=None, H=None, S_obs=4, S_pred=4), TypeError, "callable"),
])
def test_create_ebt_block_mask_errors(args, exc, msg):
    with pytest.raises(exc, match=msg):
        flexebt.create_ebt_block_mask(**args)


def pw(**over):
    args = dict(q1=t(1, 2, 6, 16), k1=t(1, 2, 8, 16), q2=t(1, 2, 6, 16), k2=t(1, 2, 8, 16), v=t(1, 2, 8, 16),
                dist_threshold=3)
    args.update(over)
    return flexebt.piecewise_attention(**args)


@pytest.mark.parametrize("over,exc,msg", [
    (dict(dist_threshold=-1), ValueError, ">= 0"),
    (dict(dist_threshold="far"), TypeError, "number"),
    (dict(q2=t(1, 2, 5, 16)), ValueError, "must match"),
    (dict(k2=t(1, 2, 8, 8)), ValueError, "must match"),
    (dict(v=t(1, 2, 7, 16)), ValueError, "positions"),
    (dict(q1=t(1, 2, 6, 8), q2=t(1, 2, 6, 8)), ValueError, "head dim"),
    (dict(v=t(1, 2, 8, 16, dtype=torch.float16)), ValueError, "dtype"),
])
def test_piecewise_errors(over, exc, msg):
    with pytest.raises(exc, match=msg):
        pw(**over)


@pytest.mark.parametrize("bad", [lambda: flexebt.mods.generate_bias_score_mod(torch.zeros(5)),
                                 lambda: flexebt.mods.generate_relative_position_bias(torch.zeros(2, 4), 2),
                                 lambda: flexebt.mods.generate_relative_position_bias(torch.zeros(2, 5), -1),
                                 lambda: flexebt.masks.generate_frame_mask(torch.zeros(4, 4)),
                                 lambda: flexebt.masks.generate_document_mask([3, 0])])
def test_builder_errors(bad):
    with pytest.raises(ValueError):
        bad()
