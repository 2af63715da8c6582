"""torch.use_deterministic_algorithms: a captured tensor read at one element per score
(``bias[h, q_idx, kv_idx]``, ``bias[b, h, q_idx, kv_idx]``, any order of those) gets its gradient
without atomic adds, deterministic on every device; a backward whose kernels must add a captured
tensor's gradient with atomic adds (on CUDA: a run-dependent order) is refused, or warned about
with warn_only=True, the way torch treats its own non-deterministic operations.  Under Triton's
CPU interpreter the programs run one after another, so every scatter is deterministic there; the
CPU tests mark the CPU as a device of run-dependent order to check the refusal itself, and read
the per-batch accumulators to check where each batch element's share lands."""

import contextlib

import pytest
import torch

import flexebt
import flexebt.kernels.flex as kf
import flexebt.kernels.plan as plan_module
from flexebt import mods
from helpers import rel_err, second_order

T = {"BACKEND": "TRITON"}


@contextlib.contextmanager
def deterministic(warn_only=False):
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def _table_call(device="cpu", learned=True, options=T, create_graph=False, relative=True, B=1):
    """A learned captured tensor: a relative-position table (read by many scores: atomic adds) or
    a full bias (one element per score)."""
    torch.manual_seed(0)
    if relative:
        table = (0.3 * torch.randn(2, 19, device=device)).requires_grad_(learned)
        score_mod = mods.generate_relative_position_bias(table, 9)
    else:
        table = (0.3 * torch.randn(2, 24, 24, device=device)).requires_grad_(learned)
        score_mod = mods.generate_bias_score_mod(table)
    x = [torch.randn(B, 2, 24, 16, device=device, requires_grad=True) for _ in range(3)]
    out = flexebt.flex_attention(*x, score_mod=score_mod, kernel_options=options)
    leaves = x + ([table] if learned else [])
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=create_graph)
    if create_graph:
        grads = torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)
    return grads


@pytest.fixture
def cpu_counts_as_nondeterministic(monkeypatch):
    monkeypatch.setattr(kf, "NONDETERMINISTIC_SCATTER", ("cuda", "cpu"))


def test_a_learned_table_backward_is_refused_under_deterministic_algorithms(cpu_counts_as_nondeterministic):
    """A relative-position table is read by every score at one distance: atomic adds, refused,
    with the error naming what is deterministic."""
    with deterministic(), pytest.raises(RuntimeError, match="atomic adds.*bias\\[h, q_idx, kv_idx\\].*REFERENCE"):
        _table_call()


# second order: the backward, the double backward, and the forward's backward once more (the
# first-order cotangent 2 * out depends on the output) each scatter the table's gradient
@pytest.mark.parametrize("create_graph, alerts", [(False, 1), (True, 3)], ids=["first order", "second order"])
def test_warn_only_warns_for_each_scatter_and_computes_the_same_gradients(cpu_counts_as_nondeterministic,
                                                                          create_graph, alerts):
    """Every scatter is flagged -- the double backward's too -- and the gradients are those of a
    run without the flag."""
    want = _table_call(create_graph=create_graph)
    with deterministic(warn_only=True), pytest.warns(UserWarning, match="atomic adds") as record:
        got = _table_call(create_graph=create_graph)
    assert sum("atomic adds" in str(w.message) for w in record) == alerts
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_several_captured_tensors_only_a_learned_table_is_flagged(cpu_counts_as_nondeterministic):
    """A mod reading a bias, a relative table and a fixed per-head scale (a view with negative and
    zero entries): refused while the table is learned; with only the bias learned it runs without
    atomics, equal to the reference and to the same call without the flag."""
    torch.manual_seed(1)
    x = [torch.randn(2, 3, 20, 8, requires_grad=True) for _ in range(3)]
    scale = torch.tensor([[-1.5, 0.0, 2.0, 7.0]])[0, 1:]  # a view, offset into its storage

    def run(bias, table, options=T):
        def score_mod(score, b, h, q_idx, kv_idx):
            return score * scale[h] + bias[h, q_idx, kv_idx] + table[h, (q_idx - kv_idx) % 7]
        out = flexebt.flex_attention(*x, score_mod=score_mod, kernel_options=options)
        leaves = x + [t for t in (bias, table) if t.requires_grad]
        return torch.autograd.grad(out.square().sum(), leaves)

    bias, table = 0.2 * torch.randn(3, 20, 20), 0.2 * torch.randn(3, 7)
    with deterministic():
        with pytest.raises(RuntimeError, match="score_mod"):
            run(bias.clone().requires_grad_(), table.clone().requires_grad_())
        got = run(bias.clone().requires_grad_(), table)
    assert all(torch.equal(a, b) for a, b in zip(got, run(bias.clone().requires_grad_(), table)))
    want = run(bias.clone().requires_grad_(), table, {"BACKEND": "REFERENCE"})
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(got, want))


