"""The closed-form double backward of attention, as dense torch math.

This is the specification the fused double-backward kernels implement tile by tile:
the row statistics ``U, W, Bbar`` are O(S) and every S x S quantity below is recomputed per tile.
Here it is written densely so tests can pin it against autograd in float64.

One row ``i`` over keys ``j`` (batch and heads dropped); ``f`` is the score_mod as a function
of the score, ``f'``, ``f''`` its derivatives (0 where masked)::

    s = scale q k^T,  t = f(s),  P = exp(t - L),  o = P v
    dP = do v^T,  D = rowsum(do * o) - dlse,  dt = P (dP - D),  ds = dt f'
    dq = scale ds k,  dk = scale ds^T q,  dv = P^T do

Given cotangents ``Gq, Gk, Gv`` of ``dq, dk, dv``::

    A = scale (Gq k^T + q Gk^T),  u = f' A,  B = do Gv^T
    U = rowsum(P u),  W = rowsum(P dP u),  Bbar = rowsum(P B)
    gP = (dP - D) u + B - U dP
    gs = f' P (gP - W + (D0 + D) U - Bbar) + dt f'' A    (D0 = rowsum(do * o), D = D0 - dlse)
       = f' P ((dP - D) (u - U) - Wc + (B - Bbar)) + dt f'' A,   Wc = W - D0 U = rowsum(P (dP - D0) u)
    g_do   = (P (u - U)) v + P Gv
    g_v    = (P (u - U))^T do
    g_q    = scale (gs k + ds Gk)
    g_k    = scale (gs^T q + ds^T Gq)
    g_dlse = U

The ``dlse`` term: a cotangent of lse shifts ``D`` (dt gains ``+P dlse``). In the softmax backward
of ``gP`` the row sum ``sum_j P gP = W - D U + Bbar - D0 U`` mixes the shifted ``D`` (from ``dt``)
and the unshifted ``D0`` (from ``D``'s dependence on ``o``), giving ``(D0 + D) U``; the
form ``2 D U`` without an lse cotangent is the ``dlse = 0`` case.  The gradient of ``dlse``
itself is ``U``.

The second form of ``gs`` is the one computed (here and in the kernels): every factor is centred.
``u = f' A`` is huge where a score_mod has a large derivative (``1 / s`` near ``s = 0``), and the
uncentred products ``U dP`` and ``D0 U`` then cancel far below their own rounding error; in fp32
that gave second-order errors of order 1 where eager math has 1e-4.  The kernels also take ``D0``
as ``rowsum(P dP)`` from the same ``P`` and ``dP`` as the other statistics, so a row with one
dominant key gives exact zeros, as eager math does.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .core import apply_score_mod, compute_dtype, expand_kv_heads, index_grid, kept_scores, masked_softmax
from .masking import dense_keep


def _mod_derivatives(score_mod: Optional[Callable], s: Tensor, b, h, qi, ki, keep: Tensor):
    """t = f(s), f'(s), f''(s) elementwise, with f applied per score (torch's semantics, see
    core.apply_score_mod).  Differentiable in s (so in q, k) when s requires grad -- the closed
    form is itself differentiated for third order -- else computed on a leaf."""
    if score_mod is None:
        return s, torch.ones_like(s), torch.zeros_like(s)
    with torch.enable_grad():
        x = s if s.requires_grad else s.detach().requires_grad_()
        t = apply_score_mod(score_mod, kept_scores(x, keep), b, h, qi, ki)
        # f applies to each score on its own, so d(sum t)/ds is f'(s) elementwise.
        d1 = torch.autograd.grad(t.sum(), x, create_graph=True, allow_unused=True)[0] if t.requires_grad else None
        d1 = torch.zeros_like(s) if d1 is None else d1
        d2 = torch.autograd.grad(d1.sum(), x, create_graph=True, allow_unused=True)[0] if d1.requires_grad else None
    d2 = torch.zeros_like(s) if d2 is None else d2
    if not s.requires_grad:
        t, d1, d2 = t.detach(), d1.detach(), d2.detach()
    return t, d1, d2


def attention_double_backward(q: Tensor, k: Tensor, v: Tensor, do: Tensor, dlse: Optional[Tensor],
                              gq: Tensor, gk: Tensor, gv: Tensor, score_mod=None, block_mask=None,
                              scale: Optional[float] = None):
    """``(g_q, g_k, g_v, g_do, g_dlse)`` for single-stream attention (GQA allowed; score_mods that
    capture no tensors).  Dense: the oracle of the fused kernels, not a fast path."""
    B, H, Sq, D = q.shape
    Hkv = k.shape[1]
    if Hkv != H:  # GQA: compute on expanded heads, sum the key/value gradients back per group
        res = attention_double_backward(q, expand_kv_heads(k, H), expand_kv_heads(v, H), do, dlse, gq,
                                        expand_kv_heads(gk, H), expand_kv_heads(gv, H), score_mod, block_mask, scale)
        g_q, g_k, g_v, g_do, g_dlse = res
        fold = lambda t: t.view(B, Hkv, H // Hkv, *t.shape[2:]).sum(2)  # noqa: E731
        return g_q, fold(g_k), fold(g_v), g_do, g_dlse
    Skv = k.shape[2]
    cdt = compute_dtype(q.dtype)
    scale = D ** -0.5 if scale is None else scale
    q, k, v, do, gq, gk, gv = (x.to(cdt) for x in (q, k, v, do, gq, gk, gv))
    b, h, qi, ki = index_grid(B, H, Sq, Skv, q.device)
    s = q @ k.transpose(-1, -2) * scale
    keep = dense_keep(block_mask, B, H, Sq, Skv, q.device)
    t, f1, f2 = _mod_derivatives(score_mod, s, b, h, qi, ki, keep)
    f1 = torch.where(keep, f1, torch.zeros_like(f1))
    f2 = torch.where(keep, f2, torch.zeros_like(f2))
    P, _ = masked_softmax(t, keep)
    dP = do @ v.transpose(-1, -2)
    D0 = (P * dP).sum(-1, keepdim=True)  # = rowsum(do * o), from the same P, dP as W and U
    Dsh = D0 - (dlse.to(cdt).unsqueeze(-1) if dlse is not None else 0.0)
    dt = P * (dP - Dsh)
    ds = dt * f1

    A = scale * (gq @ k.transpose(-1, -2) + q @ gk.transpose(-1, -2))
    u = f1 * A
    Bm = do @ gv.transpose(-1, -2)
    U = (P * u).sum(-1, keepdim=True)
    Wc = (P * (dP - D0) * u).sum(-1, keepdim=True)  # W - D0 U, centred
    Bbar = (P * Bm).sum(-1, keepdim=True)
    # Softmax backward of gP = (dP - Dsh) u + Bm - U dP: sum_j P gP = W - Dsh U + Bbar - D0 U, hence
    # gP - sum_j P gP = (dP - Dsh)(u - U) - Wc + (Bm - Bbar), every factor centred.
    gs = f1 * P * ((dP - Dsh) * (u - U) - Wc + (Bm - Bbar)) + dt * f2 * A

    g_do = (P * (u - U)) @ v + P @ gv
    g_v = (P * (u - U)).transpose(-1, -2) @ do
    g_q = scale * (gs @ k + ds @ gk)
    g_k = scale * (gs.transpose(-1, -2) @ q + ds.transpose(-1, -2) @ gq)
    return g_q, g_k, g_v, g_do, U.squeeze(-1)
