"""Trace a score_mod / mask_mod to aten graphs of pointwise ops, and derive its derivatives.

A mod is traced with ``make_fx`` on shape-``[1]`` tensors (score fp32, indices int64), so
``bias[h, q_idx, kv_idx]`` becomes ``aten.index.Tensor(constant, [h, q, kv])`` -- a *load*.
Captured tensors are found by walking the mod's closure (and nested closures, and the module
globals it names) so that later calls can pass the current tensors without re-tracing.

Derivatives come from autograd itself: the floating loads of the first trace become leaf
inputs of a second function, which runs the first graph and ``torch.autograd.grad`` on it;
``make_fx`` records that whole computation as another aten graph.  With ``t = f(s, c)``:

    fwd  graph -> t
    bwd  graph -> t, df/ds, df/dc_k              (c_k = each floating load)
    dbwd graph -> t, df/ds, df/dc_k, d2f/ds2, d2f/(ds dc_k), d2f/(dc_k dc_l)

``c_k`` is the *value* loaded from a captured tensor at one index; the kernels scatter
``dt * df/dc_k`` back to that index (atomic adds) to form the captured tensor's gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx
import torch.utils._pytree
from torch._decomp import get_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

from .identity import Buffer, captured_tensors

aten = torch.ops.aten


@dataclasses.dataclass
class Load:
    """A floating-point load ``buffer[index...]`` that becomes a derivative leaf."""

    node_name: str
    buffer: int
    learned: bool = False  # the tensor requires grad and the mod does not read it through .detach()


@dataclasses.dataclass
class TracedMod:
    kind: str                       # "score" or "mask"
    graph: torch.fx.GraphModule     # fwd graph (score: s,b,h,q,kv -> t ; mask: b,h,q,kv -> bool)
    buffers: list[Buffer]           # captured tensors, in kernel-argument order
    constants: dict[str, int]       # graph attribute name -> buffer slot
    loads: list[Load]               # floating loads (score mods only)
    derivative: dict[str, torch.fx.GraphModule]  # "bwd" / "dbwd" graphs (score mods only)
    deriv_constants: dict[str, dict[str, int]]
    name: str
    shape_reads: frozenset = frozenset()  # captured tensors (their index in ``buffers``) whose shape the mod read
    # why the mod has no derivative ("" where it has): an op torch cannot differentiate applied to the
    # score or to a captured tensor that requires grad -- the forward runs, a gradient is refused
    no_derivative: str = ""


def _idx(device="cpu"):
    # int64, as torch's eager flex_attention passes positions: the traced graph then has torch's dtypes
    # (integer arithmetic exact past 2^31); the kernels compute in int32 what fits (intervals.py)
    return torch.zeros((1,), dtype=torch.int64, device=device)


def _trace_device(buffers: list[Buffer]):
    """Trace where the captured tensors live, so indexing them with the trace's indices works."""
    return buffers[0].tensor.device if buffers else torch.device("cpu")


def _constant_map(gm: torch.fx.GraphModule, buffers: list[Buffer]) -> dict[str, int]:
    """Map each ``_tensor_constant*`` attribute of a traced graph to a buffer slot.

    A tensor the trace read must be one that ``captured_tensors`` located (so each call passes the
    current one) or one created inside the mod's body (``torch.tensor([...])``: make_fx lifts it
    with ``lift_fresh_copy``), which is added as an extra buffer.  Any other tensor would be baked
    into the cached kernel and silently reused for other mods; it is refused."""
    mapping = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        t = getattr(gm, node.target)
        slot = next((i for i, b in enumerate(buffers) if b.tensor is t), None)
        if slot is None:
            if not (node.users and all(u.target is aten.lift_fresh_copy.default for u in node.users)):
                name = getattr(buffers, "mod_name", "mod")
                raise NotImplementedError(
                    f"flexebt codegen: the mod {name} reads a tensor of shape {tuple(t.shape)} ({t.dtype}) that "
                    f"flexebt cannot locate: it is not in the mod's closure, default arguments, the globals it "
                    f"names or the attributes of the object it is bound to, nor created inside the mod. The "
                    f"compiled kernel would keep this tensor for every later call. Make it visible: capture it "
                    f"in a closure, store it as an attribute of the object the mod is a method of (self.bias, an "
                    f"nn.Module parameter or buffer) or pass it as a default argument.")
            buffers.append(Buffer(t, f"internal:{node.target}"))
            slot = len(buffers) - 1
        mapping[node.target] = slot
    return mapping


