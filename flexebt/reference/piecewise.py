"""Reference piecewise (NLPE) attention (SPEC §3): dense math, exact first and second order.

Queries are aligned to the end of the keys: with ``P = N - M``, query ``m`` and key ``n`` are
``dist = P + m - n`` apart.  Near pairs (``dist < w``) score ``<q1, k1>``, far pairs
(``dist >= w``) score ``<q2, k2>``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import compute_dtype, lse_dtype, masked_softmax


def piecewise_attention_reference(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor, dist_threshold,
                                  causal: bool = False, scale=None) -> tuple[Tensor, Tensor]:
    """``(out, lse)``; inputs are assumed validated."""
    M, N, D = q1.shape[2], k1.shape[2], q1.shape[-1]
    cdt = compute_dtype(q1.dtype)
    scale = D ** -0.5 if scale is None else scale
    s1 = torch.matmul(q1.to(cdt), k1.to(cdt).transpose(-1, -2)) * scale
    s2 = torch.matmul(q2.to(cdt), k2.to(cdt).transpose(-1, -2)) * scale
    m = torch.arange(M, device=q1.device).view(M, 1)
    n = torch.arange(N, device=q1.device).view(1, N)
    dist = (N - M) + m - n
    s = torch.where(dist >= dist_threshold, s2, s1)
    keep = (dist >= 0) if causal else torch.ones_like(dist, dtype=torch.bool)
    p, lse = masked_softmax(s, keep.expand(s.shape))
    out = torch.matmul(p, v.to(cdt))
    return out.to(q1.dtype), lse.to(lse_dtype(q1.dtype))
