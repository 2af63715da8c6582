"""Fused double-backward kernels in the interpreter against the float64 reference: EBT-style
losses (energy -> gradient with create_graph -> loss on it -> gradients of everything), with an
lse cotangent, masks, soft-cap (f'' != 0), ALiBi, fully masked rows, odd lengths; third order."""

import pytest
import torch

import flexebt
import flexebt.autograd
from flexebt import masks, mods
from helpers import rel_err

pytestmark = pytest.mark.interpreter
T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}

CASES = {
    "plain": (None, None),
    "causal": (None, lambda: masks.causal_mask),
    "softcap_causal": (lambda H: mods.generate_tanh_softcap(2.0), lambda: masks.causal_mask),
    "alibi_window": (lambda H: mods.generate_alibi_bias(H), lambda: masks.generate_sliding_window(9)),
    "document": (None, lambda: masks.generate_document_mask([12, 9, 16])),
    "empty_rows": (None, lambda: (lambda b, h, q, kv: (q % 7 != 3) & (kv <= q))),
}


def _spy(monkeypatch, family):
    """Record the fused double backwards of plans of one family ("flex": one pass over three inputs;
    "ebt": the predicted stream's node, the pass with own keys -- the observed stream's node is a
    flex plan; "piecewise": two passes writing one row group), to assert that the fused kernels
    really ran."""
    calls = []
    original = flexebt.autograd.plan_double_backward
    is_family = {"flex": lambda pl: pl.n_inputs == 3 and len(pl.passes) == 1,
                 "ebt": lambda pl: any(p.own is not None for p in pl.passes),
                 "piecewise": lambda pl: len(pl.passes) == 2 and pl.n_rows == 1}[family]

    def spy(plan, *args, **kwargs):
        if is_family(plan):
            calls.append(1)
        return original(plan, *args, **kwargs)

    monkeypatch.setattr(flexebt.autograd, "plan_double_backward", spy)
    return calls


@pytest.fixture
def fused_calls(monkeypatch):
    return _spy(monkeypatch, "flex")


@pytest.fixture
def fused_ebt_calls(monkeypatch):
    return _spy(monkeypatch, "ebt")


@pytest.fixture
def fused_piecewise_calls(monkeypatch):
    return _spy(monkeypatch, "piecewise")


def _loss(x, sm, bm, backend, lse_weight, S):
    out, lse = flexebt.flex_attention(*x, score_mod=sm, block_mask=bm, return_lse=True, kernel_options=backend)
    energy = out.square().sum() + lse_weight * (torch.where(torch.isfinite(lse), lse, 0) * torch.linspace(0, 1, S)).sum()
    g = torch.autograd.grad(energy, x, create_graph=True)
    return sum((t * t).sum() * (i + 1) for i, t in enumerate(g))


@pytest.mark.parametrize("lse_weight", [0.0, 1.0])
@pytest.mark.parametrize("case", list(CASES))
def test_second_order_matches_reference(case, lse_weight, fused_calls):
    S, D, H = 37, 16, 2
    sf, mf = CASES[case]
    sm = sf(H) if sf else None
    bm = flexebt.create_block_mask(mf(), None, None, S, S, device="cpu", BLOCK_SIZE=16) if mf else None
    x = [torch.randn(1, H, S, D, requires_grad=True) for _ in range(3)]
    got = torch.autograd.grad(_loss(x, sm, bm, T, lse_weight, S), x)
    want = torch.autograd.grad(_loss(x, sm, bm, R, lse_weight, S), x)
    assert fused_calls, "the fused double-backward kernels did not run"
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-5


def test_third_order_is_exact():
    S, D = 33, 16
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    sm = mods.generate_tanh_softcap(2.0)
    x = [torch.randn(1, 2, S, D, requires_grad=True) for _ in range(3)]

    def third(backend):
        out = flexebt.flex_attention(*x, score_mod=sm, block_mask=bm, kernel_options=backend)
        g = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        h = torch.autograd.grad(sum((t * t).sum() for t in g), x, create_graph=True)
        return torch.autograd.grad(sum((t * t).sum() for t in h), x)

    for a, b in zip(third(T), third(R)):
        assert rel_err(a, b) < 1e-5


