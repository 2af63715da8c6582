"""flexebt.flex_attention inside torch.compile(fullgraph=True): no graph break, eager-equal results
for forward and backward (captured tensors included), no recompile on a second call, and a
clear error -- never a silent drop -- for double backward through the compiled region and for
torch.func transforms inside it."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import flexebt
from flexebt import masks, mods
from helpers import rel_err

T = {"BACKEND": "TRITON"}


def _model(device, S=48, H=2, D=16):
    bias = (0.3 * torch.randn(H, S, S, device=device)).requires_grad_()
    sm = mods.generate_bias_score_mod(bias)
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device=device, BLOCK_SIZE=16 if device == "cpu" else 128)

    def attend(q, k, v):
        return flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, kernel_options=T)

    x = [torch.randn(1, H, S, D, device=device, requires_grad=True) for _ in range(3)]
    return attend, bias, x


def _check(device, backend):
    attend, bias, x = _model(device)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(attend, fullgraph=True, backend=counter)
    out = compiled(*x)
    grads = torch.autograd.grad(out.square().sum(), x + [bias])
    ref = attend(*x)
    ref_grads = torch.autograd.grad(ref.square().sum(), x + [bias])
    assert rel_err(out, ref) < 1e-6
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-5
    x2 = [torch.randn_like(t).requires_grad_() for t in x]
    compiled(*x2)
    assert counter.frame_count == 1  # the second call reused the graph


@pytest.mark.interpreter
def test_fullgraph_forward_backward_cpu():
    _check("cpu", "aot_eager")


@pytest.mark.interpreter
def test_double_backward_in_compiled_region_raises():
    attend, bias, x = _model("cpu")
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    out = compiled(*x)
    with pytest.raises(RuntimeError, match="double backward"):
        g = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        torch.autograd.grad(sum(t.square().sum() for t in g), x)


@pytest.mark.interpreter
def test_torch_func_grad_in_fullgraph_compile_raises_clearly():
    """torch.func.grad (and grad of grad) inside torch.compile(fullgraph=True): a clear error that
    names the limitation, never a silently dropped term."""
    attend, bias, x = _model("cpu")
    q, k, v = (t.detach() for t in x)

    def energy(q):
        return attend(q, k, v).square().sum()

    for fn in (torch.func.grad(energy), torch.func.grad(lambda t: torch.func.grad(energy)(t).square().sum())):
        torch._dynamo.reset()
        with pytest.raises(Exception, match="under torch.func transforms"):
            torch.compile(fn, fullgraph=True, backend="aot_eager")(q)


@pytest.mark.gpu
def test_fullgraph_inductor_gpu():
    _check("cuda", "inductor")


def _ebt_energy(S=20):
    bm = flexebt.create_ebt_block_mask(None, None, None, S, S, BLOCK_SIZE=16)
    x = [torch.randn(1, 2, S, 16) for _ in range(6)]

    def energy(q_p, backend=T):
        return flexebt.flex_ebt_attention(*x[:3], q_p, *x[4:], block_mask=bm, kernel_options=backend)[1].square().sum()

    return energy, torch.randn(1, 2, S, 16)


@pytest.mark.interpreter
def test_ebt_and_piecewise_in_a_compiled_model():
    """flex_ebt_attention and piecewise_attention compile with fullgraph=True: same values."""
    energy, q = _ebt_energy()
    got = torch.compile(energy, backend="aot_eager", fullgraph=True)(q)
    assert rel_err(got, energy(q, {"BACKEND": "REFERENCE"})) < 1e-5
    x = [torch.randn(1, 2, 24, 16) for _ in range(5)]

    def pw(*a):
        return flexebt.piecewise_attention(*a, dist_threshold=5, causal=True, kernel_options=T)

    assert rel_err(torch.compile(pw, backend="aot_eager", fullgraph=True)(*x), pw(*x)) < 1e-6


@pytest.mark.interpreter
def test_ebt_second_order_under_compile_is_exact_or_refused():
    """autograd.grad(create_graph=True) inside a compiled function: exact with backend='eager'
    (the kernels' autograd Functions run eagerly), refused by torch under aot_autograd; torch.func
    inside a fullgraph compile: a clear error.  Never a silent drop."""
    energy, q = _ebt_energy()
    want = torch.func.grad(lambda t: torch.func.grad(lambda y: energy(y, {"BACKEND": "REFERENCE"}))(t)
                           .square().sum())(q)

    def step(qq):
        qq = qq.clone().requires_grad_()
        (g,) = torch.autograd.grad(energy(qq), qq, create_graph=True)
        return torch.autograd.grad(g.square().sum(), qq)[0]

    torch._dynamo.reset()
    assert rel_err(torch.compile(step, backend="eager")(q), want) < 1e-5
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.compile(step, backend="aot_eager")(q)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="under torch.func transforms"):
        torch.compile(torch.func.grad(lambda t: torch.func.grad(energy)(t).square().sum()), fullgraph=True,
                      backend="aot_eager")(q)


TEMPERATURE = 0.5  # read by _global_mod; the test below changes it between calls


def _global_mod(score, b, h, q_idx, kv_idx):
    return score * TEMPERATURE


@pytest.mark.interpreter
def test_changed_mod_reads_recompile_never_serve_a_stale_kernel():
    """The kernel key is a constant of the compiled graph, so the graph must be guarded on what the
    mods read: a module global, a closure cell and an attribute of ``self`` changed after compiling
    give a recompile and the new value's kernel; unchanged values reuse the graph."""
    global TEMPERATURE

    class Layer:
        def __init__(self):
            self.shift = 0.25

        def score_mod(self, score, b, h, q_idx, kv_idx):
            return score + self.shift * (q_idx - kv_idx)

    cell = [0.1]

    def closure_mod(score, b, h, q_idx, kv_idx):
        return score - cell[0] * kv_idx

    layer = Layer()
    q = torch.randn(1, 2, 16, 16)
    cases = {
        "global": (_global_mod, lambda: globals().__setitem__("TEMPERATURE", 2.0)),
        "closure": (closure_mod, lambda: cell.__setitem__(0, -0.3)),
        "self": (layer.score_mod, lambda: setattr(layer, "shift", -1.5)),
    }
    try:
        for name, (mod, change) in cases.items():
            counter = CompileCounterWithBackend("aot_eager")
            f = torch.compile(lambda x, m=mod: flexebt.flex_attention(x, x, x, score_mod=m, kernel_options=T),
                              fullgraph=True, backend=counter)

            def ref():
                return flexebt.flex_attention(q, q, q, score_mod=mod, kernel_options={"BACKEND": "REFERENCE"})

            assert rel_err(f(q), ref()) < 1e-6, name
            assert rel_err(f(q), ref()) < 1e-6 and counter.frame_count == 1, name
            change()
            assert rel_err(f(q), ref()) < 1e-6, f"{name}: a stale kernel after the mod's value changed"
            recompiled = counter.frame_count
            assert recompiled > 1, name
            assert rel_err(f(q), ref()) < 1e-6 and counter.frame_count == recompiled, name
    finally:
        TEMPERATURE = 0.5


@pytest.mark.interpreter
def test_nested_closures_partials_and_mask_mods_compile_with_guards():
    """Mods whose closures hold other closures with captured tensors, partials, and a block mask's
    mask_mod reading a document table: they compile (fullgraph), match eager, and a changed scale
    in the inner closure's list recompiles."""
    import functools

    S = 24
    bias = (0.3 * torch.randn(2, S, S)).requires_grad_()
    doc = torch.arange(S) // 7
    scale = [0.5]

    def inner(h, q_idx, kv_idx):
        return bias[h, q_idx, kv_idx] * scale[0]

    def outer(score, b, h, q_idx, kv_idx):
        return score + inner(h, q_idx, kv_idx)

    def shifted(score, b, h, q_idx, kv_idx, shift):
        return score + shift * bias[h, kv_idx, q_idx]

    def same_doc(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    bm = flexebt.create_block_mask(same_doc, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    x = [torch.randn(1, 2, S, 16, requires_grad=True) for _ in range(3)]
    for mod in (outer, functools.partial(shifted, shift=-0.7)):
        def attend(q, k, v, backend, m=mod):
            return flexebt.flex_attention(q, k, v, score_mod=m, block_mask=bm, kernel_options=backend)

        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(attend, fullgraph=True, backend=counter)
        for _ in range(2):
            out = compiled(*x, T)
            want = attend(*x, {"BACKEND": "REFERENCE"})
            assert rel_err(out, want) < 1e-6
            got_g = torch.autograd.grad(out.square().sum(), x + [bias])
            want_g = torch.autograd.grad(want.square().sum(), x + [bias])
            for a, b in zip(got_g, want_g):
                assert rel_err(a, b) < 1e-5
            scale[0] = 2.0  # read by `inner` only: the second round must not reuse the first kernel


@pytest.mark.interpreter
def test_new_mods_and_block_masks_of_the_same_structure_reuse_the_graph():
    """A compiled function taking its mods and block masks as arguments: new closures over new
    tensors (a learned bias per call, a document mask per batch), a bound method of another layer
    object and a rebound closure cell reuse the graph and compute with their own tensors; a changed
    number baked into the kernel (a closure int, a `self` float) recompiles.  A bound method is
    guarded by its object: a fresh ``layer.score_mod`` of the same layer reuses the graph."""
    S, H = 24, 2

    def bias_mod(bias):
        def mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]
        return mod

    def period_mod(period):
        def mod(score, b, h, q_idx, kv_idx):
            return score + 0.25 * ((q_idx - kv_idx) % period)
        return mod

    def doc_mask(doc):
        def mask(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)
        return mask

    class Layer:
        def __init__(self, slope):
            self.slope = slope
            self.bias = torch.randn(H, S)

        def score_mod(self, score, b, h, q_idx, kv_idx):
            return score * self.slope + self.bias[h, kv_idx]

    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(fullgraph=True, backend=counter)
    def attend(q, mod, bm):
        return flexebt.flex_attention(q, q, q, score_mod=mod, block_mask=bm, kernel_options=T)

    q = torch.randn(1, H, S, 16)

    frames = [0]

    def check(mod, bm, recompiles: bool):
        want = flexebt.flex_attention(q, q, q, score_mod=mod, block_mask=bm, kernel_options={"BACKEND": "REFERENCE"})
        assert rel_err(attend(q, mod, bm), want) < 1e-6
        # dynamo may run the backend twice for one recompile (a number turned symbolic restarts it)
        assert (counter.frame_count > frames[0]) == recompiles, (counter.frame_count, frames[0])
        frames[0] = counter.frame_count

    def doc_bm():
        doc = torch.randint(0, 3, (S,)).sort().values
        return flexebt.create_block_mask(doc_mask(doc), None, None, S, S, device="cpu", BLOCK_SIZE=16)

    check(bias_mod(torch.randn(H, S, S)), doc_bm(), True)
    for _ in range(2):  # a new bias and a new document mask every call: one graph
        check(bias_mod(torch.randn(H, S, S)), doc_bm(), False)
    check(period_mod(3), doc_bm(), True)  # another mod's code: a second graph
    check(period_mod(3), doc_bm(), False)
    check(period_mod(5), doc_bm(), True)  # the baked period changed: recompile
    check(period_mod(5), doc_bm(), False)
    layer = Layer(0.5)
    check(layer.score_mod, doc_bm(), True)
    check(layer.score_mod, doc_bm(), False)  # a new bound method object of the same layer
    layer.bias = torch.randn(H, S)
    check(layer.score_mod, doc_bm(), False)  # a new tensor is read, not baked
    layer.slope = -2.0
    check(layer.score_mod, doc_bm(), True)  # a baked number changed
    check(layer.score_mod, doc_bm(), False)

    table = torch.randn(H, S, S)

    def rebound(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx, kv_idx]

    check(rebound, doc_bm(), True)
    table = torch.randn(H, S, S)  # noqa: F841 - the cell now holds a new tensor: read, not baked
    check(rebound, doc_bm(), False)


@pytest.mark.interpreter
def test_guards_see_diverging_aliases_shadowed_class_attributes_and_refuse_numpy():
    """Two routes to one tensor that later reach two tensors, and a class attribute later shadowed
    by an instance attribute, recompile (the kernel depended on them); a numpy value and a partial
    with tensor arguments are refused by name instead of served stale."""
    import functools

    import numpy as np

    S, H = 16, 2
    q = torch.randn(1, H, S, 16)
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(fullgraph=True, backend=counter)
    def attend(q, mod):
        return flexebt.flex_attention(q, q, q, score_mod=mod, kernel_options=T)

    def agrees(mod):
        want = flexebt.flex_attention(q, q, q, score_mod=mod, kernel_options={"BACKEND": "REFERENCE"})
        return rel_err(attend(q, mod), want) < 1e-6

    def two_tables(a, c):
        def mod(score, b, h, q_idx, kv_idx):
            return score + a[h, q_idx, kv_idx] + 2 * c[h, q_idx, kv_idx]
        return mod

    t = torch.randn(H, S, S)
    assert agrees(two_tables(t, t))
    assert agrees(two_tables(torch.randn(H, S, S), torch.randn(H, S, S)))

    class Layer:
        scale = 0.5

        def score_mod(self, score, b, h, q_idx, kv_idx):
            return score + self.scale * (q_idx - kv_idx)

    layer = Layer()
    assert agrees(layer.score_mod)
    layer.scale = -3.0
    assert agrees(layer.score_mod)

    table = np.float64(0.5)

    def numpy_mod(score, b, h, q_idx, kv_idx):
        return score + table * (q_idx - kv_idx)

    with pytest.raises(Exception, match="reads a numpy value"):
        attend(q, numpy_mod)

    def biased(score, b, h, q_idx, kv_idx, bias=None):
        return score + bias[h, q_idx, kv_idx]

    with pytest.raises(Exception, match="functools.partial mod with tensor arguments"):
        attend(q, functools.partial(biased, bias=torch.randn(H, S, S)))


@pytest.mark.interpreter
def test_closure_made_inside_the_compiled_function_is_refused_by_name():
    """A closure created during tracing cannot be handed to the kernel generator: fullgraph names
    the mod and says where to define it; without fullgraph the call runs eagerly and is exact."""
    S, H = 16, 2
    bias = torch.randn(H, S, S)

    def fn(q, bias):
        def inner_bias(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]
        return flexebt.flex_attention(q, q, q, score_mod=inner_bias, kernel_options=T)

    q = torch.randn(1, H, S, 16)
    with pytest.raises(Exception, match="inner_bias' is a closure created inside the compiled function"):
        torch.compile(fn, fullgraph=True, backend="aot_eager")(q, bias)
    assert rel_err(torch.compile(fn, backend="aot_eager")(q, bias), fn(q, bias)) < 1e-6


@pytest.mark.interpreter
def test_ebt_block_mask_made_inside_the_compiled_function():
    """An EBT block mask created inside the compiled function (a model that builds its mask on
    first use): its own-key mask is traced in place; values and gradients equal the reference's,
    and the next call reuses the graph."""
    S, H = 20, 2

    def fn(*xs, backend=T):
        bm = flexebt.create_ebt_block_mask(masks.ebt_causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)
        out_o, out_p = flexebt.flex_ebt_attention(*xs, block_mask=bm, kernel_options=backend)
        return out_o.square().sum() + out_p.sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for _ in range(2):
        x = [torch.randn(1, H, S, 16, requires_grad=True) for _ in range(6)]
        got, want = compiled(*x), fn(*x, backend={"BACKEND": "REFERENCE"})
        assert rel_err(got, want) < 1e-6
        for a, b in zip(torch.autograd.grad(got, x), torch.autograd.grad(want, x)):
            assert rel_err(a, b) < 1e-5
    assert counter.frame_count == 1


@pytest.mark.interpreter
def test_method_mod_inside_a_compiled_module():
    """``score_mod=self.score_mod`` inside a compiled module's forward (the method read inside the
    trace) compiles with fullgraph; forward and the learned bias's gradient equal the reference;
    layers reuse the graph across calls."""
    S, H = 20, 2

    class Attention(torch.nn.Module):
        def __init__(self, slope):
            super().__init__()
            self.slope = slope
            self.bias = torch.nn.Parameter(0.3 * torch.randn(H, S))

        def score_mod(self, score, b, h, q_idx, kv_idx):
            return score * self.slope + self.bias[h, kv_idx]

        def forward(self, q, backend):
            return flexebt.flex_attention(q, q, q, score_mod=self.score_mod, kernel_options=backend)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Attention(0.5), Attention(-1.0)])

        def forward(self, q, backend=T):
            for layer in self.layers:
                q = layer(q, backend)
            return q

    model = Model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for _ in range(2):
        q = torch.randn(1, H, S, 16, requires_grad=True)
        got = compiled(q)
        want = model(q, {"BACKEND": "REFERENCE"})
        assert rel_err(got, want) < 1e-6
        params = [q] + [layer.bias for layer in model.layers]
        for a, b in zip(torch.autograd.grad(got.square().sum(), params),
                        torch.autograd.grad(want.square().sum(), params)):
            assert rel_err(a, b) < 1e-5
    assert counter.frame_count == 1


