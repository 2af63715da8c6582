"""flexebt.runtime: what the library remembers between calls, under one rule (least recently used
goes when a store is full; entries made for objects are found only for those very objects)."""

import gc

import torch

import flexebt
from flexebt import runtime
from flexebt.runtime import Store

from helpers import rel_err

T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}


def test_least_recently_used_entry_goes_first():
    s = Store("t", 2)
    s.put("a", 1)
    s.put("b", 2)
    assert s.get("a") == 1  # a is now the most recent
    s.put("c", 3)
    assert "b" not in s and s.get("a") == 1 and s.get("c") == 3 and len(s) == 2
    assert s.puts == 3


def test_entries_for_objects_are_found_only_for_those_objects():
    s = Store("t", 8)
    owner = torch.zeros(1)
    s.put(("key", id(owner)), "value", owner)
    assert s.get(("key", id(owner)), owner) == "value"
    other = torch.zeros(1)
    assert s.get(("key", id(owner)), other) is None  # same key (as if the id were reused), another object
    assert s.get(("key", id(owner)), other, default="miss") == "miss"
    assert s.get(("key", id(owner))) is None  # made for an object: no hit without it


def test_pinned_stores_survive_clear():
    pinned, bounded = Store("p", None), Store("b", 4)
    for i in range(10):
        pinned.put(i, i)
        bounded.put(i, i)
    assert len(pinned) == 10 and len(bounded) == 4
    pinned.clear()
    bounded.clear()
    assert len(pinned) == 10 and len(bounded) == 0
    assert runtime.compiled.capacity is None and runtime.stashed.capacity is None


def test_calls_after_clear_rebuild_what_they_need_and_agree():
    x = torch.randn(1, 2, 21, 16)
    bias = torch.randn(2, 21, 21)
    sm = flexebt.mods.generate_bias_score_mod(bias)
    bm = flexebt.create_block_mask(flexebt.masks.causal_mask, None, None, 21, 21, device="cpu", BLOCK_SIZE=16)
    first = flexebt.flex_attention(x, x, x, score_mod=sm, block_mask=bm, kernel_options=T)
    built = runtime.kernels.puts
    runtime.clear()
    gc.collect()
    assert runtime.sizes()["kernels"] == 0 and runtime.sizes()["tables"] == 0
    again = flexebt.flex_attention(x, x, x, score_mod=sm, block_mask=bm, kernel_options=T)
    assert runtime.kernels.puts == built + 1  # generated again (from its source on disk)
    assert torch.equal(first, again)
    ref = flexebt.flex_attention(x.double(), x.double(), x.double(), score_mod=flexebt.mods.generate_bias_score_mod(
        bias.double()), block_mask=bm, kernel_options=R)
    assert rel_err(again, ref) < 1e-5


def test_linear_score_option_gives_the_same_attention():
    """kernel_options["LINEAR_SCORE"] = 0 turns off the forward's raw-max path (no score_mod):
    same outputs and lse within fp32 rounding."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 37, 16, generator=g) for _ in range(3))
    on, lse_on = flexebt.flex_attention(q, k, v, kernel_options=T, return_lse=True)
    off, lse_off = flexebt.flex_attention(q, k, v, kernel_options={**T, "LINEAR_SCORE": 0}, return_lse=True)
    ref, lse_ref = flexebt.flex_attention(q.double(), k.double(), v.double(), kernel_options=R, return_lse=True)
    for a, b in ((on, ref), (off, ref), (lse_on, lse_ref), (lse_off, lse_ref)):
        assert rel_err(a, b) < 1e-5


def test_kernel_options_resolve_once_into_a_frozen_hashable_value():
    from flexebt.kernels.options import KernelOptions

    given = {"BACKEND": "TRITON", "BLOCK_M1": 32, "num_warps": 2, "dkdv_num_warps": 8, "USE_TMA": True,
             "FP32_PRODUCTS": "ieee", "HEAD_GROUP": 0}
    o = KernelOptions.of(given)
    assert "BACKEND" not in o and o["USE_TMA"] == 1 and o == KernelOptions.of(dict(given))
    assert hash(o) == hash(KernelOptions.of({k: v for k, v in reversed(list(given.items()))}))
    dkdv, fwd = o.for_pass("dkdv"), o.for_pass("fwd")
    assert (dkdv.BLOCK_M, dkdv.BLOCK_N, dkdv.num_warps, dkdv.head_group) == (32, None, 8, 0)  # per-pass key wins
    assert (fwd.BLOCK_M, fwd.num_warps, fwd.num_stages) == (None, 2, None)  # all-passes key
    assert KernelOptions.decode(o.encode()) == o and KernelOptions.decode(o.encode())["FP32_PRODUCTS"] == "ieee"
    assert KernelOptions.of(None) == KernelOptions.of({}) and not KernelOptions.of(None)
    try:
        o._items = ()
    except AttributeError:
        pass
    else:
        raise AssertionError("KernelOptions must be immutable")


def test_tile_options_reach_the_launch():
    """A per-pass tile option changes what the pass is planned with (and still computes the same)."""
    from flexebt.kernels import configs

    cfg = configs.flex_config("dkdv", 16, 128, 128, {"BLOCK_M1": 16, "BLOCK_N1": 32, "dkdv_num_stages": 1})
    assert (cfg.BLOCK_M, cfg.BLOCK_N, cfg.num_stages) == (16, 32, 1)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, requires_grad=True) for _ in range(3))
    outs = []
    for opts in ({}, {"BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "num_warps": 2}):
        out = flexebt.flex_attention(q, k, v, kernel_options={**T, **opts})
        outs.append([out] + list(torch.autograd.grad(out.square().sum(), (q, k, v))))
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-5


def test_stats_count_entries_made_and_lookups_answered():
    s = Store("t", 4)
    s.put("a", 1)
    s.get("a")
    s.get("a")
    s.get("missing")
    assert (len(s), s.puts, s.hits) == (1, 1, 2)
    assert set(runtime.stats()) == set(runtime.sizes()) and "launches" in runtime.stats()
