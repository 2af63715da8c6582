"""flexebt.runtime: what the library remembers between calls, under one rule (least recently used
goes when a store is full; entries made for objects are found only for those very objects)."""

import gc

import torch

import flexebt
from flexebt import runtime
from flexebt.runtime import Store

from helpers import rel_err, second_order

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


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _causal_but_row_5(b, h, q_idx, kv_idx):  # the block structure of causal at BLOCK_SIZE 16
    return (q_idx >= kv_idx) & (q_idx != 5)


def _window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 6


def _mask(fn, L=33):
    return flexebt.create_block_mask(fn, None, None, L, L, device="cpu", BLOCK_SIZE=16)


def test_a_block_mask_changed_after_a_call_is_converted_again():
    """A BlockMask is a mutable object: its mask_mod reassigned, a table replaced or edited in place
    after a call.  The next call computes what a freshly built mask gives (the converted tables are
    reused only while the mask is as it was), on the kernels and the reference."""
    x = [torch.randn(1, 2, 33, 16) for _ in range(3)]

    def run(bm, backend=T):
        return flexebt.flex_attention(*x, block_mask=bm, kernel_options=backend)

    want_row5 = run(_mask(_causal_but_row_5))
    assert (want_row5[0, :, 5] == 0).all()
    for backend in (T, R):
        bm = _mask(_causal)
        run(bm, backend)
        bm.mask_mod = _causal_but_row_5  # same tables, another mask_mod
        assert rel_err(run(bm, backend), want_row5) < 1e-6

    # every table of another mask copied into the used object
    bm, window = _mask(_causal), _mask(_window)
    run(bm)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices", "mask_mod"):
        setattr(bm, name, getattr(window, name))
    assert torch.equal(run(bm), run(window))

    # tables edited in place: int64 tables (converted to int32 copies) and int32 ones (read as they are)
    for dtype in (torch.int64, torch.int32):
        bm = _mask(_causal)
        full = _mask(lambda b, h, q, kv: q >= 0)
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                     "q_indices", "full_q_num_blocks", "full_q_indices"):
            setattr(bm, name, getattr(bm, name).to(dtype))
        bm.mask_mod = lambda b, h, q, kv: q >= 0
        before = run(bm)  # causal's tables, all blocks kept by the mask_mod: the block-causal attention
        for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                     "q_indices", "full_q_num_blocks", "full_q_indices"):
            getattr(bm, name).copy_(getattr(full, name).to(dtype)) if getattr(bm, name).shape == getattr(
                full, name).shape else setattr(bm, name, getattr(full, name).to(dtype))
        assert not torch.equal(before, run(full))
        assert torch.equal(run(bm), run(full))


def test_a_block_mask_made_in_inference_mode_is_converted_once_and_again_when_it_changes():
    """Inference tensors keep no version counter: the conversion is kept while the mask holds the
    same mask_mod and tables (by identity) -- a serving loop converts once -- and made again when
    they change."""
    x = [torch.randn(1, 2, 33, 16) for _ in range(3)]
    with torch.inference_mode():
        bm = _mask(_causal)
        first = flexebt.flex_attention(*x, block_mask=bm, kernel_options=T)
        puts = runtime.tables.puts
        assert torch.equal(flexebt.flex_attention(*x, block_mask=bm, kernel_options=T), first)
        assert runtime.tables.puts == puts  # not converted again
        bm.mask_mod = _causal_but_row_5
        again = flexebt.flex_attention(*x, block_mask=bm, kernel_options=T)
    assert not torch.equal(first, again) and (again[0, :, 5] == 0).all()
    assert torch.equal(again, flexebt.flex_attention(*x, block_mask=_mask(_causal_but_row_5), kernel_options=T))


def test_piecewise_sees_a_reassigned_mask_mod():
    L = 33
    x = [torch.randn(1, 2, L, 16) for _ in range(5)]
    bm = _mask(_causal, L)
    for backend in (T, R):
        flexebt.piecewise_attention(*x, dist_threshold=8, block_mask=bm, kernel_options=backend)
    bm.mask_mod = _causal_but_row_5
    want = flexebt.piecewise_attention(*x, dist_threshold=8, block_mask=_mask(_causal_but_row_5, L), kernel_options=R)
    for backend in (T, R):
        got = flexebt.piecewise_attention(*x, dist_threshold=8, block_mask=bm, kernel_options=backend)
        assert rel_err(got, want) < 1e-6


def test_an_ebt_mask_whose_tables_change_after_a_call_is_planned_again():
    S_o, S_p = 21, 19
    y = [torch.randn(1, 2, S, 16) for S in (S_o, S_o, S_o, S_p, S_p, S_p)]
    bm = flexebt.create_ebt_block_mask(None, None, None, S_o, S_p, BLOCK_SIZE=16)
    before = flexebt.flex_ebt_attention(*y, block_mask=bm, kernel_options=T)
    for name in ("kv_num_blocks", "full_kv_num_blocks"):  # observed queries past the first block see no key
        table = getattr(bm.observed, name).clone()
        table[..., 1:] = 0
        setattr(bm.observed, name, table)
    after = flexebt.flex_ebt_attention(*y, block_mask=bm, kernel_options=T)
    want = flexebt.flex_ebt_attention(*y, block_mask=bm, kernel_options=R)
    assert (after[0][:, :, 16:] == 0).all() and not torch.equal(after[0], before[0])
    for a, b in zip(after, want):
        assert rel_err(a, b) < 1e-5


def test_piecewise_reads_the_block_mask_as_flex_attention_does():
    """Tables that say more than the mask_mod (block-causal tables under a mask_mod that keeps
    everything; a query block's tables emptied in place): the kernels honour the tables, as the
    reference and flex_attention do."""
    L = 33
    x = [torch.randn(1, 2, L, 16) for _ in range(5)]
    bm = _mask(_causal, L)
    run = lambda m, be: flexebt.piecewise_attention(*x, dist_threshold=8, block_mask=m, kernel_options=be)  # noqa: E731
    run(bm, T)
    bm.mask_mod = lambda b, h, q, kv: q >= 0
    assert rel_err(run(bm, T), run(bm, R)) < 1e-6
    edited = _mask(_causal, L)
    run(edited, T)
    edited.kv_num_blocks[..., 1] = 0
    edited.full_kv_num_blocks[..., 1] = 0
    got = run(edited, T)
    assert (got[:, :, 16:32] == 0).all() and rel_err(got, run(edited, R)) < 1e-6
    xs = [a.clone().requires_grad_() for a in x]
    for m in (bm, edited):  # first and second order through the honoured tables
        def pw(backend, m=m):
            return lambda *a: flexebt.piecewise_attention(*a, dist_threshold=8, block_mask=m, kernel_options=backend)
        got, want = second_order(pw(T), xs), second_order(pw(R), xs)
        for a, b in zip(got[0] + got[1], want[0] + want[1]):
            assert rel_err(a, b) < 1e-5
