"""The grid order of the first-order passes (kernels/grid.py, template ``_program_tile``): every
head group gives the same results as the plain head-by-head order, and the default group
follows the rule of design D44."""

import types

import pytest
import torch

import flexebt
from flexebt import masks, mods
from flexebt.kernels import grid
from flexebt.kernels.configs import TileConfig
from helpers import rel_err

T = {"BACKEND": "TRITON"}
# 1: plain; 2, 3, 4: groups that do and do not divide the heads (the narrow group runs first);
# 0: all heads in one group; and different groups per pass
GROUPS = [{"HEAD_GROUP": g} for g in (2, 3, 4, 0)] + [{"fwd_head_group": 3, "dq_head_group": 0, "dkdv_head_group": 2}]


def _flex(options, x0, score_mod, mask):
    x = [t.clone().requires_grad_() for t in x0]
    out, lse = flexebt.flex_attention(*x, score_mod=score_mod, block_mask=mask, enable_gqa=True, return_lse=True,
                                      kernel_options={**T, **options})
    return (out, lse, *torch.autograd.grad((out * out).sum() + lse.sum(), x))


@pytest.mark.parametrize("options", GROUPS, ids=str)
def test_flex_results_do_not_depend_on_the_head_group(options):
    torch.manual_seed(0)
    B, H, Hkv, Sq, Skv, D = 2, 6, 3, 45, 37, 16  # B * H = 12 query heads, 6 key heads (the dk/dv grid)
    x0 = [torch.randn(B, H, Sq, D), torch.randn(B, Hkv, Skv, D), torch.randn(B, Hkv, Skv, D)]
    mask = flexebt.create_block_mask(masks.causal_mask, None, None, Sq, Skv, BLOCK_SIZE=16)
    sm = mods.generate_tanh_softcap(3.0)
    for a, b in zip(_flex(options, x0, sm, mask), _flex({"HEAD_GROUP": 1}, x0, sm, mask)):
        assert torch.equal(a, b)


def test_captured_gradient_with_head_groups():
    """A captured tensor's gradient is summed by atomic adds, whose order follows the programs'
    order: equal up to rounding."""
    torch.manual_seed(1)
    x0 = [torch.randn(1, 5, 33, 16) for _ in range(3)]
    bias = 0.2 * torch.randn(5, 33, 33)
    results = []
    for options in ({"HEAD_GROUP": 1}, {"HEAD_GROUP": 2}):
        b = bias.clone().requires_grad_()
        x = [t.clone().requires_grad_() for t in x0]
        out = flexebt.flex_attention(*x, score_mod=mods.generate_bias_score_mod(b), kernel_options={**T, **options})
        results.append((out, *torch.autograd.grad((out * out).sum(), [*x, b])))
    for a, b in zip(*results):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("options", GROUPS[1:3], ids=str)
def test_ebt_results_do_not_depend_on_the_head_group(options):
    torch.manual_seed(2)
    bm = flexebt.create_ebt_block_mask(None, None, None, 32, 29, BLOCK_SIZE=16)
    x0 = [torch.randn(1, h, S, 16) for h, S in ((6, 32), (3, 32), (3, 32), (6, 29), (3, 29), (3, 29))]

    def run(opts):
        x = [t.clone().requires_grad_() for t in x0]
        outs = flexebt.flex_ebt_attention(*x, block_mask=bm, enable_gqa=True, kernel_options={**T, **opts})
        return (*outs, *torch.autograd.grad(sum((o * o).sum() for o in outs), x))

    for a, b in zip(run(options), run({"HEAD_GROUP": 1})):
        assert torch.equal(a, b)


def _order(n_bh=64, n_rows=4096, bytes_per_head=1 << 20):
    return grid.GridOrder("fwd", n_bh, n_rows, "BLOCK_M", bytes_per_head)


CFG = TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)


