"""The reference backend applies score_mod / mask_mod per score, with torch's semantics.

torch's FlexAttention defines a mod as a function of one score and its scalar indices (it maps
it over b, h, q_idx, kv_idx with torch.vmap).  So a reduction inside a mod reduces a single
score, indexing a captured tensor gathers one element (out of range: IndexError; negative
indices wrap), and a mod that needs Python values of tensors is an error.  The forward is
compared with torch's own eager flex_attention; gradients (torch's CPU backward is not
available) with an independent float64 loop below that calls the mod on 0-d tensors, one
score at a time.
"""

import warnings

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex

import flexebt
from flexebt.reference import ebt_attention_reference, flex_attention_reference, piecewise_attention_reference
from flexebt.reference.core import eval_mask_mod, index_grid
from flexebt.reference.double_backward import attention_double_backward
from helpers import rel_err, second_order
from oracles import ebt_oracle

B, H, SQ, SKV, D = 1, 2, 5, 6, 4
F64 = torch.float64


def _r(*shape, requires_grad=True):
    return torch.randn(*shape, dtype=F64).requires_grad_(requires_grad)


def _qkv(Sq=SQ, Skv=SKV, Hkv=H, dtype=F64, requires_grad=True):
    return [torch.randn(B, h, s, D, dtype=dtype).requires_grad_(requires_grad)
            for h, s in ((H, Sq), (Hkv, Skv), (Hkv, Skv))]