def _learned_mod(H, S):
    """t = tanh(s + bias[h, q, kv]) * gain[h]: two learned tensors, every second derivative
    (f_ss, f_sc, f_cc, and the bias-gain cross term) non-zero."""
    bias = (0.3 * torch.randn(H, S, S)).requires_grad_()
    gain = (1.0 + 0.2 * torch.randn(H)).requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score + bias[h, q_idx, kv_idx]) * gain[h]

    return score_mod, [bias, gain]


@pytest.mark.parametrize("which", ["bias", "tanh_bias_gain"])
def test_second_order_with_learned_tensors_is_fused(which, fused_calls):
    """Learned captured tensors: the fused kernels give the reference's gradients of q, k, v and
    of the tensors themselves (their second-order terms included)."""
    S, H = 17, 2
    if which == "bias":
        bias = (0.3 * torch.randn(H, S, S)).requires_grad_()
        sm, learned = mods.generate_bias_score_mod(bias), [bias]
    else:
        sm, learned = _learned_mod(H, S)
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    x = [torch.randn(1, H, S, 16, requires_grad=True) for _ in range(3)]

    def loss(backend):
        out = flexebt.flex_attention(*x, score_mod=sm, block_mask=bm, kernel_options=backend)
        g = torch.autograd.grad(out.square().sum(), x + learned, create_graph=True)
        return sum((t * t).sum() for t in g)

    got = torch.autograd.grad(loss(T), x + learned)
    assert fused_calls
    for a, b in zip(got, torch.autograd.grad(loss(R), x + learned)):
        assert rel_err(a, b) < 1e-5


def test_one_learned_tensor_read_twice(fused_calls):
    """A symmetric bias read at (q, kv) and at (kv, q): two loads of one tensor, each with its own
    cotangent and atomic scatter, and their cross second derivative."""
    S, H = 18, 2
    bias = (0.3 * torch.randn(H, S, S)).requires_grad_()

    def sym_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx] * bias[h, kv_idx, q_idx]

    x = [torch.randn(1, H, S, 16, requires_grad=True) for _ in range(3)]

    def loss(backend):
        out = flexebt.flex_attention(*x, score_mod=sym_bias, kernel_options=backend)
        g = torch.autograd.grad(out.square().sum(), x + [bias], create_graph=True)
        return sum((t * t).sum() for t in g)

    got = torch.autograd.grad(loss(T), x + [bias])
    assert fused_calls
    for a, b in zip(got, torch.autograd.grad(loss(R), x + [bias])):
        assert rel_err(a, b) < 1e-5


def test_frozen_captured_tensor_is_fused(fused_calls):
    """A captured tensor without gradient (a fixed bias table) takes the fused kernels."""
    bias = 0.3 * torch.randn(2, 19, 19)
    sm = mods.generate_bias_score_mod(bias)
    x = [torch.randn(1, 2, 19, 16, requires_grad=True) for _ in range(3)]

    def loss(backend):
        out = flexebt.flex_attention(*x, score_mod=sm, kernel_options=backend)
        g = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return sum((t * t).sum() for t in g)

    got = torch.autograd.grad(loss(T), x)
    assert fused_calls
    for a, b in zip(got, torch.autograd.grad(loss(R), x)):
        assert rel_err(a, b) < 1e-5


def test_third_order_with_learned_tensor_is_exact():
    """A double backward that builds a graph while a captured tensor needs a gradient runs the
    reference double backward (its third order must carry the tensor's terms); the fused kernels
    still serve the double backwards that build no graph."""
    bias = (0.3 * torch.randn(2, 9, 9)).requires_grad_()
    sm = mods.generate_bias_score_mod(bias)
    x = [torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(3)]

    def third(backend):
        out = flexebt.flex_attention(*x, score_mod=sm, kernel_options=backend)
        g = torch.autograd.grad(out.square().sum(), x + [bias], create_graph=True)
        h = torch.autograd.grad(sum((t * t).sum() for t in g), x + [bias], create_graph=True)
        return torch.autograd.grad(sum((t * t).sum() for t in h), x + [bias])

    for a, b in zip(third(T), third(R)):
        assert rel_err(a, b) < 1e-5


