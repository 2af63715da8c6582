"""Block masks whose tables list blocks past the sequence ends.

A mask cropped with torch's ``BlockMask._adjust`` keeps the listed indices of its rows, so it can
list key blocks at or past ``ceil(Skv / BLOCK)``; a mask re-labelled with shorter ``seq_lengths``
(``BlockMask.from_kv_blocks``) also has rows past the end, and a mask built without q tables
(``compute_q_blocks=False``) has none.  torch's flex_attention accepts these (its eager path
evaluates the mask_mod over the real positions) and refuses a mask whose ``seq_lengths`` differ
from the inputs'.  flexebt computes exactly torch's result here, on the kernels (interpreter)
and the reference, first and second order, and refuses where torch refuses.
"""

import math

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import flexebt
from flexebt.blockmask import EBTBlockMask, tables_in_range
from helpers import rel_err

T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}
BLOCK = 16
BACKENDS = [pytest.param(T, id="kernels", marks=pytest.mark.interpreter), pytest.param(R, id="reference")]


def window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() <= 20


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def late(b, h, q_idx, kv_idx):
    return q_idx + kv_idx >= 40


# id: (mask_mod, length the mask is built for, lengths it is cropped to).  Each lists a block
# past the end of the keys: causal a partial one, the others a full one (the last at even lengths).
ADJUSTED = {
    "causal_40x17": (causal, 48, (40, 17)),
    "window_33x17": (window, 80, (33, 17)),
    "late_37x40": (late, 64, (37, 40)),
    "late_even_32x32": (late, 48, (32, 32)),
}


def _listed(num, idx):
    return torch.arange(idx.shape[-1]) < num.unsqueeze(-1)


def _past_end(bm, Sq, Skv, beyond=0):
    """Whether bm's tables list a block index >= ceil(len / BLOCK) + beyond, or have extra rows."""
    nq, nkv = -(-Sq // bm.BLOCK_SIZE[0]), -(-Skv // bm.BLOCK_SIZE[1])
    pairs = [(bm.kv_num_blocks, bm.kv_indices, nkv), (bm.full_kv_num_blocks, bm.full_kv_indices, nkv),
             (bm.q_num_blocks, bm.q_indices, nq), (bm.full_q_num_blocks, bm.full_q_indices, nq)]
    listed = any(bool((_listed(num, idx) & (idx >= n + beyond)).any()) for num, idx, n in pairs if num is not None)
    return listed or (beyond == 0 and bm.kv_num_blocks.shape[-1] > nq)


def oracle(q, k, v, mask_mod, scale=None):
    """float64 attention under mask_mod evaluated on the real positions (torch's eager meaning)."""
    q, k, v = q.double(), k.double(), v.double()
    keep = create_mask(mask_mod, None, None, q.shape[2], k.shape[2], device="cpu")
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    rows = keep.any(-1, keepdim=True)  # rows with no kept key: out 0, lse -inf, zero gradients
    s = torch.where(rows, s.masked_fill(~keep, -math.inf), 0.0)
    lse = torch.logsumexp(s, -1)
    p = torch.where(keep, torch.exp(s - lse.unsqueeze(-1)), 0.0)
    return p @ v, torch.where(rows[..., 0], lse, -math.inf)


def second_order(fn, inputs, seed=1):
    """(first-order grads, grads of a loss on them) of sum(outputs * cotangents); cotangents drawn in
    float64 whatever the dtype, so fp32 and float64 runs see the same ones."""
    g = torch.Generator().manual_seed(seed)
    outs = fn(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    cts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    total = sum((o * c).sum() for o, c in zip(outs, cts))
    first = torch.autograd.grad(total, inputs, create_graph=True)
    w = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype) for x in first]
    second = torch.autograd.grad(sum((x * wi).sum() + 0.5 * (x ** 2).sum() for x, wi in zip(first, w)), inputs)
    return [x.detach() for x in first], list(second)


