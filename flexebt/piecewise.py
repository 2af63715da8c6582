"""Piecewise (NLPE) attention on the single-stream kernels: two block-sparse passes, one exact merge.

Near pairs (``dist = P + m - n < w``) score ``<q1, k1>``, far pairs score ``<q2, k2>``.  Each
region is one ``flex_attention`` pass over its own block mask, so a tile that lies wholly in one
region runs in one pass only -- one product -- and only the tiles the threshold crosses run in
both, each pass keeping its own pairs.  The two partial softmaxes merge exactly through each
row's max m and softmax sum l (as log-sum-exps would, but exact where every score of a row is huge):

    m = max(m_near, m_far),  l = l_near e^(m_near - m) + l_far e^(m_far - m),
    out = (l_near e^(m_near - m) out_near + l_far e^(m_far - m) out_far) / l,  lse = m + log l.

The two passes are one plan of the shared autograd chain (kernels/plan.py): the forward merges
in one fused launch (kernels/merge.py), and the backward needs no merge at all.  With the merged
``(out, m, l)``, ``P_mn = e^(s_mn - m_m) / l_m`` is the final probability of every pair whichever
pass scored it, and ``dS_mn = P_mn (dP_mn - D_m)`` with ``D_m = do_m . out_m`` is the exact score
gradient; so each pass's ordinary backward kernels, given the merged statistics, return exactly
their pairs' share: ``dq1, dk1`` from the near pass, ``dq2, dk2`` from the far one, and ``dv``
summed (in fp32) over both.  The double backward adds both passes' row statistics before either
pass uses them; the JVP merges the passes' tangents.

The offset P and the threshold enter the mask_mods as captured one-element int32 tensors, so a
new threshold reuses the compiled kernels; only the block masks are rebuilt (and cached).
"""

from __future__ import annotations

import collections
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .autograd import AttentionCall, apply_attention
from .kernels.options import KernelOptions
from .kernels.plan import AttentionPlan, KernelPass

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


def _kept_by(block_mask, M: int, N: int) -> Callable:
    """The mask_mod of what ``block_mask`` keeps over ``M x N``, as flex_attention reads a block
    mask: every position of a full block, the positions its mask_mod keeps in a partial block,
    nothing in an unlisted one.  Its tables enter as one captured tensor of block states (0 none,
    1 partial, 2 full), so a mask whose tables say more than its mask_mod (``from_kv_blocks``,
    edited tables) is honoured as in the other functions."""
    from .blockmask import tables_in_range
    from .reference.masking import _block_table

    bq, bkv = (int(x) for x in block_mask.BLOCK_SIZE)
    nkv = -(-N // bkv)
    kv_num, kv_idx, fkv_num, fkv_idx = tables_in_range(block_mask, M, N)[:4]
    state = _block_table(kv_num, kv_idx, nkv).to(torch.int8)
    if fkv_num is not None:
        state = torch.where(_block_table(fkv_num, fkv_idx, nkv), 2, state).to(torch.int8)
    per_b, per_h, user = state.shape[0] > 1, state.shape[1] > 1, block_mask.mask_mod

    def kept_by_block_mask(b, h, q_idx, kv_idx):
        s = state[b if per_b else 0, h if per_h else 0, q_idx // bq, kv_idx // bkv]
        return (s == 2) | ((s == 1) & user(b, h, q_idx, kv_idx))

    return kept_by_block_mask


def region_block_masks(M: int, N: int, dist_threshold, causal: bool, device, block_mask=None):
    """The near and far block masks (``[B, H]`` of ``block_mask`` if given, else broadcast).
    Built on the code-generation thread (create_block_mask uses vmap, and the caller may be
    inside a torch.func transform), then cached while ``block_mask`` is as it was (a BlockMask
    is mutable: ``block_mask_state``)."""
    from .codegen.source import run_on_builder
    from .kernels.flex import block_mask_state, same_state

    w = math.ceil(dist_threshold)  # dist is an integer: dist >= w  <=>  dist >= ceil(w)
    if block_mask is not None:
        B, H = block_mask.kv_num_blocks.shape[:2]
        bs = block_mask.BLOCK_SIZE
        state = block_mask_state(block_mask)
    else:
        B = H = None
        bs, state = 128, None
    key = (M, N, w, causal, str(device), id(block_mask), bs, B, H)
    hit = _MASKS.get(key)
    if hit is not None and hit[2] is block_mask and (state is None or same_state(hit[3], state)):
        _MASKS.move_to_end(key)
        return hit[0], hit[1]
    user = _kept_by(block_mask, M, N) if block_mask is not None else None
    pair = run_on_builder(_build_pair, M, N, w, causal, device, user, B, H, bs)
    _MASKS[key] = (*pair, block_mask, state)
    while len(_MASKS) > _MAX_CACHED:
        _MASKS.popitem(last=False)
    return pair


def piecewise_plan(kern_near, tables_near, n_near: int, kern_far, tables_far, n_far: int) -> AttentionPlan:
    """Inputs (q1, k1, q2, k2, v), one row group: the near pass (q1 over k1) and the far pass
    (q2 over k2), both with v; the near pass reads the first ``n_near`` captured tensors."""
    return AttentionPlan((KernelPass(0, 1, 4, 0, kern_near, tables_near, (0, n_near)),
                          KernelPass(2, 3, 4, 0, kern_far, tables_far, (n_near, n_near + n_far))), 5, 1)


def piecewise_attention_kernels(q1, k1, q2, k2, v, dist_threshold, causal, scale, score_mod, block_mask,
                                kernel_options) -> tuple[Tensor, Tensor]:
    from .codegen.source import kernels_and_buffers, position_extents
    from .kernels.flex import tables_from_block_mask
    from .reference.piecewise import piecewise_attention_reference

    M, N = q1.shape[2], k1.shape[2]
    near, far = region_block_masks(M, N, dist_threshold, causal, q1.device, block_mask)
    with torch._C._DisableFuncTorch():  # plain int32 tables even inside torch.func transforms
        t_near, t_far = (tables_from_block_mask(bm, M, N, q1.device) for bm in (near, far))
    extents = position_extents(q1.shape[0], q1.shape[1], M, N)
    (k_near, b_near), (k_far, b_far) = (kernels_and_buffers("flex_attention", score_mod, t.mask_mod, extents)
                                        for t in (t_near, t_far))
    for t in b_near + b_far:
        if t.device != q1.device:
            raise ValueError(f"piecewise_attention: a tensor captured by score_mod/mask_mod is on {t.device} but "
                             f"the inputs are on {q1.device}; move it to {q1.device}.")
    scale = q1.shape[-1] ** -0.5 if scale is None else float(scale)

    def reference(*x):
        return piecewise_attention_reference(*x, dist_threshold, causal, scale, score_mod, block_mask)

    call = AttentionCall(piecewise_plan(k_near, t_near, len(b_near), k_far, t_far, len(b_far)), scale,
                         KernelOptions.of(kernel_options), reference, (score_mod,))
    return apply_attention(call, [x.contiguous() for x in (q1, k1, q2, k2, v)], [*b_near, *b_far])
