"""Reference EBT two-stream attention: dense math, exact first and second order.

Frame: observed token ``j`` at frame ``j``; predicted token ``i`` at frame ``t = i + r + 1``.
An observed query attends to observed keys.  A predicted query attends to the observed keys
except the one at its own frame ``t``, plus its *own* predicted key at frame ``t`` -- a single
extra column per row, so the predicted stream never forms a predicted x predicted tile.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .masking import dense_keep
from .core import apply_score_mod, compute_dtype, expand_kv_heads, index_grid, kept_scores, lse_dtype, masked_softmax


def ebt_attention_reference(q_o: Tensor, k_o: Tensor, v_o: Tensor, q_p: Tensor, k_p: Tensor, v_p: Tensor,
                            score_mod: Optional[Callable] = None, block_mask=None,
                            scale: Optional[float] = None):
    """``(out_o, out_p, lse_o, lse_p)``; inputs are assumed validated."""
    B, H, So, D = q_o.shape
    Sp = q_p.shape[2]
    r = So - Sp
    dev = q_o.device
    cdt = compute_dtype(q_o.dtype)
    scale = D ** -0.5 if scale is None else scale
    qo, qp = q_o.to(cdt), q_p.to(cdt)
    ko, vo = expand_kv_heads(k_o.to(cdt), H), expand_kv_heads(v_o.to(cdt), H)
    kp, vp = expand_kv_heads(k_p.to(cdt), H), expand_kv_heads(v_p.to(cdt), H)

    # Observed stream: an ordinary attention over the observed keys, frame == stream index.
    b, h, qi, ki = index_grid(B, H, So, So, dev)
    if block_mask is None:
        keep_oo = torch.ones(B, H, So, So, dtype=torch.bool, device=dev)
    else:
        keep_oo = dense_keep(block_mask.observed, B, H, So, So, dev)
    t_oo = apply_score_mod(score_mod, kept_scores(torch.matmul(qo, ko.transpose(-1, -2)) * scale, keep_oo),
                           b, h, qi, ki)
    p_oo, lse_o = masked_softmax(t_oo, keep_oo)
    out_o = torch.matmul(p_oo, vo)

    # Predicted stream: S_o observed candidates plus one own-key column per row.
    b, h, ti, ki = index_grid(B, H, Sp, So, dev, q_offset=r + 1)
    if block_mask is None:
        keep_po = (ki != ti).expand(B, H, Sp, So)
        keep_self = torch.ones(B, H, Sp, 1, dtype=torch.bool, device=dev)
    else:
        keep_po = dense_keep(block_mask.predicted, B, H, Sp, So, dev)  # its mask_mod drops kv == t
        keep_self = block_mask.own_keep_for(B, H).to(device=dev, dtype=torch.bool).unsqueeze(-1)
    t_po = apply_score_mod(score_mod, kept_scores(torch.matmul(qp, ko.transpose(-1, -2)) * scale, keep_po),
                           b, h, ti, ki)
    s_self = (qp * kp).sum(-1, keepdim=True) * scale  # [B, H, Sp, 1]
    t_self = apply_score_mod(score_mod, kept_scores(s_self, keep_self), b, h, ti, ti)
    p, lse_p = masked_softmax(torch.cat([t_po, t_self], dim=-1), torch.cat([keep_po, keep_self], dim=-1))
    out_p = torch.matmul(p[..., :So], vo) + p[..., So:] * vp

    ldt = lse_dtype(q_o.dtype)
    return out_o.to(q_o.dtype), out_p.to(q_o.dtype), lse_o.to(ldt), lse_p.to(ldt)