# Composite ops are traced as the pointwise ops they are made of, so the code generator needs only
# those (emit.OPS).  The mod's own graph decomposes only ops whose decomposition has the same
# derivatives everywhere (the derivative graphs are traced through it); activations with kinks
# (relu, hardtanh, elu, leaky_relu) stay whole there, so their derivatives at the kink are torch's,
# and are decomposed in the derivative graphs, where autograd has already recorded them.  In-place
# arithmetic (add_, mul_, ...) stays whole too: its decomposition is prims ops; the emitter writes it
# as its functional form.
_SMOOTH = ("silu", "gelu", "softplus", "mish", "masked_fill", "masked_fill_", "lerp", "addcmul", "addcdiv",
           "fill_", "logical_and_", "logical_or_")
_KINKED = ("hardtanh", "leaky_relu", "relu", "relu6")
_BACKWARD = ("silu_backward", "gelu_backward", "elu_backward", "softplus_backward", "hardtanh_backward",
             "leaky_relu_backward", "threshold_backward", "mish_backward", "sigmoid_backward", "tanh_backward")
_MOD_DECOMPOSED = get_decompositions([getattr(aten, n) for n in _SMOOTH])
_DECOMPOSED = get_decompositions([getattr(aten, n) for n in _SMOOTH + _KINKED + _BACKWARD])


class _PerScoreIndexing(torch.overrides.TorchFunctionMode):
    """torch applies a mod to one score at a time, where ``bias[h]`` with a scalar ``h`` is a row
    and ``bias[h][q_idx]`` one value.  The trace runs the mod on one-element tensors instead, where
    ``bias[h]`` keeps a leading dimension of one; dropping it makes chained indexing mean what it
    means in torch.

    Every value torch's mod sees is 0-d (one score at a time), so type promotion weighs a captured
    0-d tensor (``w``, a ``.sum()``, ``torch.tensor(3)``) like any other value: ``i32[kv] + w`` with
    an int64 ``w`` is int64.  In the trace the other values are one-element tensors, next to which a
    0-d tensor would count less; so 0-d operands are read as one-element tensors too.

    The mode also sees what the mod reads of the captured tensors besides their values (``captured``:
    the tensors the kernels take as arguments).  A size (``bias.shape[0]``, ``len(table)``,
    ``numel()``) becomes part of the generated code, so the sizes read are recorded
    (``shape_reads``; of a tensor made from captured ones, ``bias.T.shape``, the sizes of those) and
    the kernels are cached per those sizes.  A captured tensor, or one made from it, turned into a
    Python value (``.item()``, ``float()``, ``.tolist()``, an ``if`` on it) or its memory layout
    (strides, pointer) would be frozen into the code while the tensor changes from call to call:
    refused.  (A tensor the mod makes from numbers is a constant: its values may be read.)"""

    def __init__(self, captured=(), name: str = "mod"):
        super().__init__()
        # which captured tensors each tensor of the trace comes from (by id; the tensors are kept,
        # so an id is not reused while the trace runs): the captured ones, then every op's outputs
        # from its inputs'.  A tensor the mod makes from numbers comes from none.
        self.sources: dict = {id(t): frozenset((i,)) for i, t in enumerate(captured)}
        self.keep = list(captured)
        self.name = name
        self.shape_reads: set = set()

    def _sources(self, tree) -> frozenset:
        found = frozenset()
        for x in torch.utils._pytree.tree_leaves(tree):
            if isinstance(x, torch.Tensor):
                found |= self.sources.get(id(x), frozenset())
        return found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        came_from = self._sources((args, kwargs))
        if func in _SIZE_READS:
            self.shape_reads |= came_from  # the sizes of these captured tensors are in the generated code
        elif func in _PYTHON_VALUES and came_from:
            raise NotImplementedError(
                f"flexebt: the mod {self.name!r} turns a captured tensor into a Python value "
                f"({_PYTHON_VALUES[func]}). The generated kernels would keep the value of the first call "
                f"for every later one, while the tensor can change. Use the tensor in tensor ops instead "
                f"(e.g. `score / temperature` with a 0-d or one-element tensor, "
                f"`torch.where(flag, a, b)` for a choice; they read the current value at every call), or a "
                f"Python number; kernel_options={{'BACKEND': 'REFERENCE'}} evaluates the mod as torch does.")
        elif func in _LAYOUT_READS and came_from:
            raise NotImplementedError(
                f"flexebt: the mod {self.name!r} reads the memory layout of a captured tensor "
                f"({getattr(func, '__name__', func)}); the generated kernels would keep the layout of the first "
                f"call. Index the tensor by position instead.")
        if func not in _KEEP_0D and _tensor_count((args, kwargs)) > 1:  # (promotion needs two tensors)
            args, kwargs = _one_element(args), _one_element(kwargs or {})
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.__getitem__ and isinstance(out, torch.Tensor) and out.dim() > 1 \
                and out.shape[0] == 1 and _per_score_index(args[1]):
            out = out.squeeze(0)
        if came_from:
            written = []
            if args and isinstance(args[0], torch.Tensor) and _writes_first_argument(func):
                written = [args[0], args[0]._base]  # c[0] = w, c.copy_(w): c (and what it views) now hold w
            for x in (*torch.utils._pytree.tree_leaves(out), *written):
                if isinstance(x, torch.Tensor):
                    self.sources[id(x)] = self.sources.get(id(x), frozenset()) | came_from
                    self.keep.append(x)
        return out


