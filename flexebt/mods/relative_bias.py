"""Learned relative-position bias (T5-style, clipped): one learned value per head and distance."""

from __future__ import annotations

import torch
from torch import Tensor


def generate_relative_position_bias(table: Tensor, max_distance: int):
    """score_mod ``score + table[h, clamp(kv_idx - q_idx, -max_distance, max_distance) + max_distance]``.

    Args:
        table: ``[H, 2 * max_distance + 1]`` learned biases (gradients flow to it).
        max_distance: distances beyond this share the edge value.

    Examples:
        >>> import torch, flexebt
        >>> t = torch.zeros(4, 9, requires_grad=True)
        >>> flexebt.mods.generate_relative_position_bias(t, 4).__name__
        'relative_position_bias_4'
    """
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 0:
        raise ValueError(f"generate_relative_position_bias: max_distance must be an int >= 0, got {max_distance!r}.")
    if not isinstance(table, Tensor) or table.dim() != 2 or table.shape[1] != 2 * max_distance + 1:
        shape = tuple(table.shape) if isinstance(table, Tensor) else type(table).__name__
        raise ValueError(f"generate_relative_position_bias: table must be [H, {2 * max_distance + 1}] "
                         f"(H, 2 * max_distance + 1), got {shape}.")

    def relative_position_bias(score, b, h, q_idx, kv_idx):
        rel = torch.clamp(kv_idx - q_idx, -max_distance, max_distance) + max_distance
        return score + table[h, rel]

    relative_position_bias.__name__ = f"relative_position_bias_{max_distance}"
    return relative_position_bias


def main():
    """Run the small demo (``python -m flexebt.mods.relative_bias``)."""
    from flexebt._demo import demo_score_mod

    demo_score_mod(generate_relative_position_bias(torch.randn(2, 7), 3))


if __name__ == "__main__":
    main()
