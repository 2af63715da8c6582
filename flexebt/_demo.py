"""Tiny helpers for the runnable demos at the bottom of each variant module."""

from __future__ import annotations

import torch


def ascii_mask(mask_mod, Sq: int, Skv: int, b: int = 0, h: int = 0) -> str:
    """A text picture of ``mask_mod`` over ``Sq x Skv``: ``#`` kept, ``.`` dropped."""
    from .reference.core import eval_mask_mod, index_grid

    bi, hi, q, kv = index_grid(1, 1, Sq, Skv, "cpu")
    keep = eval_mask_mod(mask_mod, (1, 1, Sq, Skv), bi + b, hi + h, q, kv)[0, 0]
    return "\n".join("".join("#" if x else "." for x in row) for row in keep.tolist())


def compare_with_torch(score_mod=None, mask_mod=None, S: int = 12, H: int = 2, D: int = 16) -> float:
    """Max abs difference between flexebt and torch's flex_attention forward on random data."""
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    from .api import flex_attention

    q, k, v = (torch.randn(1, H, S, D) for _ in range(3))
    bm = create_block_mask(mask_mod, None, None, S, S, device="cpu") if mask_mod is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch_flex(q, k, v, score_mod=score_mod, block_mask=bm)
    return (flex_attention(q, k, v, score_mod=score_mod, block_mask=bm) - ref).abs().max().item()


def demo_mask(mask_mod, S: int = 12) -> None:
    print(f"{mask_mod.__name__} over {S}x{S} (# = attend):")
    print(ascii_mask(mask_mod, S, S))
    print(f"max |flexebt - torch flex_attention| = {compare_with_torch(mask_mod=mask_mod, S=S):.2e}")


def demo_score_mod(score_mod, S: int = 12, H: int = 2) -> None:
    print(f"{score_mod.__name__}: max |flexebt - torch flex_attention| = "
          f"{compare_with_torch(score_mod=score_mod, S=S, H=H):.2e}")