def _torch_forward(q, k, v, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch_flex(q, k, v, **kw)


def loop_oracle(q, k, v, score_mod=None, mask_mod=None, scale=None):
    """float64 attention computing every score on its own: the mods get 0-d tensors (int64
    indices, as torch's eager path), one call per score.  GQA by repeating k/v heads."""
    q, k, v = q.double(), k.double(), v.double()
    Bq, Hq, Sq, Dq = q.shape
    k, v = (x.repeat_interleave(Hq // x.shape[1], dim=1) for x in (k, v))
    Skv = k.shape[2]
    scale = Dq ** -0.5 if scale is None else scale
    outs, lses = [], []
    for b in range(Bq):
        for h in range(Hq):
            for i in range(Sq):
                scores, vals = [], []
                for j in range(Skv):
                    idx = [torch.tensor(x) for x in (b, h, i, j)]
                    if mask_mod is not None and not bool(mask_mod(*idx)):
                        continue
                    s = scale * torch.dot(q[b, h, i], k[b, h, j])
                    if score_mod is not None:
                        s = torch.as_tensor(score_mod(s, *idx)).to(F64)
                    scores.append(s)
                    vals.append(v[b, h, j])
                if not scores:
                    outs.append(torch.zeros_like(v[b, h, 0]))
                    lses.append(torch.tensor(float("-inf"), dtype=F64))
                    continue
                s = torch.stack(scores)
                outs.append(torch.softmax(s, 0) @ torch.stack(vals))
                lses.append(torch.logsumexp(s, 0))
    return torch.stack(outs).view(Bq, Hq, Sq, -1), torch.stack(lses).view(Bq, Hq, Sq)


# Mods whose meaning changes if they are evaluated once over the whole score matrix.
def _score_mods(bias):
    def sum_and_norm(score, b, h, q_idx, kv_idx):
        return score - 0.5 * score.sum() + 0.3 * score.norm()

    def mean_and_max(score, b, h, q_idx, kv_idx):
        return torch.max(score) + 0.1 * score.mean() + torch.amax(score, dim=-1)

    def softmax_of_one(score, b, h, q_idx, kv_idx):  # softmax over a single score is 1
        return score + score.softmax(dim=-1)

    def bias_row_max(score, b, h, q_idx, kv_idx):  # a reduction over a captured tensor's row
        return score + bias[h, q_idx].max() - bias[h].T[kv_idx].logsumexp(-1)

    def bias_times_norm(score, b, h, q_idx, kv_idx):
        return score * (1 + 0.2 * bias[h, q_idx, kv_idx].abs().sum()) + bias[h, q_idx, kv_idx] * score.norm()

    return {f.__name__: f for f in (sum_and_norm, mean_and_max, softmax_of_one, bias_row_max, bias_times_norm)}


SCORE_MODS = list(_score_mods(None))


@pytest.mark.parametrize("name", SCORE_MODS)
def test_reductions_in_score_mod_match_torch_forward(name):
    bias = _r(H, SQ, SKV, requires_grad=False)
    sm = _score_mods(bias)[name]
    q, k, v = _qkv(requires_grad=False)
    out, lse = flexebt.flex_attention(q, k, v, score_mod=sm, return_lse=True)
    ref, ref_lse = _torch_forward(q, k, v, score_mod=sm, return_lse=True)
    assert rel_err(out, ref) < 1e-13 and rel_err(lse, ref_lse) < 1e-13


@pytest.mark.parametrize("name", SCORE_MODS)
def test_reductions_in_score_mod_first_and_second_order_match_loop(name):
    bias = _r(H, SQ, SKV)
    sm = _score_mods(bias)[name]
    inputs = _qkv() + [bias]
    f1, f2 = second_order(lambda q, k, v, _: flexebt.flex_attention(q, k, v, score_mod=sm, return_lse=True), inputs)
    r1, r2 = second_order(lambda q, k, v, _: loop_oracle(q, k, v, sm), inputs)
    for what, a, b in zip(["dq", "dk", "dv", "dbias"] * 2, f1 + f2, r1 + r2):
        assert rel_err(a, b) < 1e-11, what


def test_gqa_and_low_precision_follow_per_score_semantics():
    sm = _score_mods(None)["sum_and_norm"]
    q, k, v = _qkv(Hkv=1, requires_grad=False)
    out = flexebt.flex_attention(q, k, v, score_mod=sm, enable_gqa=True)
    assert rel_err(out, _torch_forward(q, k, v, score_mod=sm, enable_gqa=True)) < 1e-13
    assert rel_err(out, loop_oracle(q, k, v, sm)[0]) < 1e-13
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        ql, kl, vl = (x.to(dtype) for x in (q, k, v))
        got = flexebt.flex_attention(ql, kl, vl, score_mod=sm, enable_gqa=True)
        assert got.dtype == dtype and rel_err(got, loop_oracle(ql, kl, vl, sm)[0]) < tol


def _masks():
    doc = torch.tensor([0, 0, 1, 1, 1, 2])

    def all_and_stack_max(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx).all() & (torch.stack([q_idx, kv_idx]).max() < 5)

    def any_same_doc(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]).any() | (q_idx.sum() == kv_idx.sum())

    def count_nonzero(b, h, q_idx, kv_idx):  # per score: 1 iff q_idx - kv_idx != 0
        return torch.count_nonzero(q_idx - kv_idx) + (h == 0).sum() > 1

    return {f.__name__: f for f in (all_and_stack_max, any_same_doc, count_nonzero)}


@pytest.mark.parametrize("name", list(_masks()))
def test_mask_mods_with_reductions_through_create_block_mask(name):
    mm = _masks()[name]
    bm = create_block_mask(mm, None, H, SQ, SKV, device="cpu", BLOCK_SIZE=2)
    q, k, v = _qkv()
    out = flexebt.flex_attention(q, k, v, block_mask=bm)
    assert rel_err(out, _torch_forward(q.detach(), k.detach(), v.detach(), block_mask=bm)) < 1e-13
    ref = loop_oracle(q, k, v, mask_mod=mm)[0]
    assert rel_err(out, ref) < 1e-13
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [q, k, v], g), torch.autograd.grad(ref, [q, k, v], g)):
        assert rel_err(a, b) < 1e-12


# ---- mods that cannot be evaluated per score are refused, naming the mod ----

def item_bias(score, b, h, q_idx, kv_idx):
    return score * score.item()


def branchy_softcap(score, b, h, q_idx, kv_idx):
    if score > 0:
        return torch.tanh(score)
    return score


def float_of_index(score, b, h, q_idx, kv_idx):
    return score + float(q_idx)


_COUNTER = torch.zeros(())


def counts_in_place(score, b, h, q_idx, kv_idx):
    _COUNTER.add_(score)
    return score


@pytest.mark.parametrize("mod", [item_bias, branchy_softcap, float_of_index, counts_in_place],
                         ids=lambda m: m.__name__)
def test_score_mods_that_need_python_values_are_refused_by_name(mod):
    q, k, v = _qkv(requires_grad=False)
    with pytest.raises((NotImplementedError, TypeError), match=mod.__name__) as info:
        flexebt.flex_attention(q, k, v, score_mod=mod)
    assert "torch.where" in str(info.value)


