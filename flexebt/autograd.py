"""The autograd chain of the kernel path: Attention -> AttentionBackward -> (double backward).

``FlexAttention.backward`` calls ``FlexAttentionBackward.apply``, so the backward is itself a
differentiable op.  Until the fused double-backward kernels land (issue #5), the backward of
``FlexAttentionBackward`` recomputes the first-order gradients with the dense reference under
autograd and differentiates those: exact at every order, but O(S^2) memory.  Nothing is ever
dropped silently.

Captured tensors of the mods are extra inputs of both Functions, so gradients reach them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

from .codegen.source import ModKernels
from .kernels.flex import BlockTables, flex_backward, flex_forward
from .reference.flex import flex_attention_reference


@dataclasses.dataclass
class FlexCall:
    """Everything about one call that is not a tensor input."""

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
        # Under torch.func, functorch hands forward plain tensors but would wrap the tensors the
        # launcher allocates; Triton needs plain storage, and functorch wraps our outputs itself.
        with torch._C._DisableFuncTorch():
            return flex_forward(call.kernels, q, k, v, call.scale, call.tables, list(buffers), call.options)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, call, *buffers = inputs
        out, lse = output
        ctx.call = call
        ctx.save_for_backward(q, k, v, out, lse, *buffers)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *buffers = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        grads = FlexAttentionBackward.apply(q, k, v, out, lse, dout, dlse, ctx.call, *buffers)
        dq, dk, dv, *dbuf = grads
        return (dq, dk, dv, None, *dbuf)


class FlexAttentionBackward(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, out, lse, dout, dlse, call: FlexCall, *buffers):
        with torch._C._DisableFuncTorch():  # see FlexAttention.forward
            dq, dk, dv, dbuf = flex_backward(call.kernels, q, k, v, out, lse, dout, dlse, call.scale, call.tables,
                                             list(buffers), call.options)
        dbuf = [torch.zeros_like(b) if g is None else g for g, b in zip(dbuf, buffers)]
        return (dq, dk, dv, *dbuf)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, out, lse, dout, dlse, call, *buffers = inputs
        ctx.call = call
        ctx.has_dlse = dlse is not None
        ctx.save_for_backward(q, k, v, dout, dlse if dlse is not None else torch.empty(0), *buffers)

    @staticmethod
    def backward(ctx, gdq, gdk, gdv, *gdbuf):
        """Double backward by differentiating the reference's first-order gradients.

        (dq, dk, dv, dbuf) are functions of (q, k, v, dout, dlse, buffers); out and lse are
        recomputed inside, so their own gradients are returned as None (the total derivative
        already flows to q, k, v)."""
        q, k, v, dout, dlse, *buffers = ctx.saved_tensors
        call: FlexCall = ctx.call
        with torch.enable_grad():
            qd, kd, vd, dod = (x.detach().requires_grad_() for x in (q, k, v, dout))
            dlsed = dlse.detach().requires_grad_() if ctx.has_dlse else None
            grad_bufs = [b for b in buffers if b.requires_grad]
            out, lse = flex_attention_reference(qd, kd, vd, call.score_mod, call.block_mask, call.scale)
            outs, cts = [out], [dod]
            if dlsed is not None:
                outs.append(lse)
                cts.append(dlsed)
            wrt = [qd, kd, vd] + grad_bufs
            first = torch.autograd.grad(outs, wrt, cts, create_graph=True, allow_unused=True)
            first = [torch.zeros_like(w) if f is None else f for f, w in zip(first, wrt)]
            cot = [gdq, gdk, gdv] + [g for g, b in zip(gdbuf, buffers) if b.requires_grad]
            pairs = [(f, c) for f, c in zip(first, cot) if c is not None and f.requires_grad]
            targets = [qd, kd, vd, dod] + ([dlsed] if dlsed is not None else []) + grad_bufs
            if pairs:
                res = torch.autograd.grad([p[0] for p in pairs], targets, [p[1] for p in pairs], allow_unused=True)
            else:
                res = [None] * len(targets)
        gq, gk, gv, gdo = res[:4]
        gdlse = res[4] if dlsed is not None else None
        rest = list(res[5:] if dlsed is not None else res[4:])
        gbuf = [rest.pop(0) if b.requires_grad else None for b in buffers]
        return (gq, gk, gv, None, None, gdo, gdlse, None, *gbuf)
