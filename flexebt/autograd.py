"""The autograd chain of the kernel path: Attention -> AttentionBackward -> AttentionDoubleBackward.

One chain for every family: a call is an ``AttentionPlan`` of kernel passes (kernels/plan.py)
whose forward, backward, double backward and JVP are written once.  ``Attention.backward`` calls
``AttentionBackward.apply``, so the backward is itself a differentiable op.  The backward of ``*Backward`` runs the fused
double-backward kernels where they apply (see ``_fused_double_backward``); elsewhere it recomputes
the first-order gradients with the dense reference under autograd and differentiates those: exact
at every order, but O(S^2) memory.  Nothing is ever dropped silently.

Captured tensors of the mods are extra inputs of the Functions, so gradients reach them.
Kernel launches run with functorch dispatch off: under ``torch.func`` the Functions receive plain
tensors, but tensors allocated inside would be wrapped, and Triton needs plain storage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Mapping
from typing import Callable, Optional

import torch
from torch import Tensor

from .kernels.plan import AttentionPlan, plan_backward, plan_double_backward, plan_forward, plan_jvp


def _alias(x: Tensor) -> Tensor:
    """A differentiable stand-in for ``x``: gradients taken w.r.t. it count only the paths
    through it, while results keep their graph back to ``x`` (for the next order)."""
    return x.view_as(x) if x.requires_grad else x.detach().requires_grad_()


@contextlib.contextmanager
def _captured_swapped(mods: list, mapping: dict):
    """Temporarily replace captured tensors (by identity, ``mapping``: id -> tensor) in the
    closures, nested closures, lists and named globals of ``mods``."""
    undo = []
    seen = set()

    def swap_in(container, key, val):
        new = mapping.get(id(val)) if isinstance(val, torch.Tensor) else None
        if new is not None:
            undo.append((container, key, val))
            if isinstance(container, dict) or isinstance(container, list):
                container[key] = new
            else:
                container.cell_contents = new
            return True
        return False

    def walk(fn):
        if not isinstance(fn, types.FunctionType) or id(fn) in seen:
            return
        seen.add(id(fn))
        for cell in fn.__closure__ or ():
            try:
                val = cell.cell_contents
            except ValueError:
                continue
            if not swap_in(cell, None, val):
                if isinstance(val, list):
                    for j, item in enumerate(val):
                        swap_in(val, j, item)
                walk(val)
        for name in fn.__code__.co_names:
            val = fn.__globals__.get(name)
            if not swap_in(fn.__globals__, name, val) and not (getattr(val, "__module__", "") or "").startswith("torch"):
                walk(val)

    try:
        for m in mods:
            walk(m)
        missing = set(mapping) - {id(val) for _, _, val in undo}
        if missing:
            raise NotImplementedError(_UNSWAPPABLE)
        yield
    finally:
        for container, key, val in reversed(undo):
            if isinstance(container, (dict, list)):
                container[key] = val
            else:
                container.cell_contents = val


_UNSWAPPABLE = (
    "flexebt: this gradient runs through the dense reference (a third-order derivative with a captured tensor that "
    "needs a gradient, or a batched backward: autograd.grad(..., is_grads_batched=True)), which must read each such "
    "tensor through a stand-in; the mod reads one where it cannot be replaced (an object's attribute, a tuple, a "
    "default argument, a functools.partial, a dict, or a copy made for an expanded view). Capture the tensor "
    "directly in the mod's closure, a list or a module global, or pass kernel_options={'BACKEND': 'REFERENCE'} to "
    "the attention call.")


def _check_only_stand_ins_read(reference: Callable, mods, primals: list, originals: list, outs,
                               stand_ins_detached: bool) -> None:
    """After the reference ran with captured tensors swapped for stand-ins: its outputs must not
    depend on the originals.  A read the swap did not reach (the same tensor also read through an
    object's attribute) would leave part of the gradient out -- refused, never a wrong number.
    With detached stand-ins and inputs, ``outs`` shows it directly (the engine runs nothing when
    no path leads to the originals); stand-ins that are views of the originals (create_graph)
    depend on them by design, so a probe run with detached ones looks instead."""
    if not originals:
        return
    if not stand_ins_detached:
        with torch.enable_grad():
            probe = [b.detach().requires_grad_() for b in originals]
            with _captured_swapped(list(mods), {id(b): a for b, a in zip(originals, probe)}):
                outs = reference(*[x.detach() for x in primals])
    outs = [o for o in outs if o is not None and o.requires_grad]
    if not outs:
        return
    deps = torch.autograd.grad(outs, originals, [torch.zeros_like(o) for o in outs], allow_unused=True,
                               retain_graph=True)
    if any(d is not None for d in deps):
        raise NotImplementedError(_UNSWAPPABLE)


def _swapped_reference(reference: Callable, mods, primals: list, buffers: list, create_graph: bool):
    """The reference's outputs over stand-ins: ``(p, grad_bufs, outs)``, where ``p`` stand in for
    ``primals`` and ``grad_bufs`` for the captured tensors that need a gradient (swapped into the
    mods while the reference runs).  Without ``create_graph`` the stand-ins are detached leaves;
    with it, aliases (``_alias``) that keep the results' graph back to the real tensors.  A read
    of an original that no stand-in reached is refused (``_check_only_stand_ins_read``).  Call
    with grad mode on."""
    indep = _alias if create_graph else (lambda x: x.detach().requires_grad_())
    need = [b for b in buffers if b.requires_grad]
    p = [indep(x) for x in primals]
    grad_bufs = [indep(b) for b in need]
    with _captured_swapped(list(mods), {id(b): a for b, a in zip(need, grad_bufs)}):
        outs = reference(*p)
    _check_only_stand_ins_read(reference, mods, primals, need, outs, not create_graph)
    return p, grad_bufs, outs


def _reference_double_backward(reference: Callable, primals: list, buffers: list, cts: list, grad_cts: list,
                               create_graph: bool = False, mods: tuple = ()):
    """Backward of a first-order backward, by autograd through the dense reference.

    ``reference(*primals)`` returns the forward outputs; ``cts`` are the cotangents the first-order
    backward received for them (None: none); ``grad_cts`` are the cotangents of its results, the
    gradients of ``primals`` then of the buffers that require grad.  Returns the gradients of
    ``primals``, of ``cts`` and of ``buffers`` (None where there are none).  The forward outputs
    themselves (saved by the first backward) are recomputed here, so the total derivative already
    flows to ``primals`` and they get no gradient of their own.

    Every input enters as an independent variable: the cotangents usually depend on the primals
    and buffers themselves (dout = dL/dout), and a derivative w.r.t. a primal must not run
    through them.  Without ``create_graph`` they are detached leaves.  With it (a third order
    follows) they are aliases (``_alias``), so the results keep their graph to the real inputs;
    the captured tensors that need gradients are swapped for aliases inside ``mods`` (the
    score_mod / mask_mod that ``reference`` calls) while it runs.
    """
    indep = _alias if create_graph else (lambda x: x.detach().requires_grad_())
    with torch.enable_grad():
        p, grad_bufs, outs = _swapped_reference(reference, mods, primals, buffers, create_graph)
        c = [None if t is None else indep(t) for t in cts]
        pairs = [(o, ct) for o, ct in zip(outs, c) if ct is not None]
        wrt = p + grad_bufs
        first = torch.autograd.grad([o for o, _ in pairs], wrt, [ct for _, ct in pairs], create_graph=True,
                                    allow_unused=True)
        sel = [(f, g) for f, g in zip(first, grad_cts) if f is not None and g is not None and f.requires_grad]
        targets = p + [x for x in c if x is not None] + grad_bufs
        res = (torch.autograd.grad([f for f, _ in sel], targets, [g for _, g in sel], allow_unused=True,
                                   create_graph=create_graph) if sel else [None] * len(targets))
    res = list(res)
    g_primals = res[:len(p)]
    rest = res[len(p):]
    g_cts = [None if x is None else rest.pop(0) for x in c]
    g_bufs = [rest.pop(0) if b.requires_grad else None for b in buffers]
    return g_primals, g_cts, g_bufs


def _one_level(t):
    """Under torch.func.jvp the jvp rule sees tensors wrapped by the jvp level.  Unwrap exactly
    that level when it holds a plain tensor; refuse anything nested (another transform or an
    outer autograd graph underneath) rather than drop its terms."""
    if t is None or not torch._C._functorch.is_functorch_wrapped_tensor(t):
        return t
    inner = torch._C._functorch.get_unwrapped(t)
    if torch._C._functorch.is_functorch_wrapped_tensor(inner) or inner.requires_grad:
        raise NotImplementedError(
            "flexebt: forward-mode AD of the Triton kernels nested inside another transform or an autograd graph "
            "is not supported yet; use kernel_options={'BACKEND': 'REFERENCE'} for this call.")
    return inner


def _check_jvp_inputs(tensors, buffer_tangents):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        # The kernel's tangents carry no graph: reverse mode over them would silently lose terms.
        raise NotImplementedError(
            "flexebt: reverse-mode AD through forward-mode tangents of the Triton kernels is not supported yet; "
            "use kernel_options={'BACKEND': 'REFERENCE'} for this call (or torch.no_grad around the JVP).")
    if any(t is not None for t in buffer_tangents):
        raise NotImplementedError("flexebt: forward-mode AD with tangents on tensors captured by a score_mod is not "
                                  "supported by the kernels yet; use kernel_options={'BACKEND': 'REFERENCE'}.")
    if any(t is not None and not torch._C._has_storage(t) for t in tensors):
        # e.g. torch.autograd.functional.jacobian(..., vectorize=True, strategy="forward-mode"): torch's own vmap
        # batches the tangents, and the kernels have no batching rule
        raise NotImplementedError(
            "flexebt: batched tangents (torch.autograd.functional.jacobian / hessian with vectorize=True and "
            "strategy='forward-mode') are not supported by the kernels' forward-mode AD; use the default "
            "strategy='reverse-mode', or kernel_options={'BACKEND': 'REFERENCE'} for this call.")


@dataclasses.dataclass
class AttentionCall:
    """Everything about one kernel call that is not a tensor."""

    plan: AttentionPlan
    scale: float
    options: Optional[Mapping]  # kernel_options as a KernelOptions (tile overrides), or None
    # (*inputs) -> outputs then lse: the dense math of the same call (reference/), which the
    # double backward falls back to where the fused kernels do not apply, and the third order
    # differentiates
    reference: Callable
    mods: tuple = ()  # the score_mod / mask_mods the reference reads (third order swaps their captured tensors)
    return_max: bool = False  # apply_attention also returns each row group's max_scores (no gradient)
    unwanted: frozenset = frozenset()  # inputs (positions) whose first-order gradient nobody asked for

    @property
    def n_inputs(self) -> int:
        return self.plan.n_inputs

    @property
    def n_outputs(self) -> int:
        return 2 * self.plan.n_rows  # the differentiable results: outputs then lse

    @property
    def n_results(self) -> int:
        return 3 * self.plan.n_rows  # outputs, lse, then msum (each row's max and sum; no gradient)


def _zeros_for_none(xs, likes) -> list:
    return [torch.zeros_like(y) if x is None else x for x, y in zip(xs, likes)]


class Attention(torch.autograd.Function):
    """Forward: ``apply(call, *inputs, *captured)`` -> the outputs, lse and msum of every row
    group (kernels/plan.py; msum has no gradient and feeds the backward)."""

    @staticmethod
    def forward(call: AttentionCall, *xs):
        n = call.n_inputs
        with torch._C._DisableFuncTorch():
            return tuple(plan_forward(call.plan, list(xs[:n]), list(xs[n:]), call.scale, call.options))

    @staticmethod
    def setup_context(ctx, inputs, output):
        call, xs = inputs[0], inputs[1:]
        ctx.call = call
        ctx.set_materialize_grads(False)  # unused outputs (usually the lse) arrive as None, not zeros to read
        ctx.mark_non_differentiable(*output[call.n_outputs:])  # msum (and so max_scores): no gradient
        ctx.save_for_backward(*xs[:call.n_inputs], *output, *xs[call.n_inputs:])
        ctx.jvp_inputs = xs

    @staticmethod
    def jvp(ctx, _call, *tangents):
        """Forward mode, fused: one pass per kernel pass gives the outputs' tangents (torch.func.jvp,
        torch.autograd.forward_ad).  Tangents of captured tensors need the reference."""
        call: AttentionCall = ctx.call
        n = call.n_inputs
        xs = [_one_level(t) for t in ctx.jvp_inputs]  # captured tensors arrive wrapped too
        tans = [_one_level(t) for t in tangents[:n]]
        _check_jvp_inputs(xs[:n] + tans, tangents[n:])
        with torch._C._DisableFuncTorch():
            res = plan_jvp(call.plan, xs[:n], tans, xs[n:], call.scale, call.options)
        res += [None] * (call.n_results - call.n_outputs)  # msum: non-differentiable, no tangent (as torch requires)
        return tuple(res)

    @staticmethod
    def backward(ctx, *cts):
        call: AttentionCall = ctx.call
        n, m, s = call.n_inputs, call.n_outputs, call.n_results
        cts = cts[:m]  # (msum is not differentiable)
        saved = ctx.saved_tensors
        ins, outs, buffers = saved[:n], list(saved[n:n + s]), saved[n + s:]
        if all(c is None for c in cts):
            # Reached in a double backward when the outputs feed nothing that needs a gradient:
            # the engine still visits this node; there is nothing to compute.
            return (None,) * (1 + n + len(buffers))
        if _any_batched(cts):
            return (None, *_reference_vjp(call, ins, buffers, cts))  # is_grads_batched=True
        r = m // 2
        cts = _zeros_for_none(cts[:r], outs[:r]) + list(cts[r:])  # an absent lse cotangent stays None
        # The outputs enter the backward as constants: its backward (AttentionDoubleBackward or the
        # reference) differentiates the total dependence on the inputs, so a graph edge back to this
        # node would only add a first-order pass on zero cotangents.  (Without a graph to build --
        # grad mode off -- there is no edge to cut.)
        if torch.is_grad_enabled():
            outs = [o.detach() for o in outs]
        unwanted = _unwanted_inputs(ctx, call.plan)
        if unwanted:
            # e.g. the observed keys, when a gradient is taken with respect to the predicted stream
            # only: their key pass is skipped.  The engine drops what is returned for them.
            call = dataclasses.replace(call, unwanted=unwanted)
        grads = AttentionBackward.apply(call, *ins, *outs, *cts, *buffers)
        return (None, *grads)


def _any_batched(tensors) -> bool:
    """Whether a cotangent has no storage of its own for a kernel to read: batched by
    ``autograd.grad(..., is_grads_batched=True)`` (torch's own vmap over the backward), which the
    dense reference then serves.  torch.func.vmap over a vjp of the kernels is refused: the
    kernels have no batching rule, and the reference cannot run inside that transform from here."""
    batched = False
    for t in tensors:
        if t is None:
            continue
        if torch._C._functorch.is_batchedtensor(t):
            batched = "func"
        elif not torch._C._has_storage(t) and not torch._C._functorch.is_functorch_wrapped_tensor(t):
            batched = batched or "legacy"  # torch's own vmap (torch._vmap_internals) keeps no storage
    # (torch.func.grad's wrapped cotangents are not batched: torch's Function.apply unwraps them)
    if batched == "func":
        raise NotImplementedError(
            "flexebt: torch.func.vmap over the backward of the Triton kernels (torch.func.jacrev, or vmap of a vjp "
            "function) is not "
            "supported: the kernels have no batching rule. Pass kernel_options={'BACKEND': 'REFERENCE'} to the "
            "attention call (dense math, O(S^2) memory), use torch.func.jacfwd, or batch the cotangents with "
            "torch.autograd.grad(..., is_grads_batched=True), which the kernels' backward supports.")
    return bool(batched)


def _reference_vjp(call: AttentionCall, ins, buffers, cts) -> list:
    """First-order gradients by autograd through the dense reference, for cotangents the kernels
    cannot take: batched ones (the kernels have no batching rule).  Same values, O(S^2) memory.
    Returns the gradients of the inputs, then of the captured tensors (None where none flows);
    with grad mode on (``create_graph``) they keep their graph back to the inputs, through
    aliases (``_alias``; the captured tensors swapped for theirs inside the mods)."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        p, grad_bufs, outs = _swapped_reference(call.reference, call.mods, list(ins), buffers, create_graph)
        pairs = [(o, c) for o, c in zip(outs, cts) if c is not None]
        res = list(torch.autograd.grad([o for o, _ in pairs], p + grad_bufs, [c for _, c in pairs],
                                       allow_unused=True, create_graph=create_graph))
    g_ins, g_bufs = res[:len(p)], res[len(p):]
    return g_ins + [g_bufs.pop(0) if b.requires_grad else None for b in buffers]


def _unwanted_inputs(ctx, plan: AttentionPlan) -> frozenset:
    """The inputs (positions) whose gradient this backward's graph task will not use: those that
    need none, and those of the key-side inputs that ``unused_by_engine`` finds.  Under torch.func
    transforms, every input that needs a gradient is wanted."""
    need = ctx.needs_input_grad[1:plan.n_inputs + 1]
    out = {i for i, x in enumerate(need) if not x}
    keys = plan.key_inputs - out
    if not keys or torch._C._are_functorch_transforms_active():
        return frozenset(out)
    try:
        edges = ctx.next_functions  # one edge per tensor input (the call is not one)
    except AttributeError:  # not run by the engine (e.g. a direct call): all are wanted
        return frozenset(out)
    return frozenset(out | unused_by_engine(edges, keys))


def unused_by_engine(edges, positions) -> set:
    """Of the inputs at ``positions`` (their ``next_functions`` edges), those whose graph the engine
    will not run in the backward under way (``autograd.grad`` with respect to other tensors): the
    key-side inputs, which decide whether a key pass runs.  Only non-leaves are asked."""
    out = set()
    for i in positions:
        node = edges[i][0]
        # A leaf (an AccumulateGrad node) counts as wanted: when autograd.grad was asked for it, the
        # engine raises rather than answer, and raising costs more than the key pass saves at small
        # sizes.  Keys and values computed in the model (projections) are never leaves.
        if node is None or hasattr(node, "variable"):
            continue
        try:
            if not torch._C._will_engine_execute_node(node):
                out.add(i)
        except (RuntimeError, AttributeError):  # no engine task here, or a torch without the query: wanted
            pass
    return out


class AttentionBackward(torch.autograd.Function):
    """``apply(call, *inputs, *results, *cotangents, *captured)`` -> gradients of the inputs, then
    of the captured tensors (zeros where none flows).  ``results``: the forward's outputs, lse and
    msum; cotangents of the outputs and lse, those of the lse may be None."""

    @staticmethod
    def forward(call: AttentionCall, *xs):
        n, m, s = call.n_inputs, call.n_outputs, call.n_results
        ins, outs, cts, buffers = xs[:n], xs[n:n + s], xs[n + s:n + s + m], xs[n + s + m:]
        with torch._C._DisableFuncTorch():
            grads, gbuf = plan_backward(call.plan, list(ins), list(outs), list(cts), list(buffers), call.scale,
                                        call.options, call.unwanted)
        return (*_zeros_for_none(grads, ins), *_zeros_for_none(gbuf, buffers))

    @staticmethod
    def setup_context(ctx, inputs, output):
        call, xs = inputs[0], inputs[1:]
        n, m, s = call.n_inputs, call.n_outputs, call.n_results
        ctx.call = call
        cts = xs[n + s:n + s + m]
        ctx.has_ct = [c is not None for c in cts]
        ctx.save_for_backward(*xs[:n + s], *[c if c is not None else torch.empty(0) for c in cts], *xs[n + s + m:])

    @staticmethod
    def backward(ctx, *gouts):
        call: AttentionCall = ctx.call
        n, m, s = call.n_inputs, call.n_outputs, call.n_results
        saved = ctx.saved_tensors
        ins, outs, buffers = list(saved[:n]), list(saved[n:n + s]), saved[n + s + m:]
        cts = [c if has else None for c, has in zip(saved[n + s:n + s + m], ctx.has_ct)]
        gcts, gbuf_cts = gouts[:n], gouts[n:]
        if _fused_double_backward(buffers) and not _any_batched(gouts):
            # Fused double-backward kernels (O(S) memory), captured tensors' terms included.
            res = AttentionDoubleBackward.apply(call, *ins, *cts, *_zeros_for_none(gcts, ins), *outs, *buffers,
                                                *gbuf_cts)
            g_ins, g_cts, g_bufs = res[:n], res[n:n + m], res[n + m:]
            g_cts = [g if has else None for g, has in zip(g_cts, ctx.has_ct)]
            g_bufs = [g if b.requires_grad else None for g, b in zip(g_bufs, buffers)]
            return (None, *g_ins, *([None] * s), *g_cts, *g_bufs)
        # create_graph when this double backward is itself differentiated (third order)
        g_ins, g_cts, g_bufs = _reference_double_backward(
            call.reference, ins, buffers, cts, list(gcts) + [g for g, b in zip(gbuf_cts, buffers) if b.requires_grad],
            create_graph=torch.is_grad_enabled(), mods=call.mods)
        return (None, *g_ins, *([None] * s), *g_cts, *g_bufs)


def _fused_double_backward(buffers) -> bool:
    """The fused double-backward kernels serve every score_mod the codegen accepts, captured
    tensors with gradients included.  Their own backward (third order) is autograd through the
    dense reference, which has no captured-tensor terms: when a captured tensor needs a gradient
    and this double backward builds a graph (create_graph=True), the reference double backward
    runs instead."""
    return not (torch.is_grad_enabled() and any(b.requires_grad for b in buffers))


class AttentionDoubleBackward(torch.autograd.Function):
    """Fused double backward.  ``apply(call, *inputs, *cotangents, *gcts, *results, *captured,
    *bcts)`` (``results``: the forward's outputs, lse and msum): given the first-order cotangents
    (those of the lse may be None) and the cotangents ``gcts`` of the inputs' first-order
    gradients (``bcts``: of the captured tensors'; None: zero), returns the gradients of the inputs, of the cotangents (zeros for an absent lse
    cotangent) and of the captured tensors (zeros where none flows): total derivatives, the saved
    outputs being constants.  No S x S tensor exists.  Third order: autograd through the reference."""

    @staticmethod
    def forward(call: AttentionCall, *xs):
        n, m, s = call.n_inputs, call.n_outputs, call.n_results
        ins, cts, gcts, outs = xs[:n], xs[n:n + m], xs[n + m:2 * n + m], xs[2 * n + m:2 * n + m + s]
        rest = xs[2 * n + m + s:]
        nb = len(rest) // 2  # the captured tensors, then their gradients' cotangents
        buffers, bcts = rest[:nb], rest[nb:]
        with torch._C._DisableFuncTorch():
            g_ins, g_cts, g_bufs = plan_double_backward(call.plan, list(ins), list(outs), list(cts), list(gcts),
                                                        list(buffers), list(bcts), call.scale, call.options)
        return (*_zeros_for_none(g_ins, ins), *_zeros_for_none(g_cts, outs[:m]), *_zeros_for_none(g_bufs, buffers))

    @staticmethod
    def setup_context(ctx, inputs, output):
        call, xs = inputs[0], inputs[1:]
        n, m, s = call.n_inputs, call.n_outputs, call.n_results
        ctx.call = call
        ctx.n_extra = len(xs) - 2 * n - m - s
        cts = xs[n:n + m]
        ctx.has = [c is not None for c in cts]
        ctx.save_for_backward(*xs[:n], *[c if c is not None else torch.empty(0) for c in cts], *xs[n + m:2 * n + m])

    @staticmethod
    def backward(ctx, *gouts):
        """Third order: autograd through the reference double backward."""
        call: AttentionCall = ctx.call
        n, m = call.n_inputs, call.n_outputs
        saved = ctx.saved_tensors
        with torch.enable_grad():
            ins = [x.detach().requires_grad_() for x in saved[:n]]
            cts = [x.detach().requires_grad_() if h else None for x, h in zip(saved[n:n + m], ctx.has)]
            gcts = [x.detach().requires_grad_() for x in saved[n + m:2 * n + m]]
            g_ins, g_cts, _ = _reference_double_backward(call.reference, ins, [], cts, gcts, create_graph=True)
            results = list(g_ins) + list(g_cts)
            pairs = [(r, g) for r, g in zip(results, gouts) if r is not None and g is not None and r.requires_grad]
            wrt = ins + [c for c in cts if c is not None] + gcts
            grads = list(torch.autograd.grad([r for r, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                         if pairs else [None] * len(wrt))
        g_ins3, rest = grads[:n], grads[n:]
        g_cts3 = [rest.pop(0) if h else None for h in ctx.has]
        return (None, *g_ins3, *g_cts3, *rest[:n], *([None] * call.n_results), *([None] * ctx.n_extra))


def apply_attention(call: AttentionCall, ins: list, buffers: list) -> tuple:
    """The call's outputs, then their lse (then, with ``call.return_max``, their max_scores):
    ``Attention.apply``, one node per row group where the row groups read different inputs
    (``AttentionPlan.row_groups``), so that autograd sees which outputs depend on which inputs."""
    groups = call.plan.row_groups
    if groups is None:
        res = Attention.apply(call, *ins, *buffers)
    else:
        per_group = [Attention.apply(_row_group_call(call, plan, inputs, r, ins), *[ins[i] for i in inputs],
                                     *buffers) for r, (plan, inputs) in enumerate(groups)]
        res = tuple(g[j] for j in range(len(per_group[0])) for g in per_group)  # outputs, lse, msum
    return results_of(res, call.plan.n_rows, call.return_max)


def results_of(res, n_rows: int, return_max: bool) -> tuple:
    """What a caller sees of the kernels' results (outputs, lse, msum): the outputs and lse, then
    with ``return_max`` each row's largest kept modified score (msum's first column)."""
    if not return_max:
        return tuple(res[:2 * n_rows])
    return (*res[:2 * n_rows], *(ms[..., 0].detach().contiguous() for ms in res[2 * n_rows:3 * n_rows]))


def _row_group_call(call: AttentionCall, plan: AttentionPlan, inputs: tuple, r: int, ins: list) -> AttentionCall:
    """The call of row group ``r`` alone.  Its dense reference is the whole call's with the other
    inputs held constant (the group's outputs do not depend on them) and this group's outputs."""
    n_rows = call.plan.n_rows

    def reference(*xs):
        full = [x.detach() for x in ins]
        for j, i in enumerate(inputs):
            full[i] = xs[j]
        res = call.reference(*full)
        return res[r], res[n_rows + r]

    return dataclasses.replace(call, plan=plan, reference=reference)


# Every Function here is set up the same way (eager_function): apply without torch's per-call
# argument binding, and backward / jvp rules that dynamo leaves alone.
import inspect as _inspect  # noqa: E402

from torch.autograd import forward_ad as _forward_ad  # noqa: E402

try:
    from torch._functorch.utils import unwrap_dead_wrappers as _unwrap_dead_wrappers
except ImportError:  # pragma: no cover - older torch layouts
    def _unwrap_dead_wrappers(args):
        return args


def _direct_apply(cls, *args):
    """``Function.apply`` without its per-call ``inspect`` binding of default arguments: our
    forwards take every argument positionally and have no defaults, so the binding is the
    identity (it cost ~15 us per apply, a quarter of flexebt's Python time per flex fwd+bwd).
    Inside torch.func transforms torch's own apply runs (it dispatches to custom_function_call).
    Where nothing can be recorded -- grad mode off (a first-order backward without create_graph
    runs so), no forward-AD level, no transform -- apply would only run ``forward``: call it."""
    if not _SKIPPED_BY_DYNAMO[0]:
        _mark_skipped_by_dynamo()
    if torch._C._are_functorch_transforms_active():
        return torch.autograd.Function.apply.__func__(cls, *args)
    if not torch.is_grad_enabled() and _forward_ad._current_level < 0:
        return cls.forward(*args)
    return super(torch.autograd.Function, cls).apply(*_unwrap_dead_wrappers(args))


def eager_function(fn):
    """Finish an autograd.Function of the kernel path (decorator)."""
    # torch's apply looks up inspect.signature(forward) inside transforms; precompute it
    fn.forward.__signature__ = _inspect.signature(fn.forward)
    fn.apply = classmethod(_direct_apply)
    # The backward (and jvp) rules launch kernels eagerly.  When autograd runs them from inside a
    # torch.compile'd frame (autograd.grad in a compiled function, after its graph break), dynamo
    # would otherwise try to trace them -- into Triton's launcher -- and a traced autograd.Function
    # backward is not differentiable again (torch drops its second-order terms silently).  So dynamo
    # skips them: marked before the first apply of any kernel Function (importing dynamo costs about
    # as much as importing torch, so `import flexebt` does not pay it), or at once after that.
    _EAGER_FUNCTIONS.append(fn)
    if _SKIPPED_BY_DYNAMO[0]:
        _skip_in_dynamo(fn)
    return fn


_EAGER_FUNCTIONS: list = []
_SKIPPED_BY_DYNAMO = [False]


def _skip_in_dynamo(fn) -> None:
    fn.backward = staticmethod(torch.compiler.disable(fn.backward))
    if "jvp" in fn.__dict__:
        fn.jvp = staticmethod(torch.compiler.disable(fn.jvp))


def _mark_skipped_by_dynamo() -> None:
    for fn in _EAGER_FUNCTIONS:
        _skip_in_dynamo(fn)
    _SKIPPED_BY_DYNAMO[0] = True


for _fn in (Attention, AttentionBackward, AttentionDoubleBackward):
    eager_function(_fn)