# ops that take a 0-d tensor as a value to fill with (a one-element tensor is refused there), and ops
# whose type promotion under torch's per-score vmap still weighs a 0-d operand less (where, clamp with
# tensor bounds, addcmul / addcdiv: probed against torch.vmap)
_KEEP_0D = {torch.Tensor.masked_fill, torch.masked_fill, torch.Tensor.masked_fill_, torch.Tensor.fill_,
            torch.fill, torch.full_like, torch.Tensor.new_full, torch.full, torch.Tensor.item, torch.Tensor.tolist,
            torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__,
            torch.where, torch.Tensor.where, torch.clamp, torch.Tensor.clamp, torch.clip, torch.Tensor.clip,
            torch.Tensor.clamp_, torch.clamp_min, torch.clamp_max, torch.Tensor.clamp_min, torch.Tensor.clamp_max,
            torch.addcmul, torch.Tensor.addcmul, torch.addcdiv, torch.Tensor.addcdiv}


def _writes_first_argument(func) -> bool:
    """In-place ops (``add_``, ``copy_``, ``fill_``) and item assignment write their first argument."""
    return func is torch.Tensor.__setitem__ or getattr(func, "__name__", "").endswith("_") and \
        not getattr(func, "__name__", "").endswith("__")


# sizes a mod may read from a captured tensor (the kernels are then cached per size): the size
# itself, and ops that return as many results as a size (their count is a Python number)
_SIZE_READS = {torch.Tensor.shape.__get__, torch.Tensor.size, torch.Tensor.__len__, torch.Tensor.numel,
               torch.Tensor.nelement, torch.numel, torch.Tensor.nbytes.__get__, torch.Tensor.__iter__,
               torch.Tensor.unbind, torch.unbind, torch.Tensor.split, torch.split, torch.Tensor.chunk, torch.chunk,
               torch.Tensor.tensor_split, torch.tensor_split, torch.Tensor.split_with_sizes, torch.is_same_size,
               torch.Tensor.is_same_size}
# a tensor made a Python value (the trace would keep the value of the first call)
_PYTHON_VALUES = {torch.Tensor.item: ".item()", torch.Tensor.tolist: ".tolist()", torch.Tensor.__float__: "float()",
                  torch.Tensor.__int__: "int()", torch.Tensor.__bool__: "bool(), or an `if` / `and` / `or` on it",
                  torch.Tensor.__index__: "a tensor used as a Python index or count",
                  torch.Tensor.__complex__: "complex()", torch.Tensor.numpy: ".numpy()",
                  torch.Tensor.__array__: "numpy.asarray()"}
