"""EBT frame masks: mask_mods over the ``(S_o + 1) x (S_o + 1)`` frame.

In the frame, observed token ``j`` sits at ``j`` and predicted token ``i`` at ``i + r + 1``;
the ordinary causal mask therefore gives the autoregressive EBT.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ebt_causal_mask(b, h, q_idx, kv_idx):
    """Autoregressive EBT in frame coordinates: ``q_frame >= kv_frame``.

    Observed queries are causal; predicted token ``i`` sees observed ``0 .. i + r`` and itself.
    """
    return q_idx >= kv_idx


def generate_ebt_causal_mask():
    """The EBT causal frame mask_mod (identical to the causal mask, in frame coordinates).

    Examples:
        >>> import flexebt
        >>> flexebt.masks.generate_ebt_causal_mask().__name__
        'ebt_causal_mask'
    """
    return ebt_causal_mask


def generate_frame_mask(mask: Tensor):
    """mask_mod from a boolean frame mask tensor (True = attend).

    Args:
        mask: ``[S_o + 1, S_o + 1]``, ``[H, S_o + 1, S_o + 1]`` or ``[B, H, S_o + 1, S_o + 1]`` bool.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() not in (2, 3, 4):
        desc = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"generate_frame_mask: expected a 2-, 3- or 4-dim bool tensor, got {desc}.")
    if mask.dim() == 2:
        def frame_mask(b, h, q_idx, kv_idx):
            return mask[q_idx, kv_idx]
    elif mask.dim() == 3:
        def frame_mask(b, h, q_idx, kv_idx):
            return mask[h, q_idx, kv_idx]
    else:
        def frame_mask(b, h, q_idx, kv_idx):
            return mask[b, h, q_idx, kv_idx]
    frame_mask.__name__ = "frame_mask_" + "x".join(str(s) for s in mask.shape)
    return frame_mask


def main():
    """Run the small demo (``python -m flexebt.masks.ebt``)."""
    import flexebt
    from flexebt._demo import ascii_mask

    S_o, S_p = 6, 5
    bm = flexebt.create_ebt_block_mask(ebt_causal_mask, 1, 1, S_o, S_p, BLOCK_SIZE=4)
    print(f"EBT causal frame mask, S_o={S_o}, S_p={S_p} (r={S_o - S_p}); frame:")
    print(ascii_mask(ebt_causal_mask, S_o + 1, S_o + 1))
    print("over the concatenated streams [observed; predicted]:")
    print("\n".join("".join("#" if x else "." for x in row) for row in bm.to_dense_frame().tolist()))


if __name__ == "__main__":
    main()
