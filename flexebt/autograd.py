"""The autograd chain of the kernel path: Attention -> AttentionBackward -> (double backward).

``FlexAttention.backward`` calls ``FlexAttentionBackward.apply`` (likewise for EBT), so the
backward is itself a differentiable op.  The backward of ``*Backward`` runs the fused
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
from typing import Callable, Optional

import torch
from torch import Tensor

from .codegen.source import ModKernels
from .kernels.flex import BlockTables, flex_backward, flex_forward
from .reference.ebt import ebt_attention_reference
from .reference.flex import flex_attention_reference


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
            raise NotImplementedError(
                "flexebt: a tensor that needs a gradient is captured by the score_mod where it cannot be swapped "
                "for the third-order computation (inside a tuple?); capture it directly in the closure, a list or "
                "a module global.")
        yield
    finally:
        for container, key, val in reversed(undo):
            if isinstance(container, (dict, list)):
                container[key] = val
            else:
                container.cell_contents = val


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
        p = [indep(x) for x in primals]
        c = [None if t is None else indep(t) for t in cts]
        grad_bufs = [indep(b) for b in buffers if b.requires_grad]
        swap = {id(b): a for b, a in zip([b for b in buffers if b.requires_grad], grad_bufs)}
        with _captured_swapped(list(mods), swap):
            outs = reference(*p)
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


@dataclasses.dataclass
class FlexCall:
    """Everything about one single-stream call that is not a tensor input."""

    kernels: ModKernels
    tables: BlockTables
    score_mod: Optional[Callable]
    block_mask: object
    scale: float
    n_buffers: int
    options: Optional[dict] = None  # kernel_options (tile overrides)


class FlexAttention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, call: FlexCall, *buffers):
        with torch._C._DisableFuncTorch():
            return flex_forward(call.kernels, q, k, v, call.scale, call.tables, list(buffers), call.options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, call, *buffers = inputs
        out, lse = output
        ctx.call = call
        ctx.set_materialize_grads(False)  # an unused lse gets None, not a zeros tensor to read
        ctx.save_for_backward(q, k, v, out, lse, *buffers)
        ctx.jvp_inputs = (q, k, v, buffers)

    @staticmethod
    def jvp(ctx, dq, dk, dv, _call, *dbuf):
        """Forward mode, fused: one pass gives out, lse and their tangents (torch.func.jvp,
        torch.autograd.forward_ad).  Tangents of captured tensors need the reference."""
        from .kernels.flex import flex_jvp

        q, k, v = (_one_level(t) for t in ctx.jvp_inputs[:3])
        buffers = [_one_level(b) for b in ctx.jvp_inputs[3]]  # captured tensors arrive wrapped too
        dq, dk, dv = (_one_level(t) for t in (dq, dk, dv))
        _check_jvp_inputs((q, k, v, dq, dk, dv), dbuf)
        z = lambda t, like: torch.zeros_like(like) if t is None else t  # noqa: E731
        call: FlexCall = ctx.call
        with torch._C._DisableFuncTorch():
            _, _, d_out, d_lse = flex_jvp(call.kernels, q, k, v, z(dq, q), z(dk, k), z(dv, v), call.scale,
                                          call.tables, list(buffers), call.options)
        return d_out, d_lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *buffers = ctx.saved_tensors
        if dout is None and dlse is None:
            # Reached in a double backward when out/lse feed nothing that needs a gradient:
            # the engine still visits this node; there is nothing to compute.
            return (None,) * (4 + len(buffers))
        if dout is None:
            dout = torch.zeros_like(out)
        # out and lse enter the backward as constants: its backward (FlexAttentionDoubleBackward
        # or the reference) differentiates the total dependence on q, k, v, so a graph edge
        # back to this node would only add a first-order pass on zero cotangents.  (Without a
        # graph to build -- grad mode off -- there is no edge to cut.)
        if torch.is_grad_enabled():
            out, lse = out.detach(), lse.detach()
        dq, dk, dv, *dbuf = FlexAttentionBackward.apply(q, k, v, out, lse, dout, dlse, ctx.call, *buffers)
        return (dq, dk, dv, None, *dbuf)


class FlexAttentionBackward(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, out, lse, dout, dlse, call: FlexCall, *buffers):
        with torch._C._DisableFuncTorch():
            dq, dk, dv, dbuf = flex_backward(call.kernels, q, k, v, out, lse, dout, dlse, call.scale, call.tables,
                                             list(buffers), call.options)
        dbuf = [torch.zeros_like(b) if g is None else g for g, b in zip(dbuf, buffers)]
        return (dq, dk, dv, *dbuf)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, out, lse, dout, dlse, call, *buffers = inputs
        ctx.call = call
        ctx.has_dlse = dlse is not None
        ctx.save_for_backward(q, k, v, out, lse, dout, dlse if dlse is not None else torch.empty(0), *buffers)

    @staticmethod
    def backward(ctx, gdq, gdk, gdv, *gdbuf):
        q, k, v, out, lse, dout, dlse, *buffers = ctx.saved_tensors
        call: FlexCall = ctx.call
        if _fused_double_backward(call.kernels, buffers):
            # Fused double-backward kernels (O(S) memory), captured tensors' terms included.
            z = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731
            gq, gk, gv, gdo, gdlse, *gbuf = FlexAttentionDoubleBackward.apply(
                q, k, v, dout, dlse if ctx.has_dlse else None, z(gdq, q), z(gdk, k), z(gdv, v), out, lse, call,
                *buffers, *gdbuf)
            gbuf = [g if b.requires_grad else None for g, b in zip(gbuf, buffers)]
            return (gq, gk, gv, None, None, gdo, gdlse if ctx.has_dlse else None, None, *gbuf)

        def reference(q, k, v):
            return flex_attention_reference(q, k, v, call.score_mod, call.block_mask, call.scale)

        gbuf_cts = [g for g, b in zip(gdbuf, buffers) if b.requires_grad]
        # create_graph when this double backward is itself differentiated (third order)
        (gq, gk, gv), (gdo, gdlse), gbuf = _reference_double_backward(
            reference, [q, k, v], buffers, [dout, dlse if ctx.has_dlse else None], [gdq, gdk, gdv] + gbuf_cts,
            create_graph=torch.is_grad_enabled(), mods=(call.score_mod,))
        return (gq, gk, gv, None, None, gdo, gdlse, None, *gbuf)


def _fused_double_backward(kernels, buffers) -> bool:
    """The fused double-backward kernels serve every score_mod the codegen accepts, captured
    tensors with gradients included.  Their own backward (third order) is the dense closed form,
    which has no captured-tensor terms: when a captured tensor needs a gradient and this double
    backward builds a graph (create_graph=True), the reference double backward runs instead."""
    return kernels.fused_second_order and not (torch.is_grad_enabled() and any(b.requires_grad for b in buffers))


class FlexAttentionDoubleBackward(torch.autograd.Function):
    """Fused double backward of single-stream attention: given (q, k, v, dout, dlse) and the
    cotangents (Gq, Gk, Gv) of (dq, dk, dv), returns the gradients of (q, k, v, dout) and of dlse
    (total derivatives: through out and lse too).  out and lse, saved by the forward, are
    constants here; no S x S tensor exists."""

    @staticmethod
    def forward(q, k, v, dout, dlse, gq, gk, gv, out, lse, call: FlexCall, *buffers_and_cts):
        """``buffers_and_cts``: the captured tensors, then the cotangents of their first-order
        gradients (None: zero).  Returns g_q, g_k, g_v, g_do, g_dlse and one gradient per
        captured tensor (zeros where none flows)."""
        from .kernels.flex import flex_double_backward

        buffers, bcts = buffers_and_cts[:call.n_buffers], buffers_and_cts[call.n_buffers:]
        with torch._C._DisableFuncTorch():
            g_q, g_k, g_v, g_do, u, gbuf = flex_double_backward(call.kernels, q, k, v, out, lse, dout, dlse, gq, gk,
                                                                gv, call.scale, call.tables, list(buffers),
                                                                call.options, list(bcts))
        gbuf = [torch.zeros_like(b) if g is None else g for g, b in zip(gbuf, buffers)]
        return (g_q, g_k, g_v, g_do, (u if dlse is not None else torch.zeros_like(lse)), *gbuf)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, dout, dlse, gq, gk, gv, _out, _lse, call, *buffers_and_cts = inputs
        ctx.call = call
        ctx.n_extra = len(buffers_and_cts)
        ctx.has_dlse = dlse is not None
        ctx.save_for_backward(q, k, v, dout, dlse if dlse is not None else torch.empty(0), gq, gk, gv)

    @staticmethod
    def backward(ctx, *gouts):
        """Third order: autograd through the dense closed form (reference/double_backward.py)."""
        from .reference.double_backward import attention_double_backward

        q, k, v, dout, dlse, gq, gk, gv = ctx.saved_tensors
        call: FlexCall = ctx.call
        with torch.enable_grad():
            ins = [x.detach().requires_grad_() for x in (q, k, v, dout)]
            dl = dlse.detach().requires_grad_() if ctx.has_dlse else None
            g = [x.detach().requires_grad_() for x in (gq, gk, gv)]
            res = attention_double_backward(*ins, dl, *g, call.score_mod, call.block_mask, call.scale)
            pairs = [(r, c) for r, c in zip(res, gouts) if c is not None and r.requires_grad]
            wrt = ins + ([dl] if dl is not None else []) + g
            grads = torch.autograd.grad([r for r, _ in pairs], wrt, [c for _, c in pairs], allow_unused=True) \
                if pairs else [None] * len(wrt)
        grads = list(grads)
        gq_, gk_, gv_, gdo_ = grads[:4]
        gdl = grads.pop(4) if dl is not None else None
        return (gq_, gk_, gv_, gdo_, gdl, grads[4], grads[5], grads[6], None, None, None, *([None] * ctx.n_extra))


@dataclasses.dataclass
class EBTCall:
    plan: object  # kernels.ebt.EBTPlan
    score_mod: Optional[Callable]
    block_mask: object
    scale: float
    options: Optional[dict] = None


class EBTAttention(torch.autograd.Function):
    @staticmethod
    def forward(q_o, k_o, v_o, q_p, k_p, v_p, call: EBTCall, *buffers):
        from .kernels.ebt import ebt_forward

        with torch._C._DisableFuncTorch():
            return ebt_forward(call.plan, q_o, k_o, v_o, q_p, k_p, v_p, call.scale, call.options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.call = inputs[6]
        ctx.n_buffers = len(inputs) - 7
        ctx.set_materialize_grads(False)  # unused outputs (usually both lse) arrive as None
        ctx.jvp_inputs = inputs[:6]
        ctx.save_for_backward(*inputs[:6], *output, *inputs[7:])

    @staticmethod
    def jvp(ctx, *tangents):
        """Forward mode, fused: one pass per stream gives the outputs' tangents."""
        from .kernels.ebt import ebt_jvp

        qkv = [_one_level(t) for t in ctx.jvp_inputs]
        tans = [_one_level(t) for t in tangents[:6]]
        _check_jvp_inputs(qkv + tans, tangents[7:])
        tans = [torch.zeros_like(x) if t is None else t for t, x in zip(tans, qkv)]
        with torch._C._DisableFuncTorch():
            return ebt_jvp(ctx.call.plan, qkv, tans, ctx.call.scale, ctx.call.options)

    @staticmethod
    def backward(ctx, do_o, do_p, dlse_o, dlse_p):
        saved = ctx.saved_tensors
        qkv, outs, buffers = saved[:6], saved[6:10], saved[10:]
        if do_o is None and do_p is None and dlse_o is None and dlse_p is None:
            return (None,) * (7 + len(buffers))  # nothing flows back (see FlexAttention.backward)
        do_o = torch.zeros_like(outs[0]) if do_o is None else do_o
        do_p = torch.zeros_like(outs[1]) if do_p is None else do_p
        # outputs enter as constants: the double backward differentiates their dependence on qkv
        outs = [o.detach() for o in outs]
        grads = EBTAttentionBackward.apply(*qkv, *outs, do_o, do_p, dlse_o, dlse_p, ctx.call, *buffers)
        return (*grads[:6], None, *grads[6:])


