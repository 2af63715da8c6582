"""Mods through the attention kernels (interpreter) against the reference, first and second order.

The op table (test_op_table.py) checks each op's generated code on chosen operands; these tests
run whole mods through flex_attention: several captured tensors of different dtypes in one mod
(the value graph and the derivative graph once shared variable names), captured tensors that are
views (slices, strided, transposed, expanded), chained indexing, one-element tensors used as
values (with and without gradient), negative indices (they wrap) and indices out of range (an
error, as in torch), integer floor semantics in mask_mods, odd lengths and GQA.
"""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import flexebt
from helpers import rel_err, second_order

pytestmark = pytest.mark.interpreter
T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}
B, H, HKV, S, D = 1, 4, 2, 19, 16


def _compare(score_mod, learned, block_mask=None, tol=2e-5):
    q = torch.randn(B, H, S, D, requires_grad=True)
    k, v = (torch.randn(B, HKV, S, D, requires_grad=True) for _ in range(2))

    outs = {}

    def run(backend):
        def f(*xs):
            out = flexebt.flex_attention(*xs[:3], score_mod=score_mod, block_mask=block_mask, enable_gqa=True,
                                         kernel_options=backend)
            outs[backend["BACKEND"]] = out.detach()  # the forward's output, checked below (no second forward)
            return out
        return f

    got = second_order(run(T), [q, k, v] + learned)
    want = second_order(run(R), [q, k, v] + learned)
    out_t, out_r = outs["TRITON"], outs["REFERENCE"]
    assert rel_err(out_t, out_r) < tol
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.isfinite(a).all() and rel_err(a, b) < tol


