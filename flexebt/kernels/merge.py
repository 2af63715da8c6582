"""Merging two partial softmaxes over disjoint key sets, in one launch.

Each partial attention gives, per query row, its output ``out_a = sum_{j in A} e^(t_j - m_a) v_j / l_a``
with the row's max ``m_a`` over A and sum ``l_a = sum_{j in A} e^(t_j - m_a)`` (the forward's
``msum``; likewise B).  The attention over A u B is exactly

    m = max(m_a, m_b),  w_a = l_a e^(m_a - m),  w_b = l_b e^(m_b - m),  l = w_a + w_b,
    lse = m + log l,  out = (w_a out_a + w_b out_b) / l,

computed in fp32 and stored in out's dtype, with the merged ``msum = (m, l)``.  Merging through
the maxima and sums, not through each part's lse, stays exact where a row's scores are all huge
(an additive -1e9 mask): there ``lse_a = m_a + log l_a`` rounds to ``m_a``, and two parts would
weigh alike whatever their sizes.  A row empty in both (m = -inf) gives out 0, lse -inf, msum
(-inf, 0).  Used by piecewise attention (near and far passes); its derivatives are not needed
here: the backward of a split-key softmax is each pass's backward with the merged statistics
(flexebt/piecewise.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _merge_rows(OA, MA, OB, MB, O, L, M, R, DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    # int64 rows: R and the offsets rows * 2 (row statistics) and rows * DV pass 2**31 at large B * H * M
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_DV)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols[None, :] < DV)
    ma = tl.load(MA + rows * 2, mask=row_ok, other=float("-inf"))
    la = tl.load(MA + rows * 2 + 1, mask=row_ok, other=0.0)
    mb = tl.load(MB + rows * 2, mask=row_ok, other=float("-inf"))
    lb = tl.load(MB + rows * 2 + 1, mask=row_ok, other=0.0)
    m = tl.maximum(ma, mb)
    empty = m == float("-inf")
    m_safe = tl.where(empty, 0.0, m)  # exp(-inf - 0) = 0 for an empty side; no inf - inf
    wa = la * tl.exp(ma - m_safe)
    wb = lb * tl.exp(mb - m_safe)
    total = wa + wb
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, total))
    offs = rows[:, None] * DV + cols[None, :]
    oa = tl.load(OA + offs, mask=ok, other=0.0).to(tl.float32)
    ob = tl.load(OB + offs, mask=ok, other=0.0).to(tl.float32)
    out = (oa * (wa * inv)[:, None] + ob * (wb * inv)[:, None])
    tl.store(O + offs, out.to(O.dtype.element_ty), mask=ok)
    tl.store(L + rows, tl.where(empty, float("-inf"), m_safe + tl.log(tl.where(empty, 1.0, total))), mask=row_ok)
    tl.store(M + rows * 2, m, mask=row_ok)
    tl.store(M + rows * 2 + 1, total, mask=row_ok)


def merge_partial_softmax(out_a: Tensor, msum_a: Tensor, out_b: Tensor, msum_b: Tensor) -> tuple:
    """(out, lse, msum) of the attention over both key sets; inputs ``[..., Dv]`` and ``[..., 2]``
    (fp32 max and sum per row), as the forward kernels write them."""
    out_a, out_b = out_a.contiguous(), out_b.contiguous()
    msum_a, msum_b = msum_a.contiguous(), msum_b.contiguous()
    DV = out_a.shape[-1]
    R = msum_a.numel() // 2
    out = torch.empty_like(out_a)
    lse = torch.empty(msum_a.shape[:-1], dtype=torch.float32, device=msum_a.device)
    msum = torch.empty_like(msum_a)
    block_dv = triton.next_power_of_2(DV)
    block_r = max(1, min(64, 4096 // block_dv))
    _merge_rows[(triton.cdiv(R, block_r),)](out_a, msum_a, out_b, msum_b, out, lse, msum, R, DV=DV, BLOCK_R=block_r,
                                            BLOCK_DV=block_dv)
    return out, lse, msum