class EBTAttentionBackward(torch.autograd.Function):
    @staticmethod
    def forward(q_o, k_o, v_o, q_p, k_p, v_p, out_o, out_p, lse_o, lse_p, do_o, do_p, dlse_o, dlse_p,
                call: EBTCall, *buffers):
        from .kernels.ebt import ebt_backward

        with torch._C._DisableFuncTorch():
            *g, dbuf = ebt_backward(call.plan, q_o, k_o, v_o, q_p, k_p, v_p, out_o, out_p, lse_o, lse_p, do_o, do_p,
                                    dlse_o, dlse_p, call.scale, call.options)
        dbuf = [torch.zeros_like(b) if d is None else d for d, b in zip(dbuf, buffers)]
        return (*g, *dbuf)

    @staticmethod
    def setup_context(ctx, inputs, output):
        qkv, outs, cts, call, buffers = inputs[:6], inputs[6:10], inputs[10:14], inputs[14], inputs[15:]
        ctx.call = call
        ctx.has_ct = [c is not None for c in cts]
        ctx.save_for_backward(*qkv, *outs, *[c if c is not None else torch.empty(0) for c in cts], *buffers)

    @staticmethod
    def backward(ctx, *gouts):
        saved = ctx.saved_tensors
        qkv, outs, cts, buffers = list(saved[:6]), list(saved[6:10]), list(saved[10:14]), saved[14:]
        cts = [c if has else None for c, has in zip(cts, ctx.has_ct)]
        call: EBTCall = ctx.call

        pl = call.plan
        if _fused_double_backward(pl.kern, buffers):
            gcts = [torch.zeros_like(x) if g is None else g for g, x in zip(gouts[:6], qkv)]
            res = EBTAttentionDoubleBackward.apply(*qkv, *cts, *gcts, *outs, call, *buffers, *gouts[6:])
            g_cts = [g if c is not None else None for g, c in zip(res[6:10], cts)]
            gbuf = [g if b.requires_grad else None for g, b in zip(res[10:], buffers)]
            return (*res[:6], None, None, None, None, *g_cts, None, *gbuf)

        def reference(*x):
            return ebt_attention_reference(*x, call.score_mod, call.block_mask, call.scale)

        gbuf_cts = [g for g, b in zip(gouts[6:], buffers) if b.requires_grad]
        g_qkv, g_cts, gbuf = _reference_double_backward(reference, qkv, buffers, cts, list(gouts[:6]) + gbuf_cts,
                                                        create_graph=torch.is_grad_enabled(), mods=(call.score_mod,))
        return (*g_qkv, None, None, None, None, *g_cts, None, *gbuf)