def test_several_captured_tensors_of_different_dtypes():
    rel = torch.randn(H, 2 * S + 1, requires_grad=True)                 # fp32, learned
    doc = torch.randint(0, 3, (S,), dtype=torch.int64)                   # int64 document ids
    gate = torch.rand(S) > 0.3                                           # bool
    scale64 = torch.randn(H, dtype=torch.float64, requires_grad=True)    # float64, learned

    def mixed(score, b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        return score * (1 + rel[h, q_idx - kv_idx + S] * same) + torch.where(gate[kv_idx], scale64[h], -0.5)

    _compare(mixed, [rel, scale64])


@pytest.mark.parametrize("view", ["slice", "strided", "transposed", "expanded"])
def test_captured_views(view):
    if view == "slice":
        big = torch.randn(H + 1, S + 5, S + 7)
        bias = big[1:, 2:S + 2, 3:S + 3].detach().requires_grad_(True)
    elif view == "strided":
        bias = torch.randn(H, 2 * S, S)[:, ::2].detach().requires_grad_(True)
    elif view == "transposed":
        bias = torch.randn(S, S, H).permute(2, 1, 0).detach().requires_grad_(True)
    else:
        base = torch.randn(1, S, S, requires_grad=True)
        bias = base.expand(H, S, S)
    learned = [bias] if bias.is_leaf else [base]

    def biased(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    _compare(biased, learned)


def test_chained_indexing_and_constant_indices():
    bias = torch.randn(H, S, S, requires_grad=True)
    row = torch.randn(S, 3, requires_grad=True)

    def chained(score, b, h, q_idx, kv_idx):
        return score + bias[h][q_idx][kv_idx] + row[kv_idx, 2] + bias[:, 1][h, q_idx]

    _compare(chained, [bias, row])


def test_one_element_tensors_as_values():
    temp = torch.tensor(0.7, requires_grad=True)
    shift = torch.tensor(0.25, requires_grad=True)

    def tempered(score, b, h, q_idx, kv_idx):
        return score * temp + shift.detach() * (q_idx - kv_idx)

    _compare(tempered, [temp])
    q = torch.randn(B, H, S, D)
    out = flexebt.flex_attention(q, q, q, score_mod=tempered, kernel_options=T)
    (g,) = torch.autograd.grad(out.sum(), shift, allow_unused=True)
    assert g is None  # read through .detach(): no gradient, as in torch


def test_negative_indices_wrap():
    bias = torch.randn(H, S, requires_grad=True)

    def relative(score, b, h, q_idx, kv_idx):
        return score + bias[h, kv_idx - q_idx]  # negative for kv < q: wraps, as in torch

    _compare(relative, [bias])


def test_index_out_of_range_is_an_error():
    bias = torch.randn(H, S, S)

    def past_the_end(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx + 1, kv_idx]

    q = torch.randn(B, H, S, D)
    with pytest.raises(IndexError, match="past_the_end"):
        flexebt.flex_attention(q, q, q, score_mod=past_the_end, kernel_options=T)
    with pytest.raises(IndexError):
        flexebt.flex_attention(q, q, q, score_mod=past_the_end, kernel_options=R)

    def in_range(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    # the error does not stick to later calls
    out = flexebt.flex_attention(q, q, q, score_mod=in_range, kernel_options=T)
    assert rel_err(out, flexebt.flex_attention(q, q, q, score_mod=in_range, kernel_options=R)) < 1e-5


def test_floor_semantics_in_score_and_mask_mods():
    def stripes(b, h, q_idx, kv_idx):
        return ((q_idx - kv_idx) // 3) % 2 == 0  # negative differences floor, as in torch

    def buckets(score, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return score + 0.1 * (d // 4) + 0.05 * torch.remainder(d, 5) - 0.02 * torch.div(d, -3, rounding_mode="floor")

    bm = create_block_mask(stripes, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    _compare(buckets, [], block_mask=bm)


def test_powers_of_negative_scores():
    def cubic(score, b, h, q_idx, kv_idx):
        return 0.3 * score ** 3 - 0.1 * score ** 2 + 0.05 * score ** 4 + torch.tanh(score) ** 5

    _compare(cubic, [])


def test_position_index_past_a_short_tensor_is_an_error_before_launch():
    """A dimension indexed by a bare position (h, q_idx, kv_idx) is checked against the call's
    lengths on the host, once per call, instead of per score."""
    short = torch.randn(H, S - 1, S)

    def biased(score, b, h, q_idx, kv_idx):
        return score + short[h, q_idx, kv_idx]

    q = torch.randn(B, H, S, D)
    with pytest.raises(IndexError, match=r"biased.*q_idx.*up to 18.*size 18"):
        flexebt.flex_attention(q, q, q, score_mod=biased, kernel_options=T)
    with pytest.raises(IndexError):
        flexebt.flex_attention(q, q, q, score_mod=biased, kernel_options=R)


def test_gradient_of_a_temperature_is_as_accurate_as_eager_math():
    """A tensor read at one address per tile (a temperature, per-head scales) gets its gradient as
    a tree sum per tile, not one fp32 atomic per score: first and second order within the bound
    relative to eager fp32 math."""
    torch.manual_seed(3)
    temp = torch.tensor(0.9, requires_grad=True)
    head = torch.randn(H, requires_grad=True)

    def tempered(score, b, h, q_idx, kv_idx):
        return score * temp + 0.5 * score * head[h]

    n = 37
    x = [torch.randn(2, H, n, D, requires_grad=True) for _ in range(3)]

    def run(backend, cast=None):
        def f(*xs):
            ins = [t.double() for t in xs[:3]] if cast else xs[:3]
            out = flexebt.flex_attention(*ins, score_mod=tempered, kernel_options=backend)
            return out.float() if cast else out
        return f

    kern = second_order(run(T), x + [temp, head])
    eager = second_order(run(R), x + [temp, head])
    exact = second_order(run(R, cast=True), x + [temp, head])
    for k_, e_, x_ in zip(kern[0] + kern[1], eager[0] + eager[1], exact[0] + exact[1]):
        assert rel_err(k_, x_) <= max(3 * rel_err(e_, x_), 1e-6)


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["or", "and", "xor"])
def test_mask_combining_positions_with_a_captured_scalar(op):
    """A mask_mod combining a position comparison with a comparison of a captured 0-d tensor
    (`(q_idx >= kv_idx) | (temp <= 0.8)`): a bool from a scalar load and a bool tile in one op."""
    from torch.nn.attention.flex_attention import create_block_mask

    temp = torch.tensor(0.5)
    combine = {"or": lambda a, c: a | c, "and": lambda a, c: a & c, "xor": lambda a, c: a ^ c}[op]

    def mask_mod(b, h, q_idx, kv_idx):
        return combine(q_idx >= kv_idx, temp <= 0.8)

    bm = create_block_mask(mask_mod, 1, 1, 20, 20, device="cpu", BLOCK_SIZE=16)
    x = [torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3)]

    def run(backend):
        return lambda q, k, v: flexebt.flex_attention(q, k, v, block_mask=bm, kernel_options={"BACKEND": backend})

    assert rel_err(run("TRITON")(*x), run("REFERENCE")(*x)) < 1e-5
    got, want = second_order(run("TRITON"), x), second_order(run("REFERENCE"), x)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert rel_err(a, b) < 1e-4


def test_a_reduction_over_a_captured_tensor_is_refused_with_the_way_out():
    """A mod that sums a row of a captured tensor is refused by the kernels, naming the tensor as
    the mod wrote it and the rewrite; the rewrite (reduce outside the mod, capture the result)
    gives the reference's numbers and gradients."""
    table_base = torch.randn(B, H, 6, dtype=torch.float64, requires_grad=True)
    table = table_base

    def summed_row_bias(score, b, h, q_idx, kv_idx):
        return score + table[b, h].sum()

    def summed_row_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) | (table[b, h].sum() < 0)

    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    with pytest.raises(NotImplementedError, match=r"summed_row_bias.*'table' of shape \(1, 4, 6\).*sum.*outside the mod"):
        flexebt.flex_attention(q, k, v, score_mod=summed_row_bias, kernel_options=T)
    bm = create_block_mask(summed_row_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(NotImplementedError, match=r"summed_row_mask.*'table'.*REFERENCE"):
        flexebt.flex_attention(q, k, v, block_mask=bm, kernel_options=T)
    flexebt.flex_attention(q, k, v, score_mod=summed_row_bias, kernel_options=R)  # the reference computes it

    row_sum = table_base.sum(-1)

    def precomputed(score, b, h, q_idx, kv_idx):
        return score * 0.5 + torch.tanh(row_sum[b, h] * (q_idx - kv_idx) / S)

    _compare(precomputed, [table_base])


@pytest.mark.parametrize("family", ["flex", "ebt"])
def test_mask_mod_of_the_head_only_with_a_learned_bias(family):
    """A mask_mod that reads only ``h`` is one value per program, not a tile; in partial blocks it
    masks the scatter of a captured tensor's gradient, which needs a boolean tile (the interpreter
    once broadcast it to an int32 one and refused it as a mask: a crash in the backward)."""
    bias = (0.5 * torch.randn(2, H, dtype=torch.float64)).requires_grad_()
    sq, skv = 13, 11

    def clamped_bias(score, b, h, q_idx, kv_idx):
        return score + bias[torch.clamp(q_idx - kv_idx, min=0, max=1), h]

    def every_head(b, h, q_idx, kv_idx):
        return h >= h

    def odd_heads_or_causal(b, h, q_idx, kv_idx):
        return (h % 2 == 1) | (q_idx >= kv_idx)

    for mask_mod in (every_head, odd_heads_or_causal):
        if family == "flex":
            xs = [torch.randn(B, H, s, D, dtype=torch.float64).float().requires_grad_() for s in (sq, skv, skv)]
            bm = create_block_mask(mask_mod, B, H, sq, skv, device="cpu", BLOCK_SIZE=16)

            def run(opts):
                return [flexebt.flex_attention(*xs, score_mod=clamped_bias, block_mask=bm, kernel_options=opts)]
        else:
            xs = [torch.randn(B, H, s, D).requires_grad_() for s in (sq, sq, sq, skv, skv, skv)]
            bm = flexebt.create_ebt_block_mask(mask_mod, B, H, sq, skv, device="cpu", BLOCK_SIZE=16)

            def run(opts):
                return list(flexebt.flex_ebt_attention(*xs, score_mod=clamped_bias, block_mask=bm,
                                                       kernel_options=opts))
        got, want = [], []
        for opts, acc in ((T, got), (R, want)):
            outs = run(opts)
            total = sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
            acc.extend(outs + list(torch.autograd.grad(total, xs + [bias])))
        for a, b in zip(got, want):
            assert torch.isfinite(a).all() and rel_err(a, b) < 2e-5


def test_where_between_a_captured_scalar_and_the_score():
    """``torch.where(cond, |temperature|, score)`` with a 0-d captured tensor: autograd's second
    derivative graph creates ``torch.zeros(())``, which the kernels once refused."""
    temperature = torch.tensor(1.18)

    def scalar_or_score(score, b, h, q_idx, kv_idx):
        return torch.abs(torch.where(q_idx >= kv_idx, torch.abs(temperature), score))

    _compare(scalar_or_score, [])


def test_in_place_arithmetic():
    """``score += ...``, ``*=``, ``-=``, ``/=`` on the score and on integer values, as torch runs them:
    first and second order, a learned bias's gradient included."""
    bias = torch.randn(S, requires_grad=True)

    def in_place(score, b, h, q_idx, kv_idx):
        score = score * 1.0
        score *= 0.75
        score += bias[kv_idx]
        dist = q_idx - kv_idx
        dist += 2 ** 33  # past int32: int64, as in torch
        dist *= 3
        score -= 0.05 * (dist % 7)
        score /= 1.25
        return score

    _compare(in_place, [bias])


def test_a_mod_torch_cannot_differentiate_runs_forward_and_refuses_a_gradient():
    """``score // 0.5`` (floor_divide of a float has no derivative in torch): the forward equals
    torch's, on every family; a gradient through it -- backward, forward mode -- is refused, as
    torch's own backward refuses it."""
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    def sm(s, b, h, q_idx, kv_idx):
        return s + (s // 0.5) * 0.1

    x = [torch.randn(1, 2, S, D) for _ in range(3)]
    want = torch_flex(*x, score_mod=sm)
    for backend in (T, R):
        assert rel_err(flexebt.flex_attention(*x, score_mod=sm, kernel_options=backend), want) < 1e-5
    y = [torch.randn(1, 2, L, D) for L in (S + 2, S + 2, S + 2, S, S, S)]
    for a, b in zip(flexebt.flex_ebt_attention(*y, score_mod=sm, kernel_options=T),
                    flexebt.flex_ebt_attention(*y, score_mod=sm, kernel_options=R)):
        assert rel_err(a, b) < 1e-5
    z = [torch.randn(1, 2, L, D) for L in (S, S + 2, S, S + 2, S + 2)]
    assert rel_err(flexebt.piecewise_attention(*z, dist_threshold=5, score_mod=sm, kernel_options=T),
                   flexebt.piecewise_attention(*z, dist_threshold=5, score_mod=sm, kernel_options=R)) < 1e-5

    xs = [a.clone().requires_grad_() for a in x]
    out = flexebt.flex_attention(*xs, score_mod=sm, kernel_options=T)
    with pytest.raises(NotImplementedError, match="cannot differentiate.*floor_divide"):
        torch.autograd.grad(out.sum(), xs)
    with pytest.raises(RuntimeError, match="floor_divide"):  # the reference: torch's own error
        torch.autograd.grad(flexebt.flex_attention(*xs, score_mod=sm, kernel_options=R).sum(), xs)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="cannot differentiate"):
        flexebt.flex_attention(fwAD.make_dual(x[0], torch.randn_like(x[0])), x[1], x[2], score_mod=sm,
                               kernel_options=T)


@pytest.mark.parametrize("cap", [30.0, 1e3, 1e5])
def test_tanh_of_small_arguments_keeps_fp32_accuracy(cap):
    """A soft-cap with a large cap takes tanh of small arguments, where 1 - exp(-2|x|) loses most
    digits: the kernels' tanh stays as accurate as torch's fp32 tanh (forward against float64, at
    the error of the same mod in fp32 eager math), and its derivatives follow."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    exact = flexebt.flex_attention(q.double(), k.double(), v.double(), score_mod=softcap, kernel_options=R)
    eager = flexebt.flex_attention(q, k, v, score_mod=softcap, kernel_options=R)
    got = flexebt.flex_attention(q, k, v, score_mod=softcap, kernel_options=T)
    assert rel_err(got, exact) < max(2 * rel_err(eager, exact), 5e-7)
    if cap > 100:  # the cap's own gradient, ~x^3 at x = score / cap, is below fp32's reach there
        return
    learned = torch.tensor(cap, requires_grad=True)

    def learned_cap(score, b, h, q_idx, kv_idx):
        return learned * torch.tanh(score / learned)

    # (the cap's gradient, tanh(x) - x sech^2(x) at small x, cancels in fp32 on both backends)
    _compare(learned_cap, [learned], tol=2e-4)


def test_tanh_values_at_the_edges():
    """tanh of -0.0, +-inf, the branch point 0.3 and tiny arguments, as torch computes them."""
    x = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 0.29999, 0.3, -0.30001, 1e-30, -1e-6, 7.0, -20.0])

    def mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(x[kv_idx]) * 1e8  # one kept key per row: its score is the max

    bm = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx == kv_idx, None, None, 11, 11, device="cpu",
                           BLOCK_SIZE=16)
    q, k, v = (torch.randn(1, 1, 11, 16) for _ in range(3))
    _, aux = flexebt.flex_attention(q, k, v, score_mod=mod, block_mask=bm, kernel_options=T,
                                    return_aux=flexebt.AuxRequest(max_scores=True))
    want = torch.tanh(x) * 1e8
    got = aux.max_scores[0, 0]
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    assert rel_err(got, want) < 1e-6


def test_tanh_derivatives_near_saturation():
    """Where tanh saturates, its derivative 1 - tanh^2 is small and tanh itself rounds next to +-1:
    computed from the rounded tanh, the derivative keeps only the few digits that rounding left.
    The kernels compute it from tanh's parts instead, so first- and second-order gradients through
    a saturated tanh (arguments about 1.5 to 6, both signs) stay within fp32 eager math's error
    against float64 on the same (fp32-representable) inputs -- not 3x it, as elsewhere: eager's
    derivative is torch's 1 - y * y from a correctly rounded y, ours is more accurate than that
    (from the rounded tanh it would be about 2.2x eager's error here)."""
    g = torch.Generator().manual_seed(0)
    shift = torch.linspace(1.5, 6.0, S) * torch.tensor([1.0, -1.0]).repeat(S)[:S]

    def saturated(score, b, h, q_idx, kv_idx):
        return 4.0 * torch.tanh(0.5 * score + shift[kv_idx])

    x64 = [torch.randn(B, H, S, D, generator=g).double()] + \
        [torch.randn(B, HKV, S, D, generator=g).double() for _ in range(2)]
    ct = torch.randn(B, H, S, D, generator=g).double()
    w = [torch.randn(x.shape, generator=g).double() for x in x64]

    def grads(dtype, backend):
        xs = [x.to(dtype).requires_grad_() for x in x64]
        out = flexebt.flex_attention(*xs, score_mod=saturated, enable_gqa=True, kernel_options=backend)
        first = torch.autograd.grad((out * ct.to(dtype)).sum(), xs, create_graph=True)
        loss = sum((f * wi.to(dtype)).sum() + 0.5 * (f * f).sum() for f, wi in zip(first, w))
        second = torch.autograd.grad(loss, xs)
        return [t.detach().double() for t in first + second]

    exact = grads(torch.float64, R)
    eager = grads(torch.float32, R)
    got = grads(torch.float32, T)
    for a, e, x in zip(got, eager, exact):
        assert rel_err(a, x) <= max(rel_err(e, x), 4e-7), (rel_err(a, x), rel_err(e, x))


def _against_reference(score_mod, tol=1e-5, grad_tol=1e-5, S=8):
    torch.manual_seed(0)
    x = [torch.randn(1, 1, S, 16, requires_grad=True) for _ in range(3)]
    got = flexebt.flex_attention(*x, score_mod=score_mod, kernel_options=T)
    want = flexebt.flex_attention(*x, score_mod=score_mod, kernel_options=R)
    assert rel_err(got, want) < tol
    for a, b in zip(torch.autograd.grad(got.square().sum(), x), torch.autograd.grad(want.square().sum(), x)):
        assert rel_err(a, b) < grad_tol


@pytest.mark.parametrize("form", ["rsub", "rsub of a tanh square", "add scalar", "sub scalar"])
def test_alpha_given_by_position(form):
    """make_fx records ``torch.rsub(x, 1, alpha=2)`` (and add / sub of a number) with alpha as a
    positional argument: it scales the subtracted operand there too."""
    mods_ = {"rsub": lambda s: torch.rsub(s, 1, alpha=2),
             "rsub of a tanh square": lambda s: torch.rsub(torch.tanh(s) * torch.tanh(s), 1, alpha=2),
             "add scalar": lambda s: torch.add(s, 1.5, alpha=-2),
             "sub scalar": lambda s: torch.sub(s, 0.5, alpha=3)}
    f = mods_[form]
    _against_reference(lambda score, b, h, q_idx, kv_idx: f(score))


def test_in_place_writes_through_views():
    """An in-place op on a view writes the tensor it views and that tensor's other views (one
    value per score: every view is the same element), as in torch; a clone is not written."""
    bias = torch.randn(1, 8, 8)

    def through_a_view(score, b, h, q_idx, kv_idx):
        q_idx.view(-1).mul_(0)
        return score + bias[h, q_idx, kv_idx]

    def a_sibling_view(score, b, h, q_idx, kv_idx):
        other = q_idx.view(1)
        q_idx.view(-1).add_(1)
        return score + bias[h, other[0] - 1, kv_idx]

    def a_clone(score, b, h, q_idx, kv_idx):
        c = q_idx.clone()
        c.mul_(0)
        return score + bias[h, q_idx, kv_idx] + c

    for mod in (through_a_view, a_sibling_view, a_clone):
        _against_reference(mod)


def test_a_half_precision_one_minus_tanh_squared_is_rounded_as_torch_rounds_it():
    """A mod that writes 1 - y * y of an fp16 tanh itself gets torch's per-op fp16 rounding (the
    kernels' accurate form of 1 - tanh^2 is for fp32 values only; with it the output was 5e-4 off).
    The gradients differ from torch's by fp16 rounding of the derivative graph, in any form."""
    def mod(score, b, h, q_idx, kv_idx):
        y = torch.tanh(3 * score.half())
        return score + 8 * (1 - y * y).float()

    _against_reference(mod, tol=2e-6, grad_tol=2e-3)


def test_an_expanded_captured_tensor_counts_its_contiguous_copy_for_offsets():
    """An expanded tensor that requires grad reaches the kernels as a contiguous copy: offsets into
    that copy decide between int32 and int64."""
    from flexebt.codegen.identity import wide_offsets

    small = torch.empty(1, 4096, 4096, device="meta")
    assert not wide_offsets(small)
    assert wide_offsets(small.expand(160, 4096, 4096))


def test_score_updated_in_place():
    """``score += w[h] * (q_idx - kv_idx)`` / ``score.mul_(2).add_(...).tanh_()``: torch lets a mod
    update its score argument in place.  The kernels give what they give for the same mod written
    out of place, bit for bit: first and second order, a learned tensor's gradients, the EBT own
    key's score too."""
    torch.manual_seed(0)
    w = torch.randn(2, requires_grad=True)

    def plus(score, b, h, q_idx, kv_idx):
        score += w[h] * (q_idx - kv_idx)
        return score

    def plus_out_of_place(score, b, h, q_idx, kv_idx):
        return score + w[h] * (q_idx - kv_idx)

    def chained(score, b, h, q_idx, kv_idx):
        return score.mul_(2).add_(w[h] * kv_idx).tanh_()

    def chained_out_of_place(score, b, h, q_idx, kv_idx):
        return (score * 2 + w[h] * kv_idx).tanh()

    x = [torch.randn(1, 2, 19, 16, requires_grad=True) for _ in range(3)] + [w]
    y = [torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(6)] + [w]
    def flex(mod):
        return second_order(lambda *a: [flexebt.flex_attention(*a[:3], score_mod=mod, kernel_options=T)], x)

    def ebt(mod):
        return second_order(lambda *a: list(flexebt.flex_ebt_attention(*a[:6], score_mod=mod, kernel_options=T)), y)

    for run, in_place, out_of_place in ((flex, plus, plus_out_of_place), (flex, chained, chained_out_of_place),
                                        (ebt, chained, chained_out_of_place)):
        got, want = run(in_place), run(out_of_place)
        for a, b in zip(got[0] + got[1], want[0] + want[1]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_precision_arithmetic_inside_a_mod(half):
    """A captured fp16 / bf16 tensor used in arithmetic (``s + tab[q_idx] * 0.5``) and the score
    cast to that dtype inside the mod (``(s.to(half) * 2).float()``): torch computes each op in
    fp32 and rounds its result to the half dtype (to nearest even); the kernels do the same, so
    the outputs match torch's own flex_attention (to fp32 accuracy: a wrong rounding is off by the
    half dtype's eps).  Gradients: against float64 math with the same roundings of the values
    and the casts' derivative 1, to the half dtype's accuracy (autograd rounds the cotangents
    that pass through a cast, by an amount that depends on them)."""
    torch.manual_seed(3)
    tab = (torch.randn(20) * 2).to(half)
    gain = torch.tensor([1.5, -0.7], requires_grad=True)

    def mod(s, b, h, q_idx, kv_idx):
        return s + tab[q_idx] * 0.5 + (s.to(half) * 2 + tab[kv_idx]).float() * gain[h] - (tab[q_idx] - tab[kv_idx]).float()

    def mod64(s, b, h, q_idx, kv_idx):
        s_half = s + (s.to(half).double() - s).detach()  # rounded value, derivative 1
        t = tab.double()
        return (s + (t[q_idx] * 0.5).to(half).double() + (s_half * 2 + t[kv_idx]).to(half).double() * gain64[h]
                - (t[q_idx] - t[kv_idx]).to(half).double())

    x = [torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3)]
    want = torch_flex_attention(*[t.detach() for t in x], score_mod=lambda *a: mod(*a).detach())
    got = flexebt.flex_attention(*x, score_mod=mod, kernel_options=T)
    assert rel_err(got, want) < 1e-5
    gain64 = gain.detach().double().requires_grad_()
    cot = torch.randn(1, 2, 20, 16)

    def orders(sm, xs, opts):
        out = flexebt.flex_attention(*xs[:3], score_mod=sm, kernel_options=opts)
        first = torch.autograd.grad((out * cot.to(out.dtype)).sum(), xs, create_graph=True)
        return list(first) + list(torch.autograd.grad(sum((f * f).sum() for f in first), xs))

    got = orders(mod, x + [gain], T)
    want = orders(mod64, [t.detach().double().requires_grad_() for t in x] + [gain64], R)
    for a, b in zip(got, want):  # autograd rounds the casts' cotangents to the half dtype: its eps
        assert rel_err(a, b) < 4 * torch.finfo(half).eps


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_numbers_next_to_half_values_as_torch_vmap_takes_them(half):
    """torch casts a Python number to the dtype of the fp16 / bf16 tensor next to it before ``+``,
    ``-``, ``%``, ``fmod``, ``**`` and comparisons (bf16 0.3 is 0.30078125); ``*`` and ``/`` keep
    the number on torch's fast path (plain eager code, a captured 0-d tensor), but torch applies a
    mod per score through torch.vmap, where a value that varies per score takes the general path
    and the number is rounded for ``*``, ``/``, ``//`` too (0.1 is 0.10009765625, 1001 is 1000);
    in-place ``mul_`` keeps it.  The kernels take the numbers as torch does, in the derivatives too
    (a derivative of the score times half arithmetic held the half loads as fp32 and gave NaN or
    1e29 in the interpreter, a comparison of half values crashed it): equal to torch's own
    flex_attention and to the reference to fp32 accuracy (a number taken the other way is off by
    the half dtype's eps), first and second order.  ``alpha`` of add / sub (and add_ / sub_), which
    torch rounds on some paths and not others, is refused by name."""
    tab = (torch.randn(24, generator=torch.Generator().manual_seed(5)) * 3).to(half)
    temp = torch.tensor(9.0).to(half)

    def mod(s, b, h, q_idx, kv_idx):
        d = (q_idx - kv_idx).to(half)
        t = tab[q_idx] / 3.3 + 0.7 / tab[kv_idx]
        kept = tab[kv_idx].clone().mul_(0.1)  # in place: the number as it is
        cast = (tab[q_idx] % 0.3 + torch.fmod(tab[kv_idx], 0.7) + tab[q_idx].abs() ** 1.1 + (tab[kv_idx] + 0.3)
                + (tab[kv_idx] > 0.3) + (0.3 - tab[q_idx]) + tab[kv_idx].clone().add_(0.3) + d // 0.3)
        # (the score times half arithmetic: the derivative graphs hold the loads as half values too)
        return s * (tab[kv_idx] * 0.1 + 1).float() + (d * 0.1).float() + (t * 1001).float() * 1e-3 + (torch.div(d, 0.7, rounding_mode="floor")
                                                                     + kept + temp * 0.1).float() * 0.1 \
            + cast.float() * 0.1

    x = [torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3)]
    want = torch_flex_attention(*[t.detach() for t in x], score_mod=mod)
    got = flexebt.flex_attention(*x, score_mod=mod, kernel_options=T)
    assert rel_err(got, want) < 1e-5
    got2 = second_order(lambda *a: [flexebt.flex_attention(*a, score_mod=mod, kernel_options=T)], x)
    want2 = second_order(lambda *a: [flexebt.flex_attention(*a, score_mod=mod, kernel_options=R)], x)
    for a, b in zip(got2[0] + got2[1], want2[0] + want2[1]):
        assert rel_err(a, b) < 1e-5

    def with_alpha(s, b, h, q_idx, kv_idx):
        return s + torch.add(tab[kv_idx], (q_idx - kv_idx).to(half), alpha=0.3).float()

    def with_alpha_in_place(s, b, h, q_idx, kv_idx):
        return s + tab[kv_idx].clone().sub_((q_idx - kv_idx).to(half), alpha=0.3).float()

    for refused in (with_alpha, with_alpha_in_place):
        with pytest.raises(NotImplementedError, match="alpha=0.3"):
            flexebt.flex_attention(*x, score_mod=refused, kernel_options=T)
    assert rel_err(flexebt.flex_attention(*x, score_mod=with_alpha, kernel_options=R),
                   torch_flex_attention(*[t.detach() for t in x], score_mod=with_alpha)) < 1e-6
