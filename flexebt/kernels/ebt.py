"""Launchers of EBT two-stream attention on the single-stream kernel family.

No concatenation: the observed stream is one ordinary pass over the observed keys; the
predicted stream is one pass over the *same* observed keys (its block mask already drops the
key at each query's own frame) whose score_mod sees frame positions (``Q_OFF = r + 1``), with
each query's own key as a row-wise term that seeds the online softmax -- no predicted x
predicted tile.  Backward: dq passes for both streams (the predicted one also yields the own
keys' dk, dv), then one dk/dv pass whose programs add both query streams' shares for a tile of
observed keys.  One generated kernel module serves both streams (its mask code reads the frame
mask_mod and drops the own-frame key where Q_OFF > 0).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..codegen.source import ModKernels, kernels_and_buffers, position_extents
from .flex import (BlockTables, OwnKeys, QueryStream, _buffer_args, captured_grad_buffers, dkdv_pass, dq_pass,
                   finish_captured_grads, flex_forward, tables_from_block_mask)


@dataclasses.dataclass
class EBTPlan:
    """Kernels, tables and captured tensors of one EBT call.  One kernel module serves both query
    streams: its mask code reads the frame mask_mod in frame positions and drops the own-frame
    observed key where Q_OFF > 0 (``get_kernels(..., frame_mask=True)``), so the predicted
    stream's lifted BlockMask mask_mod is only used to build its tables."""

    kern: ModKernels
    tables_o: BlockTables
    tables_p: BlockTables
    buffers: list      # the captured tensors of score_mod and the frame mask_mod
    self_keep: Tensor  # int8 [B, H, S_p]
    offset: int        # r + 1: frame of predicted query 0


_STRUCTURE: dict = {}


def _keep_all(b, h, q_idx, kv_idx):
    return q_idx >= 0


def structure_mask(S_o: int, S_p: int, device):
    """The block mask of the bare two-stream structure (block_mask=None): every frame pair kept,
    except that a predicted query never sees the observed key at its own frame.  Built once per
    shape on the code-generation thread (create_block_mask uses vmap; the caller may be inside a
    torch.func transform), then cached."""
    from ..blockmask import create_ebt_block_mask
    from ..codegen.source import run_on_builder

    key = (S_o, S_p, str(device))
    if key not in _STRUCTURE:
        _STRUCTURE[key] = run_on_builder(create_ebt_block_mask, _keep_all, None, None, S_o, S_p, device=device)
    return _STRUCTURE[key]


_PLANS: dict = {}  # (ids, shapes) -> (block_mask, score_mod, EBTPlan); identity-checked, small


def plan(score_mod, block_mask, B: int, H: int, S_o: int, S_p: int, device) -> EBTPlan:
    """Tables, kernels and captured tensors of one call (call with functorch dispatch off).

    Everything but the captured tensors is cached per (block mask, score_mod, shape): repeated
    calls in a training loop skip the table conversion, the own-key mask evaluation and the
    kernel lookup; the tensors are re-read from the closures every call."""
    if block_mask is None:
        block_mask = structure_mask(S_o, S_p, device)
    key = (id(block_mask), id(score_mod), B, H, S_o, S_p, str(device))
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is block_mask and hit[1] is score_mod:
        cached = hit[2]
        # the kernel lookup runs every call: what the mods read (globals, attributes) may have changed
        kern, buffers = kernels_and_buffers("flex_attention", score_mod, block_mask.mask_mod,
                                            _frame_extents(B, H, S_o, S_p), frame_mask=True)
        if kern is cached.kern:
            return dataclasses.replace(cached, buffers=buffers)
    fresh = _plan(score_mod, block_mask, B, H, S_o, S_p, device)
    if len(_PLANS) > 64:
        _PLANS.clear()
    _PLANS[key] = (block_mask, score_mod, fresh)
    return fresh


def _plan(score_mod, block_mask, B, H, S_o, S_p, device) -> EBTPlan:
    tables_o = tables_from_block_mask(block_mask.observed, S_o, S_o, device)
    tables_p = tables_from_block_mask(block_mask.predicted, S_p, S_o, device)
    kern, buffers = kernels_and_buffers("flex_attention", score_mod, block_mask.mask_mod,
                                        _frame_extents(B, H, S_o, S_p), frame_mask=True)
    keep = block_mask.own_keep_for(B, H)  # evaluated once, when the mask was made
    return EBTPlan(kern, tables_o, tables_p, buffers, keep, S_o - S_p + 1)