def _second_order_step(fn, params):
    """An EBT-style step: an energy, its gradient with create_graph=True, a loss on the gradient."""
    def step(*xs):
        energy = fn(*xs)
        grads = torch.autograd.grad(energy, list(xs) + params, create_graph=True)
        return sum((g * g).sum() * (i + 1) for i, g in enumerate(grads))
    return step


@pytest.mark.interpreter
@pytest.mark.parametrize("family,backend", [(f, "aot_eager") for f in ("flex", "flex_lse", "ebt", "ebt_window",
                                                                        "piecewise", "piecewise_window")] +
                         [(f, "inductor") for f in ("flex_lse", "ebt", "piecewise")])
def test_second_order_inside_fullgraph_compile(family, backend):
    """With trace_autograd_ops, autograd.grad(create_graph=True) inside torch.compile(fullgraph=True)
    traces forward -> backward -> double-backward custom ops: the outer gradients (inputs and a
    learned bias) equal the reference's, and a second call with new tensors does not recompile."""
    H, D = 2, 16
    if family.startswith("flex"):
        S = 24
        bias = (0.3 * torch.randn(H, S, S)).requires_grad_()
        bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)

        def sm(score, b, h, q_idx, kv_idx):
            return torch.tanh(score + bias[h, q_idx, kv_idx])

        def fn(q, k, v, backend=T):
            out, lse = flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, return_lse=True,
                                              kernel_options=backend)
            return out.square().sum() + (lse.sum() if family == "flex_lse" else 0)

        shapes = [(1, H, S, D)] * 3
    elif family.startswith("piecewise"):
        M, N = 20, 23
        bias = (0.3 * torch.randn(H, N)).requires_grad_()
        bm = None if family == "piecewise" else flexebt.create_block_mask(masks.generate_sliding_window(9), None, None,
                                                                          M, N, device="cpu", BLOCK_SIZE=16)

        def sm(score, b, h, q_idx, kv_idx):
            return score + bias[h, kv_idx]

        def fn(*xs, backend=T):
            return flexebt.piecewise_attention(*xs, dist_threshold=5, causal=True, score_mod=sm, block_mask=bm,
                                               kernel_options=backend).square().sum()

        shapes = [(1, H, M, D), (1, H, N, D), (1, H, M, D), (1, H, N, D), (1, H, N, D)]
    else:
        S_o, S_p = 21, 20
        bias = (0.3 * torch.randn(H, S_o + 1, S_o + 1)).requires_grad_()
        bm = None if family == "ebt" else flexebt.create_ebt_block_mask(masks.generate_sliding_window(6), None, None,
                                                                        S_o, S_p, device="cpu", BLOCK_SIZE=16)

        def sm(score, b, h, q_idx, kv_idx):
            return score * 0.8 + bias[h, q_idx, kv_idx]

        def fn(*xs, backend=T):
            out_o, out_p, lse_o, lse_p = flexebt.flex_ebt_attention(*xs, score_mod=sm, block_mask=bm, return_lse=True,
                                                                    kernel_options=backend)
            return out_p.square().sum() + out_o.sum() + lse_p.sum()

        shapes = [(1, H, S_o, D)] * 3 + [(1, H, S_p, D)] * 3
    step = _second_order_step(fn, [bias])
    ref_step = _second_order_step(lambda *xs: fn(*xs, backend={"BACKEND": "REFERENCE"}), [bias])
    counter = CompileCounterWithBackend(backend)
    torch._dynamo.reset()  # every case compiles the same step code: start from an empty cache
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True, backend=counter)
        for _ in range(2):
            x = [torch.randn(s, requires_grad=True) for s in shapes]
            got = torch.autograd.grad(compiled(*x), x + [bias])
            want = torch.autograd.grad(ref_step(*x), x + [bias])
            for a, b in zip(got, want):
                assert rel_err(a, b) < 1e-5
    assert counter.frame_count == 1


