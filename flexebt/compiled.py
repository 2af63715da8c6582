"""flex_attention, flex_ebt_attention and piecewise_attention inside ``torch.compile``: the kernels
as custom ops.

Under ``torch.compile`` a call goes through public mechanisms only, so a model compiles with
``fullgraph=True`` and no graph break:

- ``torch.compiler.assume_constant_result``: ``_kernel_call(score_mod, mask_mod)`` builds (or finds)
  the generated kernels at trace time and returns their key, the captured tensors' access steps and
  the checks that pin everything else the kernels were generated for -- constants of the graph.
  ``_trace_mod_reads`` evaluates the checks through the mods, so dynamo guards each value read (a
  changed closure number, global or attribute recompiles) and nothing by identity: a second call,
  or a new mod or block mask of the same structure, reuses the graph.
- three ``torch.library.custom_op``s shared by every family -- ``flexebt::attention`` (forward),
  ``flexebt::attention_backward`` and ``flexebt::attention_double_backward`` -- each with a
  ``register_autograd`` formula that calls the next; each runs the call's plan of kernel passes
  (kernels/plan.py), the same code as the eager chain.  The captured tensors travel as a
  ``list[Tensor]``, read from the mods' closures by paths recorded when the kernels were built.

First order needs nothing more.  Second order inside the compiled function
(``torch.autograd.grad(..., create_graph=True)``, the EBT training step) needs
``torch._dynamo.config.trace_autograd_ops = True``; without it dynamo reports the graph break
naming that switch.  Third order through the compiled ops raises a clear error.  A double backward
*through* a compiled region from outside it is refused by aot_autograd ("does not currently
support double backward") -- an error, never a silent drop.  Eager mode keeps the
``autograd.Function`` chain, exact at every order.
"""

from __future__ import annotations

import functools
import math
import sys
import types
from typing import Optional

import torch
from torch import Tensor

from . import runtime
from .autograd import results_of, unused_by_engine
from .codegen.source import get_kernels, position_extents, prepare_captured
from .codegen.identity import Buffers, captured_tensors, resolve, wide_offsets
from .kernels.flex import BlockTables, tables_from_block_mask
from .kernels.options import KernelOptions
from .kernels.plan import AttentionPlan, KernelPass, plan_backward, plan_double_backward, plan_forward

# runtime.compiled: key -> ModKernels, read by the ops (outside the trace), never by traced code;
# pinned, because compiled graphs name the keys
_THIS = sys.modules[__name__]


def _stash(key: str, make) -> str:
    """Keep ``make()`` as an attribute of this module, once per ``key``; return the attribute's name.
    Traced code reads it with ``getattr(_THIS, name)``: dynamo reads module attributes when it
    meets them, where a dict it has already read keeps the entries it saw then."""
    name = runtime.stashed.get(key)
    if name is None:
        name = f"_stashed_{len(runtime.stashed)}"
        setattr(_THIS, name, make())
        runtime.stashed.put(key, name)
    return name


def _parts(mod) -> tuple:
    """A mod as dynamo can hand it to ``_kernel_call``: a bound method as its function and its
    object (dynamo converts neither the method itself nor a method read inside the trace, such as
    ``self.score_mod`` in a compiled module's forward).  The object is then guarded by identity --
    a model's layers persist, so calls reuse the graph -- and the function by its code."""
    if isinstance(mod, types.MethodType):
        return mod.__func__, mod.__self__
    if isinstance(mod, functools.partial) and any(isinstance(a, torch.Tensor) for a in
                                                  (*mod.args, *mod.keywords.values())):
        raise NotImplementedError(
            "flexebt under torch.compile: a functools.partial mod with tensor arguments cannot be handed to the "
            "kernel generator; capture the tensors in a closure (def mod(score, b, h, q_idx, kv_idx): ...) or read "
            "them through self in a method.")
    if isinstance(mod, functools.partial):
        # its numbers as plain values: once dynamo has seen two values of an argument it makes it
        # symbolic, and the kernel generator needs the value (one guard each)
        return functools.partial(mod.func, *map(_plain, mod.args),
                                 **{k: _plain(v) for k, v in mod.keywords.items()}), None
    if isinstance(mod, types.FunctionType) and mod.__code__.co_freevars:
        try:
            mod.__closure__
        except AttributeError:  # dynamo has no closure to hand over: the function was made inside the trace
            raise NotImplementedError(
                f"flexebt under torch.compile: the mod '{mod.__name__}' is a closure created inside the compiled "
                "function. flexebt generates its kernels from the mod's own closure, which torch.compile cannot hand "
                "over for a function made during tracing. Define the mod outside the compiled function (at module "
                "level, or once in a module's __init__), capturing its tensors there or reading them through self "
                "(a method such as self.score_mod works).") from None
    return mod, None