def test_mask_mods_that_need_python_values_are_refused_by_name():
    def python_if_mask(b, h, q_idx, kv_idx):
        return True if q_idx >= kv_idx else False

    def item_window(b, h, q_idx, kv_idx):
        return abs(q_idx.item() - kv_idx.item()) < 2

    good = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, SQ, SKV, device="cpu", BLOCK_SIZE=2)
    q, k, v = _qkv(requires_grad=False)
    for mm in (python_if_mask, item_window):
        bm = BlockMask.from_kv_blocks(good.kv_num_blocks, good.kv_indices, good.full_kv_num_blocks,
                                      good.full_kv_indices, BLOCK_SIZE=2, mask_mod=mm, seq_lengths=(SQ, SKV))
        with pytest.raises((NotImplementedError, TypeError), match=mm.__name__):
            flexebt.flex_attention(q, k, v, block_mask=bm)
        with pytest.raises((NotImplementedError, TypeError), match=mm.__name__):
            eval_mask_mod(mm, (B, H, SQ, SKV), *index_grid(B, H, SQ, SKV, "cpu"))


def test_a_mod_returning_more_than_one_value_per_score_is_refused():
    table = torch.randn(3)

    def vector_bias(score, b, h, q_idx, kv_idx):
        return score + table

    q, k, v = _qkv(requires_grad=False)
    with pytest.raises(TypeError, match="vector_bias"):
        flexebt.flex_attention(q, k, v, score_mod=vector_bias)


# ---- indexing captured tensors ----

def test_out_of_range_index_raises_index_error_like_torch():
    bias = torch.randn(H, SQ, SKV, dtype=F64)

    def shifted_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx + 1, kv_idx]

    def shifted_mask(b, h, q_idx, kv_idx):
        return bias[h, q_idx, kv_idx + 1] > 0

    q, k, v = _qkv(requires_grad=False)
    with pytest.raises(IndexError):
        _torch_forward(q, k, v, score_mod=shifted_bias)
    with pytest.raises(IndexError):
        flexebt.flex_attention(q, k, v, score_mod=shifted_bias)
    with pytest.raises(IndexError):
        eval_mask_mod(shifted_mask, (B, H, SQ, SKV), *index_grid(B, H, SQ, SKV, "cpu"))


def test_negative_indices_wrap_like_torch():
    bias = _r(H, SQ, SKV)
    table = _r(2 * SKV)

    def wrapped(score, b, h, q_idx, kv_idx):
        return score + bias[h - H, q_idx - kv_idx, -1 - kv_idx] + table[q_idx - kv_idx]

    q, k, v = _qkv()
    out = flexebt.flex_attention(q, k, v, score_mod=wrapped)
    assert rel_err(out, _torch_forward(q.detach(), k.detach(), v.detach(), score_mod=wrapped)) < 1e-13
    ref = loop_oracle(q, k, v, wrapped)[0]
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [q, bias, table], g), torch.autograd.grad(ref, [q, bias, table], g)):
        assert rel_err(a, b) < 1e-12


# ---- results that are not a float score ----

def python_number(score, b, h, q_idx, kv_idx):
    return 0.75


def int_distance(score, b, h, q_idx, kv_idx):
    return kv_idx - q_idx