# the memory layout of a captured tensor
_LAYOUT_READS = {torch.Tensor.stride, torch.Tensor.storage_offset, torch.Tensor.data_ptr, torch.Tensor.is_contiguous,
                 torch.Tensor.untyped_storage, torch.Tensor.storage}


def _tensor_count(tree) -> int:
    return sum(isinstance(x, torch.Tensor) for x in torch.utils._pytree.tree_leaves(tree))


def _one_element(tree):
    return torch.utils._pytree.tree_map(
        lambda x: x.reshape(1) if isinstance(x, torch.Tensor) and x.dim() == 0 else x, tree)


def _per_score_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.shape == (1,) and not i.is_floating_point() for i in items)


_PASS_THROUGH = {aten.detach.default, aten.alias.default, aten.clone.default, aten.lift_fresh_copy.default,
                 aten.contiguous.default}


def _tensor_labels(fn, buffers: list[Buffer], consts: dict[str, int]) -> dict[str, str]:
    """For messages: graph attribute -> how the user wrote the tensor (the closure variable's
    name, the global's name, ``self.bias``), falling back to where it was found."""
    code = getattr(fn, "__code__", None)
    freevars = code.co_freevars if code is not None else ()
    labels = {}
    for attr, slot in consts.items():
        buf = buffers[slot]
        if not buf.steps:  # created inside the mod: no name to give
            continue
        label = buf.path
        if buf.steps[0][0] == "cell" and buf.steps[0][1] < len(freevars):
            label = freevars[buf.steps[0][1]] + label[len(f"closure[{buf.steps[0][1]}]"):]
        elif buf.steps[0][0] == "global":
            label = label[len("global:"):]
        elif buf.steps[0] == ("attr", "__self__"):  # a bound method's object
            label = "self" + label[len("__self__"):]
        labels[attr] = label
    return labels