def _plain(x):
    """A number as a plain Python value (specialised, under dynamo, where it was symbolic)."""
    if type(x) is not int and type(x) is not float:  # (a bool, an IntEnum member, a subclass: as they are)
        return x
    if type(x) is int:
        return _static(x)[0]
    return float.fromhex(x.hex())  # (float() keeps it symbolic; its exact spelling does not)


def _joined(fn, obj):
    return fn if obj is None else types.MethodType(fn, obj)


@torch.compiler.assume_constant_result
def _kernel_parts(score_fn, score_obj, mask_fn, mask_obj, frame_mask: bool) -> tuple:
    """(arguments one by one: dynamo converts an object only as a direct argument)"""
    score_mod, mask_mod = _joined(score_fn, score_obj), _joined(mask_fn, mask_obj)
    kern = get_kernels("flex_attention", score_mod, mask_mod, frame_mask=frame_mask)
    # named by its generated source's digest: the same in every process, so a compiled graph that names
    # it is the same graph from one run to the next (inductor's caches can hit)
    key = f"flex_attention:{kern.module.__name__.rsplit('_', 1)[1]}"
    if kern.internal:
        raise NotImplementedError("flexebt under torch.compile: a mod that creates tensors inside its body is "
                                  "not supported; create them outside and capture them.")
    score = captured_tensors(score_mod, guards=True) if score_mod is not None else Buffers()
    mask = captured_tensors(mask_mod, guards=True) if mask_mod is not None else Buffers()
    mods = {"score": score_mod, "mask": mask_mod}
    paths = tuple(("score", _traced_steps(score_mod, b.steps)) for b in score) + \
        tuple(("mask", _traced_steps(mask_mod, b.steps)) for b in mask)
    # the sizes the kernels hold (a mod that reads a captured tensor's size): guarded as well
    sizes = {"score": [], "mask": []}
    for i, shape in kern.shape_pins:
        which, steps = paths[i]
        sizes[which].append((steps, "shape", shape))
    guards = tuple(tuple(_traced_guard(mods[which], g) for g in bufs.guards) + tuple(sizes[which])
                   for which, bufs in (("score", score), ("mask", mask)))
    runtime.compiled.setdefault(key, kern)
    built_for = tuple(_tensor_facts(b.tensor) for b in (*score, *mask))
    return key, paths, tuple(sorted(kern.grad_slots)), tuple(sorted(kern.positional)), kern.name, guards, built_for


def _tensor_facts(t) -> tuple:
    """What the generated code depends on of a captured tensor, as the compiled path can read it
    from a traced tensor too (dtype, rank, device type, no / one / more elements, requires grad)."""
    return t.dtype, t.dim(), t.device.type, min(t.numel(), 2), bool(t.requires_grad), wide_offsets(t)


def _traced_steps(mod, steps: tuple) -> tuple:
    """Access steps as the traced code follows them (``_read``): a global read becomes a call of a
    reader function made with the mod's module globals.  Dynamo inlines it and reads the global as
    the compiled function sees it at that point -- a value the function itself assigned before the
    call included -- where reading ``fn.__globals__[name]`` gives the value from before the call."""
    out, obj = [], mod
    for kind, arg in steps:
        if kind == "global" and _is_module_namespace(obj.__globals__):
            out.append(("reader", (_global_reader(obj.__globals__, arg), arg)))
        else:
            out.append((kind, arg))
        obj = resolve(obj, ((kind, arg),))
    return tuple(out)


def _traced_guard(mod, guard: tuple) -> tuple:
    steps, kind, want = guard
    return _traced_steps(mod, steps), kind, (_traced_steps(mod, want) if kind == "same" else want)


def _is_module_namespace(namespace: dict) -> bool:
    """Whether ``namespace`` is the dict of an imported module: dynamo reads an inlined function's
    globals from the module its ``__name__`` names, so a reader works only there (a namespace of
    ``exec`` or a copy of a module's globals keeps the plain read)."""
    module = sys.modules.get(namespace.get("__name__")) if isinstance(namespace.get("__name__"), str) else None
    return module is not None and getattr(module, "__dict__", None) is namespace


def _global_reader(namespace: dict, name: str) -> str:
    """The stashed name of a function returning global ``name`` of ``namespace`` (a module's
    globals), made once per namespace and name."""
    def make():
        made: dict = {}
        exec(compile(f"def read_{name}():\n    return {name}\n", f"<flexebt global reader {name}>", "exec"),  # noqa: S102
             namespace, made)
        return made[f"read_{name}"]
    return _stash(f"global:{id(namespace)}:{name}", make)