_LENGTH_STATE: dict = {}


@pytest.mark.interpreter
@pytest.mark.parametrize("family", ["flex", "ebt", "piecewise"])
def test_new_sequence_lengths_under_dynamic_shapes(family):
    """A compiled step called with a new sequence length is recompiled with dynamic sizes (torch's
    automatic dynamic shapes): the step -- a learned captured tensor sized by the length, the
    energy's gradient with create_graph=True, the loss back to everything -- still equals the
    reference at every length, piecewise's threshold changing with it."""
    state = _LENGTH_STATE  # a module global: the bias is replaced at every length

    def sm(score, b, h, q_idx, kv_idx):
        return score * 0.8 + _LENGTH_STATE["bias"][h, q_idx, kv_idx]

    def fn(*xs, thr=5, backend=T):
        if family == "ebt":
            out_o, out_p, _, lse_p = flexebt.flex_ebt_attention(*xs, score_mod=sm, return_lse=True,
                                                                kernel_options=backend)
            return out_p.square().sum() + out_o.sum() + lse_p.sum()
        if family == "flex":
            return flexebt.flex_attention(*xs, score_mod=sm, kernel_options=backend).square().sum()
        return flexebt.piecewise_attention(*xs, dist_threshold=thr, causal=True, score_mod=sm,
                                           kernel_options=backend).square().sum()

    def step(*xs, thr=5, backend=T):
        grads = torch.autograd.grad(fn(*xs, thr=thr, backend=backend), list(xs) + [_LENGTH_STATE["bias"]],
                                    create_graph=True)
        return sum((g * g).sum() * (i + 1) for i, g in enumerate(grads))

    H, D = 2, 8
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True, backend=counter)
        for S, thr in ((16, 5), (23, 2.5)):
            shapes = {"flex": [(1, H, S, D)] * 3, "ebt": [(1, H, S, D)] * 3 + [(1, H, S - 2, D)] * 3,
                      "piecewise": [(1, H, S, D), (1, H, S + 3, D)] * 2 + [(1, H, S + 3, D)]}[family]
            state["bias"] = (0.3 * torch.randn(H, S + 4, S + 4)).requires_grad_()
            x = [torch.randn(s, requires_grad=True) for s in shapes]
            got = torch.autograd.grad(compiled(*x, thr=thr), x + [state["bias"]])
            want = torch.autograd.grad(step(*x, thr=thr, backend={"BACKEND": "REFERENCE"}), x + [state["bias"]])
            for a, b in zip(got, want):
                assert rel_err(a, b) < 1e-5
    assert counter.frame_count >= 2  # the new length compiled anew (dynamic, or specialized)


