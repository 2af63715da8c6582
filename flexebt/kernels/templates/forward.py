# flexebt kernel template: the forward pass (see common.py for the layout and the hooks).
#
# One program per query tile keeps a running max m_i and sum l_i (online softmax) and rescales
# the output accumulator by exp(m_old - m_new) whenever the max grows; at the end o_i = acc_i / l_i
# and L_i = m_i + log l_i (m_i in the pass's units, common.py).
import triton
import triton.language as tl
from common import LN2, LOG2E, _blocks, _load_rows, _load_tile, _mm, _query_program, _row_table, _store_rows  # noqa
from common import _exp_shift, _row_results, _store_msum, _tile_positions, _tile_start  # noqa
from own_key import _own_key_scores  # noqa


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, K_DESC, V_DESC, kvh, start_n, offs_m, off_b, off_h, Sq, Skv, scale, Q_OFF,
              __BUFFERS__
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
              DOT: tl.constexpr, USE_TMA: tl.constexpr, LINEAR_SCORE: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K + kvh * Skv * D, K_DESC, kvh, start_n, Skv, D, BLOCK_N, BLOCK_D, EVEN, USE_TMA)
    v = _load_tile(V + kvh * Skv * DV, V_DESC, kvh, start_n, Skv, DV, BLOCK_N, BLOCK_DV, EVEN, USE_TMA)
    s_raw = _mm(q, tl.trans(k), DOT)
    VALID, mq_idx, q_idx, kv_idx, ZERO = _tile_positions(offs_m, offs_n, Sq, Skv, Q_OFF, BLOCK_M, BLOCK_N, EVEN)
    tu = hook.score(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx, kv_idx=kv_idx)
    # The score in the pass's units is x * x_mul.  LINEAR_SCORE (no score_mod, scale > 0): x = s_raw
    # and x_mul = scale log2(e) > 0, so the row max is x_mul * max_j x and each exponent
    # x * x_mul - m is one fused multiply-add.  Otherwise x = tu and x_mul = 1 (folded away).
    if LINEAR_SCORE:
        x = s_raw
        x_mul = scale * LOG2E
    else:
        x = tu
        x_mul = 1.0
    if IS_FULL:
        if not EVEN:
            x = tl.where(VALID, x, float("-inf"))
    else:
        mask_keep = hook.mask(b=off_b, h=off_h, q_idx=q_idx, mq_idx=mq_idx, kv_idx=kv_idx, valid=VALID)
        x = tl.where(VALID & mask_keep, x, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(x, 1) * x_mul)
    # A row with nothing kept yet has m = -inf: shift by 0 instead, so exp2() gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = _exp_shift(m_i, m_shift)
    p = _exp_shift(x * x_mul, m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, DOT)
    return acc, l_i, m_new


@triton.jit
def flex_fwd(__SIGNATURE__):
    """One query tile.  Q_OFF shifts the query positions the score_mod sees (frame coordinates of
    the EBT predicted stream; 0 otherwise).  HAS_SELF: each query i also attends to its own key
    (EBT, OWN: own_key.py), which seeds the online softmax.
    USE_TMA: K and V tiles come through the tensor descriptors K_DESC, V_DESC (Hopper's TMA).
    Writes O, LSE and MSUM: each row's largest kept modified score m (natural units; -inf for a
    row that keeps nothing; torch's max_scores) and its sum l = sum_j exp(t_j - m), which the
    backward passes read instead of the lse (common.py, _load_msum)."""
    pid_m, off_b, off_h, offs_m, qh, kvh = _query_program(Sq, H, Hkv, HEAD_GROUP, BLOCK_M, REVERSE)
    q = _load_rows(Q + qh * Sq * D, offs_m, Sq, D, BLOCK_D, EVEN)
    if HAS_SELF:
        tu_self, keep_self, vp = _own_key_scores(q, OWN, kvh * Sq, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF,
                                                 __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, EVEN)
        m_i = tu_self  # -inf where the own key is dropped
        l_i = tl.where(keep_self, 1.0, 0.0)
        acc = tl.where(keep_self[:, None], vp.to(tl.float32), 0.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    IDX, FULL_IDX, base, base_full, n_partial, n_full = _row_table(KV_BLOCKS, off_b, off_h,
                                                                   (pid_m * BLOCK_M) // SPARSE_Q, HAS_FULL)
    for FULL in tl.static_range(2):
        LIST, row, n_tiles = _blocks(FULL, IDX, FULL_IDX, base, base_full, n_partial, n_full, SPARSE_KV, BLOCK_N)
        for it in range(n_tiles):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, K_DESC, V_DESC, kvh,
                                      _tile_start(LIST, row, it, SPARSE_KV, BLOCK_N), offs_m, off_b, off_h, Sq, Skv,
                                      scale, Q_OFF, __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, FULL == 1,
                                      EVEN, DOT, USE_TMA, LINEAR_SCORE)

    # A query that kept nothing: output 0 and lse = -inf (never NaN).
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    m_nat, lse = _row_results(m_i, l_i, empty)
    _store_rows(O + qh * Sq * DV, out, offs_m, Sq, DV, BLOCK_DV)
    tl.store(LSE + qh * Sq + offs_m, lse, mask=offs_m < Sq)
    _store_msum(MSUM, m_nat, l_i, m_i, qh, offs_m, Sq)