def _read(mod, steps: tuple):
    """``resolve`` for steps made by ``_traced_steps`` (traced code)."""
    obj = mod
    for kind, arg in steps:
        obj = getattr(_THIS, arg[0])() if kind == "reader" else resolve(obj, ((kind, arg),))
    return obj


def _where(steps: tuple) -> str:
    """Access steps as the user wrote them (messages)."""
    from .codegen.identity import _path

    plain = tuple(("global", a[1]) if kind == "reader" else (kind, a) for kind, a in steps)
    return _path(plain).replace("__self__", "self", 1)


def _kernel_call(score_mod, mask_mod, frame_mask: bool = False) -> tuple:
    """Build (or find) the mods' kernels at trace time.  Returns constants of the graph: the
    kernels' key, the access steps of the captured tensors, what preparing them needs (the slots
    with gradients, the dimensions indexed by a bare position, the mod's name) and the checks that
    pin everything else the kernels were generated for (``_trace_mod_reads``)."""
    return _kernel_parts(*_parts(score_mod), *_parts(mask_mod), frame_mask)


def _captured(score_mod, mask_mod, call: tuple, extents: dict) -> list:
    """The captured tensors of this call, read through their access steps and prepared as the
    eager path prepares them (codegen.source.prepare_captured)."""
    _, paths, grad_slots, positional, name, _, built_for = call
    tensors = [_read(score_mod if which == "score" else mask_mod, steps) for which, steps in paths]
    for t, (which, steps), facts in zip(tensors, paths, built_for):
        _check_built_for(t, facts, name, steps)
    return prepare_captured(tensors, extents, grad_slots, positional, name)


def _check_built_for(t, facts: tuple, name: str, steps: tuple) -> None:
    """Refuse, while dynamo traces, a captured tensor that is not what the kernels were generated
    for.  The kernels are generated from the mods' objects as they are when tracing starts; a
    tensor the compiled function itself assigns before the call (``self.bias = ...`` in forward)
    is seen by the graph with its new value.  Where that value needs other code -- another dtype,
    rank or device, or a gradient the kernels would not form -- the result would be wrong."""
    dtype, dim, device, count, grad, wide = facts
    same = t.dtype == dtype and t.dim() == dim and t.device.type == device and (grad or not t.requires_grad)
    if same:  # (sizes: branches, so that a symbolic size becomes one guard each)
        if wide_offsets(t):
            same = wide
        else:
            same = not wide
    if same:  # (no, one or more elements: branches, as above)
        if t.numel() == 0:
            if count == 0:
                return
        elif t.numel() == 1:
            if count == 1:
                return
        elif count == 2:
            return
    where = _where(steps)
    size = {0: ", empty", 1: ", one element", 2: ""}
    was = f"{dtype}, {dim}-d, {device}{size[count]}{', requires grad' if grad else ''}"
    got = f"{t.dtype}, {t.dim()}-d, {t.device.type}{size[min(t.numel(), 2)]}{', requires grad' if t.requires_grad else ''}"
    raise NotImplementedError(
        f"flexebt under torch.compile: the mod {name!r} reads a captured tensor ({where}) that the compiled "
        f"function changes before calling attention: the kernels were generated for the tensor held when tracing "
        f"started ({was}), the graph passes another ({got}). flexebt generates kernels from the mods' objects as "
        f"they are when torch.compile starts tracing, not from values assigned during the trace. Assign the tensor "
        f"outside the compiled function, or read its source in the mod (e.g. "
        f"`score + 2 * torch.tanh(self.table[h, q_idx, kv_idx])` instead of a `self.bias` computed in forward).")


def _tables_list(t: BlockTables) -> list[Tensor]:
    return [t.kv_num, t.kv_idx, t.full_kv_num, t.full_kv_idx, t.q_num, t.q_idx, t.full_q_num, t.full_q_idx]


def _tables_from_list(ts: list[Tensor], sparse_q: int, sparse_kv: int, has_full: bool) -> BlockTables:
    return BlockTables(*ts, sparse_q=sparse_q, sparse_kv=sparse_kv, has_full=has_full, mask_mod=None)


# -- one chain of custom ops for every family -------------------------------------------------
# A call is its plan of kernel passes (kernels/plan.py) written as a layout string -- per pass the
# input positions, the row group, the key of its generated kernels, its block sizes, its slice of
# the captured tensors, the frame offset and own keys -- a meta string (scale, kernel options) and
# tensor lists: the inputs, aux (each pass's block tables, then the EBT own-key masks) and the
# captured tensors.  Each op's autograd formula calls the next op: forward -> backward -> double
# backward, so `autograd.grad(create_graph=True)` inside a compiled function
# (torch._dynamo.config.trace_autograd_ops) traces the fused double backward.