def inputs(Sq, Skv, dtype=torch.float32, H=2, D=16):
    return [torch.randn(1, H, S, D, dtype=dtype, requires_grad=True) for S in (Sq, Skv, Skv)]


def adjusted(case):
    mask_mod, L, (Sq, Skv) = ADJUSTED[case]
    bm = create_block_mask(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=BLOCK)._adjust(Sq, Skv)
    assert _past_end(bm, Sq, Skv), "the case must list a block past the end"
    return mask_mod, bm, Sq, Skv


def relabelled(mask_mod, L, Sq, Skv, compute_q_blocks=True):
    """A mask made for L x L whose seq_lengths say (Sq, Skv): torch accepts it."""
    big = create_block_mask(mask_mod, None, None, L, L, device="cpu", BLOCK_SIZE=BLOCK)
    return BlockMask.from_kv_blocks(big.kv_num_blocks, big.kv_indices, big.full_kv_num_blocks, big.full_kv_indices,
                                    BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(Sq, Skv),
                                    compute_q_blocks=compute_q_blocks)


def _check_forward(backend, mask_mod, bm, Sq, Skv):
    q, k, v = inputs(Sq, Skv)
    out, lse = flexebt.flex_attention(q, k, v, block_mask=bm, return_lse=True, kernel_options=backend)
    ref, ref_lse = oracle(q, k, v, mask_mod)
    expected = torch_flex_attention(q.detach(), k.detach(), v.detach(), block_mask=bm)
    assert rel_err(expected, ref) < 1e-5  # torch's own result is the float64 math
    assert rel_err(out, ref) < 1e-5 and rel_err(out, expected) < 1e-5
    assert rel_err(lse, ref_lse) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ADJUSTED))
