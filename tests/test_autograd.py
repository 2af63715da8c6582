"""gradcheck / gradgradcheck in float64 and torch.func transforms for every public function."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import flexebt
from flexebt import masks, mods


def r(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _flex_case():
    bias = r(2, 5, 6)
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, 5, 6, device="cpu", BLOCK_SIZE=2)
    sm = mods.generate_bias_score_mod(bias)
    return (lambda q, k, v, b: flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm)), \
        (r(1, 2, 5, 4), r(1, 2, 6, 4), r(1, 2, 6, 3), bias)


def _flex_softcap_gqa_case():
    sm = mods.generate_tanh_softcap(2.0)
    return (lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=sm, enable_gqa=True, return_lse=True)), \
        (r(1, 4, 5, 4), r(1, 2, 5, 4), r(1, 2, 5, 4))


def _ebt_case():
    bias = r(6, 6)
    bm = flexebt.create_ebt_block_mask(None, None, None, 5, 4, BLOCK_SIZE=2)
    sm = mods.generate_bias_score_mod(bias)
    return (lambda *a: flexebt.flex_ebt_attention(*a[:6], score_mod=sm, block_mask=bm, return_lse=True)), \
        (r(1, 2, 5, 4), r(1, 2, 5, 4), r(1, 2, 5, 4), r(1, 2, 4, 4), r(1, 2, 4, 4), r(1, 2, 4, 4), bias)


def _piecewise_case():
    return (lambda *a: flexebt.piecewise_attention(*a, dist_threshold=2, causal=True)), \
        (r(1, 1, 4, 4), r(1, 1, 6, 4), r(1, 1, 4, 4), r(1, 1, 6, 4), r(1, 1, 6, 3))


def _compat_case():
    m = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    return (lambda *a: flexebt.compat.ebt_attention(*a, attn_mask=m, causal=True)), \
        tuple(r(1, 1, 4, 4) for _ in range(6))


def _relative_bias_case():
    table = r(2, 5)
    sm = mods.generate_relative_position_bias(table, 2)
    return (lambda q, k, v, t: flexebt.flex_attention(q, k, v, score_mod=sm)), \
        (r(1, 2, 4, 4), r(1, 2, 4, 4), r(1, 2, 4, 4), table)


CASES = {"flex_bias_causal": _flex_case, "flex_softcap_gqa_lse": _flex_softcap_gqa_case, "ebt_bias_lse": _ebt_case,
         "piecewise": _piecewise_case, "compat": _compat_case, "flex_relative_bias": _relative_bias_case}


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_and_gradgradcheck(case):
    fn, inputs = CASES[case]()
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_torch_func_grad_jvp_and_hessian_vector_product():
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, 5, 5, device="cpu", BLOCK_SIZE=2)
    sm = mods.generate_alibi_bias(2)

    def energy(q):
        return flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm).pow(2).sum()

    def energy_eager(q):  # the same energy written as plain eager math
        slopes = torch.tensor([2.0 ** -4, 2.0 ** -8], dtype=torch.float64).view(1, 2, 1, 1)  # ALiBi, H = 2
        dist = (torch.arange(5).view(1, 5) - torch.arange(5).view(5, 1)).double()
        s = (q @ k.transpose(-1, -2)) * 0.5 + slopes * dist
        s = s.masked_fill(~torch.tril(torch.ones(5, 5, dtype=torch.bool)), float("-inf"))
        return (torch.softmax(s, -1) @ v).pow(2).sum()

    g = torch.func.grad(energy)(q)
    assert torch.allclose(g, torch.func.grad(energy_eager)(q), atol=1e-12)
    t = torch.randn_like(q)
    _, jv = torch.func.jvp(energy, (q,), (t,))
    assert torch.allclose(jv, (g * t).sum(), atol=1e-12)
    # Hessian-vector product two ways: forward-over-reverse and double backward.
    _, hvp = torch.func.jvp(torch.func.grad(energy), (q,), (t,))
    _, hvp_eager = torch.func.jvp(torch.func.grad(energy_eager), (q,), (t,))
    assert torch.allclose(hvp, hvp_eager, atol=1e-10)
    qq = q.clone().requires_grad_()
    gg = torch.autograd.grad(energy(qq), qq, create_graph=True)[0]
    hvp2 = torch.autograd.grad((gg * t).sum(), qq)[0]
    assert torch.allclose(hvp, hvp2, atol=1e-10)


def test_func_jvp_of_ebt_and_piecewise_outputs():
    x = [torch.randn(1, 1, 4, 4, dtype=torch.float64) for _ in range(6)]
    tx = [torch.randn_like(t) for t in x]
    bm = flexebt.create_ebt_block_mask(None, None, None, 4, 4, BLOCK_SIZE=2)
    f = lambda *a: flexebt.flex_ebt_attention(*a, block_mask=bm)[1]
    _, jv = torch.func.jvp(f, tuple(x), tuple(tx))
    eps = 1e-6
    fd = (f(*[a + eps * b for a, b in zip(x, tx)]) - f(*[a - eps * b for a, b in zip(x, tx)])) / (2 * eps)
    assert torch.allclose(jv, fd, atol=1e-7)
    p = lambda *a: flexebt.piecewise_attention(*a, dist_threshold=1)
    _, jp = torch.func.jvp(p, tuple(x[:5]), tuple(tx[:5]))
    fdp = (p(*[a + eps * b for a, b in zip(x[:5], tx)]) - p(*[a - eps * b for a, b in zip(x[:5], tx)])) / (2 * eps)
    assert torch.allclose(jp, fdp, atol=1e-7)