EBT_CASES = {"plain": (None, None), "causal_softcap": (lambda H: mods.generate_tanh_softcap(2.0),
                                                       lambda: masks.ebt_causal_mask),
             "alibi_window": (lambda H: mods.generate_alibi_bias(H), lambda: masks.generate_sliding_window(6))}


def _ebt_fn(sm, bm, backend):
    def f(*a):
        o = flexebt.flex_ebt_attention(*a, score_mod=sm, block_mask=bm, return_lse=True, kernel_options=backend)
        return o[0], o[1], torch.where(torch.isfinite(o[3]), o[3], 0)  # the lse cotangent path too
    return f


@pytest.mark.parametrize("r", [0, 1, 3])
@pytest.mark.parametrize("case", list(EBT_CASES))
def test_ebt_second_order_matches_reference(case, r, fused_ebt_calls, fused_calls):
    from helpers import second_order

    S_p, H = 21, 2
    S_o = S_p + r
    sf, mf = EBT_CASES[case]
    sm = sf(H) if sf else None
    bm = flexebt.create_ebt_block_mask(mf(), None, None, S_o, S_p, BLOCK_SIZE=16) if mf else None
    x = [torch.randn(1, H, S, 16, requires_grad=True) for S in (S_o, S_o, S_o, S_p, S_p, S_p)]
    got = second_order(_ebt_fn(sm, bm, T), x)
    assert fused_ebt_calls, "the fused EBT double-backward kernels did not run"
    assert fused_calls, "the observed stream's node (a single-stream plan) did not run its fused double backward"
    want = second_order(_ebt_fn(sm, bm, R), x)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-5


@pytest.mark.parametrize("r", [0, 1])
def test_ebt_second_order_with_learned_frame_bias(r, fused_ebt_calls):
    """A learned (S_o+1) x (S_o+1) frame bias: fused kernels, gradients of the six inputs and of
    the bias itself equal to the reference's (own-key column included)."""
    from helpers import second_order

    S_p, H = 19, 2
    S_o = S_p + r
    bias = (0.3 * torch.randn(H, S_o + 1, S_o + 1)).requires_grad_()
    sm = mods.generate_bias_score_mod(bias)
    bm = flexebt.create_ebt_block_mask(masks.ebt_causal_mask, None, None, S_o, S_p, BLOCK_SIZE=16)
    x = [torch.randn(1, H, S, 16, requires_grad=True) for S in (S_o, S_o, S_o, S_p, S_p, S_p)]

    def fn(backend):
        return lambda *a: _ebt_fn(sm, bm, backend)(*a[:6])

    got = second_order(fn(T), x + [bias])
    assert fused_ebt_calls
    want = second_order(fn(R), x + [bias])
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-5


def test_ebt_third_order_is_exact():
    bm = flexebt.create_ebt_block_mask(None, None, None, 18, 17, BLOCK_SIZE=16)
    sm = mods.generate_tanh_softcap(2.0)
    x = [torch.randn(1, 2, S, 16, requires_grad=True) for S in (18, 18, 18, 17, 17, 17)]

    def third(backend):
        o = flexebt.flex_ebt_attention(*x, score_mod=sm, block_mask=bm, kernel_options=backend)
        g = torch.autograd.grad(o[1].square().sum() + o[0].sum(), x, create_graph=True)
        h = torch.autograd.grad(sum((t * t).sum() for t in g), x, create_graph=True)
        return torch.autograd.grad(sum((t * t).sum() for t in h), x)

    for a, b in zip(third(T), third(R)):
        assert rel_err(a, b) < 1e-5