@pytest.mark.interpreter
def test_ebt_energy_gradient_of_the_predicted_stream_inside_fullgraph_compile(monkeypatch):
    """The EBT step's shape under torch.compile: the energy's gradient with respect to the predicted
    stream only (create_graph=True), then a loss on it back to every input.  Each stream is its own
    op, so the observed stream's output carries no graph to the predicted stream (as in eager and
    the reference), and the compiled energy gradient launches no key pass (the observed keys'
    gradient is not asked for); the gradients equal the reference's."""
    import flexebt.kernels.plan as plan_mod

    launches = []
    real = plan_mod.dkdv_pass
    monkeypatch.setattr(plan_mod, "dkdv_pass", lambda *a, **k: launches.append(1) or real(*a, **k))
    H, D, S_o, S_p = 2, 16, 21, 20
    bm = flexebt.create_ebt_block_mask(masks.ebt_causal_mask, None, None, S_o, S_p, device="cpu", BLOCK_SIZE=16)

    def step(*xs, backend=T):
        xs = [x * 1.0 for x in xs]  # computed streams, as a model has them
        out_o, out_p = flexebt.flex_ebt_attention(*xs, block_mask=bm, kernel_options=backend)
        energy = (out_p * out_p).sum() + out_o.sum()
        grads = torch.autograd.grad(energy, xs[3:], create_graph=True)
        return sum((g * g).sum() for g in grads) + out_o.square().sum()

    torch._dynamo.reset()
    x = [torch.randn(1, H, S, D, requires_grad=True) for S in (S_o,) * 3 + (S_p,) * 3]
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        compiled(*x)
        del launches[:]
        loss = compiled(*x)  # the forward, the energy gradient inside it
        assert launches == []
        got = torch.autograd.grad(loss, x)
    want = torch.autograd.grad(step(*x, backend={"BACKEND": "REFERENCE"}), x)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.interpreter
