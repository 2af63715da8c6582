"""Every op the code generator accepts, checked against torch on chosen operands.

Each case is a score_mod built around one op.  The generated code evaluates the mod, its first and
its second derivative in the score over operands that include negatives, zero (both signs),
halves, small and large magnitudes (tests/op_probe.py), and torch evaluates the same mod on the
same fp32 / int32 operands with autograd.  Values must agree to fp32 accuracy, NaN and inf at the
same places.  A coverage test requires every entry of ``flexebt.codegen.emit.OPS`` to occur in the
traced graphs (value or derivative) of some case, so a new op cannot enter the table untested.
The end-to-end tests run a few of these mods, capturing tensors of several dtypes, through the
attention kernels (interpreter) and the reference, first and second order.
"""

import pytest
import torch

from flexebt.codegen.emit import OPS, supported_ops
from flexebt.codegen.trace import trace_score_mod
from op_probe import probe

aten = torch.ops.aten
pytestmark = pytest.mark.interpreter

FLOATS = [-20.0, -3.7, -2.5, -1.5, -1.0, -0.5, -1e-3, -0.0, 0.0, 1e-3, 0.5, 1.0, 1.5, 2.5, 3.7, 20.0]
INTS = list(range(-7, 8))

# captured tables the cases read: a float table of operands, an int64 table, a bool table
W = torch.tensor(FLOATS[::-1] + [0.25, -0.75], dtype=torch.float32)   # w = W[kv + 7]
I64 = torch.arange(-7, 8, dtype=torch.int64) * 3                     # I64[q + 7]
BOOL = torch.tensor([i % 3 == 0 for i in range(15)])                  # BOOL[kv + 7]


def w_(kv):
    return W[kv + 7]


def nz(x):
    """x with 0 replaced, for divisors."""
    return torch.where(x == 0, 3, x)