def _layout(passes: list, n_inputs: int, n_rows: int) -> str:
    """The plan as a string, a constant of the graph.  ``passes``: per pass (q, k, v, rows, kernel
    key, BlockTables, (lo, hi), q_off, own or None)."""
    def one(q, k, v, rows, key, t, buf, q_off, own):
        own_s = f"{own[0]}.{own[1]}" if own is not None else "-"
        # block sizes and the frame offset as plain ints: once dynamo has seen two values (two block
        # masks, two lengths) it makes them symbolic, and a string needs their values (a guard each)
        sq, skv, off = _static(t.sparse_q, t.sparse_kv, q_off)
        return f"{q},{k},{v},{rows},{key},{sq}x{skv}x{int(t.has_full)},{buf[0]}.{buf[1]},{off},{own_s}"
    return f"{n_inputs}|{n_rows}|" + ";".join(one(*p) for p in passes)


@functools.lru_cache(maxsize=256)
def _parse(layout: str) -> tuple:
    """(n_inputs, n_rows, passes)."""
    n_inputs, n_rows, passes = layout.split("|")
    parsed = []
    for entry in passes.split(";"):
        q, k, v, rows, key, sizes, buf, q_off, own = entry.split(",")
        sq, skv, full = (int(x) for x in sizes.split("x"))
        lo, hi = (int(x) for x in buf.split("."))
        parsed.append((int(q), int(k), int(v), int(rows), key, sq, skv, bool(full), (lo, hi), int(q_off),
                       None if own == "-" else tuple(int(x) for x in own.split("."))))
    return int(n_inputs), int(n_rows), tuple(parsed)


def _plan_of(layout: str, aux: list) -> AttentionPlan:
    n_inputs, n_rows, passes = _parse(layout)
    built, own_at = [], 8 * len(passes)
    for i, (q, k, v, rows, key, sq, skv, full, buf, q_off, own) in enumerate(passes):
        keep = None
        if own is not None:
            keep, own_at = aux[own_at], own_at + 1
        tables = _tables_from_list(aux[8 * i:8 * i + 8], sq, skv, full)
        built.append(KernelPass(q, k, v, rows, runtime.compiled.get(key), tables, buf, q_off, own, keep))
    return AttentionPlan(tuple(built), n_inputs, n_rows)


def _meta(scale: float, options) -> str:
    """scale (exact, as float.hex), then the kernel options (KernelOptions.encode): one string, a
    constant of the graph."""
    return f"{float(scale).hex()}|{KernelOptions.text_of(options)}"


@functools.lru_cache(maxsize=256)
def _unmeta(meta: str) -> tuple:
    """(scale, KernelOptions) of a meta string (parsed once per string; the ops run it every call).
    The backward op's meta may end in ``|unwanted=<bits>`` (``_unwanted_meta``)."""
    scale, opts = meta.split("|")[:2]
    return float.fromhex(scale), KernelOptions.decode(opts)


def _unwanted_meta(meta: str, bits: int) -> str:
    """The backward op's meta: a bit per input whose gradient nobody uses (zeros; a key pass of
    only such inputs is skipped).  In the string, not a new op argument, so the ops' schemas -- and
    graphs compiled and cached before -- stay as they were."""
    return f"{meta}|unwanted={bits}" if bits else meta


@functools.lru_cache(maxsize=256)
def _unwanted_of(meta: str) -> frozenset:
    parts = meta.split("|")
    bits = int(parts[2].partition("=")[2]) if len(parts) > 2 else 0
    return frozenset(i for i in range(bits.bit_length()) if bits >> i & 1)


def _dense(xs: list, likes: list) -> list:
    """Op outputs are dense, as their fakes say (some kernels hand back views, e.g. a column of the
    row statistics); an absent gradient is an empty tensor (custom ops cannot return None)."""
    return [x.contiguous() if x is not None else y.new_empty(0) for x, y in zip(xs, likes)]


def _forward(layout: str, meta: str, ins: list, aux: list, buffers: list) -> list:
    scale, options = _unmeta(meta)
    return [o.contiguous() for o in plan_forward(_plan_of(layout, aux), ins, buffers, scale, options)]


def _backward(layout: str, meta: str, ins: list, outs: list, cts: list, aux: list, buffers: list) -> list:
    """Gradients of the inputs, then of the captured tensors (empty where none flows)."""
    scale, options = _unmeta(meta)
    grads, gbuf = plan_backward(_plan_of(layout, aux), ins, outs, cts, buffers, scale, options, _unwanted_of(meta))
    return [g.contiguous() if g is not None else torch.zeros_like(x) for g, x in zip(grads, ins)] + _dense(gbuf, buffers)


