"""The closed-form double backward (the derivation in flexebt/reference/double_backward.py) equals
autograd's double backward of the reference attention in float64 -- the spec of the fused kernels."""

import pytest
import torch

import flexebt
from flexebt import masks, mods
from flexebt.reference.double_backward import attention_double_backward
from flexebt.reference.flex import flex_attention_reference
from helpers import rel_err

CASES = {
    "plain": (None, None),
    "causal": (None, masks.causal_mask),
    "softcap_causal": (mods.generate_tanh_softcap(1.5), masks.causal_mask),
    "alibi_window": (mods.generate_alibi_bias(2), masks.generate_sliding_window(3)),
}


@pytest.mark.parametrize("with_dlse", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_closed_form_matches_autograd(case, with_dlse):
    sm, mm = CASES[case]
    B, H, Sq, Skv, D = 1, 2, 9, 11, 6
    bm = flexebt.create_block_mask(mm, None, None, Sq, Skv, device="cpu", BLOCK_SIZE=4) if mm else None
    r = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, H, Sq, D).requires_grad_(), r(B, H, Skv, D).requires_grad_(), r(B, H, Skv, D).requires_grad_()
    do = r(B, H, Sq, D).requires_grad_()
    dlse = r(B, H, Sq).requires_grad_() if with_dlse else None
    gq, gk, gv = r(B, H, Sq, D), r(B, H, Skv, D), r(B, H, Skv, D)

    out, lse = flex_attention_reference(q, k, v, sm, bm, None)
    outs, cts = [out], [do]
    if with_dlse:
        finite = torch.isfinite(lse)
        outs.append(torch.where(finite, lse, 0))
        cts.append(dlse)
    dq, dk, dv = torch.autograd.grad(outs, [q, k, v], cts, create_graph=True)
    targets = [q, k, v, do] + ([dlse] if with_dlse else [])
    want = torch.autograd.grad([dq, dk, dv], targets, [gq, gk, gv], allow_unused=True)
    got = attention_double_backward(q.detach(), k.detach(), v.detach(), do.detach(),
                                    dlse.detach() if with_dlse else None, gq, gk, gv, sm, bm)
    for name, a, b in zip(["g_q", "g_k", "g_v", "g_do", "g_dlse"], got, want):
        b = torch.zeros_like(a) if b is None else b
        assert rel_err(a, b) < 1e-10, name