def bool_causal(score, b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def constant_tensor(score, b, h, q_idx, kv_idx):
    return torch.tensor(0.1, dtype=torch.float64)


@pytest.mark.parametrize("mod", [python_number, int_distance, bool_causal, constant_tensor],
                         ids=lambda m: m.__name__)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_results_that_are_not_the_score_dtype_are_cast(mod, dtype):
    q, k, v = _qkv(dtype=dtype)
    out, lse = flexebt.flex_attention(q, k, v, score_mod=mod, return_lse=True)
    ref, ref_lse = loop_oracle(q, k, v, mod)
    tol = 1e-13 if dtype == F64 else 1e-6
    assert out.dtype == dtype and rel_err(out, ref) < tol and rel_err(lse, ref_lse) < tol
    if mod is not python_number:  # torch's vmap needs tensors from a mod
        assert rel_err(out, _torch_forward(q.detach(), k.detach(), v.detach(), score_mod=mod)) < tol
    dv, = torch.autograd.grad(out.sum(), v)
    assert torch.isfinite(dv).all()


def test_mask_mod_returning_python_bool_or_int():
    keep = eval_mask_mod(lambda b, h, q, kv: True, (B, H, SQ, SKV), *index_grid(B, H, SQ, SKV, "cpu"))
    assert keep.dtype == torch.bool and keep.shape == (B, H, SQ, SKV) and keep.all()
    keep = eval_mask_mod(lambda b, h, q, kv: (q - kv) % 2, (B, H, SQ, SKV), *index_grid(B, H, SQ, SKV, "cpu"))
    qi, ki = torch.meshgrid(torch.arange(SQ), torch.arange(SKV), indexing="ij")
    assert torch.equal(keep[0, 0], (qi - ki) % 2 == 1)


# ---- second order with captured tensors, and torch.func ----

def test_gradcheck_and_gradgradcheck_with_captured_tensors():
    bias = _r(H, 3, 4)
    gate = _r(H)

    def gated_norm_bias(score, b, h, q_idx, kv_idx):
        return score * torch.sigmoid(gate[h]) + bias[h, q_idx, kv_idx] * score.norm() - score.abs().sum() ** 2 * 0.1

    mask = create_block_mask(lambda b, h, q, kv: (q >= kv).all() | (kv == 3), None, None, 3, 4, device="cpu",
                             BLOCK_SIZE=2)

    def fn(q, k, v, bias, gate):
        return flexebt.flex_attention(q, k, v, score_mod=gated_norm_bias, block_mask=mask, return_lse=True)

    inputs = (_r(1, H, 3, 4), _r(1, H, 4, 4), _r(1, H, 4, 3), bias, gate)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_closed_form_double_backward_uses_per_score_derivatives():
    def squared_norm(score, b, h, q_idx, kv_idx):
        return score + 0.3 * score.norm() ** 2 + torch.sin(score.sum())

    q, k, v = _qkv()
    do = torch.randn(B, H, SQ, D, dtype=F64)
    gq, gk, gv = (torch.randn_like(x) for x in (q, k, v))
    got = attention_double_backward(q.detach(), k.detach(), v.detach(), do, None, gq, gk, gv, squared_norm)
    out, _ = flex_attention_reference(q, k, v, squared_norm)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], do, create_graph=True)
    want = torch.autograd.grad([dq, dk, dv], [q, k, v], [gq, gk, gv])
    for a, b in zip(got[:3], want):
        assert rel_err(a, b) < 1e-12


def test_torch_func_grad_jvp_vmap_with_reduction_mod():
    sm = _score_mods(None)["sum_and_norm"]
    q, k, v = _qkv(requires_grad=False)

    def energy(q):
        return flexebt.flex_attention(q, k, v, score_mod=sm).square().sum()

    def energy_loop(q):
        return loop_oracle(q, k, v, sm)[0].square().sum()

    g = torch.func.grad(energy)(q)
    assert rel_err(g, torch.func.grad(energy_loop)(q)) < 1e-12
    t = torch.randn_like(q)
    _, hvp = torch.func.jvp(torch.func.grad(energy), (q,), (t,))
    qq = q.clone().requires_grad_()
    gg = torch.autograd.grad(energy_loop(qq), qq, create_graph=True)[0]
    assert rel_err(hvp, torch.autograd.grad((gg * t).sum(), qq)[0]) < 1e-11
    qs = torch.randn(3, *q.shape, dtype=F64)
    batched = torch.func.vmap(lambda x: flexebt.flex_attention(x, k, v, score_mod=sm))(qs)
    for i in range(3):
        assert rel_err(batched[i], loop_oracle(qs[i], k, v, sm)[0]) < 1e-13


# ---- EBT and piecewise references ----

def test_ebt_reference_applies_mods_per_score():
    So, Sp = 5, 4

    def frame_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx).all() & (torch.stack([q_idx - kv_idx]).amax() < 4)

    def frame_mod(score, b, h, q_idx, kv_idx):
        return score - score.sum() * 0.5 + 0.1 * (q_idx - kv_idx).abs().sum()

    bm = flexebt.create_ebt_block_mask(frame_mask, None, None, So, Sp, BLOCK_SIZE=2)
    x = [_r(1, H, S, D) for S in (So, So, So, Sp, Sp, Sp)]
    got = flexebt.flex_ebt_attention(*x, score_mod=frame_mod, block_mask=bm, return_lse=True)
    want = ebt_oracle(*x, score_mod=frame_mod, mask_mod=frame_mask)
    order = [0, 1, 2, 3]  # out_o, out_p, lse_o, lse_p
    for i in order:
        assert rel_err(got[i], want[i]) < 1e-12
    g = [torch.randn_like(o) for o in got[:2]]
    for a, b in zip(torch.autograd.grad(got[:2], x, g), torch.autograd.grad(want[:2], x, g)):
        assert rel_err(a, b) < 1e-11