def test_torch_func_grad_of_grad_through_the_fused_kernels(fused_calls):
    S = 32
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    k, v = torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)
    sm = mods.generate_tanh_softcap(2.0)

    def energy(q, backend):
        return flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, kernel_options=backend).square().sum()

    def hess_loss(backend):
        return torch.func.grad(lambda x: torch.func.grad(lambda y: energy(y, backend))(x).square().sum())

    q = torch.randn(1, 2, S, 16)
    got = hess_loss(T)(q)
    assert fused_calls
    assert rel_err(got, hess_loss(R)(q)) < 1e-5


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_second_order(Hkv, fused_calls, fused_ebt_calls):
    from helpers import second_order

    Hq, S = 4, 29
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    sm = mods.generate_alibi_bias(Hq)
    x = [torch.randn(1, h, S, 16, requires_grad=True) for h in (Hq, Hkv, Hkv)]

    def f(backend):
        return lambda *a: flexebt.flex_attention(*a, score_mod=sm, block_mask=bm, enable_gqa=True,
                                                 kernel_options=backend)

    got, want = second_order(f(T), x), second_order(f(R), x)
    assert fused_calls
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert rel_err(a, b) < 1e-5
    ebm = flexebt.create_ebt_block_mask(None, None, None, 21, 20, BLOCK_SIZE=16)
    y = [torch.randn(1, h, L, 16, requires_grad=True) for h, L in ((Hq, 21), (Hkv, 21), (Hkv, 21), (Hq, 20),
                                                                       (Hkv, 20), (Hkv, 20))]

    def g(backend):
        return lambda *a: flexebt.flex_ebt_attention(*a, score_mod=sm, block_mask=ebm, enable_gqa=True,
                                                     kernel_options=backend)

    got, want = second_order(g(T), y), second_order(g(R), y)
    assert fused_ebt_calls
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert rel_err(a, b) < 1e-5


def test_gqa_third_order():
    Hq, Hkv, S = 4, 2, 21
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    x = [torch.randn(1, h, S, 16, requires_grad=True) for h in (Hq, Hkv, Hkv)]

    def third(backend):
        out = flexebt.flex_attention(*x, block_mask=bm, enable_gqa=True, kernel_options=backend)
        g = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        h = torch.autograd.grad(sum((t * t).sum() for t in g), x, create_graph=True)
        return torch.autograd.grad(sum((t * t).sum() for t in h), x)

    for a, b in zip(third(T), third(R)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("stream", ["flex", "ebt"])
def test_tma_loads_in_the_double_backward(stream):
    """kernel_options USE_TMA in the three double-backward passes (key-side tiles k, v, Gk, Gv in
    the row and g_q passes; query-side q, O, dO, Gq in the g_k/g_v pass): the same second-order
    gradients, bit for bit, as the pointer loads -- odd lengths, GQA, a causal mask, soft-cap."""
    torch.manual_seed(0)
    sm = mods.generate_tanh_softcap(2.0)
    if stream == "flex":
        S, D = 37, 16
        bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)
        x0 = [torch.randn(1, 4, S, D), torch.randn(1, 2, S, D), torch.randn(1, 2, S, D)]

        def attend(x, options):
            return (flexebt.flex_attention(*x, score_mod=sm, block_mask=bm, enable_gqa=True, kernel_options=options),)
    else:
        S, D = 29, 16
        bm = flexebt.create_ebt_block_mask(None, None, None, S + 2, S, device="cpu", BLOCK_SIZE=16)
        x0 = [torch.randn(1, 4, S + 2, D), torch.randn(1, 2, S + 2, D), torch.randn(1, 2, S + 2, D),
              torch.randn(1, 4, S, D), torch.randn(1, 2, S, D), torch.randn(1, 2, S, D)]

        def attend(x, options):
            return flexebt.flex_ebt_attention(*x, score_mod=sm, block_mask=bm, enable_gqa=True,
                                              kernel_options=options)

    def second_order(options):
        x = [t.clone().requires_grad_() for t in x0]
        outs = attend(x, options)
        g = torch.autograd.grad(sum((o * o).sum() for o in outs), x, create_graph=True)
        return torch.autograd.grad(sum((t * t).sum() for t in g), x)

    for a, b in zip(second_order({**T, "USE_TMA": True}), second_order(T)):
        assert torch.equal(a, b)