def _normalize_loads(gm: torch.fx.GraphModule, name: str, labels: dict[str, str] | None = None) -> None:
    """Rewrite every read of a captured tensor as one ``aten.index.Tensor(tensor, [i_0, .., i_n])``
    node with an index per dimension (a *load*; the emitter bounds-checks it):

    - chained indexing ``bias[h][q_idx]`` (index, squeeze, select steps) is folded into one load;
    - a one-element tensor used as a value (``score * temperature``) is a load at index 0, so a
      temperature that requires grad receives its gradient;
    - a read through ``.detach()`` is a load followed by a detach (no gradient flows).
    Any other use of a captured tensor -- a slice, a reduction or arithmetic over a whole tensor --
    is refused, naming the mod."""
    partial = {}  # node -> (get_attr node, {tensor dim: index}, detached)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            partial[node] = (node, {}, False)
            continue
        if node.op != "call_function":
            continue
        src = node.args[0] if node.args else None
        if src not in partial:
            continue
        attr, idx, detached = partial[src]
        free = [d for d in range(getattr(gm, attr.target).dim()) if d not in idx]  # dims not indexed yet
        t = node.target
        if t in _PASS_THROUGH:
            partial[node] = (attr, idx, detached or t is aten.detach.default)
        elif t is aten.index.Tensor and all(i is not None for i in node.args[1]) and len(node.args[1]) <= len(free):
            partial[node] = (attr, {**idx, **dict(zip(free, node.args[1]))}, detached)
        elif t in (aten.squeeze.dim, aten.squeeze.dims) and idx:
            partial[node] = (attr, idx, detached)  # the leading one of a per-score index
        elif t is aten.select.int and -len(free) <= node.args[1] < len(free):
            partial[node] = (attr, {**idx, free[node.args[1]]: int(node.args[2])}, detached)
    tensors = {a: getattr(gm, a.target) for a in partial if a.op == "get_attr"}
    loaded = {}  # a finished read -> its load (a read used as another read's index, table[ids[q, 1]])
    for node, (attr, by_dim, detached) in partial.items():
        tensor = tensors[attr]
        idx = [loaded.get(by_dim[d], by_dim[d]) for d in sorted(by_dim)]
        complete = len(idx) == tensor.dim()
        if not by_dim and tensor.numel() == 1:  # a one-element tensor used as a value (maybe detached)
            idx, complete = [0] * tensor.dim(), True
        # the uses outside this read's own chain: a node of ``partial`` continues the chain only where
        # it reads this node as its tensor (args[0]); one that indexes with it uses its value
        outside = [u for u in node.users if u not in partial or u.args[0] is not node]
        if not outside:
            continue
        if not complete:
            shape = tuple(tensor.shape)
            label = (labels or {}).get(attr.target)
            raise NotImplementedError(
                f"flexebt codegen: the mod {name!r} uses the captured tensor "
                f"{repr(label) + ' ' if label else ''}of shape {shape} "
                f"{'indexed with ' + str(len(idx)) + ' of its ' + str(len(shape)) + ' dimensions' if idx else 'as a whole'}"
                f" ({', '.join(str(u.target) for u in outside)}). A mod works on one score at a time: read one "
                f"value per score, with an index for every dimension (e.g. bias[h, q_idx, kv_idx]); slices, "
                f"reductions over a tensor and tensor-wide arithmetic are not supported by the kernels. Compute "
                f"that outside the mod and capture the result instead (e.g. `row_sum = bias.sum(-1)` once, then "
                f"`row_sum[b, h]` in the mod; autograd carries gradients through it), or run this mod with "
                f"kernel_options={{'BACKEND': 'REFERENCE'}}.")
        if node.target is aten.index.Tensor and node.args[0] is attr and len(idx) == len(node.args[1]) \
                and not detached:
            continue  # already one load
        # before the read itself, or (a tensor used whole) before its first use: the index constants
        # come first, then the load
        first_use = next(n for n in gm.graph.nodes if n in outside) if node.op == "get_attr" else node
        with gm.graph.inserting_before(first_use):
            args = []
            for i in idx:
                if isinstance(i, torch.fx.Node):
                    args.append(i)
                else:
                    c = gm.graph.call_function(aten.scalar_tensor.default, (i,), {"dtype": torch.int64})
                    c.meta["val"] = torch.scalar_tensor(i, dtype=torch.int64)
                    args.append(c)
            load = gm.graph.call_function(aten.index.Tensor, (attr, args))
            load.meta["val"] = torch.empty((1,), dtype=tensor.dtype)
            out = load
            if detached:
                out = gm.graph.call_function(aten.detach.default, (load,))
                out.meta["val"] = load.meta["val"]
        loaded[node] = out
        for u in outside:
            u.replace_input_with(node, out)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _trace(fn, args, name: str = "mod", decompositions=None) -> torch.fx.GraphModule:
    table = _DECOMPOSED if decompositions is None else decompositions
    try:
        gm = make_fx(fn, tracing_mode="real", decomposition_table=table, _allow_non_fake_inputs=True)(*args)
    except RuntimeError as e:
        if "_local_scalar_dense" in str(e) or "data-dependent" in str(e):
            raise NotImplementedError(
                f"flexebt: the mod {name!r} turns a tensor into a Python value (.item(), int(), float(), bool(), or "
                f"an `if` / `and` / `or` on a tensor). torch applies a mod to one score at a time through vmap, "
                f"where that is not allowed either; write the choice with tensor ops instead, e.g. "
                f"torch.where(cond, a, b).") from None
        raise
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def trace_mask_mod(mask_mod: Callable) -> TracedMod:
    buffers = captured_tensors(mask_mod)
    dev = _trace_device(buffers)
    name = getattr(mask_mod, "__name__", "mask_mod")

    mode = _PerScoreIndexing([b.tensor for b in buffers], name)

    def per_score(b, h, q, kv):
        with mode:
            out = mask_mod(b, h, q, kv)
        return _as_bool(out, q, name)  # (outside the mode: its size checks are not the mod's reads)

    gm = _trace(per_score, tuple(_idx(dev) for _ in range(4)), name)
    consts = _constant_map(gm, buffers)
    _normalize_loads(gm, name, _tensor_labels(mask_mod, buffers, consts))
    return TracedMod("mask", gm, buffers, consts, [], {}, {}, name, frozenset(mode.shape_reads))