def test_second_order_compile_without_the_switch_names_it_and_third_order_is_refused():
    """Without trace_autograd_ops a fullgraph compile of the step fails naming the switch; a third
    order through the compiled ops raises a clear error, never a silent drop."""
    S = 16
    x = [torch.randn(1, 2, S, 16, requires_grad=True) for _ in range(3)]
    step = _second_order_step(lambda q, k, v: flexebt.flex_attention(q, k, v, kernel_options=T).square().sum(), [])
    torch._dynamo.reset()
    with pytest.raises(Exception, match="trace_autograd_ops"):
        torch.compile(step, fullgraph=True, backend="aot_eager")(*x)

    def third(q, k, v):
        g = torch.autograd.grad(step(q, k, v), [q, k, v], create_graph=True)
        return sum((t * t).sum() for t in g)

    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        with pytest.raises(Exception, match="third-order"):
            torch.compile(third, fullgraph=True, backend="aot_eager")(*x)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["flex", "ebt"])
def test_second_order_inside_inductor_compile_gpu(family):
    """The EBT step under inductor on the GPU (fp32, odd lengths): outer gradients of the inputs
    and of a learned bias equal eager flexebt's."""
    dev, H, D = "cuda", 4, 64
    if family == "flex":
        S = 200
        bias = (0.3 * torch.randn(H, S, S, device=dev)).requires_grad_()
        bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device=dev)
        sm = mods.generate_bias_score_mod(bias)  # made outside the compiled function

        def fn(q, k, v):
            return flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, kernel_options=T).square().sum()

        shapes = [(2, H, S, D)] * 3
    else:
        S_o, S_p = 131, 128
        bias = (0.3 * torch.randn(H, S_o + 1, S_o + 1, device=dev)).requires_grad_()
        sm = mods.generate_bias_score_mod(bias)

        def fn(*xs):
            out_o, out_p = flexebt.flex_ebt_attention(*xs, score_mod=sm, kernel_options=T)
            return out_p.square().sum() + out_o.sum()

        shapes = [(2, H, S_o, D)] * 3 + [(2, H, S_p, D)] * 3
    step = _second_order_step(fn, [bias])
    x = [torch.randn(s, device=dev, requires_grad=True) for s in shapes]
    want = torch.autograd.grad(step(*x), x + [bias])
    torch._dynamo.reset()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        got = torch.autograd.grad(torch.compile(step, fullgraph=True)(*x), x + [bias])
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def _ebt_step_gpu(S_o=131, S_p=128, H=4, D=64, B=2):
    """An EBT second-order step on the GPU (fp32) with a learned bias, and its inputs."""
    dev = "cuda"
    bias = (0.3 * torch.randn(H, S_o + 1, S_o + 1, device=dev)).requires_grad_()
    sm = mods.generate_bias_score_mod(bias)

    def fn(*xs):
        out_o, out_p = flexebt.flex_ebt_attention(*xs, score_mod=sm, kernel_options=T)
        return out_p.square().sum() + out_o.sum()

    shapes = [(B, H, S_o, D)] * 3 + [(B, H, S_p, D)] * 3
    x = [torch.randn(s, device=dev, requires_grad=True) for s in shapes]
    return _second_order_step(fn, [bias]), x, bias


