"""Reference piecewise (NLPE) attention: dense math, exact first and second order.

Queries are aligned to the end of the keys: with ``P = N - M``, query ``m`` and key ``n`` are
``dist = P + m - n`` apart.  Near pairs (``dist < w``) score ``<q1, k1>``, far pairs
(``dist >= w``) score ``<q2, k2>``.  An optional ``score_mod`` then sees the chosen score at
``(m, n)``, and an optional ``block_mask`` (over ``M x N``) drops pairs, as in ``flex_attention``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .core import apply_score_mod, compute_dtype, index_grid, kept_scores, lse_dtype, masked_softmax
from .masking import dense_keep


def piecewise_attention_reference(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor, dist_threshold,
                                  causal: bool = False, scale=None, score_mod: Optional[Callable] = None,
                                  block_mask=None) -> tuple[Tensor, Tensor]:
    """``(out, lse)``; inputs are assumed validated."""
    B, H, M, D = q1.shape
    N = k1.shape[2]
    cdt = compute_dtype(q1.dtype)
    scale = D ** -0.5 if scale is None else scale
    s1 = torch.matmul(q1.to(cdt), k1.to(cdt).transpose(-1, -2)) * scale
    s2 = torch.matmul(q2.to(cdt), k2.to(cdt).transpose(-1, -2)) * scale
    m = torch.arange(M, device=q1.device).view(M, 1)
    n = torch.arange(N, device=q1.device).view(1, N)
    dist = (N - M) + m - n
    s = torch.where(dist >= dist_threshold, s2, s1)
    keep = (dist >= 0) if causal else torch.ones_like(dist, dtype=torch.bool)
    keep = keep.expand(s.shape)
    if block_mask is not None:
        keep = keep & dense_keep(block_mask, B, H, M, N, q1.device)
    if score_mod is not None:
        b, h, qi, ki = index_grid(B, H, M, N, q1.device)
        s = apply_score_mod(score_mod, kept_scores(s, keep), b, h, qi, ki)
    p, lse = masked_softmax(s, keep)
    out = torch.matmul(p, v.to(cdt))
    return out.to(q1.dtype), lse.to(lse_dtype(q1.dtype))