def _double_backward(layout: str, meta: str, ins: list, outs: list, cts: list, gcts: list, aux: list,
                     buffers: list, bcts: list) -> list:
    """Gradients of the inputs, of the cotangents (empty where a cotangent was None), then of the
    captured tensors (empty where none flows)."""
    scale, options = _unmeta(meta)
    grads, g_cts, gbuf = plan_double_backward(_plan_of(layout, aux), ins, outs, cts, gcts, buffers, bcts, scale,
                                              options)
    grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, ins)]
    return _dense(grads, ins) + _dense(g_cts, outs[:len(cts)]) + _dense(gbuf, buffers)


@torch.library.custom_op("flexebt::attention", mutates_args=())
def attention_op(layout: str, meta: str, ins: list[Tensor], aux: list[Tensor], buffers: list[Tensor]) -> list[Tensor]:
    """The outputs of every row group, then their lse, then their msum (kernels/plan.py)."""
    return _forward(layout, meta, ins, aux, buffers)


@attention_op.register_fake
def _(layout, meta, ins, aux, buffers):
    _, n_rows, passes = _parse(layout)
    first = {}
    for p in passes:
        first.setdefault(p[3], p)
    rows = [first[r] for r in range(n_rows)]
    outs = [ins[p[0]].new_empty(*ins[p[0]].shape[:3], ins[p[2]].shape[-1]) for p in rows]
    lses = [ins[p[0]].new_empty(ins[p[0]].shape[:3], dtype=torch.float32) for p in rows]
    msums = [ins[p[0]].new_empty(*ins[p[0]].shape[:3], 2, dtype=torch.float32) for p in rows]
    return outs + lses + msums


@torch.library.custom_op("flexebt::attention_backward", mutates_args=())
def attention_backward_op(layout: str, meta: str, ins: list[Tensor], outs: list[Tensor],
                          cts: list[Optional[Tensor]], aux: list[Tensor], buffers: list[Tensor]) -> list[Tensor]:
    return _backward(layout, meta, ins, outs, cts, aux, buffers)


def _buffer_grad_fakes(layout: str, buffers: list) -> list:
    slots = set()
    for p in _parse(layout)[2]:
        slots.update(p[8][0] + s for s in runtime.compiled.get(p[4]).grad_slots)
    return [b.new_empty(b.shape) if i in slots else b.new_empty(0) for i, b in enumerate(buffers)]


@attention_backward_op.register_fake
def _(layout, meta, ins, outs, cts, aux, buffers):
    return [x.new_empty(x.shape) for x in ins] + _buffer_grad_fakes(layout, buffers)


@torch.library.custom_op("flexebt::attention_double_backward", mutates_args=())
def attention_double_backward_op(layout: str, meta: str, ins: list[Tensor], outs: list[Tensor],
                                 cts: list[Optional[Tensor]], gcts: list[Optional[Tensor]], aux: list[Tensor],
                                 buffers: list[Tensor], bcts: list[Optional[Tensor]]) -> list[Tensor]:
    return _double_backward(layout, meta, ins, outs, cts, gcts, aux, buffers, bcts)


@attention_double_backward_op.register_fake
def _(layout, meta, ins, outs, cts, gcts, aux, buffers, bcts):
    n_out = len(cts) // 2
    g_cts = [o.new_empty(o.shape) if i < n_out or cts[i] is not None else o.new_empty(0)
             for i, o in enumerate(outs[:len(cts)])]
    return [x.new_empty(x.shape) for x in ins] + g_cts + _buffer_grad_fakes(layout, buffers)


def _grad_or_none(g: Tensor, like: Tensor):
    """An op's gradient slot: None where it is empty (nothing flows there)."""
    return g if g.numel() or not like.numel() else None


def _save(ctx, **lists):
    """Save tensor lists (None entries kept as None) for the backward formulas."""
    flat, layout = [], {}
    for name, xs in lists.items():
        idx = []
        for x in xs:
            if x is None:
                idx.append(None)
            else:
                idx.append(len(flat))
                flat.append(x)
        layout[name] = idx
    ctx.save_for_backward(*flat)
    ctx.layout = layout


def _saved(ctx) -> dict:
    saved = ctx.saved_tensors
    return {name: [None if i is None else saved[i] for i in idx] for name, idx in ctx.layout.items()}


def _attention_setup(ctx, inputs, output):
    layout, meta, ins, aux, buffers = inputs
    ctx.call = (layout, meta)
    ctx.needs = [b.requires_grad for b in buffers]
    # the outputs, lse and msum all enter the backward (msum carries no gradient)
    ctx.n_out = 2 * _parse(layout)[1]
    _save(ctx, ins=list(ins), outs=list(output), aux=list(aux), buffers=list(buffers))


