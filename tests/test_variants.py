"""flexebt.mods / flexebt.masks: named closures, plain PyTorch (they run in torch's own
flex_attention unchanged), attention-gym reused, and the demos run."""

import importlib
import warnings

import attn_gym
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex

import flexebt
from flexebt import masks, mods
from helpers import rel_err

S, H = 10, 2
SCORE_MODS = {
    "alibi_2heads": lambda: mods.generate_alibi_bias(H),
    "tanh_softcap_3": lambda: mods.generate_tanh_softcap(3),
    "bias_2x10x10": lambda: mods.generate_bias_score_mod(torch.randn(H, S, S)),
    "bias_10x10": lambda: mods.generate_bias_score_mod(torch.randn(S, S)),
    "bias_1x2x10x10": lambda: mods.generate_bias_score_mod(torch.randn(1, H, S, S)),
    "relative_position_bias_3": lambda: mods.generate_relative_position_bias(torch.randn(H, 7), 3),
}
MASK_MODS = {
    "causal_mask": masks.generate_causal_mask,
    "sliding_window_3": lambda: masks.generate_sliding_window(3),
    "prefix_lm_causal_mask_4": lambda: masks.generate_prefix_lm_mask(4),
    "document_causal_mask_3docs": lambda: masks.generate_document_mask([3, 3, 4]),
    "ebt_causal_mask": masks.generate_ebt_causal_mask,
    "frame_mask_10x10": lambda: masks.generate_frame_mask(torch.rand(S, S) < 0.5),
    "piecewise_near_3": lambda: masks.generate_piecewise_near_mask(3, S, S),
    "piecewise_far_3": lambda: masks.generate_piecewise_far_mask(3, S, S),
    "end_aligned_causal_10x10": lambda: masks.generate_end_aligned_causal_mask(S, S),
}


def _torch_and_ours(score_mod=None, mask_mod=None):
    q, k, v = (torch.randn(1, H, S, 8) for _ in range(3))
    bm = create_block_mask(mask_mod, None, None, S, S, device="cpu", BLOCK_SIZE=4) if mask_mod else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch_flex(q, k, v, score_mod=score_mod, block_mask=bm)
    return flexebt.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm), ref


@pytest.mark.parametrize("name", list(SCORE_MODS))
def test_score_mods_are_named_and_run_in_torch_flex(name):
    mod = SCORE_MODS[name]()
    assert mod.__name__ == name
    ours, ref = _torch_and_ours(score_mod=mod)
    assert rel_err(ours, ref) < 1e-5


@pytest.mark.parametrize("name", list(MASK_MODS))
def test_mask_mods_are_named_and_run_in_torch_flex(name):
    mod = MASK_MODS[name]()
    assert mod.__name__ == name
    ours, ref = _torch_and_ours(mask_mod=mod)
    if name == "piecewise_far_3":  # rows 0..2 keep no key: torch's eager path returns 0 there too
        assert torch.all(ours[:, :, :3] == 0)
    assert rel_err(ours, ref) < 1e-5


def test_attention_gym_builders_are_reused():
    assert masks.causal_mask is attn_gym.masks.causal_mask
    b = h = torch.tensor(0)
    q, kv = torch.arange(9).view(9, 1), torch.arange(9).view(1, 9)
    pairs = [(masks.generate_sliding_window(2), attn_gym.masks.generate_sliding_window(2)),
             (masks.generate_prefix_lm_mask(3), attn_gym.masks.generate_prefix_lm_mask(3))]
    for ours, theirs in pairs:
        assert torch.equal(ours(b, h, q, kv), theirs(b, h, q, kv))
    s = torch.randn(9, 9)
    assert torch.equal(mods.generate_alibi_bias(4)(s, b, h, q, kv), attn_gym.mods.generate_alibi_bias(4)(s, b, h, q, kv))


def test_document_mask_accepts_empty_documents():
    """An empty document (a repeated offset, a zero length) is legal in a packed batch, as in
    attention-gym: the mask equals attention-gym's and the one without the empty document."""
    from attn_gym.masks.document_mask import generate_doc_mask_mod as gym_doc

    b = h = torch.tensor(0)
    q, kv = torch.arange(12).view(12, 1), torch.arange(12).view(1, 12)
    with_empty = torch.tensor([0, 0, 5, 5, 12])
    ours = masks.generate_doc_mask_mod(masks.causal_mask, with_empty)(b, h, q, kv)
    assert torch.equal(ours, gym_doc(masks.causal_mask, with_empty)(b, h, q, kv))
    assert torch.equal(ours, masks.generate_doc_mask_mod(masks.causal_mask, torch.tensor([0, 5, 12]))(b, h, q, kv))
    assert torch.equal(masks.generate_document_mask([5, 0, 7])(b, h, q, kv),
                       masks.generate_document_mask([5, 7])(b, h, q, kv))


@pytest.mark.parametrize("module", ["mods.alibi", "mods.softcap", "mods.bias", "mods.relative_bias", "masks.causal",
                                    "masks.sliding_window", "masks.prefix_lm", "masks.document", "masks.ebt",
                                    "masks.piecewise"])
def test_demo_runs(module, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        importlib.import_module(f"flexebt.{module}").main()
    out = capsys.readouterr().out
    assert out.strip()
    if "flexebt - torch" in out:
        assert float(out.rsplit("=", 1)[1]) < 1e-5


def test_readme_and_docstring_examples():
    import doctest

    import flexebt.api
    import flexebt.blockmask
    import flexebt.compat
    import flexebt.masks.document
    import flexebt.mods.bias

    for m in (flexebt.api, flexebt.blockmask, flexebt.compat, flexebt.mods.alibi, flexebt.mods.bias,
              flexebt.mods.softcap, flexebt.mods.relative_bias, flexebt.masks.causal, flexebt.masks.document,
              flexebt.masks.ebt, flexebt.masks.piecewise, flexebt.masks.prefix_lm, flexebt.masks.sliding_window):
        res = doctest.testmod(m, verbose=False)
        assert res.failed == 0, m.__name__
