"""The kernel cache never serves a kernel or a captured tensor of another mod.

Every mod that reads a value through a closure, a global, ``self``, an attribute chain, a
``functools.partial``, a callable object or a container runs through the Triton kernels (CPU
interpreter) and the reference, with the value changed between calls; captured tensors that
require grad get their gradient.  A tensor flexebt cannot locate is refused, never baked."""

import functools
import weakref

import pytest
import torch

import flexebt
from flexebt import runtime
from flexebt.codegen.identity import captured_tensors, fingerprint, resolve
from helpers import rel_err

T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}
H, S, D = 2, 17, 16

pytestmark = pytest.mark.interpreter


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, S, D, generator=g) for _ in range(3)]


def _run(score_mod, leaves=(), seed=0):
    """Output and gradients (q, k, v, then ``leaves``) of both backends for one cotangent."""
    res = []
    for opts in (T, R):
        q, k, v = (x.requires_grad_() for x in _qkv(seed))
        out = flexebt.flex_attention(q, k, v, score_mod=score_mod, kernel_options=opts)
        ct = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
        res.append((out.detach(), torch.autograd.grad((out * ct).sum(), [q, k, v, *leaves], allow_unused=True)))
    return res


def _check(score_mod, leaves=(), seed=0):
    (out, grads), (rout, rgrads) = _run(score_mod, leaves, seed)
    assert rel_err(out, rout) < 1e-5
    for g, rg in zip(grads, rgrads):
        assert rg is not None
        assert g is not None, "a captured tensor that requires grad got no gradient from the kernels"
        assert rel_err(g, rg) < 1e-4
    return out


class BiasLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(H, S, S))

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score + self.bias[h, q_idx, kv_idx]


def test_six_layers_each_with_its_own_bias():
    """``score_mod=layer.score_mod`` (a new bound method per call) in a loop over layers of one
    class: each call uses its own layer's bias, each bias gets its own gradient, one kernel."""
    layers = torch.nn.ModuleList(BiasLayer() for _ in range(6))
    n = runtime.kernels.puts
    outs = []
    for i, layer in enumerate(layers):
        outs.append(_check(layer.score_mod, [layer.bias], seed=i))
    assert runtime.kernels.puts <= n + 1  # described by class + metadata: one kernel for all six
    assert fingerprint(layers[0].score_mod) == fingerprint(layers[5].score_mod)
    assert [b.tensor for b in captured_tensors(layers[3].score_mod)] == [layers[3].bias]


SCALE = 2.0


def _global_scale_mod(score, b, h, q_idx, kv_idx):
    return score * SCALE + (kv_idx - q_idx) * 0.1


def test_global_number_changed_between_calls(monkeypatch):
    first = _check(_global_scale_mod)
    monkeypatch.setitem(globals(), "SCALE", -0.5)
    second = _check(_global_scale_mod)
    assert rel_err(first, second) > 1e-2


class Config:
    def __init__(self, scale):
        self.scale = scale


class ScaledLayer:
    def __init__(self, scale):
        self.cfg = Config(scale)
        self.table = torch.randn(H, S, S, requires_grad=True)

    def score_mod(self, score, b, h, q_idx, kv_idx):
        return score * self.cfg.scale + self.helper(h, q_idx, kv_idx)

    def helper(self, h, q_idx, kv_idx):  # a method the mod calls reads another attribute
        return self.table[h, q_idx, kv_idx] * self.cfg.shift


def test_attribute_chain_changed_between_calls():
    layer = ScaledLayer(2.0)
    layer.cfg.shift = 1.0
    mod = layer.score_mod  # one bound method, kept
    first = _check(mod, [layer.table])
    layer.cfg.scale = -0.5
    second = _check(mod, [layer.table])
    layer.cfg.shift = 3.0
    third = _check(mod, [layer.table])
    assert rel_err(first, second) > 1e-2 and rel_err(second, third) > 1e-2


def test_reassigned_parameter_gets_the_gradient():
    layer = BiasLayer()
    mod = layer.score_mod  # one bound method, kept (a training loop may hold it)
    _check(mod, [layer.bias])
    old = layer.bias
    layer.bias = torch.nn.Parameter(torch.randn(H, S, S))
    _check(mod, [layer.bias], seed=1)
    assert layer.bias is not old


def _partial_bias(state, score, b, h, q_idx, kv_idx, weight=1.0):
    return score + weight * state.bias[h, q_idx, kv_idx]