def test_adjusted_mask_forward_equals_torch(case, backend):
    _check_forward(backend, *adjusted(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_relabelled_longer_mask_forward_equals_torch(backend):
    # rows past the end and key blocks up to 4 past ceil(Skv / BLOCK)
    bm = relabelled(window, 80, 40, 17)
    assert _past_end(bm, 40, 17, beyond=1)
    _check_forward(backend, window, bm, 40, 17)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_listing_blocks_far_past_the_end_without_q_tables(backend):
    """Hand-made tables (compute_q_blocks=False, as torch's _adjust keeps them) that list every real
    block plus blocks far past the end: torch evaluates the mask_mod on the real positions, and so
    does flexebt; the kernels derive the q tables the backward needs from the kv tables."""
    Sq, Skv = 21, 37  # 2 x 3 blocks
    rows = torch.tensor([[0, 1, 2, 5, 9], [7, 0, 1, 2, 4]], dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(torch.tensor([[[5, 5]]], dtype=torch.int32), rows[None, None], BLOCK_SIZE=BLOCK,
                                  mask_mod=late, seq_lengths=(Sq, Skv), compute_q_blocks=False)
    assert bm.q_indices is None and _past_end(bm, Sq, Skv, beyond=1)
    _check_forward(backend, late, bm, Sq, Skv)
    x = inputs(Sq, Skv)
    got = second_order(lambda *t: flexebt.flex_attention(*t, block_mask=bm, kernel_options=backend), x)
    want = second_order(lambda *t: oracle(*t, late)[0], [t.detach().double().requires_grad_() for t in x])
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert rel_err(a, b) < 3e-5


@pytest.mark.interpreter
@pytest.mark.parametrize("case", ["causal_40x17", "late_even_32x32"])
def test_adjusted_mask_gradients_first_and_second_order(case):
    """Kernels (fp32) and reference (float64) against the float64 math, with lse in the loss."""
    mask_mod, bm, Sq, Skv = adjusted(case)
    x = inputs(Sq, Skv)
    x64 = [t.detach().double().requires_grad_() for t in x]

    def run(backend):
        return lambda *t: flexebt.flex_attention(*t, block_mask=bm, return_lse=True, kernel_options=backend)

    want = second_order(lambda *t: oracle(*t, mask_mod), x64)
    kern = second_order(run(T), x)
    ref = second_order(run(R), x64)
    for a, r, b in zip(kern[0] + kern[1], ref[0] + ref[1], want[0] + want[1]):
        assert rel_err(a, b) < 3e-5
        assert rel_err(r, b) < 1e-12


def test_tables_in_range_lists_only_real_blocks():
    bm = relabelled(window, 80, 40, 17)
    kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx = tables_in_range(bm, 40, 17)
    assert kv_num.shape[-1] == 3 and q_num.shape[-1] == 2
    for num, idx, n in ((kv_num, kv_idx, 2), (fkv_num, fkv_idx, 2), (q_num, q_idx, 3), (fq_num, fq_idx, 3)):
        listed = _listed(num, idx)
        assert bool(((idx < n) | ~listed).all())
    # the in-range blocks the mask lists are all kept, in order
    listed = _listed(bm.kv_num_blocks[..., :3], bm.kv_indices[..., :3, :])
    for r in range(3):
        row = bm.kv_indices[0, 0, r][listed[0, 0, r]]
        assert torch.equal(kv_idx[0, 0, r, :kv_num[0, 0, r]], row[row < 2])


# ---- refusals, where torch refuses ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("built, lengths, hint", [(80, (40, 37), "_adjust"), (80, (64, 40), "_adjust"),
                                                  (80, (33, 80), "_adjust"), (32, (40, 37), "rebuild")])
def test_mask_for_other_lengths_is_refused_like_torch(backend, built, lengths, hint):
    bm = create_block_mask(window, None, None, built, built, device="cpu", BLOCK_SIZE=BLOCK)
    q, k, v = (t.detach() for t in inputs(*lengths))
    with pytest.raises(ValueError):
        torch_flex_attention(q, k, v, block_mask=bm)
    with pytest.raises(ValueError, match=rf"built for \(Q_LEN, KV_LEN\) = \({built}, {built}\).*{hint}"):
        flexebt.flex_attention(q, k, v, block_mask=bm, kernel_options=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_shorter_than_their_seq_lengths_are_refused(backend):
    small = create_block_mask(window, None, None, 32, 32, device="cpu", BLOCK_SIZE=BLOCK)
    bm = BlockMask.from_kv_blocks(small.kv_num_blocks, small.kv_indices, small.full_kv_num_blocks,
                                  small.full_kv_indices, BLOCK_SIZE=BLOCK, mask_mod=window, seq_lengths=(40, 40))
    q, k, v = (t.detach() for t in inputs(40, 40))
    with pytest.raises(ValueError, match="kv_num_blocks has 2 rows.*need 3"):
        flexebt.flex_attention(q, k, v, block_mask=bm, kernel_options=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_mask_is_refused_like_torch(backend):
    bm = create_block_mask(causal, 1, 2, 32, 32, device="cpu", BLOCK_SIZE=BLOCK)[:, :1]
    q, k, v = (t.detach() for t in inputs(32, 32, H=1))
    with pytest.raises(RuntimeError):
        torch_flex_attention(q, k, v, block_mask=bm)
    for kind in (RuntimeError, ValueError):
        with pytest.raises(kind, match="sliced"):
            flexebt.flex_attention(q, k, v, block_mask=bm, kernel_options=backend)


# ---- EBT: the two parts of an EBT block mask cropped from a longer one ----

def ebt_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 20)


def ebt_not_self(b, h, q_idx, kv_idx):
    return q_idx != kv_idx


def _cropped_ebt_mask(mask_mod, S_o, S_p, grow=16):
    """EBT mask for lengths grown by ``grow`` (the same offset r), its parts cropped with _adjust."""
    big = flexebt.create_ebt_block_mask(mask_mod, None, None, S_o + grow, S_p + grow, device="cpu", BLOCK_SIZE=BLOCK)
    return EBTBlockMask(mask_mod=mask_mod, observed=big.observed._adjust(S_o, S_o),
                        predicted=big.predicted._adjust(S_p, S_o), S_obs=S_o, S_pred=S_p, B=1, H=1)


@pytest.mark.interpreter
@pytest.mark.parametrize("mask_mod,S_o,S_p", [(late, 40, 33), (ebt_not_self, 32, 31)],
                         ids=["late_40_33", "not_self_32_31"])
def test_ebt_cropped_mask_first_and_second_order(mask_mod, S_o, S_p):
    """Kernels and reference with the cropped mask against the float64 reference with the mask built
    for these lengths (whose tables list nothing past the end)."""
    bm = _cropped_ebt_mask(mask_mod, S_o, S_p)
    assert _past_end(bm.predicted, S_p, S_o) or _past_end(bm.observed, S_o, S_o)
    exact = flexebt.create_ebt_block_mask(mask_mod, None, None, S_o, S_p, device="cpu", BLOCK_SIZE=BLOCK)
    x = [torch.randn(1, 2, S, 16, requires_grad=True) for S in (S_o,) * 3 + (S_p,) * 3]
    x64 = [t.detach().double().requires_grad_() for t in x]

    def run(mask, backend):
        return lambda *t: flexebt.flex_ebt_attention(*t, block_mask=mask, return_lse=True, kernel_options=backend)

    want = second_order(run(exact, R), x64)
    for got, bound in ((second_order(run(bm, T), x), 3e-5), (second_order(run(bm, R), x64), 1e-12)):
        for a, b in zip(got[0] + got[1], want[0] + want[1]):
            assert rel_err(a, b) < bound
    outs = flexebt.flex_ebt_attention(*x, block_mask=bm, return_lse=True, kernel_options=T)
    for a, b in zip(outs, run(exact, R)(*x64)):
        assert rel_err(a, b) < 1e-5


def test_ebt_mask_parts_of_other_lengths_are_refused():
    big = flexebt.create_ebt_block_mask(ebt_window, None, None, 40, 38, device="cpu", BLOCK_SIZE=BLOCK)
    with pytest.raises(ValueError, match=r"observed BlockMask was built for \(Q_LEN, KV_LEN\) = \(40, 40\).*_adjust"):
        EBTBlockMask(mask_mod=ebt_window, observed=big.observed, predicted=big.predicted._adjust(30, 32),
                     S_obs=32, S_pred=30, B=1, H=1)
    with pytest.raises(ValueError, match=r"predicted BlockMask was built for \(Q_LEN, KV_LEN\) = \(38, 40\)"):
        EBTBlockMask(mask_mod=ebt_window, observed=big.observed._adjust(32, 32), predicted=big.predicted,
                     S_obs=32, S_pred=30, B=1, H=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ebt_mask_for_longer_lengths_is_refused(backend):
    bm = flexebt.create_ebt_block_mask(ebt_window, None, None, 40, 38, device="cpu", BLOCK_SIZE=BLOCK)
    x = [torch.randn(1, 2, S, 16) for S in (21,) * 3 + (19,) * 3]
    with pytest.raises(ValueError, match=r"built for \(S_obs, S_pred\) = \(40, 38\)"):
        flexebt.flex_ebt_attention(*x, block_mask=bm, kernel_options=backend)


def test_reference_ignores_listed_blocks_past_the_end():
    """A mask whose tables come from longer sequences (blocks listed past KV_LEN), declared for the
    short lengths: the reference backend keeps exactly the short causal mask (it once indexed past
    its block table)."""
    from torch.nn.attention.flex_attention import BlockMask

    from flexebt.reference.masking import dense_keep

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    S = 37
    long = flexebt.create_block_mask(causal, None, None, S + 60, S + 60, device="cpu", BLOCK_SIZE=16)
    short = BlockMask.from_kv_blocks(long.kv_num_blocks, long.kv_indices, long.full_kv_num_blocks,
                                     long.full_kv_indices, BLOCK_SIZE=long.BLOCK_SIZE, mask_mod=causal,
                                     seq_lengths=(S, S))
    keep = dense_keep(short, 1, 1, S, S, "cpu")
    assert torch.equal(keep[0, 0], torch.ones(S, S, dtype=torch.bool).tril())
    q = torch.randn(1, 2, S, 16)
    out = flexebt.flex_attention(q, q, q, block_mask=short, kernel_options={"BACKEND": "REFERENCE"})
    want = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert (out - want).abs().max() < 1e-5


# -- tables that do not say what create_block_mask would: the kv tables are the mask ------------

def _table_oracle(q, k, v, bm, mask_mod):
    """float64 attention over what bm's kv tables keep, each listed block once: every position of a
    full block, mask_mod's positions in a partial one, nothing elsewhere (flex_attention's meaning
    of a block mask's tables)."""
    Sq, Skv = q.shape[2], k.shape[2]
    bq, bkv = bm.BLOCK_SIZE
    nkv = -(-Skv // bkv)

    def dense(num, idx):
        table = torch.zeros(*idx.shape[:-1], nkv, dtype=torch.bool)
        for pos in torch.nonzero(_listed(num, idx)).tolist():
            table[tuple(pos[:-1]) + (int(idx[tuple(pos)]),)] = True
        return table.repeat_interleave(bq, -2)[..., :Sq, :].repeat_interleave(bkv, -1)[..., :Skv]

    keep = dense(bm.kv_num_blocks, bm.kv_indices) & create_mask(mask_mod, None, None, Sq, Skv, device="cpu")
    if bm.full_kv_num_blocks is not None:
        keep = keep | dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    rows = keep.any(-1, keepdim=True)
    s = torch.where(rows, s.masked_fill(~keep, -math.inf), 0.0)
    return torch.where(keep, torch.softmax(s, -1), 0.0) @ v


def _edited(how):
    bm = create_block_mask(causal, None, None, 40, 40, device="cpu", BLOCK_SIZE=BLOCK)
    if how == "full_kv_zeroed_in_place":  # the full blocks dropped; the q tables still list them
        bm.full_kv_num_blocks.zero_()
    elif how == "full_kv_replaced":
        bm.full_kv_num_blocks = torch.zeros_like(bm.full_kv_num_blocks)
    elif how == "partial_kv_edited":  # the last query block's diagonal block dropped
        bm.kv_num_blocks[..., -1] = 0
    elif how == "listed_partial_and_full":  # block (1, 0) listed in both tables, block (2, 2) twice
        kv_num, kv_idx = bm.kv_num_blocks.clone(), bm.kv_indices.clone()
        kv_idx[..., 1, 1] = 0
        kv_num[..., 1] = 2
        kv_idx[..., 2, 1] = kv_idx[..., 2, 0]
        kv_num[..., 2] = 2
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, bm.full_kv_num_blocks, bm.full_kv_indices, BLOCK_SIZE=BLOCK,
                                      mask_mod=causal, seq_lengths=(40, 40))
    elif how == "count_past_width":  # all blocks partial; row 0 lists blocks 0, 1, 2 and says 9 of them
        nq = 3
        kv_idx = torch.arange(nq, dtype=torch.int32).expand(1, 1, nq, nq).contiguous()
        kv_num = torch.tensor([[[9, 2, 3]]], dtype=torch.int32)
        bm = BlockMask.from_kv_blocks(kv_num, kv_idx, BLOCK_SIZE=BLOCK, mask_mod=causal, seq_lengths=(40, 40))
    return bm


@pytest.mark.interpreter
@pytest.mark.parametrize("how", ["full_kv_zeroed_in_place", "full_kv_replaced", "partial_kv_edited",
                                 "listed_partial_and_full", "count_past_width"])
def test_kernels_read_the_kv_tables_as_they_are(how):
    """The kv tables define the mask for every pass: after an in-place edit or replacement the
    transposed (q) tables the dk / dv passes read are rebuilt from them; a block listed twice, or
    both partial and full, counts once; a count past the row's width lists the row.  First and
    second order on the kernels equal the reference and the float64 math of the tables."""
    torch.manual_seed(0)
    x = inputs(40, 40)
    bm = _edited(how)
    want = _table_oracle(*x, bm, causal)
    for opts in (T, R):
        assert rel_err(flexebt.flex_attention(*x, block_mask=bm, kernel_options=opts), want) < 1e-5
    got = second_order(lambda *a: flexebt.flex_attention(*a, block_mask=bm, kernel_options=T), x)
    ref = second_order(lambda *a: flexebt.flex_attention(*a, block_mask=bm, kernel_options=R),
                       [t.detach().double().requires_grad_() for t in x])
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        assert rel_err(a, b) < 2e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_without_batch_and_head_dims_are_refused(backend):
    """BlockMask.from_kv_blocks takes tables of 2 or more dims; flexebt reads [B, H, ...] tables and
    says how to add the missing dims instead of misreading them."""
    bm = create_block_mask(causal, None, None, 32, 32, device="cpu", BLOCK_SIZE=BLOCK)
    flat = BlockMask.from_kv_blocks(bm.kv_num_blocks[0], bm.kv_indices[0], bm.full_kv_num_blocks[0],
                                    bm.full_kv_indices[0], BLOCK_SIZE=BLOCK, mask_mod=causal, seq_lengths=(32, 32))
    with pytest.raises(ValueError, match=r"kv_num_blocks has shape \(1, 2\).*\[B, H, \.\.\.\].*\[None\]"):
        flexebt.flex_attention(*inputs(32, 32), block_mask=flat, kernel_options=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_on_another_device_is_refused(backend):
    bm = create_block_mask(causal, None, None, 32, 32, device="cpu", BLOCK_SIZE=BLOCK).to("meta")
    with pytest.raises(ValueError, match="block_mask is on meta but the inputs are on cpu"):
        flexebt.flex_attention(*inputs(32, 32), block_mask=bm, kernel_options=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tables_of_other_batch_and_head_dims_are_refused(backend):
    """Partial and full tables with different [B, H] would be read with the partial ones' strides."""
    bm = create_block_mask(causal, None, None, 32, 32, device="cpu", BLOCK_SIZE=BLOCK)
    odd = BlockMask.from_kv_blocks(bm.kv_num_blocks.expand(2, 1, -1).contiguous(),
                                   bm.kv_indices.expand(2, 1, -1, -1).contiguous(), bm.full_kv_num_blocks,
                                   bm.full_kv_indices, BLOCK_SIZE=BLOCK, mask_mod=causal, seq_lengths=(32, 32))
    q, k, v = (torch.randn(2, 2, 32, 16) for _ in range(3))
    with pytest.raises(ValueError, match=r"full_kv_num_blocks has leading \[B, H\] dims \(1, 1\) but kv_num_blocks"):
        flexebt.flex_attention(q, k, v, block_mask=odd, kernel_options=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_indices_in_the_tables_name_no_block(backend):
    """Hand-made tables with -1 padding inside a row's count (as some producers fill unused slots):
    a negative index names no block, on the kernels and the reference alike (the reference
    scattered it and failed), first and second order against the dense meaning of the tables."""
    S = 64  # 4 x 4 blocks
    num = torch.tensor([[[2, 2, 2, 2]]], dtype=torch.int32)
    idx = torch.tensor([[[[0, -1], [1, -1], [2, 1], [3, -4]]]], dtype=torch.int32)
    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=BLOCK, seq_lengths=(S, S), compute_q_blocks=False)
    listed = torch.zeros(4, 4, dtype=torch.bool)
    for r, cols in enumerate(([0], [1], [2, 1], [3])):
        listed[r, cols] = True
    keep_table = listed.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)

    def dense(q, k, v):
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.softmax(s.masked_fill(~keep_table, -math.inf), -1) @ v

    x = inputs(S, S)
    got = second_order(lambda *t: flexebt.flex_attention(*t, block_mask=bm, kernel_options=backend), x)
    want = second_order(dense, [t.detach().double().requires_grad_() for t in x])
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert rel_err(a, b) < 3e-5