def _frame_extents(B: int, H: int, S_o: int, S_p: int) -> dict:
    """EBT mods see frame positions: S_o + 1 of them once there is a predicted stream (its last
    query and own key sit at frame S_o)."""
    n = S_o + 1 if S_p > 0 else S_o
    return position_extents(B, H, n, n, max(S_o, S_p))


def ebt_forward(pl: EBTPlan, q_o, k_o, v_o, q_p, k_p, v_p, scale: float, options: Optional[dict] = None):
    out_o, lse_o = flex_forward(pl.kern, q_o, k_o, v_o, scale, pl.tables_o, pl.buffers, options)
    out_p, lse_p = flex_forward(pl.kern, q_p, k_o, v_o, scale, pl.tables_p, pl.buffers, options,
                                q_off=pl.offset, own=OwnKeys(k_p, v_p, pl.self_keep))
    return out_o, out_p, lse_o, lse_p


def ebt_backward(pl: EBTPlan, q_o, k_o, v_o, q_p, k_p, v_p, out_o, out_p, lse_o, lse_p, dout_o, dout_p,
                 dlse_o, dlse_p, scale: float, options: Optional[dict] = None):
    """Gradients of q_o, k_o, v_o, q_p, k_p, v_p and of the score_mod's captured tensors."""
    c = lambda t: t.contiguous() if t is not None else None  # noqa: E731
    dout_o, dout_p, dlse_o, dlse_p = c(dout_o), c(dout_p), c(dlse_o), c(dlse_p)
    # one kernel module and one set of captured-tensor accumulators serve both query streams
    gbufs = captured_grad_buffers(pl.kern, pl.buffers, q_o.device)
    bargs = _buffer_args(pl.buffers, gbufs)
    own = OwnKeys(k_p, v_p, pl.self_keep)
    dq_o, delta_o, _ = dq_pass(pl.kern, q_o, k_o, v_o, out_o, lse_o, dout_o, dlse_o, scale, pl.tables_o, bargs,
                               options)
    dq_p, delta_p, (dkp, dvp) = dq_pass(pl.kern, q_p, k_o, v_o, out_p, lse_p, dout_p, dlse_p, scale, pl.tables_p,
                                        bargs, options, q_off=pl.offset, own=own)
    # one dk/dv launch: each observed key tile adds both query streams' shares in registers
    dk_o, dv_o = dkdv_pass(pl.kern, q_o, k_o, v_o, lse_o, delta_o, dout_o, scale, pl.tables_o, bargs, options,
                           second=QueryStream(q_p, dout_p, lse_p, delta_p, pl.tables_p, pl.offset))
    grads = finish_captured_grads(pl.buffers, gbufs)
    return dq_o, dk_o, dv_o, dq_p, *_own_key_grads(dkp, dvp, k_p, v_p), grads