@pytest.mark.gpu
def test_cuda_graph_capture_of_a_second_order_step_gpu():
    """Eager flexebt's forward, create_graph gradient and outer backward captured in one CUDA graph
    (capture fails on any host synchronisation): replays with new inputs equal eager steps."""
    step, x, bias = _ebt_step_gpu()
    params = x + [bias]

    def run():
        return torch.autograd.grad(step(*x), params)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: kernels built and launches remembered before capture
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grads = run()
    for _ in range(2):
        with torch.no_grad():
            for t in params:
                t.copy_(torch.randn_like(t))
        graph.replay()
        want = run()
        for a, b in zip(static_grads, want):
            assert rel_err(a, b) < 1e-6


@pytest.mark.gpu
def test_reduce_overhead_compile_of_a_second_order_step_gpu():
    """mode="reduce-overhead" (inductor with CUDA graphs) on the second-order step: the outer
    gradients equal eager flexebt's on three calls with new inputs, with one compiled graph."""
    from torch._dynamo.utils import counters

    step, x, bias = _ebt_step_gpu()
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
        for _ in range(3):
            xs = [torch.randn_like(t).requires_grad_() for t in x]
            torch.compiler.cudagraph_mark_step_begin()
            got = [g.clone() for g in torch.autograd.grad(compiled(*xs), xs + [bias])]
            want = torch.autograd.grad(step(*xs), xs + [bias])
            for a, b in zip(got, want):
                assert rel_err(a, b) < 1e-5
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.interpreter
def test_several_mods_in_one_compiled_function():
    """Layers with different mods (and an EBT call of another shape) in one fullgraph compile: each
    gets its own kernels; values equal eager."""
    def halve(score, b, h, q_idx, kv_idx):
        return score * 0.5

    def slope(score, b, h, q_idx, kv_idx):
        return score + 0.1 * (q_idx - kv_idx)

    def f(x, y):
        a = flexebt.flex_attention(x, x, x, score_mod=halve, kernel_options=T)
        b = flexebt.flex_attention(a, a, a, score_mod=slope, kernel_options=T)
        out_o, out_p = flexebt.flex_ebt_attention(y, y, y, y[:, :, 1:], y[:, :, 1:], y[:, :, 1:], score_mod=slope,
                                                  kernel_options=T)
        return b.sum() + out_p.square().sum() + out_o.sum()

    x, y = torch.randn(1, 2, 16, 16), torch.randn(1, 2, 19, 16)
    assert rel_err(torch.compile(f, backend="aot_eager", fullgraph=True)(x, y), f(x, y)) < 1e-6


def test_compiled_graphs_name_kernels_the_same_in_every_process(tmp_path):
    """The kernel key a compiled graph carries as a constant comes from the generated source, not
    from an object's address: two processes give the same key (so inductor's caches can hit), and
    a different mod gives a different one."""
    import subprocess
    import sys

    script = ("import torch, flexebt.compiled as c\n"
              "from flexebt import masks, mods\n"
              "print(c._kernel_parts(mods.generate_alibi_bias(2), None, masks.causal_mask, None, False)[0])\n"
              "print(c._kernel_parts(mods.generate_tanh_softcap(5.0), None, None, None, False)[0])\n")
    env = dict(__import__("os").environ, FLEXEBT_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
            .stdout.split() for _ in range(2)]
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1] and all(k.startswith("flex_attention:") for k in runs[0])
