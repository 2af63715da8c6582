"""Drop-in call of ebt_flash_attention 0.2.0's ``ebt_attention``, on flexebt.

``attn_mask`` is an ``(S + 1) x (S + 1)`` frame mask (``S = S_o``): bool (True = attend) or
additive.  **Documented difference:** additive values are in natural-log units added to the
scaled score (the torch convention); ebt_flash_attention adds them to the score in base 2 (after
its ``sm_scale * log2(e)``, before ``exp2``), so multiply such a mask by ``ln 2`` (``0.6931``) to
reproduce its numbers.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import noop_mask

from . import _validation as V
from .api import flex_ebt_attention
from .blockmask import create_ebt_block_mask, frame_causal_mask
from .masks.ebt import generate_frame_mask
from .mods.bias import generate_bias_score_mod

__all__ = ["ebt_attention"]


def ebt_attention(q_o: Tensor, k_o: Tensor, v_o: Tensor, q_p: Tensor, k_p: Tensor, v_p: Tensor,
                  attn_mask: Optional[Tensor] = None, causal: bool = False, sm_scale: Optional[float] = None,
                  warp_specialize: bool = True, USE_TMA: bool = True, *, enable_gqa: bool = False,  # noqa: N803
                  return_lse: bool = False, kernel_options: Optional[dict] = None):
    """EBT two-stream attention with ebt_flash_attention 0.2.0's signature (same positional
    order); returns ``(out_o, out_p)``.

    Args:
        q_o, k_o, v_o: observed stream ``[B, H, S_o, D]``.  q_p, k_p, v_p: predicted ``[B, H, S_p, D]``.
        attn_mask: frame mask ``[S_o + 1, S_o + 1]`` (or with leading ``[H]`` / ``[B, H]`` dims),
            bool (True = attend) or floating additive (natural log units; ``-inf`` drops).  The
            positions it drops become a block mask, so whole tiles it drops are skipped.
        causal: AND the causal frame mask.  With neither ``attn_mask`` nor ``causal`` every frame
            pair is kept (a ``UserWarning`` says so: the autoregressive EBT passes ``causal=True``).
        sm_scale: softmax scale, default ``D ** -0.5``.
        warp_specialize, USE_TMA: ebt_flash_attention's scheduling switches; accepted and ignored
            (flexebt picks its kernels' schedule; ``kernel_options`` sets it).
        enable_gqa: allow fewer key/value heads than query heads.
        return_lse: also return ``lse_o``, ``lse_p`` (as :func:`flexebt.flex_ebt_attention`).
        kernel_options: as :func:`flexebt.flex_ebt_attention` (backend, tiles).

    Returns:
        ``(out_o, out_p)``: ``[B, H, S_o, D]`` and ``[B, H, S_p, D]`` in the input dtype, or
        ``(out_o, out_p, lse_o, lse_p)`` with ``return_lse``.

    Raises:
        ValueError: stream lengths with ``S_o < S_p``, or an ``attn_mask`` of the wrong shape.
        TypeError: an ``attn_mask`` that is not a tensor.

    Unlike ebt_flash_attention, second-order gradients (``create_graph=True``) are exact.

    Examples:
        >>> import torch
        >>> from flexebt.compat import ebt_attention
        >>> x = lambda: torch.randn(1, 2, 8, 16)
        >>> mask = torch.tril(torch.ones(9, 9, dtype=torch.bool))
        >>> out_o, out_p = ebt_attention(x(), x(), x(), x(), x(), x(), attn_mask=mask, causal=True)
    """
    fn = "compat.ebt_attention"
    V.check_tensors(fn, [("q_o", q_o), ("k_o", k_o), ("v_o", v_o), ("q_p", q_p), ("k_p", k_p), ("v_p", v_p)])
    B, H, S_o = q_o.shape[:3]
    S_p = q_p.shape[2]
    V.check_ebt_lengths(S_o, S_p)
    score_mod, mask_mod = None, None
    mask_b = mask_h = None  # the mask's own batch / heads: the block tables must follow them
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"{fn}: attn_mask must be a tensor or None, got {type(attn_mask).__name__}.")
        F = S_o + 1
        if attn_mask.dim() not in (2, 3, 4) or tuple(attn_mask.shape[-2:]) != (F, F):
            raise ValueError(
                f"{fn}: attn_mask must be a frame mask of shape [{F}, {F}] (S_o + 1 = {F}), optionally with "
                f"leading [H] or [B, H] dims; got {tuple(attn_mask.shape)}."
            )
        lead = tuple(attn_mask.shape[:-2])
        if (attn_mask.dim() == 3 and lead[0] != H) or (attn_mask.dim() == 4 and (lead[0] not in (1, B) or lead[1] not in (1, H))):
            raise ValueError(f"{fn}: attn_mask leading dims {lead} do not match B={B}, H={H}.")
        if attn_mask.device != q_o.device:
            raise ValueError(f"{fn}: attn_mask is on {attn_mask.device} but the inputs are on {q_o.device}.")
        if attn_mask.dim() == 4:
            attn_mask = attn_mask.expand(B, H, F, F)
            mask_b, mask_h = B, H
        elif attn_mask.dim() == 3:
            mask_h = H
        if attn_mask.dtype == torch.bool:
            mask_mod = generate_frame_mask(attn_mask)
        elif attn_mask.is_floating_point():
            # -inf drops the pair: that part becomes the block mask (tiles it drops are skipped);
            # the finite values are an additive bias (differentiable, if the mask requires grad)
            kept = attn_mask != float("-inf")
            mask_mod = generate_frame_mask(kept)
            score_mod = generate_bias_score_mod(torch.where(kept, attn_mask, 0.0))
        else:
            raise TypeError(f"{fn}: attn_mask must be bool or floating point, got {attn_mask.dtype}.")
    if causal:
        mask_mod = frame_causal_mask if mask_mod is None else _and(mask_mod, frame_causal_mask)
    if mask_mod is None:
        if not torch.compiler.is_compiling():
            warnings.warn(f"{fn}: attn_mask=None and causal=False keep every frame pair, so each query also sees "
                          f"the keys of later frames (not causal). Pass causal=True for the autoregressive EBT.",
                          UserWarning, stacklevel=2)
        mask_mod = noop_mask
    block_mask = create_ebt_block_mask(mask_mod, mask_b, mask_h, S_o, S_p, device=q_o.device)
    return flex_ebt_attention(q_o, k_o, v_o, q_p, k_p, v_p, score_mod=score_mod, block_mask=block_mask,
                              scale=sm_scale, enable_gqa=enable_gqa, return_lse=return_lse,
                              kernel_options=kernel_options)


def _and(first, second):
    def both(b, h, q_idx, kv_idx):
        return first(b, h, q_idx, kv_idx) & second(b, h, q_idx, kv_idx)

    both.__name__ = f"{first.__name__}_and_{second.__name__}"
    return both
