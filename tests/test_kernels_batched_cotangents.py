"""Batched cotangents through the kernel path (interpreter): ``autograd.grad(..., is_grads_batched=True)``
(torch's own vmap over the backward) gives the same gradients as one ordinary backward per
cotangent -- for every family, with a learned captured tensor, first
order and, with ``create_graph=True``, second order.  The kernels have no batching rule: such a
backward runs the dense reference (same values, O(S^2) memory) instead of reading a tensor that
has no storage.  torch.func.vmap over a vjp of the kernels is refused by name."""

import pytest
import torch

import flexebt
from flexebt import masks
from helpers import rel_err

pytestmark = pytest.mark.interpreter
T = {"BACKEND": "TRITON"}
H, D = 2, 8


def _family(name: str):
    """(fn(*xs) -> one output tensor, input shapes, learned captured tensor)."""
    if name == "flex":
        S = 19
        bias = (0.5 * torch.randn(H, S, S)).requires_grad_()
        bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)

        def sm(score, b, h, q_idx, kv_idx):
            return score - bias[h, q_idx, kv_idx]

        def fn(*xs):
            out, lse = flexebt.flex_attention(*xs, score_mod=sm, block_mask=bm, return_lse=True, kernel_options=T)
            return out * lse.unsqueeze(-1).sin()

        return fn, [(1, H, S, D)] * 3, bias
    if name == "ebt":
        S_o, S_p = 17, 15
        bias = (0.5 * torch.randn(H)).requires_grad_()

        def sm(score, b, h, q_idx, kv_idx):
            return score * bias[h] - 0.1 * (q_idx - kv_idx)

        def fn(*xs):
            out_o, out_p = flexebt.flex_ebt_attention(*xs, score_mod=sm, kernel_options=T)
            return torch.cat([out_o, out_p], dim=2)

        return fn, [(1, H, S_o, D)] * 3 + [(1, H, S_p, D)] * 3, bias
    M, N = 13, 18
    bias = (0.5 * torch.randn(H, N)).requires_grad_()

    def sm(score, b, h, q_idx, kv_idx):
        return score + bias[h, kv_idx]

    def fn(*xs):
        return flexebt.piecewise_attention(*xs, dist_threshold=4, causal=True, score_mod=sm, kernel_options=T)

    return fn, [(1, H, M, D), (1, H, N, D), (1, H, M, D), (1, H, N, D), (1, H, N, D)], bias


@pytest.mark.parametrize("family", ["flex", "ebt", "piecewise"])
def test_is_grads_batched_equals_one_backward_per_cotangent(family):
    fn, shapes, bias = _family(family)
    # the streams computed from one leaf (as in a model): gradients reach it through views
    leaf = torch.randn(sum(s[2] for s in shapes), D, requires_grad=True)
    xs = list(torch.split(leaf.unsqueeze(0).unsqueeze(0).expand(1, H, -1, -1) * 1.0, [s[2] for s in shapes], dim=2))
    out = fn(*xs)
    cts = torch.randn(3, *out.shape)
    cts[1] = 0.0  # a zero cotangent in the batch
    wrt = [leaf, bias, xs[1]]
    got = torch.autograd.grad(out, wrt, cts, is_grads_batched=True, retain_graph=True)
    for i in range(cts.shape[0]):
        want = torch.autograd.grad(out, wrt, cts[i], retain_graph=True)
        for g, w in zip(got, want):
            assert g.shape[1:] == w.shape
            assert rel_err(g[i], w) < 1e-5 if w.abs().max() > 0 else g[i].abs().max() == 0


@pytest.mark.parametrize("family", ["flex", "ebt", "piecewise"])
def test_is_grads_batched_with_create_graph_differentiates_again(family):
    """Hessian-vector products batched over vectors: each row's second-order gradient equals the
    one of an ordinary create_graph backward with that cotangent."""
    fn, shapes, bias = _family(family)
    xs = [torch.randn(s, requires_grad=True) for s in shapes]
    out = fn(*xs)
    cts = torch.randn(2, *out.shape)
    wrt = [xs[0], xs[-1], bias]
    got = torch.autograd.grad(out, wrt, cts, is_grads_batched=True, create_graph=True)
    weights = [torch.randn_like(g[0]) for g in got]
    for i in range(cts.shape[0]):
        second = torch.autograd.grad(sum((g[i] * w).sum() for g, w in zip(got, weights)), xs + [bias],
                                     retain_graph=True, allow_unused=True)
        first = torch.autograd.grad(out, wrt, cts[i], create_graph=True)
        want = torch.autograd.grad(sum((g * w).sum() for g, w in zip(first, weights)), xs + [bias],
                                   retain_graph=True, allow_unused=True)
        for a, b in zip(second, want):
            if b is None:
                assert a is None or a.abs().max() == 0
            else:
                assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("family", ["flex", "ebt", "piecewise"])