def _one_value(x, like, name: str, kind: str):
    """A mod returns one value per score: a number, or a tensor of one element."""
    if not isinstance(x, torch.Tensor):
        if not isinstance(x, (bool, int, float)):
            raise TypeError(f"flexebt: the {kind} {name!r} returned {type(x).__name__}; it must return a tensor "
                            f"(or a number) with one value per score.")
        return torch.full_like(like, x, dtype=torch.float32 if kind == "score_mod" else torch.bool)
    if x.numel() != 1:
        raise TypeError(f"flexebt: the {kind} {name!r} returned a tensor of shape {tuple(x.shape)} for one score; it "
                        f"must return one value per score (index captured tensors down to one value).")
    return x.reshape(like.shape)


def _as_bool(x, like, name="mask_mod"):
    return _one_value(x, like, name, "mask_mod").to(torch.bool)


def _as_float(x, like, name="score_mod"):
    return _one_value(x, like, name, "score_mod").to(torch.float32)


def trace_score_mod(score_mod: Callable, want_second_order: bool = False) -> TracedMod:
    buffers = captured_tensors(score_mod)
    dev = _trace_device(buffers)
    args = (torch.zeros((1,), dtype=torch.float32, device=dev), *(_idx(dev) for _ in range(4)))
    name = getattr(score_mod, "__name__", "score_mod")

    mode = _PerScoreIndexing([b.tensor for b in buffers], name)

    def per_score(s, b, h, q, kv):
        with mode:
            out = score_mod(s, b, h, q, kv)
        return _as_float(out, s, name)

    gm = _trace(per_score, args, name, _MOD_DECOMPOSED)
    consts = _constant_map(gm, buffers)
    _normalize_loads(gm, name, _tensor_labels(score_mod, buffers, consts))

    # Floating loads become derivative leaves.
    loads = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.index.Tensor:
            src = node.args[0]
            tensor = getattr(gm, src.target) if src.op == "get_attr" else None
            if tensor is not None and tensor.is_floating_point():
                detached = all(u.target is aten.detach.default for u in node.users)
                loads.append(Load(node.name, consts[src.target], tensor.requires_grad and not detached))
    derivative, deriv_consts, no_derivative = {}, {}, ""
    custom = _custom_backwards(score_mod, buffers, dev, name)
    if custom:
        # the trace holds the ops of a torch.autograd.Function's forward; the derivative graphs would
        # differentiate those ops, not call the Function's own backward (a straight-through round
        # would get a zero gradient): the forward runs, a gradient is refused
        no_derivative = (
            f"flexebt: the score_mod {name!r} applies the torch.autograd.Function {', '.join(custom)}, whose own "
            f"backward the fused kernels cannot call: they differentiate the ops of its forward, which may differ "
            f"from that backward. Its forward runs on the kernels; for gradients, run the mod with "
            f"kernel_options={{'BACKEND': 'REFERENCE'}} (it calls the Function's backward, as torch does), or write "
            f"the Function's effect with differentiable ops (a straight-through estimator as "
            f"`x + (f(x) - x).detach()`).")
    for which in (() if custom else ("bwd", "dbwd") if want_second_order else ("bwd",)):
        learned = [ld.learned for ld in loads]
        try:
            dg = _trace_derivatives(gm, loads, second=(which == "dbwd"), learned=learned, device=dev, name=name)
        except RuntimeError as e:
            if "derivative for" not in str(e) and "not implemented" not in str(e):
                raise
            # as in torch: the forward runs, and a gradient through the op is an error (raised by the
            # kernels' backward and forward-mode passes: kernels/plan.py)
            no_derivative = (
                f"flexebt: the score_mod {name!r} applies an op that torch cannot differentiate to the score or to a "
                f"captured tensor that requires grad ({e}); torch's own backward refuses it too. Its forward runs; "
                f"for a gradient, detach that operand or use a differentiable op.")
            derivative, deriv_consts = {}, {}
            break
        derivative[which] = dg
        deriv_consts[which] = _constant_map(dg, buffers)
    return TracedMod("score", gm, buffers, consts, loads, derivative, deriv_consts, name, frozenset(mode.shape_reads),
                     no_derivative)


