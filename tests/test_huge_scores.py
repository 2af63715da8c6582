"""Rows whose every score is huge in magnitude -- an additive -1e9, -1e10 or finfo.min mask over a
whole query row, the way model code masks padding -- on the kernels (interpreter), all three
families, first and second order, forward mode and a learned bias.

fp32 eager math rounds every score of such a row to the mask value, so its softmax there is
uniform (a float64 oracle would not round, and would disagree with every fp32 implementation);
the oracle is therefore the reference backend *in fp32*, that is eager math in the same dtype.
The kernels keep each row's max and softmax sum apart (msum): through the lse alone, whose log-sum
rounds away next to a max of 1e9, the backward recomputed probabilities n times too large, and
finfo.min overflowed to -inf when taken to log2 units."""

import pytest
import torch

import flexebt
from helpers import large_logit_orders, rel_err, second_order, ulp_of_largest_logit

pytestmark = [pytest.mark.interpreter,
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]  # -> -inf, as on GPU
T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}
HUGE = [-1e9, -1e10, torch.finfo(torch.float32).min]
TOL = 1e-5


def _bias(n_q: int, n_k: int, value: float, learned: bool = False) -> torch.Tensor:
    """Zeros, with row 3 all ``value`` (a fully masked query), row 5 half of it, and row 7 all
    ``value`` but one key at ``value / 2`` (two huge scores: that key takes all the weight)."""
    b = torch.zeros(n_q, n_k)
    b[3] = value
    b[5, :n_k // 2] = value
    b[7] = value
    b[7, 2] = value / 2
    return b.requires_grad_(learned)


def _agree(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        fin = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), fin), f"{what}[{i}]: finite where the reference is not"
        assert rel_err(a[fin], b[fin]) < TOL, f"{what}[{i}]: {rel_err(a[fin], b[fin]):.2e}"


@pytest.mark.parametrize("value", HUGE, ids=["-1e9", "-1e10", "finfo.min"])
def test_flex_attention(value):
    torch.manual_seed(0)
    S = 24
    bias = _bias(S, S, value, learned=True)

    def sm(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx, kv_idx]

    x = [torch.randn(1, 2, S, 16, requires_grad=True) for _ in range(3)]

    def f(backend):
        return lambda q, k, v, bias_: flexebt.flex_attention(q, k, v, score_mod=sm, kernel_options=backend,
                                                             return_lse=True)

    got_o, got_l = f(T)(*x, bias)
    want_o, want_l = f(R)(*x, bias)
    _agree([got_o, got_l], [want_o, want_l], "out, lse")
    got = second_order(lambda *a: f(T)(*a)[0], x + [bias])
    want = second_order(lambda *a: f(R)(*a)[0], x + [bias])
    _agree(got[0], want[0], "first order (q, k, v, bias)")
    _agree(got[1][:3], want[1][:3], "second order (q, k, v)")


@pytest.mark.parametrize("value", HUGE, ids=["-1e9", "-1e10", "finfo.min"])
def test_forward_mode(value):
    torch.manual_seed(1)
    S = 20
    bias = _bias(S, S, value)

    def sm(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx, kv_idx]

    x = [torch.randn(1, 2, S, 16) for _ in range(3)]
    t = [torch.randn_like(a) for a in x]

    def f(backend):
        return lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=sm, kernel_options=backend, return_lse=True)

    got = torch.func.jvp(f(T), tuple(x), tuple(t))
    want = torch.func.jvp(f(R), tuple(x), tuple(t))
    _agree([*got[0], *got[1]], [*want[0], *want[1]], "primal and tangent")


@pytest.mark.parametrize("value", HUGE, ids=["-1e9", "-1e10", "finfo.min"])
def test_ebt_attention(value):
    """A predicted query whose frame row is all huge, own key included (kv_idx = q_idx)."""
    torch.manual_seed(2)
    S_p, r = 13, 2
    S_o, F = S_p + r, S_p + r + 1
    bias = _bias(F, F, value)
    bias[F - 4] = value  # the predicted query at frame F - 4, own key and all
    x = [torch.randn(1, 2, S, 16, requires_grad=True) for S in (S_o, S_o, S_o, S_p, S_p, S_p)]

    def sm(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx, kv_idx]

    def f(backend):
        return lambda *a: flexebt.flex_ebt_attention(*a, score_mod=sm, kernel_options=backend)

    _agree(f(T)(*x), f(R)(*x), "outputs")
    got, want = second_order(f(T), x), second_order(f(R), x)
    _agree(got[0], want[0], "first order")
    _agree(got[1], want[1], "second order")