def _attention_grad(ctx, grads):
    layout, meta = ctx.call
    t = _saved(ctx)
    # out and lse enter the backward as constants: its own backward (the double backward)
    # differentiates the total dependence on the inputs.
    outs = [o.detach() for o in t["outs"]]
    grads = grads[:ctx.n_out]
    res = attention_backward_op(layout, _unwanted_meta(meta, _unwanted_bits(ctx, layout, len(t["ins"]))), t["ins"],
                                outs, [g.contiguous() if g is not None else None for g in grads], t["aux"],
                                t["buffers"])
    n = len(t["ins"])
    gbuf = [_grad_or_none(g, b) if need else None for g, b, need in zip(res[n:], t["buffers"], ctx.needs)]
    return None, None, list(res[:n]), [None] * len(t["aux"]), gbuf


def _unwanted_bits(ctx, layout: str, n: int) -> int:
    """A bit per input (of the first ``n`` edges: the op's ``ins``) whose gradient the backward
    under way will not use -- asked of the engine at trace time, so the graph keeps the answer as
    a constant in the op's meta string (a traced ``autograd.grad`` always has the same inputs).
    Only key-side inputs."""
    keys = {i for p in _parse(layout)[2] for i in (p[1], p[2])}
    try:
        edges = ctx.next_functions
    except AttributeError:
        return 0
    return sum(1 << i for i in unused_by_engine(edges, keys) if i < n)


def _backward_setup(ctx, inputs, output):
    layout, meta, ins, outs, cts, aux, buffers = inputs
    ctx.call = (layout, meta)
    ctx.needs = [b.requires_grad for b in buffers]
    _save(ctx, ins=list(ins), outs=list(outs), cts=list(cts), aux=list(aux), buffers=list(buffers))


def _backward_grad(ctx, grads):
    layout, meta = ctx.call
    t = _saved(ctx)
    n = len(t["ins"])
    gcts, bcts = list(grads[:n]), [(g if need and g is not None and g.numel() else None)
                                   for g, need in zip(grads[n:], ctx.needs)]
    res = attention_double_backward_op(layout, meta, t["ins"], t["outs"], t["cts"], gcts, t["aux"],
                                       t["buffers"], bcts)
    n_ct = len(t["cts"])
    g_cts = [(_grad_or_none(g, o) if c is not None else None) for g, o, c in zip(res[n:n + n_ct], t["outs"], t["cts"])]
    gbuf = [_grad_or_none(g, b) if need else None for g, b, need in zip(res[n + n_ct:], t["buffers"], ctx.needs)]
    return None, None, list(res[:n]), [None] * len(t["outs"]), g_cts, [None] * len(t["aux"]), gbuf


def _third_order(ctx, grads):
    raise NotImplementedError(
        "flexebt inside torch.compile: third-order gradients (differentiating the double backward) are not "
        "supported by the compiled ops; run that part eagerly (flexebt's eager path is exact at every order) or use "
        "kernel_options={'BACKEND': 'REFERENCE'} inside the compiled region.")


def _double_backward_setup(ctx, inputs, output):
    pass


attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)
attention_backward_op.register_autograd(_backward_grad, setup_context=_backward_setup)
attention_double_backward_op.register_autograd(_third_order, setup_context=_double_backward_setup)


