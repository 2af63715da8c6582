"""Differential fuzzing in CI: random mods and shapes, kernels vs reference vs float64 oracle.

``fuzzer.py`` generates each case from one seed (mod source, captured tensors, shapes, block
mask), runs the TRITON kernels (interpreter, fp32), the REFERENCE backend (fp32 and float64) and
its own float64 oracle, and compares outputs, lse, first- and second-order gradients and forward-mode
tangents (``torch.autograd.forward_ad``).  The seeds
here are fixed, so the test is deterministic; long runs use the CLI
(``python tests/fuzzer.py --seconds 3600 --seed 0 --out findings.jsonl``).
"""

import dataclasses

import pytest
import torch

import fuzzer

# Seeds run against every implementation, at lengths <= KERNEL_MAX_LEN (about 1.5 minutes on two
# cores in the interpreter).
KERNEL_SEEDS = list(range(0, 16)) + [90025, 90294]  # 90025: a mask_mod of b / h only, with a learned bias;
# 90294: torch.where between a 0-d captured tensor and the score
KERNEL_MAX_LEN = 20
# ... of which these also check the kernels' forward mode (it adds about a third to a case): every
# family, and captured leaves whose tangents the kernels refuse (8, 15: judged on q/k/v tangents)
JVP_KERNEL_SEEDS = {1, 3, 5, 8, 10, 15}
# Seeds for the cheap layers (reference backend and the fuzzer's own self-check) only.
REFERENCE_SEEDS = list(range(1000, 1060)) + [90168, 90214]  # 90168, 90214: a per-head bias, whose gradients
# vanish (softmax ignores it): judged by the rounding floor of their terms


def _fail(findings):
    msgs = []
    for f in findings:
        msgs.append(f.report() + "\n--- reproduction ---\n" + f.case.repro(f.report()))
    pytest.fail("\n\n".join(msgs), pytrace=False)


@pytest.mark.interpreter
@pytest.mark.parametrize("seed", KERNEL_SEEDS)
def test_fuzz_kernels_and_reference(seed):
    case = fuzzer.make_case(seed, max_len=KERNEL_MAX_LEN)
    findings, info = fuzzer.compare_case(case, ("TRITON", "REFERENCE"), jvp=seed in JVP_KERNEL_SEEDS)
    if findings:
        _fail(findings)


@pytest.mark.parametrize("seed", REFERENCE_SEEDS)
def test_fuzz_reference(seed):
    case = fuzzer.make_case(seed)
    findings, info = fuzzer.compare_case(case, ("REFERENCE",))
    if findings:
        _fail(findings)


@pytest.mark.parametrize("seed", range(2000, 2150))
def test_oracle_matches_torch_per_score(seed):
    """The fuzzer's dense tree evaluation equals torch's per-score semantics (nested vmap of the
    rendered source), so a disagreement with the oracle is the library's, not the fuzzer's."""
    case = fuzzer.make_case(seed)
    score_mod, mask_mod, tables, _ = case.build()
    try:
        fuzzer.check_vmap(case, score_mod, mask_mod, tables)
    except (IndexError, RuntimeError) as e:  # out-of-range index: torch raises, the tree evaluation too
        with pytest.raises((IndexError, RuntimeError)):
            xs = fuzzer._inputs(case, case.data_seed)
            fuzzer.oracle_forward(case, xs, tables, torch.float64, promote=True)
        assert "out of" in str(e) or "index" in str(e).lower()


def test_generator_is_deterministic():
    a, b = fuzzer.make_case(123), fuzzer.make_case(123)
    assert a.build_source() == b.build_source() and a.describe() == b.describe()


def test_cases_cover_the_grammar():
    """The seeds above exercise the features the fuzzer is for."""
    src = "\n".join([fuzzer.make_case(s, max_len=KERNEL_MAX_LEN).build_source() for s in KERNEL_SEEDS]
                    + [fuzzer.make_case(s).build_source() for s in REFERENCE_SEEDS])
    for needle in ("//", "%", "rounding_mode='floor'", "torch.remainder", "**", "torch.where", "torch.clamp",
                   "torch.float64", "torch.int32", "torch.int64", "requires_grad_", "[::2", ".transpose(",
                   ".expand(", "torch.tanh", "torch.exp", "torch.log", "torch.sqrt", "torch.sigmoid", "< 0.7"):
        assert needle in src, needle
    fams = {fuzzer.make_case(s, max_len=KERNEL_MAX_LEN).family for s in KERNEL_SEEDS}
    assert fams == {"flex", "ebt", "piecewise"}


