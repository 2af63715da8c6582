"""Differential fuzzing in CI: random mods and shapes, kernels vs reference vs float64 oracle.

``fuzzer.py`` generates each case from one seed (mod source, captured tensors, shapes, block
mask), runs the TRITON kernels (interpreter, fp32), the REFERENCE backend (fp32 and float64) and
its own float64 oracle, and compares outputs, lse, first- and second-order gradients.  The seeds
here are fixed, so the test is deterministic; long runs use the CLI
(``python tests/fuzzer.py --seconds 3600 --seed 0 --out findings.jsonl``).
"""

import dataclasses

import pytest
import torch

import fuzzer

# Seeds run against every implementation, at lengths <= KERNEL_MAX_LEN (about 1.5 minutes on two
# cores in the interpreter).
KERNEL_SEEDS = list(range(0, 16)) + [90025]  # 90025: a mask_mod of b / h only, with a learned bias
KERNEL_MAX_LEN = 20
# Seeds for the cheap layers (reference backend and the fuzzer's own self-check) only.
REFERENCE_SEEDS = list(range(1000, 1060))


def _fail(findings):
    msgs = []
    for f in findings:
        msgs.append(f.report() + "\n--- reproduction ---\n" + f.case.repro(f.report()))
    pytest.fail("\n\n".join(msgs), pytrace=False)


@pytest.mark.interpreter
@pytest.mark.parametrize("seed", KERNEL_SEEDS)
def test_fuzz_kernels_and_reference(seed):
    case = fuzzer.make_case(seed, max_len=KERNEL_MAX_LEN)
    findings, info = fuzzer.compare_case(case, ("TRITON", "REFERENCE"))
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