@torch.compiler.assume_constant_result
def _active_transforms() -> str:
    """torch.func transforms active while dynamo traces this call (Grad/Jvp/Vmap levels it has
    entered), as a constant string for the graph."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    wanted = {TransformType.Grad: "grad", TransformType.Jvp: "jvp", TransformType.Vmap: "vmap"}
    return ",".join(wanted[i.key()] for i in retrieve_all_functorch_interpreters() if i.key() in wanted)


@torch.compiler.assume_constant_result
def _pinned(obj) -> bool:
    """Nothing to compute: passing ``obj`` makes dynamo convert it to a constant of the graph,
    which guards it (a function by its code object, a class, module or builtin by identity)."""
    return True


def _same_float(x, want) -> bool:
    """``x`` is the float ``want``, where ``want`` is ``"nan"`` or a zero of either sign."""
    if not isinstance(x, float):
        return False
    if want == "nan":
        return x != x
    return x == 0.0 and math.copysign(1.0, x) == math.copysign(1.0, want)


def _same_atom(x, want) -> bool:
    """``x == want`` with the type the key recorded (``True`` is not ``1``, ``1`` is not ``1.0``),
    written with isinstance (dynamo traces it for symbolic numbers too)."""
    if isinstance(want, bool) or want is None:
        return x is want
    if isinstance(want, int):
        return isinstance(x, int) and not isinstance(x, bool) and x == want
    if isinstance(want, float):
        return isinstance(x, float) and x == want
    if isinstance(want, complex):
        return isinstance(x, complex) and x == want
    if isinstance(want, str):
        return isinstance(x, str) and x == want
    return x == want  # bytes, dtypes, devices, layouts, ranges: equal only to their own kind


def _guards_hold(mod, guards) -> bool:
    """Evaluate the checks recorded with the mod's captured tensors (codegen.identity) while
    dynamo traces: each one reads a value the generated kernel depends on -- a closure constant,
    a global number, an attribute of ``self``, a container's length, an object's class -- through
    the mod, so dynamo guards it and a changed value recompiles (new trace, new kernel).  Nothing
    is guarded by the identity of the mod or of its objects: a new mod or block mask of the same
    structure reuses the graph."""
    ok = True
    for steps, kind, want in guards:
        x = _read(mod, steps)
        if kind == "eq":
            ok = ok and _same_atom(x, want)
        elif kind == "float":
            ok = ok and _same_float(x, want)
        elif kind == "len":
            ok = ok and len(x) == want
        elif kind == "shape":
            ok = ok and x.dim() == len(want) and all(n == m for n, m in zip(x.shape, want))
        elif kind == "keys":
            ok = ok and tuple(x.keys()) == want
        elif kind == "same":
            ok = ok and x is _read(mod, want)
        elif kind == "numpy":
            raise NotImplementedError(
                "flexebt under torch.compile: a mod that reads a numpy value (at "
                f"{_where(steps)}) cannot be guarded by value (dynamo keeps only its shape); "
                "use a Python number or a torch tensor instead.")
        else:
            ok = ok and _pinned(type(x) if kind == "type" else x)
    return ok


def _trace_mod_reads(score_mod, mask_mod, call: tuple) -> None:
    """Guard, while dynamo traces, everything the kernels of ``call`` were generated for (see
    ``_guards_hold``).  ``_kernel_call`` is a constant of the graph: without these guards a global
    number changed after compiling would keep the graph, and with it the kernel generated for the
    old value."""
    score_guards, mask_guards = call[5]
    if not (_guards_hold(score_mod, score_guards) and _guards_hold(mask_mod, mask_guards)):
        raise NotImplementedError(
            f"flexebt under torch.compile: the mod {call[4]!r} reads a value (a number, an object) that the compiled "
            f"function assigns before calling attention (e.g. `self.scale = ...` in forward, or a global). flexebt "
            f"generates the "
            f"kernels from the mods' values as they are when torch.compile starts tracing, so the graph would keep "
            f"the old one. Assign the value outside the compiled function, or hold it in a captured tensor (a 0-d "
            f"tensor updated in place, e.g. `self.scale.fill_(x)`, is read when the kernels run).")


def refuse_torch_func(fn: str) -> None:
    """Raise, while dynamo traces, when torch.func transforms are active (see _active_transforms)."""
    transforms = _active_transforms()
    if transforms:
        raise NotImplementedError(
            f"flexebt.{fn} inside torch.compile under torch.func transforms ({transforms}) is not supported: "
            "the compiled path has no functorch rules, and torch.compile does not support double backward. Run the "
            "torch.func transform outside torch.compile (eager flexebt kernels support torch.func.grad, grad of "
            "grad and jvp), or use kernel_options={'BACKEND': 'REFERENCE'} inside it.")


def _mod_call(score_mod, mask_mod, extents: dict, frame_mask: bool = False) -> tuple:
    """(kernel key, captured tensors) of one pass's mods, their reads guarded."""
    call = _kernel_call(score_mod, mask_mod, frame_mask)
    buffers = _captured(score_mod, mask_mod, call, extents)
    _trace_mod_reads(score_mod, mask_mod, call)
    return call[0], buffers


def flex_attention_compiled(query, key, value, score_mod, block_mask, scale, kernel_options, return_max=False):
    """The Triton path as custom ops (used while ``torch.compiler.is_compiling()``): (out, lse) or,
    with ``return_max``, (out, lse, max_scores)."""
    refuse_torch_func("flex_attention")
    B, H, Sq = query.shape[:3]
    Skv = key.shape[2]
    tables = tables_from_block_mask(block_mask, Sq, Skv, query.device)
    mask_mod = block_mask.mask_mod if block_mask is not None else None
    kern, buffers = _mod_call(score_mod, mask_mod, position_extents(B, H, Sq, Skv))
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    layout = _layout([(0, 1, 2, 0, kern, tables, (0, len(buffers)), 0, None)], 3, 1)
    res = attention_op(layout, _meta(scale, kernel_options), [query.contiguous(), key.contiguous(), value.contiguous()],
                       _tables_list(tables), buffers)
    return results_of(res, 1, return_max)


def _static(*sizes) -> tuple:
    """Integers as plain Python ints.  Under dynamic shapes -- what torch.compile turns to once a
    function sees a second sequence length, or with dynamic=True -- sizes are symbolic, but the
    block masks built once per shape outside the trace need their values: formatting them makes
    dynamo specialize the graph to these values (one guard each), so a new length compiles anew,
    as with dynamic=False.  flex_attention needs no such values and stays dynamic."""
    return tuple(int(x) for x in ",".join(f"{int(n)}" for n in sizes).split(","))