def _reciprocal(score, b, h, q_idx, kv_idx):
    return 1 / score


@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("seed", [2, 3])
def test_large_derivative_mod_stays_at_eager_precision(seed, with_lse, fused_calls):
    """1 / score under a causal mask: scores near 0 give logits in the thousands, f' = -1/s^2 up to
    1e6 and rows with one dominant key.  The double backward keeps every factor centred and takes
    D0 = sum_j P dP from its own P and dP, so its fp32 error stays near eager fp32's (uncentred it
    was of order 1-20 relative on these seeds).  The first order reads D = do.o from the forward's
    output, as every fused attention backward does: its error is a bounded multiple of eager's
    (docs: "Mods with large derivatives")."""
    B, H, S, D = 1, 2, 67, 16
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu")
    torch.manual_seed(seed)
    base = [torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(7)]
    w = torch.linspace(-1, 1, S, dtype=torch.float64)

    def run(dtype, backend):
        x = [t.to(dtype).requires_grad_() for t in base[:3]]
        out, lse = flexebt.flex_attention(*x, score_mod=_reciprocal, block_mask=bm, return_lse=True,
                                          kernel_options=backend)
        energy = (out * base[3].to(dtype)).sum() + (with_lse * (lse * w.to(dtype))).sum()
        first = torch.autograd.grad(energy, x, create_graph=True)
        second = torch.autograd.grad(sum((g * c.to(dtype)).sum() for g, c in zip(first, base[4:])), x)
        return [g.detach() for g in first], list(second)

    want_first, want_second = run(torch.float64, R)
    eager_first, eager_second = run(torch.float32, R)
    got_first, got_second = run(torch.float32, T)
    assert fused_calls
    for got, eager, want in zip(got_second, eager_second, want_second):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) <= 8 * max(rel_err(eager, want), 1e-5)
    for got, eager, want in zip(got_first, eager_first, want_first):
        assert rel_err(got, want) <= 30 * max(rel_err(eager, want), 1e-5)


@pytest.fixture
def folded(monkeypatch):
    """One entry per g_k/g_v launch of the double backward: whether it also added g_q (atomic)."""
    from flexebt.kernels import plan as plan_mod

    calls = []
    original = plan_mod.dbwd_dkdv_pass

    def spy(*args, **kwargs):
        calls.append(kwargs.get("gq_acc") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(plan_mod, "dbwd_dkdv_pass", spy)
    return calls


@pytest.mark.parametrize("stream", ["flex", "ebt", "piecewise"])
def test_dq_by_atomic_adds(stream, folded):
    """kernel_options DBWD_DQ_ATOMIC: the g_k/g_v pass adds each tile's share of g_q into fp32
    rows and the g_q pass keeps only the own key's column -- second order equal to the reference
    (GQA, odd lengths, rows that keep nothing, soft-cap, own keys, a row group split over two
    passes)."""
    torch.manual_seed(1)
    sm = mods.generate_tanh_softcap(2.0)
    if stream == "flex":
        S = 37
        bm = flexebt.create_block_mask(lambda b, h, q, kv: (q % 7 != 3) & (kv <= q), None, None, S, S,
                                       device="cpu", BLOCK_SIZE=16)
        x0 = [torch.randn(1, 4, S, 16), torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)]

        def attend(x, options):
            return (flexebt.flex_attention(*x, score_mod=sm, block_mask=bm, enable_gqa=True, kernel_options=options),)
    elif stream == "ebt":
        S = 21
        bm = flexebt.create_ebt_block_mask(None, None, None, S + 2, S, device="cpu", BLOCK_SIZE=16)
        x0 = [torch.randn(1, 4, S + 2, 16), torch.randn(1, 2, S + 2, 16), torch.randn(1, 2, S + 2, 16),
              torch.randn(1, 4, S, 16), torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)]

        def attend(x, options):
            return flexebt.flex_ebt_attention(*x, score_mod=sm, block_mask=bm, enable_gqa=True, kernel_options=options)
    else:
        S = 35
        x0 = [torch.randn(1, 2, S, 16) for _ in range(5)]

        def attend(x, options):
            return (flexebt.piecewise_attention(*x, 9, causal=True, kernel_options=options),)

    def second_order(options, dtype=torch.float32):
        x = [t.to(dtype).requires_grad_() for t in x0]
        outs = attend(x, options)
        g = torch.autograd.grad(sum((o * o).sum() for o in outs), x, create_graph=True)
        return torch.autograd.grad(sum((t * t).sum() * (i + 1) for i, t in enumerate(g)), x)

    atomic = second_order({**T, "DBWD_DQ_ATOMIC": 1})
    assert folded and all(folded), "the g_q share was not added by the g_k/g_v pass"
    for a, b in zip(atomic, second_order(R, torch.float64)):
        assert rel_err(a, b) < 1e-5