def _own_key_grads(dkp: Tensor, dvp: Tensor, k_p: Tensor, v_p: Tensor):
    """The own keys' gradients from the per-query-head ones [B, H, S_p, D]: summed over the query
    heads of a GQA group; without GQA the kernel already wrote them in k_p's dtype."""
    B, H, S_p, D = dkp.shape
    Hkv = k_p.shape[1]
    if Hkv == H:
        return dkp, dvp
    dk = dkp.view(B, Hkv, H // Hkv, S_p, D).sum(2, dtype=torch.float32)
    dv = dvp.view(B, Hkv, H // Hkv, S_p, dvp.shape[3]).sum(2, dtype=torch.float32)
    return dk.to(k_p.dtype), dv.to(v_p.dtype)


def ebt_double_backward(pl: EBTPlan, qkv: list, outs: list, cts: list, gcts: list, scale: float,
                        options: Optional[dict] = None, buffer_cts: Optional[list] = None):
    """Fused double backward of EBT attention (GQA allowed).

    qkv = (q_o, k_o, v_o, q_p, k_p, v_p), outs = (out_o, out_p, lse_o, lse_p), cts = (do_o, do_p,
    dlse_o, dlse_p) (dlse may be None), gcts = cotangents of (dq_o, dk_o, dv_o, dq_p, dk_p, dv_p).
    Both query streams see the observed keys with the same cotangents Gk_o, Gv_o; the predicted
    stream's own keys carry Gk_p, Gv_p as one more column per row.  ``buffer_cts``: cotangents of
    the captured tensors' first-order gradients.  Returns the gradients of qkv (6), then of do_o,
    do_p, dlse_o, dlse_p, then the list of the captured tensors' gradients (None: not scattered)."""
    from .flex import captured_cotangents, dbwd_dkdv_pass, dbwd_dq_pass, dbwd_rows_pass

    q_o, k_o, v_o, q_p, k_p, v_p = qkv
    out_o, out_p, lse_o, lse_p = outs
    do_o, do_p, dlse_o, dlse_p = cts
    gq_o, gk_o, gv_o, gq_p, gk_p, gv_p = gcts
    # one set of accumulators and cotangents serves both streams (as in ebt_backward)
    gbufs = captured_grad_buffers(pl.kern, pl.buffers, q_o.device)
    bargs = _buffer_args(pl.buffers, gbufs, captured_cotangents(pl.kern, pl.buffers, buffer_cts or []))
    own, own_cts = OwnKeys(k_p, v_p, pl.self_keep), (gk_p, gv_p)
    obs = (pl.kern, q_o, k_o, v_o, out_o, do_o, lse_o, dlse_o, gq_o, gk_o, gv_o)
    pred = (pl.kern, q_p, k_o, v_o, out_p, do_p, lse_p, dlse_p, gq_p, gk_o, gv_o)
    gdo_o, st_o = dbwd_rows_pass(*obs, scale, pl.tables_o, bargs, options)
    gdo_p, st_p = dbwd_rows_pass(*pred, scale, pl.tables_p, bargs, options, q_off=pl.offset, own=own,
                                 own_cts=own_cts)
    g_q_o, _ = dbwd_dq_pass(*obs, st_o, scale, pl.tables_o, bargs, options, captured_grads=bool(gbufs))
    g_q_p, (g_kp, g_vp) = dbwd_dq_pass(*pred, st_p, scale, pl.tables_p, bargs, options, q_off=pl.offset, own=own,
                                       own_cts=own_cts, captured_grads=bool(gbufs))
    acc = (torch.empty(k_o.shape, dtype=torch.float32, device=k_o.device),
           torch.empty(v_o.shape, dtype=torch.float32, device=v_o.device))
    dbwd_dkdv_pass(*obs, st_o, scale, pl.tables_o, bargs, options, into=acc)
    g_k_o, g_v_o = dbwd_dkdv_pass(*pred, st_p, scale, pl.tables_p, bargs, options, q_off=pl.offset, add=acc)
    return [g_q_o, g_k_o, g_v_o, g_q_p, *_own_key_grads(g_kp, g_vp, k_p, v_p),
            gdo_o, gdo_p, st_o[..., 0] if dlse_o is not None else None, st_p[..., 0] if dlse_p is not None else None,
            finish_captured_grads(pl.buffers, gbufs)]


def ebt_jvp(pl: EBTPlan, qkv: list, tangents: list, scale: float, options: Optional[dict] = None):
    """Tangents of (out_o, out_p, lse_o, lse_p) along tangents of (q_o, k_o, v_o, q_p, k_p, v_p)."""
    from .flex import flex_jvp

    q_o, k_o, v_o, q_p, k_p, v_p = qkv
    dq_o, dk_o, dv_o, dq_p, dk_p, dv_p = tangents
    _, _, d_out_o, d_lse_o = flex_jvp(pl.kern, q_o, k_o, v_o, dq_o, dk_o, dv_o, scale, pl.tables_o, pl.buffers,
                                      options)
    _, _, d_out_p, d_lse_p = flex_jvp(pl.kern, q_p, k_o, v_o, dq_p, dk_o, dv_o, scale, pl.tables_p, pl.buffers,
                                      options, q_off=pl.offset, own=OwnKeys(k_p, v_p, pl.self_keep),
                                      own_tangents=(dk_p, dv_p))
    return d_out_o, d_out_p, d_lse_o, d_lse_p