@pytest.mark.parametrize("value", HUGE, ids=["-1e9", "-1e10", "finfo.min"])
def test_piecewise_attention(value):
    """The near and far passes each see part of a huge row: their merge weighs them by their sums
    (through the lse alone both parts read as equal: the output was 0.57-0.91 off)."""
    torch.manual_seed(3)
    S = 22
    bias = _bias(S, S, value)

    def sm(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx, kv_idx]

    x = [torch.randn(1, 2, S, 16, requires_grad=True) for _ in range(5)]

    def f(backend):
        return lambda *a: flexebt.piecewise_attention(*a, dist_threshold=5, causal=False, score_mod=sm,
                                                      kernel_options=backend)

    _agree([f(T)(*x)], [f(R)(*x)], "output")
    got, want = second_order(f(T), x), second_order(f(R), x)
    _agree(got[0], want[0], "first order")
    _agree(got[1], want[1], "second order")
    t = [torch.randn_like(a) for a in x]
    got_j = torch.func.jvp(f(T), tuple(a.detach() for a in x), tuple(t))
    want_j = torch.func.jvp(f(R), tuple(a.detach() for a in x), tuple(t))
    _agree(list(got_j), list(want_j), "forward mode")


@pytest.mark.parametrize("scale", [1e7, -6.25e7])
def test_huge_products_through_a_score_mod(scale):
    """Huge scores from q.k itself (every score of a row 1.6e8 or -1e9): without a score_mod the
    backward keeps one fp32 reference per row (its fast path; concepts.md says where that ends), an
    identity score_mod takes the exact path.  (dq and dk here are scale times a sum that cancels to
    rounding noise in every implementation; the output and dv are well conditioned.)"""
    torch.manual_seed(4)
    q, k = torch.ones(1, 1, 16, 16, requires_grad=True), torch.ones(1, 1, 16, 16, requires_grad=True)
    v = torch.randn(1, 1, 16, 16, requires_grad=True)
    ct = torch.randn(1, 1, 16, 16)
    res = []
    for backend in (T, R):
        out = flexebt.flex_attention(q, k, v, scale=scale, score_mod=lambda s, b, h, qi, kv: s,
                                     kernel_options=backend)
        res.append([out, torch.autograd.grad(out, v, ct)[0]])
    _agree(res[0], res[1], "output and dv")


@pytest.mark.parametrize("magnitude", [4.0, 10.0])
def test_large_logits_without_a_score_mod(magnitude):
    """Logits of 50 to 350 with no score_mod (scores kept in log2 units): the backward rebuilds each
    row's max as m log2 e, an ulp of which is 3e-5 at 500, and subtracts it before log2 l, so the
    first- and second-order gradients stay within 3x of eager fp32 math's error (the rule of
    tests/spec_tolerance.py; they were up to 6x)."""
    from spec_tolerance import check

    S, D = 19, 16
    torch.manual_seed(0)
    x64 = [torch.randn(1, 2, S, D, dtype=torch.float64) * m for m in (magnitude, magnitude, 1.0)]

    def eager(q, k, v):
        return torch.softmax((q @ k.transpose(-1, -2)) * D ** -0.5, -1) @ v

    def orders(fn, dtype):
        return large_logit_orders(fn, x64, dtype)

    ref, base = orders(eager, torch.float64), orders(eager, torch.float32)
    got = orders(lambda q, k, v: flexebt.flex_attention(q, k, v, kernel_options={"BACKEND": "TRITON"}), torch.float32)
    names = ["out", "dq", "dk", "dv", "ddq", "ddk", "ddv"]
    for name, a, e, r in zip(names, got, base, ref):
        check(name, a.detach(), e.detach(), r, torch.float32, 2 if name == "out" else 3)
    # With the host's own fp32 products (FP32_PRODUCTS), a pass that rebuilds the scores as k q^T may
    # miss the forward's q k^T by an ulp -- on a GPU too: the tensor cores promise no order. One ulp of
    # the largest logit is then the floor of what a gradient can keep (here 3e-5 at logit 350).
    ulp = ulp_of_largest_logit(x64[0], x64[1], D ** -0.5)
    for mode in ("ieee", "tf32x3"):
        got = orders(lambda q, k, v: flexebt.flex_attention(q, k, v, kernel_options={"BACKEND": "TRITON",
                                                                                     "FP32_PRODUCTS": mode}),
                     torch.float32)
        for name, a, e, r in zip(names, got, base, ref):
            bound = max((2 if name == "out" else 3) * rel_err(e.detach(), r), 1e-5, ulp)
            assert rel_err(a.detach(), r) <= bound, (mode, name)