def test_piecewise_reference_applies_score_mod_per_score():
    M, N, w = 4, 6, 2
    q1, k1, q2, k2, v = (_r(1, H, S, D) for S in (M, N, M, N, N))

    def halve_sum(score, b, h, q_idx, kv_idx):
        return score.sum() * 0.5 + score.norm()

    out, lse = piecewise_attention_reference(q1, k1, q2, k2, v, w, causal=True, score_mod=halve_sum)
    scale = D ** -0.5
    rows, lses = [], []
    for h in range(H):
        for m in range(M):
            cand = []
            for n in range(N - M + m + 1):  # causal
                qa, ka = (q2, k2) if (N - M) + m - n >= w else (q1, k1)
                s = scale * torch.dot(qa[0, h, m], ka[0, h, n])
                cand.append(halve_sum(s, *(torch.tensor(i) for i in (0, h, m, n))))
            s = torch.stack(cand)
            rows.append(torch.softmax(s, 0) @ v[0, h, :len(cand)])
            lses.append(torch.logsumexp(s, 0))
    ref, ref_lse = torch.stack(rows).view(1, H, M, D), torch.stack(lses).view(1, H, M)
    assert rel_err(out, ref) < 1e-13 and rel_err(lse, ref_lse) < 1e-13
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [q1, k2, v], g), torch.autograd.grad(ref, [q1, k2, v], g)):
        assert rel_err(a, b) < 1e-12


# ---- empty shapes ----

def _check_empty(outs, lses, inputs):
    for o in outs:
        assert not torch.isnan(o).any() and (o == 0).all()
    for lse in lses:
        assert torch.isneginf(lse).all()
    total = sum(o.sum() for o in outs) + sum(torch.where(torch.isinf(lse), 0.0, lse).sum() for lse in lses)
    grads = torch.autograd.grad(total, inputs, allow_unused=True, materialize_grads=True)
    for g, x in zip(grads, inputs):
        assert g.shape == x.shape and not torch.isnan(g).any() and (g == 0).all()


@pytest.mark.parametrize("Sq,Skv", [(0, 6), (5, 0), (0, 0)], ids=lambda s: str(s))
@pytest.mark.parametrize("with_mod", [False, True], ids=["plain", "score_mod"])
def test_empty_flex_reference(Sq, Skv, with_mod):
    sm = _score_mods(None)["sum_and_norm"] if with_mod else None
    q, k, v = _qkv(Sq, Skv)
    out, lse = flex_attention_reference(q, k, v, sm)
    assert out.shape == (B, H, Sq, D) and lse.shape == (B, H, Sq)
    _check_empty([out], [lse], [q, k, v])


def test_empty_ebt_and_piecewise_references():
    x = [_r(1, H, 0, D) for _ in range(6)]
    out_o, out_p, lse_o, lse_p = ebt_attention_reference(*x, score_mod=_score_mods(None)["sum_and_norm"])
    assert out_o.shape == out_p.shape == (1, H, 0, D) and lse_o.shape == lse_p.shape == (1, H, 0)
    _check_empty([out_o, out_p], [lse_o, lse_p], x)
    # observed tokens but no prediction
    x = [_r(1, H, S, D) for S in (3, 3, 3, 0, 0, 0)]
    out_o, out_p, lse_o, lse_p = ebt_attention_reference(*x)
    assert out_p.shape == (1, H, 0, D) and lse_p.shape == (1, H, 0) and torch.isfinite(out_o).all()
    # piecewise: no key (rows empty: zeros, -inf) and no query
    x = [_r(1, H, S, D) for S in (4, 0, 4, 0, 0)]
    out, lse = piecewise_attention_reference(*x, 1, causal=False)
    assert out.shape == (1, H, 4, D)
    _check_empty([out], [lse], x)
    x = [_r(1, H, S, D) for S in (0, 5, 0, 5, 5)]
    out, lse = piecewise_attention_reference(*x, 1, causal=True)
    assert out.shape == (1, H, 0, D) and lse.shape == (1, H, 0)
    _check_empty([out], [lse], x)


