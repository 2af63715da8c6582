"""What a mod reads besides one value per score, and what the generated kernels make of it.

The kernels are generated once per mod structure and cached, so anything the code generator
freezes into the kernel must either be part of the cache key or be refused:

- a captured tensor's *size* (``table.shape[1]``, ``len(w)``, ``numel()``): the kernels are cached
  per size read, eager and compiled;
- a captured tensor's *value* as a Python number (``.item()``, ``float()``, an ``if`` on it) or its
  memory layout: refused, naming what the mod did (the tensor can change between calls);
- enum members, subclasses of numbers, properties, ``getattr``: keyed by what the mod reads;
- under ``torch.compile``: values the compiled function itself assigns before the call are refused
  (the kernels come from the objects as tracing starts), block masks of other block sizes and
  ``functools.partial`` mods with changing numbers go through one compiled call site.

Every number is checked against flexebt's float64 reference (itself checked against torch).
"""

import dataclasses
import enum
import functools

import pytest
import torch

import flexebt
from helpers import rel_err

T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}
H, S, D = 2, 20, 16


def _qkv(seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, S, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def _reference(q, k, v, score_mod=None, block_mask=None):
    return flexebt.flex_attention(q.double(), k.double(), v.double(), score_mod=score_mod, block_mask=block_mask,
                                  kernel_options=R)


def _close(q, k, v, score_mod, got=None, tol=2e-6):
    got = flexebt.flex_attention(q, k, v, score_mod=score_mod, kernel_options=T) if got is None else got
    assert rel_err(got, _reference(q, k, v, score_mod)) < tol


# -- sizes -----------------------------------------------------------------------------------------

def test_kernels_follow_the_size_a_mod_reads():
    """A relative-position table whose width sets the clamp distance (T5 style): each width gets
    its own kernels, first and second order included; torch's eager flex_attention agrees."""
    q, k, v = _qkv(requires_grad=True)
    holder = {}

    def rel_bias(score, b, h, q_idx, kv_idx):
        table = holder["table"]
        far = (table.shape[1] - 1) // 2
        return score + table[h, (q_idx - kv_idx).clamp(-far, far) + far]

    for width in (9, 17, 5, 9):
        holder["table"] = torch.randn(H, width, generator=torch.Generator().manual_seed(width), requires_grad=True)
        out = flexebt.flex_attention(q, k, v, score_mod=rel_bias, kernel_options=T)
        ref = _reference(q, k, v, rel_bias)
        assert rel_err(out, ref) < 2e-6, width
        # (torch's flex_attention has no backward on CPU: its forward on detached inputs)
        torch_out = torch.nn.attention.flex_attention.flex_attention(q.detach(), k.detach(), v.detach(),
                                                                      score_mod=rel_bias)
        assert rel_err(torch_out, ref) < 2e-6
        wrt = [q, holder["table"]]
        g = torch.autograd.grad(out.square().sum(), wrt, create_graph=True)
        g_ref = torch.autograd.grad(ref.square().sum(), wrt, create_graph=True)
        for a, b in zip(g, g_ref):
            assert rel_err(a, b) < 1e-5, width
        gg = torch.autograd.grad(sum(x.square().sum() for x in g), wrt)
        gg_ref = torch.autograd.grad(sum(x.square().sum() for x in g_ref), wrt)
        for a, b in zip(gg, gg_ref):
            assert rel_err(a, b) < 1e-5, width


@pytest.mark.parametrize("read", ["len", "numel", "size", "view_shape", "clamp_bound", "mask"])
def test_other_size_reads(read):
    q, k, v = _qkv()
    holder = {}
    mods = {
        "len": lambda s, b, h, qi, ki: s * (len(holder["w"]) / 4),
        "numel": lambda s, b, h, qi, ki: s + holder["w"].numel() * 0.1,
        "size": lambda s, b, h, qi, ki: s * holder["w"].size(0) / 4,
        "view_shape": lambda s, b, h, qi, ki: s * holder["w"].flip(0).shape[-1] / 4,  # a derived size: every tensor's
        "clamp_bound": lambda s, b, h, qi, ki: s + holder["w"][(qi - ki).abs().clamp(0, holder["w"].shape[0] - 1)],
    }
    for n in (4, 7, 3):
        holder["w"] = torch.linspace(-1, 1, n)
        if read == "mask":
            def window(b, h, qi, ki):
                return (qi - ki).abs() < holder["w"].shape[0]
            bm = flexebt.create_block_mask(window, None, None, S, S, device="cpu", BLOCK_SIZE=16)
            got = flexebt.flex_attention(q, k, v, block_mask=bm, kernel_options=T)
            assert rel_err(got, _reference(q, k, v, block_mask=bm)) < 2e-6, n
        else:
            _close(q, k, v, mods[read])


# -- values that would be frozen: refused --------------------------------------------------------

@pytest.mark.parametrize("how", ["item", "float", "tolist", "int_index", "if", "item_of_view"])
def test_python_values_of_captured_tensors_are_refused(how):
    q, k, v = _qkv()
    temp = torch.tensor(2.0)
    steps = torch.tensor([1, 2, 3])
    mods = {
        "item": lambda s, b, h, qi, ki: s / temp.item(),
        "float": lambda s, b, h, qi, ki: s / float(temp),
        "tolist": lambda s, b, h, qi, ki: s * steps.tolist()[1],
        "int_index": lambda s, b, h, qi, ki: s * [1.0, 2.0, 3.0, 4.0][steps[0]],
        "if": lambda s, b, h, qi, ki: s * 2 if temp > 1 else s,
        "item_of_view": lambda s, b, h, qi, ki: s / (temp * 2).item(),
    }
    with pytest.raises(NotImplementedError, match="turns a captured tensor into a Python value"):
        flexebt.flex_attention(q, k, v, score_mod=mods[how], kernel_options=T)
    if how in ("item", "float"):  # the reference evaluates it as torch does, with the current value
        temp.fill_(0.5)
        torch_out = torch.nn.attention.flex_attention.flex_attention(q, k, v, score_mod=mods[how])
        assert rel_err(_reference(q, k, v, mods[how]), torch_out) < 2e-6


def test_memory_layout_reads_are_refused():
    q, k, v = _qkv()
    w = torch.randn(H, S)

    def strided(s, b, h, qi, ki):
        return s + w[h, ki] * w.stride(0)

    with pytest.raises(NotImplementedError, match="memory layout"):
        flexebt.flex_attention(q, k, v, score_mod=strided, kernel_options=T)


# -- objects read by value -----------------------------------------------------------------------

class Mode(enum.IntEnum):
    ONE = 1
    THREE = 3


class Kind(enum.Enum):
    PLAIN = "plain"
    CAPPED = "capped"


class Scale(float):
    pass


def test_enum_members_and_number_subclasses_key_the_kernels():
    q, k, v = _qkv()
    state = {"mode": Mode.ONE, "kind": Kind.PLAIN, "scale": Scale(0.5)}

    def by_int_enum(s, b, h, qi, ki):
        return s * state["mode"]

    def by_enum(s, b, h, qi, ki):
        return 2.0 * torch.tanh(s / 2.0) if state["kind"] == Kind.CAPPED else s * 3.0

    def by_subclass(s, b, h, qi, ki):
        return s * state["scale"]

    for mode, kind, scale in ((Mode.ONE, Kind.PLAIN, 0.5), (Mode.THREE, Kind.CAPPED, 2.5), (Mode.ONE, Kind.PLAIN, 0.5)):
        state.update(mode=mode, kind=kind, scale=Scale(scale))
        for mod in (by_int_enum, by_enum, by_subclass):
            _close(q, k, v, mod)


@dataclasses.dataclass
class Config:
    temperature: float = 2.0

    @property
    def inverse(self):
        return 1.0 / self.temperature


def test_properties_and_getattr_are_read_through():
    q, k, v = _qkv()
    cfg = Config()

    def by_property(s, b, h, qi, ki):
        return s * cfg.inverse

    # a mod that reads an attribute by computed name: every attribute of what its module's globals reach
    # counts (here a namespace of its own; in this test module they reach pytest, too many to describe)
    namespace = {"torch": torch, "cfg": cfg}
    exec("def by_getattr(s, b, h, qi, ki):\n    return s * getattr(cfg, 'temperature')", namespace)  # noqa: S102
    by_getattr = namespace["by_getattr"]
    for t in (2.0, 0.25, 2.0):
        cfg.temperature = t
        _close(q, k, v, by_property)
        _close(q, k, v, by_getattr)

    def in_a_big_module(s, b, h, qi, ki):  # every global of this module counts, pytest's objects with them
        return s * getattr(cfg, "temperature")

    with pytest.raises(NotImplementedError, match="Read what it needs by name"):
        flexebt.flex_attention(q, k, v, score_mod=in_a_big_module, kernel_options=T)


def test_one_element_tensor_of_rank_one_as_a_value():
    """``s * w`` with ``w`` of shape [1]: the kernels read its one value (torch and the reference refuse
    the [1]-shaped result per score; ``w[0]`` is what they compute)."""
    q, k, v = _qkv()
    w = torch.tensor([3.0], requires_grad=True)

    def scaled(s, b, h, qi, ki):
        return s * w

    out = flexebt.flex_attention(q, k, v, score_mod=scaled, kernel_options=T)
    ref = _reference(q, k, v, lambda s, b, h, qi, ki: s * w[0])
    assert rel_err(out, ref) < 2e-6
    g, = torch.autograd.grad(out.square().sum(), w)
    g_ref, = torch.autograd.grad(ref.square().sum(), w)
    assert rel_err(g, g_ref) < 1e-5


@pytest.mark.parametrize("index", ["computed", "position"])
def test_an_empty_tensor_after_a_full_one_raises_as_torch(index):
    """A mod whose captured tensor is replaced by an empty one of the same dtype and rank: torch (and
    the reference) raise IndexError; the kernels made for the full tensor must not be reused (their
    clamped index would be -1, a load before the tensor), so the empty one gets its own trace, which
    raises the same error."""
    q, k, v = _qkv()
    box = {"t": torch.randn(S)}

    def read(s, b, h, qi, ki):
        return s + box["t"][qi // 7 if index == "computed" else qi]

    _close(q, k, v, read)
    box["t"] = torch.empty(0)
    for options in (R, T):
        with pytest.raises(IndexError):
            flexebt.flex_attention(q, k, v, score_mod=read, kernel_options=options)


# -- under torch.compile ---------------------------------------------------------------------------

def test_compiled_kernels_follow_sizes_and_partial_numbers():
    q, k, v = _qkv()
    holder = {}

    def rel_bias(score, b, h, q_idx, kv_idx):
        far = (holder["table"].shape[1] - 1) // 2
        return score + holder["table"][h, (q_idx - kv_idx).clamp(-far, far) + far]

    def scaled(s, b, h, qi, ki, c=1.0):
        return s * c

    sized = torch.compile(lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=rel_bias, kernel_options=T),
                          backend="aot_eager", fullgraph=True)
    with_partial = torch.compile(lambda q, k, v, mod: flexebt.flex_attention(q, k, v, score_mod=mod, kernel_options=T),
                                 backend="aot_eager", fullgraph=True)
    for width, c in ((9, 0.3), (17, 1.7), (5, 0.3)):
        holder["table"] = torch.randn(H, width, generator=torch.Generator().manual_seed(width))
        _close(q, k, v, rel_bias, sized(q, k, v))
        mod = functools.partial(scaled, c=c)
        _close(q, k, v, mod, with_partial(q, k, v, mod))


def test_compiled_block_masks_of_other_block_sizes():
    q, k, v = _qkv()

    def causal(b, h, qi, ki):
        return qi >= ki

    attend = torch.compile(lambda q, k, v, bm: flexebt.flex_attention(q, k, v, block_mask=bm, kernel_options=T),
                           backend="aot_eager", fullgraph=True)
    for bs in (16, 32, 16):
        bm = flexebt.create_block_mask(causal, None, None, S, S, device="cpu", BLOCK_SIZE=bs)
        assert rel_err(attend(q, k, v, bm), _reference(q, k, v, block_mask=bm)) < 2e-6, bs


class _Attention(torch.nn.Module):
    """Computes the tensor its mod reads in forward (an attribute assigned inside the compiled call)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(0.3 * torch.randn(H, S, S, generator=torch.Generator().manual_seed(3)))
        self.temperature = 1.0

    def score_mod(self, s, b, h, qi, ki):
        return s * self.temperature + self.bias[h, qi, ki]

    def forward(self, q, k, v, temperature=None):
        self.bias = torch.tanh(self.table) * 2.0
        if temperature is not None:
            self.temperature = temperature
        return flexebt.flex_attention(q, k, v, score_mod=self.score_mod, kernel_options=T)


def test_compiled_values_assigned_before_the_call():
    """An attribute the compiled forward assigns and the mod reads: the same kind of tensor as
    when tracing starts is exact (gradients included); one the kernels were not generated for
    (here: a no_grad warm-up left a tensor without grad) and a number assigned in forward are
    refused, never computed with the old kernels."""
    q, k, v = _qkv(requires_grad=True)
    model = _Attention()
    model(q, k, v)  # eager: self.bias requires grad, as inside the compiled training step
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    g = torch.autograd.grad(out.square().sum(), [q, model.table])
    model.bias = torch.tanh(model.table) * 2.0  # the values the compiled forward computed, in a graph of its own
    ref = _reference(q, k, v, model.score_mod)
    g_ref = torch.autograd.grad(ref.square().sum(), [q, model.table])
    assert rel_err(out, ref) < 2e-6
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-5

    fresh = _Attention()
    with torch.no_grad():
        fresh(q, k, v)  # a validation pass: self.bias without grad
    with pytest.raises(Exception, match="changes before calling attention"):
        torch.compile(fresh, backend="aot_eager", fullgraph=True)(q, k, v)
    scheduled = _Attention()
    scheduled(q, k, v)
    with pytest.raises(Exception, match="assigns before calling attention"):
        torch.compile(scheduled, backend="aot_eager", fullgraph=True)(q, k, v, temperature=2.0)


_TEMPERATURE = 1.0
_BIAS = torch.zeros(H, S, S)


def _by_global_number(s, b, h, qi, ki):
    return s * _TEMPERATURE


def _by_global_tensor(s, b, h, qi, ki):
    return s + _BIAS[h, qi, ki]


def test_compiled_globals_assigned_before_the_call():
    """A global the compiled function assigns before the call: a number is refused (the kernels were
    generated for the old one); a tensor of the same kind is passed as the new one, exact."""
    global _BIAS
    q, k, v = _qkv()

    def set_number(q, k, v, t):
        global _TEMPERATURE
        _TEMPERATURE = t
        return flexebt.flex_attention(q, k, v, score_mod=_by_global_number, kernel_options=T)

    with pytest.raises(Exception, match="assigns before calling attention"):
        torch.compile(set_number, backend="aot_eager", fullgraph=True)(q, k, v, 2.0)

    def set_tensor(q, k, v, table):
        global _BIAS
        _BIAS = torch.tanh(table)
        return flexebt.flex_attention(q, k, v, score_mod=_by_global_tensor, kernel_options=T)

    compiled = torch.compile(set_tensor, backend="aot_eager", fullgraph=True)
    for seed in (1, 2):
        table = torch.randn(H, S, S, generator=torch.Generator().manual_seed(seed))
        out = compiled(q, k, v, table)
        _BIAS = torch.tanh(table)
        assert rel_err(out, _reference(q, k, v, _by_global_tensor)) < 2e-6


def test_more_size_and_value_reads():
    """``torch.numel``; a size of a row gathered per score (width 1 first); a layout read through a
    derived tensor is refused; a tensor the mod makes from numbers may be read as a value."""
    q, k, v = _qkv()
    holder = {}

    def by_numel(s, b, h, qi, ki):
        return s + torch.numel(holder["w"]) * 0.1

    def by_row_width(s, b, h, qi, ki):
        row = holder["t"][h]
        return s * row.shape[-1] / 4

    for n in (1, 5, 1):
        holder["w"], holder["t"] = torch.randn(n + 3), torch.randn(H, n)
        _close(q, k, v, by_numel)
        _close(q, k, v, by_row_width)

    w = torch.randn(H, S)

    def by_derived_stride(s, b, h, qi, ki):
        return s * w.detach().stride(0)

    with pytest.raises(NotImplementedError, match="memory layout"):
        flexebt.flex_attention(q, k, v, score_mod=by_derived_stride, kernel_options=T)

    def by_constant(s, b, h, qi, ki):
        c = torch.tensor(2.0)
        return s * [1.0, 2.0, 3.0, 4.0][torch.tensor(3)] if c > 1 else s

    _close(q, k, v, by_constant)


def test_size_read_by_a_mask_mod_next_to_captured_score_tensors():
    """The mask_mod's captured tensors come after the score_mod's in the kernels' slots."""
    q, k, v = _qkv()
    bias = torch.randn(H, S, S)
    holder = {}

    def biased(s, b, h, qi, ki):
        return s + bias[h, qi, ki]

    def window(b, h, qi, ki):
        return (qi - ki).abs() < holder["w"].shape[0]

    for n in (3, 9, 3):
        holder["w"] = torch.zeros(n)
        bm = flexebt.create_block_mask(window, None, None, S, S, device="cpu", BLOCK_SIZE=16)
        got = flexebt.flex_attention(q, k, v, score_mod=biased, block_mask=bm, kernel_options=T)
        assert rel_err(got, _reference(q, k, v, biased, bm)) < 2e-6, n


def test_size_read_in_ebt_attention():
    g = torch.Generator().manual_seed(5)
    x = [torch.randn(1, H, 12, D, generator=g) for _ in range(6)]
    holder = {}

    def rel_bias(s, b, h, qi, ki):
        far = (holder["table"].shape[1] - 1) // 2
        return s + holder["table"][h, (qi - ki).clamp(-far, far) + far]

    for width in (3, 7):
        holder["table"] = torch.randn(H, width, generator=g)
        got = flexebt.flex_ebt_attention(*x, score_mod=rel_bias, kernel_options=T)
        ref = flexebt.flex_ebt_attention(*(t.double() for t in x), score_mod=rel_bias, kernel_options=R)
        for a, r in zip(got, ref):
            assert rel_err(a, r) < 2e-6, width


def test_compiled_partial_enum_and_copied_namespaces():
    """A partial's IntEnum argument keeps its type under compile; a mod made by ``exec`` in a copy
    of a module's globals (or a namespace named after no module) reads its own globals."""
    q, k, v = _qkv()

    def by_mode(s, b, h, qi, ki, mode=Mode.ONE):
        return s * 3.0 if mode is Mode.THREE else torch.tanh(s)

    attend = torch.compile(lambda q, k, v, mod: flexebt.flex_attention(q, k, v, score_mod=mod, kernel_options=T),
                           backend="aot_eager", fullgraph=True)
    for mode in (Mode.THREE, Mode.ONE, Mode.THREE):
        mod = functools.partial(by_mode, mode=mode)
        _close(q, k, v, mod, attend(q, k, v, mod))

    for namespace in (dict(globals()), {"__name__": "generated_mods", "torch": torch}):
        namespace["_BIAS"] = torch.randn(H, S, S, generator=torch.Generator().manual_seed(9))
        exec("def made(s, b, h, qi, ki):\n    return s + _BIAS[h, qi, ki]", namespace)  # noqa: S102
        made = namespace["made"]
        _close(q, k, v, made, attend(q, k, v, made))


def test_indirect_reads_of_captured_tensors():
    """Sizes counted through results (``len(w.unbind(0))``, iterating, ``is_same_size``) key the
    kernels; ``numpy.asarray``, ``storage()`` and a captured value written into a tensor the mod made
    and then read as a number are refused."""
    import numpy as np

    q, k, v = _qkv()
    holder = {}
    counted = {
        "unbind": lambda s, b, h, qi, ki: s * len(holder["w"].unbind(0)) / 4,
        "iterate": lambda s, b, h, qi, ki: s * sum(1 for _ in holder["w"]) / 4,
        "same_size": lambda s, b, h, qi, ki: s * 2 if torch.is_same_size(holder["w"], torch.zeros(4)) else s,
    }
    for n in (4, 7, 4):
        holder["w"] = torch.linspace(-1, 1, n)
        for mod in counted.values():
            _close(q, k, v, mod)

    temp = torch.tensor(2.0)

    def written(s, b, h, qi, ki):
        c = torch.tensor([0.0])
        c[0] = temp
        return s / c.item()

    refused = [lambda s, b, h, qi, ki: s / float(np.asarray(temp)), written]
    for mod in refused:
        with pytest.raises(NotImplementedError, match="turns a captured tensor into a Python value"):
            flexebt.flex_attention(q, k, v, score_mod=mod, kernel_options=T)
    with pytest.raises(NotImplementedError, match="memory layout"):
        flexebt.flex_attention(q, k, v, score_mod=lambda s, b, h, qi, ki: s * temp.storage().size(),
                               kernel_options=T)


def test_a_read_indexed_by_another_read_with_a_constant_index():
    """``table[h, ids[b, q_idx, kv_idx, 1]]`` (a Graphormer edge encoding): the inner read, with a
    constant index, feeds the outer one's index -- first and second order equal the reference, the
    learned table's gradients included; chained indexing and a mask_mod of the same form too."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 3, (1, S, S, 2), generator=g, dtype=torch.int32)
    table = torch.randn(H, 3, 3, generator=g).requires_grad_()
    anc = torch.rand(S, 5, generator=g) < 0.6
    ids_m = torch.randint(0, 5, (S, 2), generator=g)

    def edge(score, b, h, q_idx, kv_idx):
        return score + table[h, ids[b, q_idx, kv_idx, 0], ids[b, q_idx, kv_idx, -1]]  # -1 wraps, as in torch

    def chained(score, b, h, q_idx, kv_idx):
        return score + table[h][ids[b, q_idx, kv_idx, 1]][ids[b, q_idx, kv_idx, 0]] * 0.5

    def tree(b, h, q_idx, kv_idx):
        return anc[q_idx, ids_m[kv_idx, 1]] | (q_idx == kv_idx)

    bm = flexebt.create_block_mask(tree, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    for sm in (edge, chained):
        results = []
        for dtype, options in ((torch.float32, T), (torch.float64, R)):
            x = [t.to(dtype).requires_grad_() for t in _qkv(5)]
            out = flexebt.flex_attention(*x, score_mod=sm, block_mask=bm, kernel_options=options)
            first = torch.autograd.grad(out.square().sum(), x + [table], create_graph=True)
            second = torch.autograd.grad(sum((f * f).sum() for f in first), x + [table])
            results.append([out, *first, *second])
        for a, b in zip(*results):
            assert rel_err(a, b) < 1e-5


_ROUND_STEP = 4.0


class _ScaledRound(torch.autograd.Function):
    """round(x * step) / step forward (step: a module-level number it reads), identity backward: a
    straight-through estimator."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.round(x * _ROUND_STEP) / _ROUND_STEP

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_custom_autograd_functions_in_a_score_mod():
    """A torch.autograd.Function in a score_mod: the kernels run its forward, but would differentiate
    the ops of that forward instead of calling its backward (a straight-through round would get a
    zero gradient), so a gradient through it is refused by name, and the reference backend calls the
    backward as torch does. ``Fn.apply`` kept in a closure is described like one named globally; a
    number the Function's forward reads keys the kernels; a Function on a path without gradients
    (an index) is not refused."""
    global _ROUND_STEP
    q0, k0, v0 = _qkv(2)
    round_apply = _ScaledRound.apply  # kept in a closure

    def st(score, b, h, q_idx, kv_idx):
        return round_apply(score)  # round(score * 4) / 4

    def oracle(q, k, v):
        s = q @ k.transpose(-1, -2) * D ** -0.5
        s = s + (torch.round(s * 4) / 4 - s).detach()
        return torch.softmax(s, -1) @ v

    x = [t.double().requires_grad_() for t in (q0, k0, v0)]
    want = oracle(*x)
    want_grads = torch.autograd.grad(want.square().sum(), x)
    y = [t.double().requires_grad_() for t in (q0, k0, v0)]
    got = flexebt.flex_attention(*y, score_mod=st, kernel_options=R)
    for a, b in zip(torch.autograd.grad(got.square().sum(), y), want_grads):
        assert rel_err(a, b) < 1e-12

    z = [t.clone().requires_grad_() for t in (q0, k0, v0)]
    out = flexebt.flex_attention(*z, score_mod=st, kernel_options=T)
    assert rel_err(out, want) < 1e-5
    with pytest.raises(NotImplementedError, match="torch.autograd.Function _ScaledRound"):
        torch.autograd.grad(out.square().sum(), z)

    def scaled(score, b, h, q_idx, kv_idx):
        return _ScaledRound.apply(score)

    try:
        for step in (4.0, 1.0):
            _ROUND_STEP = step
            _close(q0, k0, v0, scaled)
    finally:
        _ROUND_STEP = 4.0

    def on_positions(score, b, h, q_idx, kv_idx):
        return score + round_apply((q_idx - kv_idx).float() / 3)

    w = [t.clone().requires_grad_() for t in (q0, k0, v0)]
    out = flexebt.flex_attention(*w, score_mod=on_positions, kernel_options=T)
    got = torch.autograd.grad(out.square().sum(), w)
    r = [t.double().requires_grad_() for t in (q0, k0, v0)]
    ref = _reference(*r, score_mod=on_positions)
    for a, b in zip(got, torch.autograd.grad(ref.square().sum(), r)):
        assert rel_err(a, b) < 1e-5
