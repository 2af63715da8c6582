"""Merging two partial softmaxes over disjoint key sets, in one launch.

Each partial attention gives, per query row, ``out_a = sum_{j in A} e^(s_j - lse_a) v_j`` and
``lse_a = log sum_{j in A} e^(s_j)`` (likewise B).  The attention over A u B is exactly

    m = max(lse_a, lse_b),  w_a = e^(lse_a - m),  w_b = e^(lse_b - m),
    lse = m + log(w_a + w_b),  out = (w_a out_a + w_b out_b) / (w_a + w_b),

computed in fp32 and stored in out's dtype; a row empty in both (both lse = -inf) gives out 0
and lse -inf.  Used by piecewise attention (near and far passes); its derivatives are not
needed here: the backward of a split-key softmax is each pass's backward with the merged
(out, lse) (flexebt/piecewise.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _merge_rows(OA, LA, OB, LB, O, L, R, DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_DV)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols[None, :] < DV)
    la = tl.load(LA + rows, mask=row_ok, other=float("-inf"))
    lb = tl.load(LB + rows, mask=row_ok, other=float("-inf"))
    m = tl.maximum(la, lb)
    empty = m == float("-inf")
    m_safe = tl.where(empty, 0.0, m)  # exp(-inf - 0) = 0 for each side; no inf - inf
    wa = tl.exp(la - m_safe)
    wb = tl.exp(lb - m_safe)
    total = wa + wb
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total))
    offs = rows.to(tl.int64)[:, None] * DV + cols[None, :]
    oa = tl.load(OA + offs, mask=ok, other=0.0).to(tl.float32)
    ob = tl.load(OB + offs, mask=ok, other=0.0).to(tl.float32)
    out = (oa * (wa * inv)[:, None] + ob * (wb * inv)[:, None])
    tl.store(O + offs, out.to(O.dtype.element_ty), mask=ok)
    tl.store(L + rows, tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total))), mask=row_ok)


def merge_partial_softmax(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of the attention over both key sets; inputs ``[..., Dv]`` and ``[...]``
    (fp32 lse), as the forward kernels write them."""
    out_a, out_b = out_a.contiguous(), out_b.contiguous()
    lse_a, lse_b = lse_a.contiguous(), lse_b.contiguous()
    DV = out_a.shape[-1]
    R = lse_a.numel()
    out = torch.empty_like(out_a)
    lse = torch.empty_like(lse_a)
    block_dv = triton.next_power_of_2(DV)
    block_r = max(1, min(64, 4096 // block_dv))
    _merge_rows[(triton.cdiv(R, block_r),)](out_a, lse_a, out_b, lse_b, out, lse, R, DV=DV, BLOCK_R=block_r,
                                            BLOCK_DV=block_dv)
    return out, lse