@pytest.mark.parametrize("mod,message", [
    (lambda s, b, h, q, kv: s + (q // (kv % 3)).float(), "ZeroDivisionError"),
    (lambda s, b, h, q, kv: s + (q % (kv % 3)).float(), "ZeroDivisionError"),
    (lambda s, b, h, q, kv: s + (q ** -1).float(), "Integers to negative integer powers"),
])
def test_integer_arithmetic_errors_reach_the_caller_as_torch_raises_them(mod, message):
    """An integer divided by zero in a mod is torch's RuntimeError, not a refusal of how the mod is
    written."""
    q = torch.randn(1, 1, 5, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=message) as torch_error:
        torch_flex(q, q, q, score_mod=mod)
    with pytest.raises(RuntimeError, match=message) as ours:
        flexebt.flex_attention(q, q, q, score_mod=mod, kernel_options={"BACKEND": "REFERENCE"})
    assert type(ours.value) is type(torch_error.value)


def test_a_nan_row_has_a_nan_lse_as_in_torch():
    """A NaN in one query row: that row's output and lse are NaN (not the -inf of a row that keeps no
    key); the other rows are torch's."""
    q, k, v = (torch.randn(1, 2, 7, 8, dtype=torch.float64) for _ in range(3))
    q[0, 0, 3, 2] = float("nan")
    want, want_lse = torch_flex(q, k, v, return_lse=True)
    out, lse = flexebt.flex_attention(q, k, v, return_lse=True, kernel_options={"BACKEND": "REFERENCE"})
    assert torch.isnan(lse[0, 0, 3]) and torch.isnan(out[0, 0, 3]).all()
    assert torch.equal(torch.isnan(lse), torch.isnan(want_lse))
    finite = ~torch.isnan(want_lse)
    assert rel_err(lse[finite], want_lse[finite]) < 1e-12 and rel_err(out[finite], want[finite]) < 1e-12


def _undefined_where_removed(score, b, h, q_idx, kv_idx):
    """NaN wherever kv_idx > q_idx (sqrt of a negative number), defined on the causal triangle."""
    return score / torch.sqrt((q_idx - kv_idx + 1).to(score.dtype)) + torch.log((q_idx - kv_idx + 1).to(score.dtype))


@pytest.mark.parametrize("backend", ["REFERENCE", "TRITON"])
@pytest.mark.parametrize("family", ["flex", "ebt", "piecewise"])
def test_mod_undefined_where_the_mask_removes_pairs(family, backend, monkeypatch):
    """A score_mod that is NaN only at positions the mask removes: those positions change no
    result, so the outputs, first- and second-order gradients are finite and equal those of the
    same attention written with a mod that is defined everywhere (its values on the kept
    positions are the same)."""
    if backend == "TRITON":
        monkeypatch.setenv("TRITON_INTERPRET", "1")

    def defined(score, b, h, q_idx, kv_idx):
        d = (q_idx - kv_idx + 1).clamp_min(1).to(score.dtype)
        return score / torch.sqrt(d) + torch.log(d)

    torch.manual_seed(0)
    dt = torch.float64 if backend == "REFERENCE" else torch.float32
    opts = {"BACKEND": backend}
    if family == "flex":
        S = 21
        bm = flexebt.create_block_mask(lambda b, h, q, kv: q >= kv, None, None, S, S, device="cpu", BLOCK_SIZE=16)
        x0 = [torch.randn(1, 2, S, 16, dtype=dt) for _ in range(3)]

        def attend(x, sm):
            return (flexebt.flex_attention(*x, score_mod=sm, block_mask=bm, kernel_options=opts),)
    elif family == "ebt":
        S = 19  # frame positions: the observed stream's t, the predicted stream's t + 1; causal frame mask
        bm = flexebt.create_ebt_block_mask(None, None, None, S, S, device="cpu", BLOCK_SIZE=16)
        x0 = [torch.randn(1, 2, S, 16, dtype=dt) for _ in range(6)]

        def attend(x, sm):
            return flexebt.flex_ebt_attention(*x, score_mod=sm, block_mask=bm, kernel_options=opts)
    else:
        S = 23
        x0 = [torch.randn(1, 2, S, 16, dtype=dt) for _ in range(5)]

        def attend(x, sm):
            return (flexebt.piecewise_attention(*x, 7, causal=True, score_mod=sm, kernel_options=opts),)

    def orders(sm):
        x = [t.clone().requires_grad_() for t in x0]
        outs = attend(x, sm)
        g = torch.autograd.grad(sum((o * o).sum() for o in outs), x, create_graph=True)
        g2 = torch.autograd.grad(sum((t * t).sum() for t in g), x)
        return [o.detach() for o in outs] + list(g) + list(g2)

    tol = 1e-12 if dt == torch.float64 else 1e-5
    for a, b in zip(orders(_undefined_where_removed), orders(defined)):
        assert torch.isfinite(a).all()
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())