def test_fuzzer_catches_a_wrong_kernel(monkeypatch):
    """A deliberately wrong implementation is reported (the comparison is not vacuous)."""
    case = fuzzer.make_case(1003)
    real = fuzzer.library_forward

    def off_by_a_bit(c, xs, score_mod, mask_mod, backend):
        outs, lses = real(c, xs, score_mod, mask_mod, backend)
        return [o * (1 + 1e-4) for o in outs], lses

    monkeypatch.setattr(fuzzer, "library_forward", off_by_a_bit)
    findings, info = fuzzer.compare_case(dataclasses.replace(case), ("REFERENCE",))
    assert info["skipped"] is None
    assert any(f.kind == "wrong" for f in findings)


def test_fuzzer_catches_a_wrong_tangent(monkeypatch):
    """Forward mode: a deliberately wrong tangent is reported as a wrong ``jvp:`` quantity."""
    case = fuzzer.make_case(1003)
    real = fuzzer.run_jvp

    def off_by_a_bit(c, impl, dtype, data_seed=None, leaf_tangents=True):
        res = real(c, impl, dtype, data_seed, leaf_tangents)
        if impl == "REFERENCE" and dtype == torch.float32 and res.touts is not None:
            res.touts = [t * (1 + 1e-4) for t in res.touts]
        return res

    monkeypatch.setattr(fuzzer, "run_jvp", off_by_a_bit)
    findings, info = fuzzer.compare_case(dataclasses.replace(case), ("REFERENCE",), check_ref64=False)
    assert info["skipped"] is None and info["jvp"].startswith("judged")
    assert [f.what for f in findings] == ["jvp:out"]


@pytest.mark.parametrize("seed", [1001, 1002, 1003, 1012, 1021, 1074])  # a score_mod reading a leaf: all but 1003
def test_oracle_tangents_match_central_differences(seed):
    """The float64 oracle's forward-mode tangents (inputs and captured leaves) equal central
    differences of the same float64 math along the same directions (the fuzzer's own check)."""
    case = fuzzer.make_case(seed)
    res = fuzzer.run_jvp(case, "oracle", torch.float64)
    assert res.error is None
    h = 1e-6
    tx, leaf_tangent = fuzzer.jvp_tangents(case, case.data_seed)
    xs = fuzzer._inputs(case, case.data_seed)

    def at(sign):
        _, leaf_tangent = fuzzer.jvp_tangents(case, case.data_seed)
        # a float32 leaf moves in float64 (the oracle computes in float64 either way)
        _, _, tables, _ = case.build(dual=lambda x: x.detach().double() + sign * h * leaf_tangent(x).double())
        with torch.no_grad():
            outs, lses, _ = fuzzer.oracle_forward(case, [x + sign * h * t for x, t in zip(xs, tx)], tables,
                                                  torch.float64, promote=True)
        return outs + (lses or [])

    want = [(a - b) / (2 * h) for a, b in zip(at(1), at(-1))]
    got = res.touts + (res.tlses or [])
    for g, w in zip(got, want):
        fin = torch.isfinite(w)
        assert torch.allclose(g[fin], w[fin], rtol=1e-4, atol=1e-6)


def _bias_case(index, seed=5):
    """A hand-written flex case: ``score + bias0[<index>]`` with a learned float32 bias."""
    size = {"b": 2, "h": 2, "q_idx": 7, "kv_idx": 9}
    shape = tuple(size[a] for a in index)
    table = fuzzer.Table("bias0", "f", torch.float32, shape,
                         [f"bias0_base = 0.5 * torch.randn({shape}, generator=g, dtype=torch.float32)"
                          ".requires_grad_()", "bias0 = bias0_base"], grad_leaf="bias0_base")
    load = fuzzer.Node("load", "f", tuple(fuzzer.Node("idx", "i", attr=a) for a in index), attr="bias0", data=True)
    tree = fuzzer.Node("add", "f", (fuzzer.Node("score", "f", data=True), load), data=True)
    return fuzzer.Case(seed, "flex", 2, 2, 2, 16, 16, 7, 9, None, tree, None, "none", 16, False, [table],
                       data_seed=seed)