def test_functools_partial():
    state = Config(None)
    state.bias = torch.randn(H, S, S, requires_grad=True)
    mod = functools.partial(_partial_bias, state, weight=1.0)
    _check(mod, [state.bias])
    state.bias = torch.randn(H, S, S, requires_grad=True)  # same partial, new tensor
    _check(mod, [state.bias], seed=1)
    _check(functools.partial(_partial_bias, state, weight=-2.0), [state.bias], seed=2)


class CallableBias:
    def __init__(self):
        self.bias = torch.randn(H, S, S, requires_grad=True)
        self.gain = 1.0

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score + self.gain * self.bias[h, q_idx, kv_idx]


def test_callable_object():
    mod = CallableBias()
    _check(mod, [mod.bias])
    mod.bias = torch.randn(H, S, S, requires_grad=True)  # same object, new tensor and number
    mod.gain = -3.0
    _check(mod, [mod.bias], seed=1)


def _dict_mod(tables):
    def dict_mod(score, b, h, q_idx, kv_idx):
        return score + tables["row"][q_idx] * tables["col"][kv_idx] + tables["shift"]

    return dict_mod


def test_dict_of_tensors():
    for i, shift in enumerate((0.5, -1.5)):
        tables = {"row": torch.randn(S, requires_grad=True), "col": torch.randn(S, requires_grad=True),
                  "shift": shift}
        _check(_dict_mod(tables), [tables["row"], tables["col"]], seed=i)
    mod = _dict_mod(tables)
    _check(mod, [tables["row"], tables["col"]])
    tables["row"] = torch.randn(S, requires_grad=True)  # the same mod, its dict changed
    tables["shift"] = 2.0
    _check(mod, [tables["row"], tables["col"]], seed=3)
    assert [resolve(mod, b.steps) for b in captured_tensors(mod)] == [tables["row"], tables["col"]]


HEAD_GAIN = 1.0


def _internal_tensor_mod(score, b, h, q_idx, kv_idx):
    gain = torch.tensor(HEAD_GAIN)  # created inside the mod: baked by value
    return score * gain + (kv_idx - q_idx) * 0.1


def test_tensor_created_inside_the_mod(monkeypatch):
    first = _check(_internal_tensor_mod)
    monkeypatch.setitem(globals(), "HEAD_GAIN", 0.25)
    second = _check(_internal_tensor_mod)
    assert rel_err(first, second) > 1e-2


def test_unlocatable_tensor_is_refused():
    hidden = torch.randn(H, S, S)
    ref = weakref.ref(hidden)  # reachable only by calling the weak reference

    def hidden_bias(score, b, h, q_idx, kv_idx):
        return score + ref()[h, q_idx, kv_idx]

    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match=r"hidden_bias.*cannot locate.*closure"):
        flexebt.flex_attention(q, k, v, score_mod=hidden_bias, kernel_options=T)
    out = flexebt.flex_attention(q, k, v, score_mod=hidden_bias, kernel_options=R)  # the reference runs it
    assert torch.isfinite(out).all()


def test_aliased_tensor_is_part_of_the_key():
    """One tensor reached twice takes one slot; two tensors on the same routes take two: the
    kernel cannot read one slot for the other."""
    a, b = torch.randn(H, S, S), torch.randn(H, S, S)

    def make(x, y):
        def two(score, b_, h, q_idx, kv_idx):
            return score + x[h, q_idx, kv_idx] - 2 * y[h, q_idx, kv_idx]
        return two

    assert fingerprint(make(a, a)) != fingerprint(make(a, b))
    _check(make(a, a))
    _check(make(b, a))


@pytest.mark.interpreter
def test_object_handed_to_a_helper_is_keyed_by_what_the_helper_reads():
    """A mod passing a config object to a helper function (``helper(self.cfg, x)`` reading
    ``cfg.scale``): a changed ``scale`` gives a new kernel, on the first call after the change."""
    class Cfg:
        def __init__(self):
            self.scale = 0.5

    def helper(cfg, x):
        return cfg.scale * x

    class Layer:
        def __init__(self):
            self.cfg = Cfg()

        def score_mod(self, score, b, h, q_idx, kv_idx):
            return score + helper(self.cfg, q_idx - kv_idx)

    layer = Layer()
    q = torch.randn(1, 2, 16, 16)
    for scale in (0.5, -3.0):
        layer.cfg.scale = scale
        got = flexebt.flex_attention(q, q, q, score_mod=layer.score_mod, kernel_options={"BACKEND": "TRITON"})
        want = flexebt.flex_attention(q, q, q, score_mod=layer.score_mod, kernel_options={"BACKEND": "REFERENCE"})
        assert (got - want).abs().max() < 1e-5, scale
