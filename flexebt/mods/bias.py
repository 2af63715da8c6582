"""Additive bias tensor, e.g. a learned ``[H, Sq, Skv]`` bias; gradients reach it (1st and 2nd order)."""

from __future__ import annotations

from torch import Tensor


def generate_bias_score_mod(bias: Tensor):
    """score_mod ``score + bias[..., q_idx, kv_idx]``.

    Args:
        bias: ``[Sq, Skv]`` (shared), ``[H, Sq, Skv]`` (per head) or ``[B, H, Sq, Skv]``.  If it
            requires grad, flexebt returns its gradient, first and second order.  For EBT
            attention index it by frame: ``[S_o + 1, S_o + 1]``.

    Examples:
        >>> import torch, flexebt
        >>> bias = torch.zeros(4, 8, 8, requires_grad=True)
        >>> flexebt.mods.generate_bias_score_mod(bias).__name__
        'bias_4x8x8'
    """
    if not isinstance(bias, Tensor) or bias.dim() not in (2, 3, 4):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"generate_bias_score_mod: bias must be a 2-, 3- or 4-dim tensor "
                         f"([Sq, Skv], [H, Sq, Skv] or [B, H, Sq, Skv]), got {shape}.")
    if bias.dim() == 2:
        def bias_mod(score, b, h, q_idx, kv_idx):
            return score + bias[q_idx, kv_idx]
    elif bias.dim() == 3:
        def bias_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]
    else:
        def bias_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, q_idx, kv_idx]
    bias_mod.__name__ = "bias_" + "x".join(str(s) for s in bias.shape)
    return bias_mod


def main():
    """Run the small demo (``python -m flexebt.mods.bias``)."""
    import torch

    from flexebt._demo import demo_score_mod

    demo_score_mod(generate_bias_score_mod(torch.randn(2, 12, 12)))


if __name__ == "__main__":
    main()
