"""torch.use_deterministic_algorithms: a backward whose kernels add a captured tensor's gradient
with atomic adds (on CUDA: a run-dependent order) is refused, or warned about with
warn_only=True, the way torch treats its own non-deterministic operations.  Under Triton's CPU
interpreter the programs run one after another, so the scatter is deterministic there; the CPU
tests mark the CPU as a device of run-dependent order to check the refusal itself."""

import contextlib

import pytest
import torch

import flexebt
import flexebt.kernels.flex as kf
from flexebt import mods
from helpers import rel_err

T = {"BACKEND": "TRITON"}


@contextlib.contextmanager
def deterministic(warn_only=False):
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _learned_bias_call(device="cpu", learned=True, options=T, create_graph=False):
    torch.manual_seed(0)
    bias = (0.3 * torch.randn(2, 24, 24, device=device)).requires_grad_(learned)
    x = [torch.randn(1, 2, 24, 16, device=device, requires_grad=True) for _ in range(3)]
    out = flexebt.flex_attention(*x, score_mod=mods.generate_bias_score_mod(bias), kernel_options=options)
    leaves = x + ([bias] if learned else [])
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=create_graph)
    if create_graph:
        grads = torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)
    return grads


@pytest.fixture
def cpu_counts_as_nondeterministic(monkeypatch):
    monkeypatch.setattr(kf, "NONDETERMINISTIC_SCATTER", ("cuda", "cpu"))


def test_a_learned_bias_backward_is_refused_under_deterministic_algorithms(cpu_counts_as_nondeterministic):
    with deterministic(), pytest.raises(RuntimeError, match="atomic adds.*use_deterministic_algorithms"):
        _learned_bias_call()


# second order: the backward, the double backward, and the forward's backward once more (the
# first-order cotangent 2 * out depends on the output) each scatter the bias's gradient
@pytest.mark.parametrize("create_graph, alerts", [(False, 1), (True, 3)], ids=["first order", "second order"])
def test_warn_only_warns_for_each_scatter_and_computes_the_same_gradients(cpu_counts_as_nondeterministic,
                                                                          create_graph, alerts):
    """Every scatter is flagged -- the double backward's too -- and the gradients are those of a
    run without the flag."""
    want = _learned_bias_call(create_graph=create_graph)
    with deterministic(warn_only=True), pytest.warns(UserWarning, match="atomic adds") as record:
        got = _learned_bias_call(create_graph=create_graph)
    assert sum("atomic adds" in str(w.message) for w in record) == alerts
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_several_captured_tensors_only_a_learned_one_is_flagged(cpu_counts_as_nondeterministic):
    """A mod reading a learned bias and a fixed per-head scale (a view with negative and zero
    entries) is refused; the same mod with neither learned runs, equal to the reference."""
    torch.manual_seed(1)
    x = [torch.randn(1, 3, 20, 8, requires_grad=True) for _ in range(3)]
    scale = torch.tensor([[-1.5, 0.0, 2.0, 7.0]])[0, 1:]  # a view, offset into its storage

    def run(bias, options=T):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score * scale[h] + bias[h, q_idx, kv_idx]
        out = flexebt.flex_attention(*x, score_mod=score_mod, kernel_options=options)
        leaves = x + ([bias] if bias.requires_grad else [])
        return torch.autograd.grad(out.square().sum(), leaves)

    bias = 0.2 * torch.randn(3, 20, 20)
    with deterministic():
        with pytest.raises(RuntimeError, match="score_mod"):
            run(bias.clone().requires_grad_())
        got = run(bias)
    want = run(bias, {"BACKEND": "REFERENCE"})
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))


def test_no_captured_gradient_or_the_reference_backend_is_deterministic(cpu_counts_as_nondeterministic):
    want = _learned_bias_call(options={"BACKEND": "REFERENCE"})
    with deterministic():
        _learned_bias_call(learned=False)  # the bias is read, its gradient not asked for: no scatter
        got = _learned_bias_call(options={"BACKEND": "REFERENCE"})
    assert all(rel_err(a, b) == 0 for a, b in zip(want, got))


def test_the_interpreter_scatters_in_one_order():
    with deterministic():
        a = _learned_bias_call()
        b = _learned_bias_call()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
def test_refused_on_cuda():
    with deterministic(), pytest.raises(RuntimeError, match="atomic adds"):
        _learned_bias_call(device="cuda", options=None)
    _learned_bias_call(device="cuda", learned=False, options=None)


@pytest.mark.gpu
def test_outputs_and_input_gradients_repeat_bit_for_bit_on_cuda():
    """Everything but a captured tensor's gradient is summed by one program in a fixed order."""
    def run():
        torch.manual_seed(0)
        x = [torch.randn(2, 4, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        out = flexebt.flex_attention(*x, score_mod=mods.generate_alibi_bias(4))
        grads = torch.autograd.grad(out.float().square().sum(), x, create_graph=True)
        second = torch.autograd.grad(sum(g.float().square().sum() for g in grads), x)
        return (out, *grads, *second)

    with deterministic():
        a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