def test_default_group_rule(monkeypatch):
    # an H100: 132 SMs, 50 MiB of L2
    monkeypatch.setattr(grid, "_device_facts", lambda index: (132, 50 << 20, 65536, 233472, 2048))
    grid._default_group.cache_clear()
    cuda = torch.device("cuda", 0)
    # 32 tiles per head, 2 programs per SM: 9 heads fill a wave; the largest divisor of 64 within is 8
    assert grid.head_group(_order(), CFG, None, cuda, 2) == 8
    assert grid.head_group(_order(), CFG, None, cuda, 1) == 4        # 5 heads fill it -> 4
    assert grid.head_group(_order(n_bh=7), CFG, None, cuda, 2) == 7   # fewer heads than a wave: all
    assert grid.head_group(_order(n_bh=11), CFG, None, cuda, 1) == 1  # 11 is prime: no divisor within 5
    # 8 MiB per head: half the L2 holds 3 heads -> 2 (a divisor of 64)
    assert grid.head_group(_order(n_rows=16384, bytes_per_head=8 << 20), CFG, None, cuda, 2) == 2
    # asked for: kept (capped at the head count); <= 0 means all heads; per-pass keys first
    assert grid.head_group(_order(), CFG, {"HEAD_GROUP": 3}, cuda, 2) == 3
    assert grid.head_group(_order(), CFG, {"HEAD_GROUP": 0}, cuda, 2) == 64
    assert grid.head_group(_order(), CFG, {"HEAD_GROUP": 100}, cuda, 2) == 64
    assert grid.head_group(_order(), CFG, {"HEAD_GROUP": 3, "fwd_head_group": 5}, cuda, 2) == 5
    # off CUDA (the interpreter) the plain order
    assert grid.head_group(_order(), CFG, None, torch.device("cpu"), 2) == 1
    grid._default_group.cache_clear()  # computed with the patched device facts


def test_resident_programs(monkeypatch):
    monkeypatch.setattr(grid, "_device_facts", lambda index: (132, 50 << 20, 65536, 233472, 2048))
    cuda = torch.device("cuda", 0)
    compiled = types.SimpleNamespace(n_regs=255, metadata=types.SimpleNamespace(shared=112 << 10))
    # registers: 8192 per warp (255 x 32 rounded up to 256) x 4 warps -> 2; shared memory -> 2
    assert grid.resident_programs(compiled, 4, cuda) == 2
    assert grid.resident_programs(compiled, 8, cuda) == 1
    small = types.SimpleNamespace(n_regs=128, metadata=types.SimpleNamespace(shared=40 << 10))
    assert grid.resident_programs(small, 4, cuda) == 4  # registers: 65536 / (4096 x 4)
    # no compiled kernel facts (the interpreter): the default guess
    assert grid.resident_programs(None, 4, cuda) == grid.DEFAULT_RESIDENT
    assert grid.resident_programs(compiled, 4, torch.device("cpu")) == grid.DEFAULT_RESIDENT


def test_double_backward_and_jvp_with_head_groups():
    """The double-backward and JVP passes keep the plain order by default; asked for, groups give
    the same results."""
    torch.manual_seed(3)
    B, H, Hkv, S, D = 1, 6, 2, 35, 16
    x0 = [torch.randn(B, H, S, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)]
    mask = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, BLOCK_SIZE=16)
    sm = mods.generate_tanh_softcap(3.0)

    def run(options):
        x = [t.clone().requires_grad_() for t in x0]
        f = lambda *a: flexebt.flex_attention(*a, score_mod=sm, block_mask=mask, enable_gqa=True,  # noqa: E731
                                              kernel_options={**T, **options})
        out = f(*x)
        g = torch.autograd.grad((out * out).sum(), x, create_graph=True)
        gg = torch.autograd.grad(sum((t * t).sum() for t in g), x)
        _, tangent = torch.func.jvp(f, tuple(x0), tuple(torch.randn_like(t) for t in x0))
        return (out, *g, *gg, tangent)

    torch.manual_seed(4)
    plain = run({"HEAD_GROUP": 1})
    for options in ({"HEAD_GROUP": 4}, {"dbwd_rows_head_group": 0, "dbwd_dq_head_group": 5, "dbwd_dkdv_head_group": 2,
                                        "jvp_head_group": 3}):
        torch.manual_seed(4)
        for a, b in zip(run(options), plain):
            assert torch.equal(a, b)