def _custom_backwards(score_mod: Callable, buffers: list[Buffer], device, name: str) -> list[str]:
    """The torch.autograd.Function classes the score_mod applies on a path that carries gradients
    (from the score or from a captured tensor that requires grad): the mod runs once more under
    autograd, as torch's eager flex_attention runs it, and its graph is searched back to the captured
    tensors (their own history is the user's, not the mod's)."""
    keep = [b.tensor.grad_fn for b in buffers if b.tensor.grad_fn is not None]  # (alive: ids stay unique)
    stop = {id(f) for f in keep}
    s = torch.zeros((1,), dtype=torch.float32, device=device, requires_grad=True)
    with torch.enable_grad(), _PerScoreIndexing([b.tensor for b in buffers], name):
        out = score_mod(s.clone(), *(_idx(device) for _ in range(4)))
    found, seen = [], set()
    stack = [out.grad_fn] if isinstance(out, torch.Tensor) else []
    while stack:
        node = stack.pop()
        if node is None or id(node) in stop or id(node) in seen:
            continue
        seen.add(id(node))
        keep.append(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            cls = getattr(node, "_forward_cls", None)
            label = getattr(cls, "__qualname__", type(node).__name__)
            if label not in found:
                found.append(label)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


class _LeafInterpreter(torch.fx.Interpreter):
    """Runs the fwd graph with each floating load replaced by a given leaf tensor."""

    def __init__(self, gm, leaves: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.leaves = leaves

    def run_node(self, n):
        if n.name in self.leaves:
            return self.leaves[n.name]
        if n.op == "call_function" and n.target is aten.index.Tensor and not n.args[1]:
            # a 0-d captured tensor read as a value (_normalize_loads): torch indexes it through a
            # one-element view; the emitter reads the tensor itself (emit.Emitter._load)
            t = self.fetch_attr(n.args[0].target)
            return aten.index.Tensor(t.reshape(1), [torch.zeros((1,), dtype=torch.int64, device=t.device)])
        return super().run_node(n)


def _trace_derivatives(gm: torch.fx.GraphModule, loads: list[Load], second: bool, learned: list[bool],
                       device="cpu", name: str = "score_mod") -> torch.fx.GraphModule:
    """The derivative graph of ``gm``.  Only the loads of tensors that require grad are
    differentiated (``learned``); the others get zero derivatives, as a constant has, so a mod may
    apply ops without a derivative (``//``) to them, as in torch."""
    names = [ld.node_name for ld in loads]

    def grad(y, xs, **kw):
        """d y / d x for each x (zeros where x is not differentiated or y does not depend on it)."""
        live = [i for i, x in enumerate(xs) if x.requires_grad]
        out = [torch.zeros_like(x) for x in xs]
        if y.requires_grad and live:
            got = torch.autograd.grad(y.sum(), [xs[i] for i in live], allow_unused=True, **kw)
            for i, g in zip(live, got):
                if g is not None:
                    out[i] = g
        return out

    def derivs(s, b, h, q, kv, *leaves):
        with torch.enable_grad():
            s = s.detach().requires_grad_(True)
            leaves = [x.detach().requires_grad_(learn) for x, learn in zip(leaves, learned)]
            # the mod gets a copy of the score: it may update its argument in place (score += ...),
            # as torch allows, which a leaf that requires grad refuses
            t = _LeafInterpreter(gm, dict(zip(names, leaves))).run(s.clone(), b, h, q, kv)
            wrt = [s, *leaves]
            first = grad(t, wrt, create_graph=second)
            outs = [t.detach(), *[g.detach() for g in first]]
            if second:
                outs += grad(first[0], wrt, retain_graph=True)  # d2f/ds2, then d2f/(ds dc_k)
                for k in range(len(leaves)):  # then d2f/(dc_k dc_l), k-major
                    outs += grad(first[1 + k], leaves, retain_graph=True)
        return tuple(outs)

    f32 = lambda: torch.zeros((1,), dtype=torch.float32, device=device)  # noqa: E731
    # a 16-bit load as 16-bit, as the kernels hold it: the derivative's arithmetic on it then rounds
    # as the mod's does (an fp32 leaf gave fp32 code for a bf16 value); other loads as fp32
    dtypes = {n.name: n.meta["val"].dtype for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}

    def leaf(name):
        dtype = dtypes.get(name, torch.float32)
        return torch.zeros((1,), dtype=dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32,
                           device=device)

    return _trace(derivs, (f32(), *(_idx(device) for _ in range(4)), *(leaf(n) for n in names)))
