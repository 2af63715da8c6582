"""Reference single-stream FlexAttention: dense math, exact first and second order."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .masking import dense_keep
from .core import apply_score_mod, compute_dtype, expand_kv_heads, index_grid, kept_scores, lse_dtype, masked_softmax


def flex_attention_reference(query: Tensor, key: Tensor, value: Tensor, score_mod: Optional[Callable] = None,
                             block_mask: Optional[BlockMask] = None, scale: Optional[float] = None,
                             return_max: bool = False) -> tuple:
    """``(out, lse)`` of ``softmax(score_mod(scale * q k^T) | mask) v`` for ``[B, H, S, D]`` inputs;
    with ``return_max`` also each row's largest kept modified score (no gradient; ``-inf`` for a
    row that keeps nothing), as torch's ``AuxOutput.max_scores``.

    Inputs are assumed validated.  GQA is handled by expanding the key/value heads.
    """
    B, Hq, Sq, D = query.shape
    Skv = key.shape[2]
    cdt = compute_dtype(query.dtype)
    scale = D ** -0.5 if scale is None else scale
    q = query.to(cdt)
    k = expand_kv_heads(key.to(cdt), Hq)
    v = expand_kv_heads(value.to(cdt), Hq)

    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    b, h, qi, ki = index_grid(B, Hq, Sq, Skv, query.device)
    keep = dense_keep(block_mask, B, Hq, Sq, Skv, query.device)
    t = apply_score_mod(score_mod, kept_scores(s, keep), b, h, qi, ki)
    p, lse = masked_softmax(t, keep)
    out = torch.matmul(p, v)
    out, lse = out.to(query.dtype), lse.to(lse_dtype(query.dtype))
    if not return_max:
        return out, lse
    kept = torch.where(keep, t.detach(), float("-inf"))
    maxs = kept.amax(-1) if Skv > 0 else lse.detach().clone()
    return out, lse, maxs.to(lse.dtype)