@torch.compiler.assume_constant_result
def _structure_name(S_o: int, S_p: int, device: str) -> str:
    """The EBT structure mask of a shape (block_mask=None), built once outside the trace."""
    from .kernels.ebt import structure_mask

    return _stash(f"structure:{S_o}:{S_p}:{device}", lambda: structure_mask(S_o, S_p, torch.device(device)))


def ebt_attention_compiled(q_o, k_o, v_o, q_p, k_p, v_p, score_mod, block_mask, scale, kernel_options):
    """flex_ebt_attention's Triton path as custom ops: (out_o, out_p, lse_o, lse_p).  The passes are
    kernels/ebt.py's, both with one kernel module and one slice of captured tensors, each stream's
    in an op of its own."""
    from .kernels.ebt import _frame_extents

    refuse_torch_func("flex_ebt_attention")
    B, H, S_o = q_o.shape[:3]
    S_p = q_p.shape[2]
    if block_mask is None:
        block_mask = getattr(_THIS, _structure_name(*_static(S_o, S_p), str(q_o.device)))
    tables_o = tables_from_block_mask(block_mask.observed, S_o, S_o, q_o.device)
    tables_p = tables_from_block_mask(block_mask.predicted, S_p, S_o, q_o.device)
    kern, buffers = _mod_call(score_mod, block_mask.mask_mod, _frame_extents(B, H, S_o, S_p), True)
    scale = q_o.shape[-1] ** -0.5 if scale is None else float(scale)
    q_o, k_o, v_o, q_p, k_p, v_p = (x.contiguous() for x in (q_o, k_o, v_o, q_p, k_p, v_p))
    b, meta = (0, len(buffers)), _meta(scale, kernel_options)
    # One op per stream, as the eager path's one autograd node per row group: the observed outputs
    # do not depend on the predicted stream, and the graph must say so.
    out_o, lse_o, _ = attention_op(_layout([(0, 1, 2, 0, kern, tables_o, b, 0, None)], 3, 1), meta,
                                [q_o, k_o, v_o], _tables_list(tables_o), buffers)
    out_p, lse_p, _ = attention_op(_layout([(0, 1, 2, 0, kern, tables_p, b, S_o - S_p + 1, (3, 4))], 5, 1), meta,
                                [q_p, k_o, v_o, k_p, v_p], _tables_list(tables_p) + [block_mask.own_keep_for(B, H)],
                                buffers)
    return out_o, out_p, lse_o, lse_p


@torch.compiler.assume_constant_result
def _region_name(M: int, N: int, dist_threshold, causal: bool, device: str, block_mask) -> str:
    """Piecewise attention's (user mask, near mask, far mask), built once outside the trace (the
    user's mask is held, so its id is not reused while stashed)."""
    from .piecewise import region_block_masks

    key = f"regions:{M}:{N}:{dist_threshold!r}:{causal}:{device}:{id(block_mask)}"
    return _stash(key, lambda: (block_mask, *region_block_masks(M, N, dist_threshold, causal, torch.device(device),
                                                                block_mask)))


def piecewise_attention_compiled(q1, k1, q2, k2, v, dist_threshold, causal, scale, score_mod, block_mask,
                                 kernel_options):
    """piecewise_attention as custom ops: the plan of piecewise.py -- the near and far passes, each
    with its own mask_mod's kernels and captured tensors, merged into one row group."""
    refuse_torch_func("piecewise_attention")
    B, H, M = q1.shape[:3]
    N = k1.shape[2]
    # the regions depend on the threshold only through ceil(w): distances are integers
    _, near, far = getattr(_THIS, _region_name(*_static(M, N, math.ceil(dist_threshold)), causal, str(q1.device),
                                               block_mask))
    extents = position_extents(B, H, M, N)
    t_near = tables_from_block_mask(near, M, N, q1.device)
    t_far = tables_from_block_mask(far, M, N, q1.device)
    k_near, b_near = _mod_call(score_mod, near.mask_mod, extents)
    k_far, b_far = _mod_call(score_mod, far.mask_mod, extents)
    scale = q1.shape[-1] ** -0.5 if scale is None else float(scale)
    nn, nf = len(b_near), len(b_far)
    layout = _layout([(0, 1, 4, 0, k_near, t_near, (0, nn), 0, None),
                      (2, 3, 4, 0, k_far, t_far, (nn, nn + nf), 0, None)], 5, 1)
    out = attention_op(layout, _meta(scale, kernel_options), [x.contiguous() for x in (q1, k1, q2, k2, v)],
                       _tables_list(t_near) + _tables_list(t_far), b_near + b_far)[0]
    return out