def test_dq_by_atomic_adds_default():
    """On by default where it is measured faster -- 16-bit CUDA inputs of head dim <= 64 -- and off
    elsewhere (D128, fp32, CPU); the option overrides the default either way; never with captured
    tensors' scatters or under deterministic algorithms."""
    from types import SimpleNamespace

    from flexebt.kernels.flex import dbwd_dq_by_atomics

    def t(cuda, size, d):  # what the rule reads of a tensor
        return SimpleNamespace(is_cuda=cuda, element_size=lambda: size, shape=(2, 4, 128, d))

    assert dbwd_dq_by_atomics(None, False, t(True, 2, 64), t(True, 2, 64))
    assert not dbwd_dq_by_atomics(None, False, t(True, 2, 64), t(True, 2, 128))
    assert not dbwd_dq_by_atomics(None, False, t(True, 4, 64), t(True, 4, 64))
    assert not dbwd_dq_by_atomics({}, False, t(False, 2, 64), t(False, 2, 64))
    assert dbwd_dq_by_atomics({"DBWD_DQ_ATOMIC": 1}, False, t(False, 4, 128), t(False, 4, 128))
    assert not dbwd_dq_by_atomics({"DBWD_DQ_ATOMIC": 0}, False, t(True, 2, 64), t(True, 2, 64))
    assert not dbwd_dq_by_atomics(None, True, t(True, 2, 64), t(True, 2, 64))
    torch.use_deterministic_algorithms(True)
    try:
        assert not dbwd_dq_by_atomics(None, False, t(True, 2, 64), t(True, 2, 64))
    finally:
        torch.use_deterministic_algorithms(False)


def test_dq_by_atomic_adds_not_taken_where_it_would_change_results(folded):
    """DBWD_DQ_ATOMIC stays off where the g_q pass scatters a learned tensor's gradient (that
    scatter is in its key loop) and under deterministic algorithms (the adds' order varies):
    both still give the reference's numbers."""
    S, H = 21, 2
    bias = (0.3 * torch.randn(H, S, S)).requires_grad_()
    sm = mods.generate_bias_score_mod(bias)
    x = [torch.randn(1, H, S, 16, requires_grad=True) for _ in range(3)]

    def loss(options, extra):
        out = flexebt.flex_attention(*x, score_mod=sm, kernel_options=options)
        g = torch.autograd.grad(out.square().sum(), x + extra, create_graph=True)
        return torch.autograd.grad(sum((t * t).sum() for t in g), x + extra)

    got = loss({**T, "DBWD_DQ_ATOMIC": 1}, [bias])
    assert folded == [False]
    want = loss(R, [bias])
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
    folded.clear()
    sm = None  # read by loss(): no learned tensor now
    torch.use_deterministic_algorithms(True)
    try:
        got = loss({**T, "DBWD_DQ_ATOMIC": 1}, [])
    finally:
        torch.use_deterministic_algorithms(False)
    assert folded == [False]
    for a, b in zip(got, loss(R, [])):
        assert rel_err(a, b) < 1e-5