def test_batched_second_order_over_a_kernel_first_order(family):
    """The first-order gradient from the kernels (create_graph=True), then a batch of vectors
    through its backward at once (rows of a Hessian-vector product): each row equals the ordinary
    second-order backward with that vector."""
    fn, shapes, bias = _family(family)
    xs = [torch.randn(s, requires_grad=True) for s in shapes]
    out = fn(*xs)
    ct = torch.randn_like(out)
    wrt = [xs[0], xs[1], bias]
    first = torch.autograd.grad(out, wrt, ct, create_graph=True)
    vs = [torch.randn(2, *g.shape) for g in first]
    got = torch.autograd.grad(first, xs + [bias], vs, is_grads_batched=True, retain_graph=True, allow_unused=True)
    for i in range(2):
        want = torch.autograd.grad(first, xs + [bias], [v[i] for v in vs], retain_graph=True, allow_unused=True)
        for a, b in zip(got, want):
            if b is None:
                assert a is None or a[i].abs().max() == 0
            else:
                assert rel_err(a[i], b) < 1e-5


def test_func_vmap_over_a_vjp_of_the_kernels_is_refused_by_name_and_the_reference_serves_it():
    fn, shapes, bias = _family("flex")
    xs = [torch.randn(s) for s in shapes]
    out, vjp = torch.func.vjp(lambda q, k, v: fn(q, k, v), *xs)
    cts = torch.randn(3, *out.shape)
    with pytest.raises(NotImplementedError, match="torch.func.vmap over the backward.*BACKEND.*REFERENCE"):
        torch.func.vmap(vjp)(cts)
    # the way out the error names gives the per-cotangent gradients of the kernels
    T["BACKEND"] = "REFERENCE"
    try:
        _, ref_vjp = torch.func.vjp(lambda q, k, v: fn(q, k, v), *xs)
        got = torch.func.vmap(ref_vjp)(cts)
    finally:
        T["BACKEND"] = "TRITON"
    for i in range(cts.shape[0]):
        for g, w in zip(got, vjp(cts[i])):
            assert rel_err(g[i], w) < 1e-5


class _Holder:
    pass


def test_a_captured_tensor_read_where_no_stand_in_reaches_is_refused_never_partial():
    """The dense-reference fallbacks (a batched backward; a double backward that builds a graph for
    the third order while a captured tensor needs a gradient) read each learned captured tensor
    through a stand-in swapped into the mod.  The same tensor also read through an object's
    attribute, where no stand-in reaches, would lose that read's share of the gradient: refused.
    The kernels' own backward (unbatched, first and second order) serves it exactly."""
    S = 12
    hold = _Holder()
    bias = hold.b = (0.3 * torch.randn(H, S, S)).requires_grad_()

    def sm(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx] + 0.5 * hold.b[h, q_idx, kv_idx]

    x = [torch.randn(1, H, S, D, requires_grad=True) for _ in range(3)]
    out = flexebt.flex_attention(*x, score_mod=sm, kernel_options=T)
    cts = torch.randn(2, *out.shape)
    with pytest.raises(NotImplementedError, match="cannot be replaced"):
        torch.autograd.grad(out, [bias], cts, is_grads_batched=True, retain_graph=True)
    first = torch.autograd.grad(out, x + [bias], cts[0], create_graph=True)
    with pytest.raises(NotImplementedError, match="cannot be replaced"):
        torch.autograd.grad(sum((g * g).sum() for g in first), x + [bias], create_graph=True, retain_graph=True)
    want = torch.autograd.grad(flexebt.flex_attention(*x, score_mod=sm, kernel_options={"BACKEND": "REFERENCE"}),
                               x + [bias], cts[0])
    for a, b in zip(first, want):
        assert rel_err(a, b) < 1e-5
    # second order without a graph for a third order: the fused kernels, exact
    second = torch.autograd.grad(sum((g * g).sum() for g in first), x + [bias])
    ref_first = torch.autograd.grad(flexebt.flex_attention(*x, score_mod=sm, kernel_options={"BACKEND": "REFERENCE"}),
                                    x + [bias], cts[0], create_graph=True)
    ref_second = torch.autograd.grad(sum((g * g).sum() for g in ref_first), x + [bias])
    for a, b in zip(second, ref_second):
        assert rel_err(a, b) < 1e-5


def test_jacobians_vectorized_by_torch_reverse_mode_exact_forward_mode_refused():
    """torch.autograd.functional.jacobian(vectorize=True) batches with torch's own vmap: in reverse
    mode (batched cotangents) the kernels' backward gives the reference's Jacobian; in forward mode
    (batched tangents into the kernels' JVP) the call is refused by name."""
    S = 6
    x = [torch.randn(1, 1, S, 4) for _ in range(3)]

    def f(backend):
        return lambda q, k, v: flexebt.flex_attention(q, k, v, kernel_options=backend)

    got = torch.autograd.functional.jacobian(f(T), tuple(x), vectorize=True)
    want = torch.autograd.functional.jacobian(f({"BACKEND": "REFERENCE"}), tuple(x))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
    with pytest.raises(NotImplementedError, match="strategy='reverse-mode'"):
        torch.autograd.functional.jacobian(f(T), tuple(x), vectorize=True, strategy="forward-mode")