CASES = {
    # arithmetic
    "add": lambda s, b, h, q, kv: s + w_(kv) + (q + kv) + 2,
    "add_alpha": lambda s, b, h, q, kv: torch.add(s, w_(kv), alpha=2),
    "add_bool": lambda s, b, h, q, kv: torch.where((q > 0) + (kv > 0), s, -s),
    "sub": lambda s, b, h, q, kv: s - w_(kv) - (q - kv) - 1.5,
    "sub_alpha": lambda s, b, h, q, kv: torch.sub(s, w_(kv), alpha=3),
    "rsub": lambda s, b, h, q, kv: 2.0 - s + torch.rsub(q, kv),
    "mul": lambda s, b, h, q, kv: s * w_(kv) * (q * kv) * 0.5,
    "mul_bool": lambda s, b, h, q, kv: torch.where((q > 0) * (kv > 0), s, s * 2),
    "div": lambda s, b, h, q, kv: s / nz(w_(kv)) + q / nz(kv) + s / 3,
    "div_int_scalar": lambda s, b, h, q, kv: q / 4 + s,
    "floordiv_int": lambda s, b, h, q, kv: (q // nz(kv)) + (q // -2) + (q // 3) + s,
    "floordiv_float": lambda s, b, h, q, kv: w_(kv) // 0.75 + w_(kv) // nz(w_(q)) + torch.div(s, 0.75, rounding_mode="floor") + s,
    "div_floor": lambda s, b, h, q, kv: torch.div(q, nz(kv), rounding_mode="floor") + torch.div(
        s, nz(w_(kv)), rounding_mode="floor") + s,
    "div_trunc": lambda s, b, h, q, kv: torch.div(q, nz(kv), rounding_mode="trunc") + torch.div(
        s, nz(w_(kv)), rounding_mode="trunc") + s,
    "remainder_int": lambda s, b, h, q, kv: (q % nz(kv)) + (q % 3) + (q % -4) + torch.remainder(5, nz(kv)) + s,
    "remainder_float": lambda s, b, h, q, kv: s % nz(w_(kv)) + s % 0.75 + torch.remainder(s, -1.25),
    "fmod": lambda s, b, h, q, kv: torch.fmod(q, nz(kv)) + torch.fmod(s, 0.75) + torch.fmod(s, nz(w_(kv))),
    # powers
    "pow_int": lambda s, b, h, q, kv: s ** 2 + s ** 3 * 0.1 + s ** 4 * 0.01 + s ** 5 * 1e-3 + (q - kv) ** 2,
    "pow_negative": lambda s, b, h, q, kv: nz(s) ** -2 + nz(s) ** -1.0 + s ** 0,
    "pow_float": lambda s, b, h, q, kv: s ** 0.5 + s ** 1.5 + torch.abs(s) ** 2.5,
    "pow_tensor": lambda s, b, h, q, kv: s ** w_(kv) + s ** (q - kv).to(torch.float32),
    "pow_base": lambda s, b, h, q, kv: 2.0 ** s + 0.5 ** w_(kv) + (-2.0) ** (q - kv).float(),
    "square": lambda s, b, h, q, kv: torch.square(s),
    # comparisons and logic
    "compare": lambda s, b, h, q, kv: s * (q == kv) + s * (q != kv) * 2 + (q < kv) * 3 + (q <= kv) * 4 + (
        q > kv) * 5 + (q >= kv) * 6 + (s > 0.5) + (s >= w_(kv)) + (s < 1) + (s <= 0) + (s == 0) + (s != 1),
    "bitwise": lambda s, b, h, q, kv: (q & kv) + (q | kv) + (q ^ kv) + (q & 3) + (q | 4) + (q ^ 5) + s,
    "shift": lambda s, b, h, q, kv: (q >> 1) + (q << 2) + (q >> torch.abs(kv) % 4) + (q << torch.abs(kv) % 4) + s +
    torch.bitwise_left_shift(q, 3) + torch.bitwise_right_shift(q, torch.abs(kv) % 3),
    "logical": lambda s, b, h, q, kv: torch.where(torch.logical_and(q > 0, kv > 0) | torch.logical_or(q < -3, kv > 5)
                                                  ^ torch.logical_xor(q > kv, BOOL[kv + 7]), s, -s),
    "not": lambda s, b, h, q, kv: torch.where(~(q > kv) & torch.logical_not(BOOL[kv + 7]), s, 0.5 * s) + (~q),
    "isnan_isinf": lambda s, b, h, q, kv: torch.where(torch.isnan(torch.log(s)) | torch.isinf(1 / s), 1.0, s) +
    torch.isfinite(torch.log(s)),
    "where": lambda s, b, h, q, kv: torch.where(q > kv, s, w_(kv)) + torch.where(q > kv, 1, s) +
    torch.where(q > kv, s, 2.5) + torch.where(q > kv, 1.5, 2.0) + torch.where(q < kv, q, I64[q + 7]),
    "where_mixed": lambda s, b, h, q, kv: torch.where(q > kv, q, s) + torch.where(BOOL[kv + 7], I64[q + 7], 0.5),
    "masked_fill": lambda s, b, h, q, kv: s.masked_fill(q < kv, -1.5) + w_(kv).masked_fill(q > kv, 2.0),
    # min / max / clamp
    "maximum": lambda s, b, h, q, kv: torch.maximum(s, w_(kv)) + torch.maximum(q, kv) + torch.max(s, -s * 0.5),
    "minimum": lambda s, b, h, q, kv: torch.minimum(s, w_(kv)) + torch.minimum(q, kv) + torch.min(s, s * 0.5),
    "clamp": lambda s, b, h, q, kv: s.clamp(-1, 1) + s.clamp(min=w_(kv)) + s.clamp(max=0.5) + (q - kv).clamp(-2, 3)
    + torch.clamp(s, min=w_(q), max=w_(kv)),
    "clamp_min_max": lambda s, b, h, q, kv: torch.clamp_min(s, 0.5) + torch.clamp_max(s, w_(kv)),
    "clamp_min_max_other_forms": lambda s, b, h, q, kv: torch.clamp_max(s, 0.5) + s.clamp_max(-0.25)
    + torch.clamp_min(s, w_(q)) + (q - kv).clamp_max(2) + torch.clamp_min(q - kv, -3),
    # elementwise functions
    "neg_abs": lambda s, b, h, q, kv: -s + torch.abs(s) + torch.abs(q - kv),
    "exp_log": lambda s, b, h, q, kv: torch.exp(s * 0.5) + torch.exp2(s * 0.5) + torch.log(s) + torch.log2(s) +
    torch.log10(s),
    "sqrt": lambda s, b, h, q, kv: torch.sqrt(s) + torch.rsqrt(s) + torch.reciprocal(s),
    "sigmoid": lambda s, b, h, q, kv: torch.sigmoid(s),
    "tanh": lambda s, b, h, q, kv: torch.tanh(s),
    "trig": lambda s, b, h, q, kv: torch.sin(s) + torch.cos(s) + torch.tan(s * 0.3),
    "hyperbolic": lambda s, b, h, q, kv: torch.sinh(s * 0.5) * 0.5 + torch.cosh(s * 0.5) * 0.25,
    "expm1_log1p": lambda s, b, h, q, kv: torch.expm1(s) + torch.log1p(s),
    "erf": lambda s, b, h, q, kv: torch.erf(s),
    "rounding": lambda s, b, h, q, kv: torch.floor(s * 1.5) + torch.ceil(s * 1.5) + torch.trunc(s * 1.5) +
    torch.round(s * 1.5) + torch.round(s) + torch.frac(s * 1.5) + s,
    "sign": lambda s, b, h, q, kv: torch.sign(s) + torch.sgn(s * 2) + torch.sign(q - kv) + s,
    "activations": lambda s, b, h, q, kv: torch.relu(s) + torch.nn.functional.silu(s) + torch.nn.functional.gelu(s)
    + torch.nn.functional.gelu(s, approximate="tanh") + torch.nn.functional.softplus(s) +
    torch.nn.functional.leaky_relu(s) + torch.nn.functional.hardtanh(s) +
    torch.nn.functional.mish(s) + torch.nn.functional.relu6(s * 4),
    # values and casts
    "casts": lambda s, b, h, q, kv: q.to(torch.float32) + s.to(torch.int32) + s.to(torch.bfloat16).float() +
    (s * 1000.3).to(torch.float16).float() + q.to(torch.bool) + (q - kv).long() + s.double(),
    "fills": lambda s, b, h, q, kv: torch.ones_like(s) + torch.zeros_like(s) + torch.full_like(s, 3.5) + s +
    s.new_ones(()) + s.new_zeros(()) + s.new_full((), 0.25) + torch.full_like(q, 2) +
    torch.zeros(()) + torch.ones(()) * 0.5 + torch.full((), 0.75),
    "reductions_of_one": lambda s, b, h, q, kv: s.sum() + s.mean() + s.amax() + s.norm() +
    s.view(1).sum(0) + s.unsqueeze(0).squeeze(0),
    "constant": lambda s, b, h, q, kv: 1.5,
    "int_result": lambda s, b, h, q, kv: q - kv,
    "detach": lambda s, b, h, q, kv: s.detach() * s + s.clone(),
}


def _operands():
    s = torch.tensor(FLOATS, dtype=torch.float32)
    qi = torch.tensor(INTS, dtype=torch.int32)
    n_s, n_i = s.numel(), qi.numel()
    S = s.view(-1, 1, 1).expand(n_s, n_i, n_i)
    Q = qi.view(1, -1, 1).expand(n_s, n_i, n_i)
    KV = qi.view(1, 1, -1).expand(n_s, n_i, n_i)
    return S.reshape(-1), Q.reshape(-1), KV.reshape(-1)


def _torch(mod, s, q, kv):
    """torch's value and first and second derivative of ``mod`` in the score, one score at a time
    (vmap, as torch applies mods)."""
    s = s.clone().requires_grad_(True)

    def one(s1, q1, kv1):
        out = mod(s1, torch.zeros_like(q1), torch.zeros_like(q1), q1, kv1)
        return torch.as_tensor(out, dtype=torch.float32).float() + s1 * 0

    t = torch.vmap(one)(s, q, kv)
    (d1,) = torch.autograd.grad(t.sum(), s, create_graph=True)
    if not d1.requires_grad:
        return t.detach(), d1.detach(), torch.zeros_like(s)
    (d2,) = torch.autograd.grad(d1.sum(), s)
    return t.detach(), d1.detach(), d2


def _assert_close(got, want, what):
    nan_g, nan_w = torch.isnan(got), torch.isnan(want)
    bad = nan_g != nan_w
    inf = torch.isinf(want) | torch.isinf(got)
    bad |= inf & ~nan_w & (got != want)
    fin = ~nan_w & ~inf
    tol = 1e-5 * want.abs() + 1e-5
    bad |= fin & ((got - want).abs() > tol)
    if bad.any():
        i = bad.nonzero()[:5, 0]
        raise AssertionError(f"{what}: {int(bad.sum())} operands differ; e.g. at {i.tolist()}: generated "
                             f"{got[i].tolist()} vs torch {want[i].tolist()}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_torch(case):
    mod = CASES[case]
    mod.__name__ = case
    s, q, kv = _operands()
    t, d1, d2, _src = probe(mod, s, q, kv)
    rt, rd1, rd2 = _torch(mod, s, q, kv)
    _assert_close(t, rt, f"{case}: value")
    _assert_close(d1, rd1, f"{case}: d/ds")
    _assert_close(d2, rd2, f"{case}: d2/ds2")


def test_every_op_is_covered():
    """Every entry of the op table occurs in the traced graphs of some case (value or derivative)."""
    seen = set()
    for name, mod in CASES.items():
        traced = trace_score_mod(mod, want_second_order=True)
        for gm in (traced.graph, *traced.derivative.values()):
            seen |= {n.target for n in gm.graph.nodes if n.op == "call_function"}
    missing = sorted(str(op) for op in OPS if op not in seen)
    assert not missing, f"ops in the table that no case exercises: {missing}"


def test_supported_ops_listed_in_docs():
    """docs/supported-ops.md lists exactly the table's ops (python -m flexebt.codegen.emit > docs/... regenerates)."""
    import pathlib

    from flexebt.codegen.emit import supported_ops_markdown

    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "supported-ops.md").read_text()
    assert doc == supported_ops_markdown(), "docs/supported-ops.md is stale: regenerate it from the op table"
    assert supported_ops()


def test_unsupported_op_named_in_error():
    def uses_atan(score, b, h, q_idx, kv_idx):
        return torch.atan(score)

    with pytest.raises(NotImplementedError, match=r"atan.*uses_atan.*Supported:.*torch\.exp"):
        from flexebt.codegen.source import get_kernels
        get_kernels("flex_attention", uses_atan, None)