def _bias_layout(layout, B, H, S):
    """(bias, score_mod) reading one element per score, in several layouts."""
    if layout == "h,q,kv":
        bias = 0.3 * torch.randn(H, S, S)
        return bias.requires_grad_(), lambda score, b, h, q_idx, kv_idx: score + bias[h, q_idx, kv_idx]
    if layout == "b,h,q,kv (tanh)":
        bias = 0.3 * torch.randn(B, H, S, S)
        return bias.requires_grad_(), lambda score, b, h, q_idx, kv_idx: score * torch.tanh(bias[b, h, q_idx, kv_idx])
    if layout == "h,kv,q of a transposed slice":
        big = torch.randn(H + 1, S + 3, S + 2)
        bias = big[1:, 3:, 2:].transpose(1, 2).detach().requires_grad_()  # [H, S + 2, S], strided
        return bias, lambda score, b, h, q_idx, kv_idx: score * torch.sigmoid(bias[h, kv_idx, q_idx])
    if layout == "kv,h,b,q":
        bias = 0.3 * torch.randn(S, H, B, S)
        return bias.requires_grad_(), lambda score, b, h, q_idx, kv_idx: score - bias[kv_idx, h, b, q_idx]
    raise KeyError(layout)


# B = 2 (not more) where the bias does not index the batch: two batch elements already need two
# per-batch accumulators, summed afterwards; a third only adds interpreter programs (cost ~ B * H)
@pytest.mark.parametrize("layout, B", [("h,q,kv", 1), ("h,q,kv", 2), ("b,h,q,kv (tanh)", 2),
                                       ("h,kv,q of a transposed slice", 2), ("kv,h,b,q", 2)])
def test_a_bias_read_once_per_score_is_deterministic(cpu_counts_as_nondeterministic, layout, B):
    """A captured tensor read at one element per score: under deterministic algorithms its first-
    and second-order gradients come without atomic adds (no refusal where atomics would not be
    deterministic), equal to the atomic path's and close to the float64 reference (GQA, odd S)."""
    H, S = 2, 11
    torch.manual_seed(2)
    bias, score_mod = _bias_layout(layout, B, H, S)
    x = [torch.randn(B, H, S, 16, requires_grad=True)] + [torch.randn(B, 1, S, 16, requires_grad=True)
                                                           for _ in range(2)]

    def run(options=T):
        f = lambda *t: flexebt.flex_attention(*t[:3], score_mod=score_mod, enable_gqa=True,  # noqa: E731
                                              kernel_options=options)
        first, second = second_order(f, x + [bias])
        return first + second

    with deterministic():
        got = run()
    atomic = run()
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(got, atomic))
    want = run({"BACKEND": "REFERENCE"})
    assert all(torch.isfinite(a).all() and rel_err(a, b) < 2e-5 for a, b in zip(got, want))


def test_each_batch_element_has_its_own_accumulator(monkeypatch):
    """A bias that does not index the batch is added into one accumulator per batch element (no two
    programs of a launch touch one element), summed in order afterwards: each accumulator holds
    exactly the gradient of its batch element's call.  (The interpreter's programs run one after
    another, so only these accumulators show whether each batch element wrote its own.)"""
    H, S, B = 2, 19, 3
    torch.manual_seed(3)
    bias = (0.3 * torch.randn(H, S, S)).requires_grad_()
    x = [torch.randn(B, H, S, 16) for _ in range(3)]
    seen = []
    real = plan_module.captured_grad_buffers

    def spy(*args, **kw):
        acc = real(*args, **kw)
        seen.append(acc)
        return acc

    monkeypatch.setattr(plan_module, "captured_grad_buffers", spy)

    def grad(xs):
        out = flexebt.flex_attention(*xs, score_mod=mods.generate_bias_score_mod(bias), kernel_options=T)
        return torch.autograd.grad((out * torch.linspace(-1, 1, 16)).sum(), bias)[0]

    with deterministic():
        total = grad(x)
    (acc,) = seen
    assert acc.batch_stride == {0: H * S * S} and acc[0].shape == (B, H * S * S)
    for b in range(B):
        alone = grad([t[b:b + 1] for t in x])
        assert torch.allclose(acc[0][b].view(H, S, S), alone, rtol=1e-6, atol=1e-7)
    assert torch.equal(total, acc[0].sum(0).view(H, S, S))


