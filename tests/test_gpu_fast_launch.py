"""The fast re-launch path on the GPU (kernels/launcher.py, design D45): repeated calls, whose
launches skip Triton's binding, give the same results as calls through ``kernel[grid]``, for
every kernel family (first order, double backward, JVP, EBT, captured-tensor gradients, GQA,
TMA and pointer loads, odd lengths).  (pytest -m gpu)"""

import pytest
import torch
import torch.func

import flexebt
import flexebt.kernels.flex as kf
from flexebt import masks, mods
from flexebt.kernels.launcher import FastLaunches
from helpers import rel_err

pytestmark = pytest.mark.gpu


def _flex(x0, bias):
    x = [t.clone().requires_grad_() for t in x0]
    b = bias.clone().requires_grad_()

    def sm(score, bb, h, q, kv):
        return score + b[h, q, kv]

    bm = flexebt.create_block_mask(masks.causal_mask, None, None, x0[0].shape[2], x0[1].shape[2], device="cuda")
    out = flexebt.flex_attention(*x, score_mod=sm, block_mask=bm, enable_gqa=True)
    g = torch.autograd.grad(out.float().square().sum(), [*x, b], create_graph=True)
    gg = torch.autograd.grad(sum((t.float() ** 2).sum() for t in g[:3]), x)
    return (out, *g, *gg)


def _plain(x0):
    x = [t.clone().requires_grad_() for t in x0]
    sm = mods.generate_tanh_softcap(20.0)
    out = flexebt.flex_attention(*x, score_mod=sm)
    t = [0.5 * a.flip(-1) for a in x0]  # the same tangents in every call
    _, jv = torch.func.jvp(lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=sm), tuple(x0), tuple(t))
    return (out, *torch.autograd.grad(out.float().sum(), x), jv)


def _ebt(x0):
    x = [t.clone().requires_grad_() for t in x0]
    S = x0[0].shape[2]
    bm = flexebt.create_ebt_block_mask(None, None, None, S, S, device="cuda")
    o, p = flexebt.flex_ebt_attention(*x, block_mask=bm)
    g = torch.autograd.grad(o.float().square().sum() + p.float().square().sum(), x, create_graph=True)
    gg = torch.autograd.grad(sum((t.float() ** 2).sum() for t in g), x)
    return (o, p, *g, *gg)


def _case(name):
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    gqa = [torch.randn(2, 4, 300, 64, **bf), torch.randn(2, 2, 277, 64, **bf), torch.randn(2, 2, 277, 64, **bf)]
    bias = 0.1 * torch.randn(4, 300, 277, device="cuda")
    d128 = [torch.randn(1, 3, 517, 128, **bf) for _ in range(3)]
    fp32 = [torch.randn(1, 2, 200, 32, device="cuda") for _ in range(3)]
    ebt = [torch.randn(1, 4, 257, 64, **bf) for _ in range(6)]
    return {"flex_gqa_bias": lambda: _flex(gqa, bias), "plain_d128_jvp": lambda: _plain(d128),
            "plain_fp32": lambda: _plain(fp32), "ebt": lambda: _ebt(ebt)}[name]


@pytest.mark.parametrize("name,tma", [("flex_gqa_bias", False), ("flex_gqa_bias", True), ("plain_d128_jvp", False),
                                      ("plain_d128_jvp", True), ("plain_fp32", False), ("ebt", False), ("ebt", True)])
def test_fast_relaunch_matches_triton_launch(name, tma, monkeypatch):
    if tma:  # these shapes are below TMA_MIN_WORK: make the first-order passes take descriptors anyway
        monkeypatch.setattr(kf, "TMA_MIN_WORK", 0)
    fn = _case(name)
    monkeypatch.setattr(kf, "_FAST", FastLaunches(enabled=False))
    slow = fn()
    fast = FastLaunches(enabled=True)
    monkeypatch.setattr(kf, "_FAST", fast)
    first = fn()  # makes the entries (a launch repeated inside one call already re-issues)
    assert len(fast.store) and fast.enabled
    hits = fast.hits
    again = fn()
    assert fast.hits - hits >= len(fast.store) > 0 and fast.enabled  # every launch re-issued
    for a, b, c in zip(slow, first, again):
        # captured-tensor gradients are summed by atomics (order not fixed); all else is bitwise
        for x in (b, c):
            assert torch.equal(a, x) or rel_err(a.float(), x.float()) < 1e-5
