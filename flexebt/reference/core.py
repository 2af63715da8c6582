"""Dense building blocks shared by every reference oracle.

Everything here is plain PyTorch on materialised ``[B, H, Sq, Skv]`` score tensors, so
autograd gives exact first- and second-order gradients, ``torch.func`` transforms work,
and float64 inputs give a float64 oracle.  Memory is O(S^2): this is the oracle and the CPU
backend, not the fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp16/bf16 accumulate in fp32, fp32/fp64 keep theirs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is fp32 (natural log), or float64 for float64 inputs (as torch flex_attention)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def index_grid(B: int, H: int, Sq: int, Skv: int, device, q_offset: int = 0, kv_offset: int = 0):
    """Broadcastable int32 index tensors ``b, h, q_idx, kv_idx`` for a dense evaluation.

    Shapes are ``[B,1,1,1]``, ``[1,H,1,1]``, ``[1,1,Sq,1]``, ``[1,1,1,Skv]``, so a mod written
    for scalars (the FlexAttention convention) evaluates on the whole grid by broadcasting.
    """
    b = torch.arange(B, device=device, dtype=torch.int32).view(B, 1, 1, 1)
    h = torch.arange(H, device=device, dtype=torch.int32).view(1, H, 1, 1)
    q = (torch.arange(Sq, device=device, dtype=torch.int32) + q_offset).view(1, 1, Sq, 1)
    kv = (torch.arange(Skv, device=device, dtype=torch.int32) + kv_offset).view(1, 1, 1, Skv)
    return b, h, q, kv


def apply_score_mod(score_mod, scores: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Evaluate a FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)`` densely."""
    if score_mod is None:
        return scores
    out = score_mod(scores, b, h, q_idx, kv_idx)
    if not isinstance(out, Tensor):
        out = torch.as_tensor(out, dtype=scores.dtype, device=scores.device)
    if out.dtype != scores.dtype:
        out = out.to(scores.dtype)
    return out.expand(scores.shape) if out.shape != scores.shape else out


def eval_mask_mod(mask_mod, shape, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Evaluate a ``mask_mod(b, h, q_idx, kv_idx)`` densely; returns a bool tensor of ``shape``."""
    if mask_mod is None:
        return torch.ones(shape, dtype=torch.bool, device=q_idx.device)
    keep = mask_mod(b, h, q_idx, kv_idx)
    if not isinstance(keep, Tensor):
        keep = torch.as_tensor(bool(keep), device=q_idx.device)
    return keep.to(torch.bool).expand(shape)


def masked_softmax(t: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim restricted to ``keep``; returns ``(P, lse)``.

    A row with no kept entry (or whose kept scores are all ``-inf``) gets ``P = 0`` and
    ``lse = -inf``, with zero (never NaN) gradients.  Written so that no masked position ever
    produces an ``inf`` inside autograd (the usual ``where`` NaN trap): masked scores are
    replaced by the row shift itself before ``exp``, and the sum is guarded before ``log``.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=t.dtype, device=t.device)
    # The shift m is only for stability: softmax is shift invariant, so detaching it leaves
    # first- and second-order gradients exact.
    m = torch.where(keep, t, neg_inf).amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(keep, torch.exp(torch.where(keep, t, m) - m), torch.zeros_like(t))
    denom = e.sum(dim=-1, keepdim=True)
    nonempty = denom > 0
    safe = torch.where(nonempty, denom, torch.ones_like(denom))
    p = e / safe
    lse = torch.where(nonempty, torch.log(safe) + m, neg_inf).squeeze(-1)
    return p, lse


def expand_kv_heads(x: Tensor, n_q_heads: int) -> Tensor:
    """GQA: query head ``h`` reads key/value head ``h // (Hq // Hkv)``."""
    n_kv = x.shape[1]
    if n_kv == n_q_heads:
        return x
    return x.repeat_interleave(n_q_heads // n_kv, dim=1)