class EBTAttentionDoubleBackward(torch.autograd.Function):
    """Fused double backward of EBT attention.  Inputs: qkv (6), cotangents do_o, do_p, dlse_o,
    dlse_p (dlse may be None), the cotangents of the six first-order gradients, the saved outputs
    (out_o, out_p, lse_o, lse_p; constants), call, buffers.  Outputs: total gradients of qkv (6)
    and of do_o, do_p, dlse_o, dlse_p (zeros for an absent dlse).  Third order: autograd through
    the reference double backward."""

    @staticmethod
    def forward(q_o, k_o, v_o, q_p, k_p, v_p, do_o, do_p, dlse_o, dlse_p, gq_o, gk_o, gv_o, gq_p, gk_p, gv_p,
                out_o, out_p, lse_o, lse_p, call: EBTCall, *buffers_and_cts):
        from .kernels.ebt import ebt_double_backward

        n = len(buffers_and_cts) // 2  # the captured tensors, then their gradients' cotangents
        buffers, bcts = buffers_and_cts[:n], buffers_and_cts[n:]
        qkv = [q_o, k_o, v_o, q_p, k_p, v_p]
        outs = [out_o, out_p, lse_o, lse_p]
        with torch._C._DisableFuncTorch():
            *res, gbuf = ebt_double_backward(call.plan, qkv, outs, [do_o, do_p, dlse_o, dlse_p],
                                             [gq_o, gk_o, gv_o, gq_p, gk_p, gv_p], call.scale, call.options,
                                             list(bcts))
        res[8] = res[8] if res[8] is not None else torch.zeros_like(outs[2])
        res[9] = res[9] if res[9] is not None else torch.zeros_like(outs[3])
        gbuf = [torch.zeros_like(b) if g is None else g for g, b in zip(gbuf, buffers)]
        return (*res, *gbuf)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.call = inputs[20]
        ctx.n_extra = len(inputs) - 21
        ctx.has = [t is not None for t in inputs[6:10]]
        ctx.save_for_backward(*inputs[:6], *[t if t is not None else torch.empty(0) for t in inputs[6:10]],
                              *inputs[10:16])

    @staticmethod
    def backward(ctx, *gouts):
        saved = ctx.saved_tensors
        call: EBTCall = ctx.call
        with torch.enable_grad():
            qkv = [x.detach().requires_grad_() for x in saved[:6]]
            cts = [x.detach().requires_grad_() if h else None for x, h in zip(saved[6:10], ctx.has)]
            gcts = [x.detach().requires_grad_() for x in saved[10:16]]

            def reference(*x):
                return ebt_attention_reference(*x, call.score_mod, call.block_mask, call.scale)

            g_qkv, g_cts, _ = _reference_double_backward(reference, qkv, [], cts, gcts, create_graph=True)
            results = list(g_qkv) + list(g_cts)
            pairs = [(r, g) for r, g in zip(results, gouts) if r is not None and g is not None and r.requires_grad]
            wrt = qkv + [c for c in cts if c is not None] + gcts
            grads = list(torch.autograd.grad([r for r, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                         if pairs else [None] * len(wrt))
        g_qkv3 = grads[:6]
        rest = grads[6:]
        g_cts3 = [rest.pop(0) if h else None for h in ctx.has]
        return (*g_qkv3, *g_cts3, *rest[:6], None, None, None, None, None, *([None] * ctx.n_extra))


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


for _fn in (FlexAttention, FlexAttentionBackward, FlexAttentionDoubleBackward, EBTAttention, EBTAttentionBackward,
            EBTAttentionDoubleBackward):
    eager_function(_fn)
