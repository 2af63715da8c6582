"""Piecewise (NLPE) attention on the single-stream kernels: two block-sparse passes, one exact merge.

Near pairs (``dist = P + m - n < w``) score ``<q1, k1>``, far pairs score ``<q2, k2>``.  Each
region is one ``flex_attention`` pass over its own block mask, so a tile that lies wholly in one
region runs in one pass only -- one product -- and only the tiles the threshold crosses run in
both, each pass keeping its own pairs.  The two partial softmaxes merge exactly through their
log-sum-exps:

    lse = logaddexp(lse_near, lse_far),   out = e^(lse_near - lse) out_near + e^(lse_far - lse) out_far.

First order (``PiecewiseAttention``): the forward merges in one fused launch
(kernels/merge.py), and the backward needs no merge at all.  With the merged ``(out, lse)``,
``P_mn = e^(s_mn - lse_m)`` is the final probability of every pair whichever pass scored it, and
``dS_mn = P_mn (dP_mn - D_m)`` with ``D_m = do_m . out_m`` is the exact score gradient; so each
pass's ordinary backward kernels, given the merged ``(out, lse)``, return exactly their pairs'
share: ``dq1, dk1`` from the near pass, ``dq2, dk2`` from the far one, and ``dv`` summed (in
fp32) over both.

Higher orders (``create_graph=True``), forward mode and torch.func transforms differentiate the
composition instead: two ``flex_attention`` calls (fused backward, double backward and JVP
kernels each) and the merge in plain torch, which autograd differentiates at every order.  A
double backward recomputes that composition once from the saved inputs.

The offset P and the threshold enter the mask_mods as captured one-element int32 tensors, so a
new threshold reuses the compiled kernels; only the block masks are rebuilt (and cached).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .autograd import eager_function

_MASKS: "collections.OrderedDict" = collections.OrderedDict()  # a few recent (near, far) block-mask pairs
_MAX_CACHED = 16


def _region_mask_mods(P: Tensor, w: Tensor, causal: bool, user_mask: Optional[Callable]):
    """(near, far) mask_mods; P and w are one-element int32 tensors read by the kernels."""

    def keep(b, h, q_idx, kv_idx):
        k = (P + q_idx - kv_idx) >= 0 if causal else q_idx >= 0
        return k & user_mask(b, h, q_idx, kv_idx) if user_mask is not None else k

    def piecewise_near(b, h, q_idx, kv_idx):
        return keep(b, h, q_idx, kv_idx) & ((P + q_idx - kv_idx) < w)

    def piecewise_far(b, h, q_idx, kv_idx):
        return keep(b, h, q_idx, kv_idx) & ((P + q_idx - kv_idx) >= w)

    return piecewise_near, piecewise_far


def _build_pair(M, N, w, causal, device, user, B, H, bs):
    from .blockmask import create_block_mask

    P_t = torch.tensor(N - M, dtype=torch.int32, device=device)
    w_t = torch.tensor(w, dtype=torch.int32, device=device)
    near, far = _region_mask_mods(P_t, w_t, causal, user)
    return tuple(create_block_mask(f, B, H, M, N, device=device, BLOCK_SIZE=bs) for f in (near, far))


def region_block_masks(M: int, N: int, dist_threshold, causal: bool, device, block_mask=None):
    """The near and far block masks (``[B, H]`` of ``block_mask`` if given, else broadcast).
    Built on the code-generation thread (create_block_mask uses vmap, and the caller may be
    inside a torch.func transform), then cached."""
    from .codegen.source import run_on_builder

    w = math.ceil(dist_threshold)  # dist is an integer: dist >= w  <=>  dist >= ceil(w)
    if block_mask is not None:
        B, H = block_mask.kv_num_blocks.shape[:2]
        bs = block_mask.BLOCK_SIZE
        user = block_mask.mask_mod
    else:
        B = H = None
        bs, user = 128, None
    key = (M, N, w, causal, str(device), id(block_mask), bs)
    hit = _MASKS.get(key)
    if hit is not None and (block_mask is None or hit[2] is block_mask):
        _MASKS.move_to_end(key)
        return hit[0], hit[1]
    pair = run_on_builder(_build_pair, M, N, w, causal, device, user, B, H, bs)
    _MASKS[key] = (*pair, block_mask)
    while len(_MASKS) > _MAX_CACHED:
        _MASKS.popitem(last=False)
    return pair


def merge_partial_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """One softmax from two over disjoint key sets, exactly: (out, lse).  Rows empty in both
    give out 0, lse -inf, and zero (not NaN) gradients."""
    empty = torch.isneginf(lse_a) & torch.isneginf(lse_b)
    a = torch.where(empty, 0.0, lse_a)  # finite stand-ins for rows empty in both
    b = torch.where(empty, 0.0, lse_b)
    # log(e^a + e^b) shifted by a constant (detached) maximum: exact at every derivative order,
    # and finite where one side is -inf (torch.logaddexp's second derivative is NaN there)
    shift = torch.maximum(a, b).detach()
    lse = shift + torch.log(torch.exp(a - shift) + torch.exp(b - shift))
    wa = torch.exp(a - lse).unsqueeze(-1)
    wb = torch.exp(b - lse).unsqueeze(-1)
    out = wa * out_a.to(wa.dtype) + wb * out_b.to(wb.dtype)
    out = torch.where(empty.unsqueeze(-1), 0.0, out)
    return out.to(out_a.dtype), torch.where(empty, float("-inf"), lse)


def composed_piecewise(q1, k1, q2, k2, v, dist_threshold, causal, scale, score_mod, block_mask,
                       kernel_options) -> tuple[Tensor, Tensor]:
    """(out, lse) as a composition autograd differentiates at every order: two flex_attention
    passes and the torch merge."""
    from .api import flex_attention

    M, N = q1.shape[2], k1.shape[2]
    near, far = region_block_masks(M, N, dist_threshold, causal, q1.device, block_mask)
    out_n, lse_n = flex_attention(q1, k1, v, score_mod=score_mod, block_mask=near, scale=scale, return_lse=True,
                                  kernel_options=kernel_options)
    out_f, lse_f = flex_attention(q2, k2, v, score_mod=score_mod, block_mask=far, scale=scale, return_lse=True,
                                  kernel_options=kernel_options)
    return merge_partial_attention(out_n, lse_n, out_f, lse_f)


@dataclasses.dataclass
class PiecewiseCall:
    """The two passes of one call (kernels, tables) and what the composed fallback needs."""

    kern_near: object
    kern_far: object
    tables_near: object
    tables_far: object
    n_near: int  # captured tensors of the near pass come first among the Function's extra inputs
    scale: float
    options: Optional[dict]
    composed: Callable  # (q1, k1, q2, k2, v) -> (out, lse), differentiable at every order


@eager_function
class PiecewiseAttention(torch.autograd.Function):
    """First-order fused piecewise attention (see the module docstring for the math)."""

    @staticmethod
    def forward(q1, k1, q2, k2, v, call: PiecewiseCall, *buffers):
        from .kernels.flex import flex_forward
        from .kernels.merge import merge_partial_softmax

        b_near, b_far = list(buffers[:call.n_near]), list(buffers[call.n_near:])
        out_n, lse_n = flex_forward(call.kern_near, q1, k1, v, call.scale, call.tables_near, b_near, call.options)
        out_f, lse_f = flex_forward(call.kern_far, q2, k2, v, call.scale, call.tables_far, b_far, call.options)
        return merge_partial_softmax(out_n, lse_n, out_f, lse_f)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q1, k1, q2, k2, v, call, *buffers = inputs
        out, lse = output
        ctx.call = call
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q1, k1, q2, k2, v, out, lse, *buffers)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q1, k1, q2, k2, v, out, lse, *buffers = ctx.saved_tensors
        call: PiecewiseCall = ctx.call
        if dout is None:
            return (None,) * (6 + len(buffers))
        if torch.is_grad_enabled():  # create_graph=True: a higher order follows
            return _composed_backward(ctx, (q1, k1, q2, k2, v), buffers, dout)
        from .kernels.flex import (_buffer_args, captured_grad_buffers, dkdv_pass, dq_pass,
                                   finish_captured_grads)

        dout = dout.contiguous()
        grads, dv32 = [], torch.empty(v.shape, dtype=torch.float32, device=v.device)
        passes = ((call.kern_near, call.tables_near, q1, k1, buffers[:call.n_near]),
                  (call.kern_far, call.tables_far, q2, k2, buffers[call.n_near:]))
        for i, (kern, tables, q, k, bufs) in enumerate(passes):
            gbufs = captured_grad_buffers(kern, list(bufs), q.device)
            bargs = _buffer_args(list(bufs), gbufs)
            dq, delta, _ = dq_pass(kern, q, k, v, out, lse, dout, None, call.scale, tables, bargs, call.options)
            # dv of both passes sums in fp32 (one rounding): the near pass writes its part to dv32,
            # the far pass adds it and writes v's dtype (and adds zeros to its own dk2)
            if i == 0:
                dk = torch.empty_like(k)
                dkdv_pass(kern, q, k, v, lse, delta, dout, call.scale, tables, bargs, call.options, into=(dk, dv32))
            else:
                dk, dv = torch.zeros_like(k), torch.empty_like(v)
                dkdv_pass(kern, q, k, v, lse, delta, dout, call.scale, tables, bargs, call.options, into=(dk, dv),
                          add=(dk, dv32))
            grads.append((dq, dk, finish_captured_grads(list(bufs), gbufs)))
        (dq1, dk1, gb_near), (dq2, dk2, gb_far) = grads
        return (dq1, dk1, dq2, dk2, dv, None, *gb_near, *gb_far)


def _composed_backward(ctx, primals, buffers, dout):
    """The first-order gradients as a differentiable function of the inputs (for create_graph):
    autograd through the composition, w.r.t. aliases of the inputs (so each input gets only the
    paths through itself, while the results keep their graph to the real inputs) and w.r.t. the
    captured tensors that need gradients (they appear in both passes' lists; the near slots
    carry their gradient)."""
    from .autograd import _alias

    call: PiecewiseCall = ctx.call
    near = buffers[:call.n_near]
    # one slot per distinct tensor carries its gradient: a tensor read by both the score_mod and the
    # mask_mod sits in two slots, and autograd sums what the slots return
    first = [b.requires_grad and not any(b is c for c in near[:i]) for i, b in enumerate(near)]
    learned = [b for b, f in zip(near, first) if f]
    with torch.enable_grad():
        p = [_alias(x) for x in primals]
        out, _ = call.composed(*p)
        g = torch.autograd.grad(out, p + learned, dout, create_graph=True, allow_unused=True)
    g_primals = [gi if need else None for gi, need in zip(g[:5], ctx.needs_input_grad[:5])]
    rest = list(g[5:])
    g_near = [rest.pop(0) if f else None for f in first]
    return (*g_primals, None, *g_near, *([None] * (len(buffers) - call.n_near)))


def _needs_composition(tensors) -> bool:
    """torch.func transforms and forward-mode tangents differentiate the composition (the fused
    Function has no jvp or batching rule)."""
    from .backends import _has_forward_tangent, _in_dual_level, _is_wrapped

    return any(_is_wrapped(t) for t in tensors) or (_in_dual_level() and any(_has_forward_tangent(t)
                                                                             for t in tensors))


def piecewise_attention_kernels(q1, k1, q2, k2, v, dist_threshold, causal, scale, score_mod, block_mask,
                                kernel_options) -> tuple[Tensor, Tensor]:
    from .codegen.source import kernels_and_buffers, position_extents
    from .kernels.flex import tables_from_block_mask

    args = (dist_threshold, causal, scale, score_mod, block_mask, kernel_options)
    if _needs_composition((q1, k1, q2, k2, v)):
        return composed_piecewise(q1, k1, q2, k2, v, *args)
    M, N = q1.shape[2], k1.shape[2]
    near, far = region_block_masks(M, N, dist_threshold, causal, q1.device, block_mask)
    t_near, t_far = (tables_from_block_mask(bm, M, N, q1.device) for bm in (near, far))
    extents = position_extents(q1.shape[0], q1.shape[1], M, N)
    (k_near, b_near), (k_far, b_far) = (kernels_and_buffers("flex_attention", score_mod, t.mask_mod, extents)
                                        for t in (t_near, t_far))
    for t in b_near + b_far:
        if t.device != q1.device:
            raise ValueError(f"piecewise_attention: a tensor captured by score_mod/mask_mod is on {t.device} but "
                             f"the inputs are on {q1.device}; move it to {q1.device}.")
    call = PiecewiseCall(k_near, k_far, t_near, t_far, len(b_near), q1.shape[-1] ** -0.5 if scale is None
                         else float(scale), kernel_options, lambda *p: composed_piecewise(*p, *args))
    c = [x.contiguous() for x in (q1, k1, q2, k2, v)]
    return PiecewiseAttention.apply(*c, call, *b_near, *b_far)