def test_gradient_terms_measure_what_a_vanishing_gradient_sums():
    """A bias indexed by ``b`` alone leaves the softmax unchanged: its gradient is exactly zero, a
    sum of terms that cancel.  The oracle's term sizes are the scale of fp32 rounding there; with a
    bias read once per score, each element's size bounds its gradient."""
    vanishing = fuzzer.run_impl(_bias_case(("b",)), "oracle", torch.float64, order=1)
    g, terms = vanishing.g1[-1], vanishing.g1_terms[-1]
    assert (terms > 1.0).all() and (g.abs() < 1e-9 * terms).all()
    per_score = fuzzer.run_impl(_bias_case(("b", "h", "q_idx", "kv_idx")), "oracle", torch.float64, order=1)
    g, terms = per_score.g1[-1], per_score.g1_terms[-1]
    assert (g.abs() <= terms * (1 + 1e-6)).all() and (g.abs() > 1e-3 * terms).any()


@pytest.mark.parametrize("scale, wrong", [(0.2, False), (5.0, True)])
def test_vanishing_gradient_floor_admits_rounding_and_catches_more(monkeypatch, scale, wrong):
    """An error in a vanishing captured-tensor gradient passes below the rounding floor of its
    terms and is reported above it (the floor can fail)."""
    case = _bias_case(("b",))
    oracle = fuzzer.run_impl(dataclasses.replace(case), "oracle", torch.float64)
    floor = fuzzer.CANCEL_ROUNDING * oracle.g1_terms[-1].norm().item()
    real = fuzzer.run_impl

    def offset_leaf_grad(c, impl, dtype, data_seed=None, order=2):
        res = real(c, impl, dtype, data_seed, order)
        if impl == "REFERENCE" and dtype == torch.float32 and res.g1 is not None:
            off = torch.tensor([1.0, -1.0]) * (scale * floor / 2 ** 0.5)
            res.g1[-1] = res.g1[-1] + off.to(res.g1[-1].dtype)
        return res

    monkeypatch.setattr(fuzzer, "run_impl", offset_leaf_grad)
    findings, info = fuzzer.compare_case(case, ("REFERENCE",), check_ref64=False)
    assert info["skipped"] is None
    assert [f.what for f in findings] == (["grad:dbias0_base"] if wrong else [])


def test_gradient_terms_are_per_score_under_a_broadcast():
    """``score * bias[b]``: the terms are ``dS_ij * score_ij`` with both signs; their size sums
    their absolute values, not the (cancelling) sum over the broadcast."""
    case = _bias_case(("b",))
    case.score_tree = fuzzer.Node("mul", "f", case.score_tree.args, data=True)
    res = fuzzer.run_impl(case, "oracle", torch.float64, order=1)
    terms = res.g1_terms[-1]
    xs = [x.requires_grad_() for x in fuzzer._inputs(case, case.data_seed)]
    _, _, tables, _ = case.build()
    aux = {}
    outs, _, _ = fuzzer.oracle_forward(case, xs, tables, torch.float64, True, aux)
    g = torch.Generator().manual_seed(case.data_seed + 7)
    ct = torch.randn(outs[0].shape, generator=g, dtype=torch.float64)
    p = aux["p"]
    dp = torch.autograd.grad((outs[0] * ct).sum(), p)[0]
    w = p * (dp.abs() + (p * dp).sum(-1, keepdim=True).abs())
    q, k = xs[0], xs[1]
    score = (q @ k.transpose(-1, -2)) * case.D ** -0.5
    want = (w * score.abs()).sum((1, 2, 3)).detach()
    assert torch.allclose(terms.double(), want, rtol=1e-5)
