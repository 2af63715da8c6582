"""Piecewise (NLPE) attention on the single-stream kernels: two block-sparse passes, one exact merge.

Near pairs (``dist = P + m - n < w``) score ``<q1, k1>``, far pairs score ``<q2, k2>``.  Each
region is one ``flex_attention`` pass over its own block mask, so a tile that lies wholly in one
region runs in one pass only -- one product -- and only the tiles the threshold crosses run in
both, each pass keeping its own pairs.  The two partial softmaxes merge exactly through their
log-sum-exps:

    lse = logaddexp(lse_near, lse_far),   out = e^(lse_near - lse) out_near + e^(lse_far - lse) out_far.

Every derivative order follows: the kernels differentiate (out, lse) of each pass -- backward,
fused double backward, JVP -- and the merge is plain torch.  The offset P and the threshold enter
the mask_mods as captured one-element int32 tensors, so a new threshold reuses the compiled
kernels; only the block masks are rebuilt (and cached).
"""

from __future__ import annotations

import collections
import math
from typing import Callable, Optional

import torch
from torch import Tensor

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
    from .codegen.source import _builder

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
    pair = _builder().submit(_build_pair, M, N, w, causal, device, user, B, H, bs).result()
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


def piecewise_attention_kernels(q1, k1, q2, k2, v, dist_threshold, causal, scale, score_mod, block_mask,
                                kernel_options) -> tuple[Tensor, Tensor]:
    from .api import flex_attention

    M, N = q1.shape[2], k1.shape[2]
    near, far = region_block_masks(M, N, dist_threshold, causal, q1.device, block_mask)
    out_n, lse_n = flex_attention(q1, k1, v, score_mod=score_mod, block_mask=near, scale=scale, return_lse=True,
                                  kernel_options=kernel_options)
    out_f, lse_f = flex_attention(q2, k2, v, score_mod=score_mod, block_mask=far, scale=scale, return_lse=True,
                                  kernel_options=kernel_options)
    return merge_partial_attention(out_n, lse_n, out_f, lse_f)
