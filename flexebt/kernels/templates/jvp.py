# flexebt kernel template: forward mode, the forward and its JVP in one pass (see common.py for the
# layout and the hooks).
#
# With tangents dq, dk, dv of q, k, v:
#   ds = scale (dq k^T + q dk^T),  dt = f'(s) ds,  dP = P (dt - m),  m_i = sum_j P_ij dt_ij,
#   d o_i = sum_j P_ij (dt_ij - m_i) v_j + sum_j P_ij dv_j,   d lse_i = m_i.
# One pass with the forward's online softmax: sum P dt v, sum P dv and sum P dt are rescaled by the
# same factor as the output accumulator, so the tangents come out normalised at the end.
import triton
import triton.language as tl
from common import LN2, _blocks, _load_rows, _mm, _query_program, _row_table, _store_rows, _tile_positions  # noqa
from common import _exp_shift, _row_results, _store_msum, _tile_start  # noqa
from own_key import _own_key_jvp  # noqa


@triton.jit
def _jvp_tile(acc, tacc, macc, l_i, m_i, q, dq, K, V, DK, DVT, kvh, start_n, offs_m, off_b, off_h, Sq, Skv, scale,
              Q_OFF, __BUFFERS__
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
              DOT: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K + kvh * Skv * D, offs_n, Skv, D, BLOCK_D, EVEN)
    v = _load_rows(V + kvh * Skv * DV, offs_n, Skv, DV, BLOCK_DV, EVEN)
    dk = _load_rows(DK + kvh * Skv * D, offs_n, Skv, D, BLOCK_D, EVEN)
    dv = _load_rows(DVT + kvh * Skv * DV, offs_n, Skv, DV, BLOCK_DV, EVEN)
    s_raw = _mm(q, tl.trans(k), DOT)
    VALID, mq_idx, q_idx, kv_idx, ZERO = _tile_positions(offs_m, offs_n, Sq, Skv, Q_OFF, BLOCK_M, BLOCK_N, EVEN)
    tu, dtds = hook.score_grad(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx, kv_idx=kv_idx)
    keep = hook.keep(full=IS_FULL, b=off_b, h=off_h, q_idx=q_idx, mq_idx=mq_idx, kv_idx=kv_idx, valid=VALID)
    tu = tl.where(keep, tu, float("-inf"))
    dt = tl.where(keep, dtds * (_mm(dq, tl.trans(k), DOT) + _mm(q, tl.trans(dk), DOT)) * scale, 0.0)
    m_new = tl.maximum(m_i, tl.max(tu, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = _exp_shift(m_i, m_shift)
    p = _exp_shift(tu, m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT)
    pdt = p * dt
    tacc = tacc * alpha[:, None] + _mm(pdt.to(v.dtype), v, DOT) + _mm(p.to(dv.dtype), dv, DOT)
    macc = macc * alpha + tl.sum(pdt, 1)
    return acc, tacc, macc, l_i, m_new


@triton.jit
def flex_jvp(__SIGNATURE__):
    """Forward and JVP in one pass: O, LSE and their tangents DO (d out), DLSE (d lse).  HAS_SELF:
    the EBT own key (OWN, with its tangents) seeds the accumulators, as in the forward."""
    pid_m, off_b, off_h, offs_m, qh, kvh = _query_program(Sq, H, Hkv, HEAD_GROUP, BLOCK_M, False)
    q = _load_rows(Q + qh * Sq * D, offs_m, Sq, D, BLOCK_D, EVEN)
    dq = _load_rows(DQ + qh * Sq * D, offs_m, Sq, D, BLOCK_D, EVEN)
    if HAS_SELF:
        tu_s, dt_s, keep_s, vp, dvp = _own_key_jvp(q, dq, OWN, kvh * Sq, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF,
                                                   __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, EVEN)
        m_i = tu_s
        l_i = tl.where(keep_s, 1.0, 0.0)
        acc = tl.where(keep_s[:, None], vp.to(tl.float32), 0.0)
        tacc = tl.where(keep_s[:, None], dt_s[:, None] * vp.to(tl.float32) + dvp.to(tl.float32), 0.0)
        macc = tl.where(keep_s, dt_s, 0.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        tacc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        macc = tl.zeros([BLOCK_M], dtype=tl.float32)
    IDX, FULL_IDX, base, base_full, n_partial, n_full = _row_table(KV_BLOCKS, off_b, off_h,
                                                                   (pid_m * BLOCK_M) // SPARSE_Q, HAS_FULL)
    for FULL in tl.static_range(2):
        LIST, row, n_tiles = _blocks(FULL, IDX, FULL_IDX, base, base_full, n_partial, n_full, SPARSE_KV, BLOCK_N)
        for it in range(n_tiles):
            acc, tacc, macc, l_i, m_i = _jvp_tile(acc, tacc, macc, l_i, m_i, q, dq, K, V, DK, DVT, kvh,
                                                  _tile_start(LIST, row, it, SPARSE_KV, BLOCK_N), offs_m, off_b, off_h,
                                                  Sq, Skv, scale, Q_OFF, __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV, BLOCK_M,
                                                  BLOCK_N, FULL == 1, EVEN, DOT)
    empty = l_i == 0.0
    inv = 1.0 / tl.where(empty, 1.0, l_i)
    out = acc * inv[:, None]
    mbar = macc * inv
    dout = tacc * inv[:, None] - mbar[:, None] * out
    m_nat, lse = _row_results(m_i, l_i, empty)
    _store_rows(O + qh * Sq * DV, out, offs_m, Sq, DV, BLOCK_DV)
    _store_rows(DO + qh * Sq * DV, dout, offs_m, Sq, DV, BLOCK_DV)
    tl.store(LSE + qh * Sq + offs_m, lse, mask=offs_m < Sq)
    tl.store(DLSE + qh * Sq + offs_m, mbar, mask=offs_m < Sq)
    _store_msum(MSUM, m_nat, l_i, m_i, qh, offs_m, Sq)
