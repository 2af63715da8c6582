"""Dense (token-level) meaning of a block-sparse ``BlockMask``: what a kernel keeps."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

from .core import eval_mask_mod, index_grid


def _block_table(num_blocks: Tensor, indices: Tensor, n_kv_blocks: int) -> Tensor:
    """``[B', H', nQ, nKV]`` bool: the kv blocks that ``indices[..., :num_blocks]`` lists."""
    slots = torch.arange(indices.shape[-1], device=indices.device)
    # a listed block past the last kv block holds no positions (a mask made for longer sequences);
    # a negative index names no block either (the kernels' tables drop both: blockmask.py)
    listed = (slots < num_blocks.unsqueeze(-1).long()) & (indices.long() >= 0) & (indices.long() < n_kv_blocks)
    # Unlisted slots scatter into a spare column that is cut off afterwards.
    target = torch.where(listed, indices.long(), torch.full_like(indices, n_kv_blocks, dtype=torch.long))
    table = torch.zeros(*indices.shape[:-1], n_kv_blocks + 1, dtype=torch.bool, device=indices.device)
    table.scatter_(-1, target, True)
    return table[..., :n_kv_blocks]


def _to_tokens(table: Tensor, bq: int, bkv: int, Sq: int, Skv: int) -> Tensor:
    return table.repeat_interleave(bq, dim=-2)[..., :Sq, :].repeat_interleave(bkv, dim=-1)[..., :Skv]


def dense_keep(block_mask: Optional[BlockMask], B: int, H: int, Sq: int, Skv: int, device) -> Tensor:
    """Token-level keep mask ``[B, H, Sq, Skv]`` that a block-sparse kernel honours.

    A position is kept iff its block is *full*, or its block is *partial* and the block
    mask's ``mask_mod`` keeps it; positions in blocks that are not listed are dropped.  Full
    blocks skip the mask_mod, exactly like FlexAttention's kernels.  The mask_mod is evaluated
    per position (:func:`eval_mask_mod`), with torch's per-score semantics.
    """
    shape = (B, H, Sq, Skv)
    if block_mask is None or Sq == 0 or Skv == 0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    bq, bkv = block_mask.BLOCK_SIZE
    n_kv_blocks = -(-Skv // bkv)
    partial = _block_table(block_mask.kv_num_blocks, block_mask.kv_indices, n_kv_blocks)
    partial = _to_tokens(partial, bq, bkv, Sq, Skv).to(device)
    b, h, q, kv = index_grid(B, H, Sq, Skv, device)
    keep = partial.expand(shape) & eval_mask_mod(block_mask.mask_mod, shape, b, h, q, kv)
    if block_mask.full_kv_num_blocks is not None:
        full = _block_table(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_kv_blocks)
        keep = keep | _to_tokens(full, bq, bkv, Sq, Skv).to(device).expand(shape)
    return keep
