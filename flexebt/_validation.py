"""Input checks shared by the public functions.

Every message says what was expected, what came, and how to fix it.  User input never
reaches an ``assert`` or an ``IndexError``.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_tensors(fn: str, named: Sequence[tuple[str, object]]) -> None:
    """Rank 4, floating dtype, and one dtype and device for all of ``named``."""
    first_name, first = None, None
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"{fn}: {name} must have 4 dimensions [B, H, S, D], got shape {tuple(t.shape)} "
                f"({t.dim()} dims). Reshape it, e.g. x.view(B, S, H, D).transpose(1, 2)."
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{fn}: {name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64."
            )
        if first is None:
            first_name, first = name, t
            continue
        if t.dtype != first.dtype:
            raise ValueError(
                f"{fn}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                f"all inputs must share one dtype (cast with .to({first.dtype}))."
            )
        if t.device != first.device:
            raise ValueError(
                f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}; "
                f"move all inputs to one device."
            )
        if t.shape[0] != first.shape[0]:
            raise ValueError(
                f"{fn}: batch size mismatch: {first_name} has B={first.shape[0]} but {name} has B={t.shape[0]}."
            )


def check_qkv(fn: str, q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool, q_name="query", k_name="key",
              v_name="value") -> None:
    """Head dims, key/value lengths and head counts (GQA) of one q/k/v triple."""
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{fn}: head dim mismatch: {q_name} has D={q.shape[-1]} but {k_name} has D={k.shape[-1]}; "
            f"query and key must share D (value may differ)."
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"{fn}: {k_name} has {k.shape[2]} positions but {v_name} has {v.shape[2]}; they must match."
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(
            f"{fn}: {k_name} has {k.shape[1]} heads but {v_name} has {v.shape[1]}; they must match."
        )
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(
                f"{fn}: {q_name} has {Hq} heads but {k_name}/{v_name} have {Hkv}; pass enable_gqa=True for "
                f"grouped-query attention, or give them the same number of heads."
            )
        if Hq % Hkv != 0:
            raise ValueError(
                f"{fn}: grouped-query attention needs the query heads ({Hq}) to be a multiple of the "
                f"key/value heads ({Hkv})."
            )


def check_scale(fn: str, scale) -> None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"{fn}: scale must be a float or None, got {type(scale).__name__}.")


def check_callable(fn: str, name: str, mod) -> None:
    if mod is not None and not callable(mod):
        raise TypeError(f"{fn}: {name} must be a callable or None, got {type(mod).__name__}.")


def check_block_mask(fn: str, block_mask: Optional[BlockMask], B: int, H: int, Sq: int, Skv: int) -> None:
    if block_mask is None:
        return
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"{fn}: block_mask must be a torch.nn.attention.flex_attention.BlockMask (from create_block_mask) "
            f"or None, got {type(block_mask).__name__}."
        )
    if tuple(block_mask.seq_lengths) != (Sq, Skv):
        raise ValueError(
            f"{fn}: block_mask was built for (Q_LEN, KV_LEN) = {tuple(block_mask.seq_lengths)} but the inputs "
            f"have ({Sq}, {Skv}); rebuild it with create_block_mask(mask_mod, B, H, {Sq}, {Skv})."
        )
    check_mask_batch_heads(fn, block_mask.kv_num_blocks.shape[0], block_mask.kv_num_blocks.shape[1], B, H)


def check_mask_batch_heads(fn: str, mB: int, mH: int, B: int, H: int) -> None:
    if mB not in (1, B):
        raise ValueError(f"{fn}: block_mask was built for B={mB}, inputs have B={B}; use B={B} or None.")
    if mH not in (1, H):
        raise ValueError(f"{fn}: block_mask was built for H={mH}, inputs have H={H} query heads; use H={H} or None.")


def check_ebt_lengths(S_obs: int, S_pred: int) -> None:
    if S_pred > S_obs:
        raise ValueError(
            f"EBT attention: the predicted stream (S_pred={S_pred}) is longer than the observed stream "
            f"(S_obs={S_obs}); expected S_obs = S_pred + r with r >= 0."
        )


def check_kernel_options(fn: str, kernel_options) -> None:
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise TypeError(f"{fn}: kernel_options must be a dict or None, got {type(kernel_options).__name__}.")
