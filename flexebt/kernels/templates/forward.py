# flexebt kernel template: the forward pass (see common.py for the layout and the hooks).
#
# One program per query tile keeps a running max m_i and sum l_i (online softmax) and rescales
# the output accumulator by exp2(m_old - m_new) whenever the max grows; at the end
# o_i = acc_i / l_i and L_i = (m_i + log2 l_i) ln 2.
import triton
import triton.language as tl
from common import LN2, LOG2E, _blocks, _load_rows, _load_tile, _mm, _own_keep, _own_positions, _query_program  # noqa
from common import _row_dot, _row_table, _store_rows, _tile_positions, _tile_start  # noqa


@triton.jit
def _own_key_scores(q, KP, VP, SELF_KEEP, own, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF, __BUFFERS__
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """EBT own key as a row-wise term: t2_i = f(scale q_i.kp_i) log2 e at frame (t, t), t = i + Q_OFF,
    or -inf where it is dropped; one [BLOCK_M] column, no tile.  Returns (t2, keep, vp).  ``own``:
    the offset of the key head's rows in KP / VP ([B, Hkv, Sq, D] like q's rows), in rows."""
    kp = _load_rows(KP + own * D, offs_m, Sq, D, BLOCK_D, EVEN)
    vp = _load_rows(VP + own * DV, offs_m, Sq, DV, BLOCK_DV, EVEN)
    s_raw = _row_dot(q, kp)  # [BLOCK_M, 1]
    VALID, mq_idx, q_idx, kv_idx, ZERO = _own_positions(offs_m, Sq, Q_OFF, BLOCK_M, EVEN)
    t2 = hook.score(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx, kv_idx=kv_idx)
    keep = _own_keep(SELF_KEEP, VALID, qh, offs_m, Sq)
    t2 = tl.sum(tl.where(keep, t2, float("-inf")), 1)
    return t2, tl.sum(keep.to(tl.int32), 1) > 0, vp


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, K_DESC, V_DESC, kvh, start_n, offs_m, off_b, off_h, Sq, Skv, scale, Q_OFF,
              __BUFFERS__
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
              IEEE: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr, LINEAR_SCORE: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K + kvh * Skv * D, K_DESC, kvh, start_n, Skv, D, BLOCK_N, BLOCK_D, EVEN, USE_TMA)
    v = _load_tile(V + kvh * Skv * DV, V_DESC, kvh, start_n, Skv, DV, BLOCK_N, BLOCK_DV, EVEN, USE_TMA)
    s_raw = _mm(q, tl.trans(k), IEEE, UPCAST)
    VALID, mq_idx, q_idx, kv_idx, ZERO = _tile_positions(offs_m, offs_n, Sq, Skv, Q_OFF, BLOCK_M, BLOCK_N, EVEN)
    t2 = hook.score(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx, kv_idx=kv_idx)
    # The log2-unit score is x * x_mul.  LINEAR_SCORE (no score_mod, scale > 0): x = s_raw and
    # x_mul = scale log2(e) > 0, so the row max is x_mul * max_j x and each exponent
    # x * x_mul - m is one fused multiply-add.  Otherwise x = t2 and x_mul = 1 (folded away).
    if LINEAR_SCORE:
        x = s_raw
        x_mul = scale * LOG2E
    else:
        x = t2
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
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(x * x_mul - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE, UPCAST)
    return acc, l_i, m_new


@triton.jit
def flex_fwd(__SIGNATURE__):
    """One query tile.  Q_OFF shifts the query positions the score_mod sees (frame coordinates of
    the EBT predicted stream; 0 otherwise).  HAS_SELF: each query i also attends to its own key
    KP[i], VP[i] (EBT), kept iff SELF_KEEP[b, h, i]; that key seeds the online softmax.
    USE_TMA: K and V tiles come through the tensor descriptors K_DESC, V_DESC (Hopper's TMA).
    RETURN_MAX: also store each row's largest kept modified score (MAXS, natural units; -inf for
    a row that keeps nothing) -- the online softmax's final running max."""
    pid_m, off_b, off_h, offs_m, qh, kvh = _query_program(Sq, H, Hkv, HEAD_GROUP, BLOCK_M, REVERSE)
    q = _load_rows(Q + qh * Sq * D, offs_m, Sq, D, BLOCK_D, EVEN)
    if HAS_SELF:
        t2_self, keep_self, vp = _own_key_scores(q, KP, VP, SELF_KEEP, kvh * Sq, qh, offs_m, off_b, off_h, Sq, scale,
                                                 Q_OFF, __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, EVEN)
        m_i = t2_self  # -inf where the own key is dropped
        l_i = tl.where(keep_self, 1.0, 0.0)
        acc = tl.where(keep_self[:, None], vp.to(tl.float32), 0.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    base, base_full, n_partial, n_full = _row_table(KV_NUM, FULL_NUM, off_b, off_h, (pid_m * BLOCK_M) // SPARSE_Q,
                                                    MB, MH, NQ_BLOCKS, NKV_LIST, NKV_LIST_FULL, HAS_FULL)
    for FULL in tl.static_range(2):
        IDX, row, n_tiles = _blocks(FULL, KV_IDX, FULL_IDX, base, base_full, n_partial, n_full, SPARSE_KV, BLOCK_N)
        for it in range(n_tiles):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, K_DESC, V_DESC, kvh,
                                      _tile_start(IDX, row, it, SPARSE_KV, BLOCK_N), offs_m, off_b, off_h, Sq, Skv,
                                      scale, Q_OFF, __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, FULL == 1,
                                      EVEN, IEEE, UPCAST, USE_TMA, LINEAR_SCORE)

    # A query that kept nothing: output 0 and lse = -inf (never NaN).
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    _store_rows(O + qh * Sq * DV, out, offs_m, Sq, DV, BLOCK_DV)
    tl.store(LSE + qh * Sq + offs_m, lse, mask=offs_m < Sq)
    if RETURN_MAX:
        tl.store(MAXS + qh * Sq + offs_m, m_i * LN2, mask=offs_m < Sq)