@pytest.mark.parametrize("layout, B, stride", [("h,q,kv", 1, 0), ("h,q,kv", 3, None), ("b,h,q,kv", 3, 0)])
def test_the_default_takes_no_atomics_where_one_accumulator_serves(monkeypatch, layout, B, stride):
    """Without deterministic algorithms: a bias read once per score whose load indexes the batch
    (or a call of batch 1) is added with plain reads and writes into one accumulator (batch
    stride 0); one that does not index a larger batch keeps the atomic adds (no batch stride)."""
    H, S = 2, 9
    torch.manual_seed(5)
    bias = (0.3 * torch.randn(*((B,) if layout.startswith("b") else ()), H, S, S)).requires_grad_()
    index = (lambda b, h, q, kv: bias[b, h, q, kv]) if layout.startswith("b") else (lambda b, h, q, kv: bias[h, q, kv])
    x = [torch.randn(B, H, S, 16) for _ in range(3)]
    seen = []
    real = plan_module.captured_grad_buffers
    monkeypatch.setattr(plan_module, "captured_grad_buffers", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])

    def grad(options):
        out = flexebt.flex_attention(*x, score_mod=lambda score, b, h, q_idx, kv_idx: score + index(b, h, q_idx, kv_idx),
                                     kernel_options=options)
        return torch.autograd.grad((out * torch.linspace(-1, 1, 16)).sum(), bias)[0]

    got = grad(T)
    assert seen[0].batch_stride == ({} if stride is None else {0: stride})
    assert rel_err(got, grad({"BACKEND": "REFERENCE"})) < 1e-5


@pytest.mark.parametrize("family", ["ebt", "piecewise"])
def test_ebt_and_piecewise_bias_gradients_are_deterministic(cpu_counts_as_nondeterministic, family):
    """The EBT streams (two nodes, own keys, frame positions) and piecewise's two passes (each with
    its own accumulators): under deterministic algorithms, no refusal, and the gradients of the
    atomic path, first and second order."""
    torch.manual_seed(4)
    B, H, S = 2, 1, 7
    if family == "ebt":
        bias = (0.3 * torch.randn(H, 2 * S, 2 * S)).requires_grad_()  # frame positions reach past S
        x = [torch.randn(B, H, S, 16, requires_grad=True) for _ in range(6)]
        f = lambda *t: flexebt.flex_ebt_attention(*t[:6], score_mod=mods.generate_bias_score_mod(bias),  # noqa: E731
                                                  kernel_options=T)
    else:
        bias = (0.3 * torch.randn(H, S, S)).requires_grad_()
        x = [torch.randn(B, H, S, 16, requires_grad=True) for _ in range(5)]
        f = lambda *t: flexebt.piecewise_attention(*t[:5], dist_threshold=3,  # noqa: E731
                                                   score_mod=mods.generate_bias_score_mod(bias), kernel_options=T)
    with deterministic():
        first, second = second_order(f, x + [bias])
    want_first, want_second = second_order(f, x + [bias])
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(first + second, want_first + want_second))


def test_no_captured_gradient_or_the_reference_backend_is_deterministic(cpu_counts_as_nondeterministic):
    want = _table_call(options={"BACKEND": "REFERENCE"})
    with deterministic():
        _table_call(learned=False)  # the table is read, its gradient not asked for: no scatter
        got = _table_call(options={"BACKEND": "REFERENCE"})
    assert all(rel_err(a, b) == 0 for a, b in zip(want, got))


def test_the_interpreter_scatters_in_one_order():
    with deterministic():
        a = _table_call()
        b = _table_call()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
def test_refused_on_cuda():
    with deterministic(), pytest.raises(RuntimeError, match="atomic adds"):
        _table_call(device="cuda", options=None)
    _table_call(device="cuda", learned=False, options=None)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 3])
def test_a_full_bias_repeats_bit_for_bit_on_cuda(B):
    """A bias read once per score: deterministic algorithms give it a gradient without atomics
    that repeats bit for bit (first and second order, a batch that the bias does not index, GQA,
    bf16 inputs, odd S), close to the atomic path's."""
    def run():
        torch.manual_seed(0)
        bias = (0.3 * torch.randn(8, 1000, 1000, device="cuda")).requires_grad_()
        q = torch.randn(B, 8, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k, v = (torch.randn(B, 2, 1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        out = flexebt.flex_attention(q, k, v, score_mod=mods.generate_bias_score_mod(bias), enable_gqa=True)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, bias), create_graph=True)
        second = torch.autograd.grad(sum(g.float().square().sum() for g in grads), (q, k, v, bias))
        return (*grads, *second)

    with deterministic():
        a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    atomic = run()
    assert all(rel_err(x, y) < 1e-5 for x, y in zip(a, atomic))


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
