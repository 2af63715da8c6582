# flexebt kernel template: the EBT own key, where it enters each pass (see common.py for the layout
# and the hooks).
#
# In an EBT call each query i of the predicted stream also attends to one key of its own, KP[i]
# with value VP[i], at its own frame position (kv_idx = q_idx), kept iff KEEP[b, h, i] != 0.  That
# key is one more column of query i's row, so every pass over query tiles adds a row-wise term:
# a [BLOCK_M, 1] column of scores s_i = q_i.kp_i, through the same score hooks as a tile.  A pass
# takes the own keys as one argument OWN (a signatures.Own*Args tuple, absent without HAS_SELF)
# and calls, under `if HAS_SELF:`, its entry point here:
#   forward      _own_key_scores    seeds the online softmax with the own key
#   backward     _own_key_grads     its share of dq, and dkp, dvp
#   double bwd   _own_key_second    its column of the second-order terms, _own_key_captured for g_c
#   forward mode _own_key_jvp       seeds the accumulators and their tangents
# Key-tile passes never see own keys (each is one query's only), so they have no entry point.
# ``own``: the offset of the key head's rows in KP / VP ([B, Hkv, Sq, D] like q's rows), in rows.
import triton
import triton.language as tl
from common import _exp_from, _load_rows, _mod_indices, _row_dot  # noqa


@triton.jit
def _own_positions(offs_m, Sq, Q_OFF, BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """Mod inputs of the own-key column ([BLOCK_M, 1]): query i meets its own key at its own frame
    position (kv_idx = q_idx), the one-column form of _tile_positions."""
    VALID = (offs_m < Sq)[:, None]
    mq_idx, _unused = _mod_indices(offs_m, offs_m, Sq, Sq, EVEN)
    q_idx = mq_idx[:, None] + Q_OFF
    return VALID, mq_idx, q_idx, q_idx, tl.zeros([BLOCK_M, 1], dtype=tl.int32)


@triton.jit
def _own_keep(KEEP, VALID, qh, offs_m, Sq):
    """Which rows keep their own key ([BLOCK_M, 1]): KEEP[b, h, i] != 0 inside the sequence."""
    return VALID & (tl.load(KEEP + qh * Sq + offs_m, mask=offs_m < Sq, other=0) != 0)[:, None]


@triton.jit
def _own_key_scores(q, OWN, own, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF, __BUFFERS__
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """Forward: t_i = f(scale q_i.kp_i) at frame (t, t), t = i + Q_OFF, in the pass's units, or -inf
    where the own key is dropped; one [BLOCK_M] column, no tile.  Returns (tu, keep, vp)."""
    kp = _load_rows(OWN.KP + own * D, offs_m, Sq, D, BLOCK_D, EVEN)
    vp = _load_rows(OWN.VP + own * DV, offs_m, Sq, DV, BLOCK_DV, EVEN)
    s_raw = _row_dot(q, kp)  # [BLOCK_M, 1]
    VALID, mq_idx, q_idx, kv_idx, ZERO = _own_positions(offs_m, Sq, Q_OFF, BLOCK_M, EVEN)
    tu = hook.score(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx, kv_idx=kv_idx)
    keep = _own_keep(OWN.KEEP, VALID, qh, offs_m, Sq)
    tu = tl.sum(tl.where(keep, tu, float("-inf")), 1)
    return tu, tl.sum(keep.to(tl.int32), 1) > 0, vp


@triton.jit
def _own_key_grads(q, do, ra, rb, delta, OWN, own, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF, __BUFFERS__
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """Backward of the own-key term of one query tile: returns (ds_self [BLOCK_M, 1], kp, dkp
    without scale, dvp) and scatters its captured-tensor gradients.  p_i = exp(t_i - L_i),
    dt_i = p_i (do_i.vp_i - D_i), ds_i = dt_i f'(s_i); dq_i += ds_i kp_i, dkp_i = ds_i q_i,
    dvp_i = p_i do_i (times scale where the score had it)."""
    kp = _load_rows(OWN.KP + own * D, offs_m, Sq, D, BLOCK_D, EVEN)
    vp = _load_rows(OWN.VP + own * DV, offs_m, Sq, DV, BLOCK_DV, EVEN)
    s_raw = _row_dot(q, kp)
    VALID, mq_idx, q_idx, kv_idx, ZERO = _own_positions(offs_m, Sq, Q_OFF, BLOCK_M, EVEN)
    tu, dtds = hook.score_grad(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx, kv_idx=kv_idx)
    keep = _own_keep(OWN.KEEP, VALID, qh, offs_m, Sq)
    p = tl.where(keep, _exp_from(tu, ra[:, None], rb[:, None]), 0.0)
    dt = p * (_row_dot(do, vp) - delta[:, None])
    hook.captured_grad(dt=dt, keep=keep)
    ds = tl.where(keep, dt * dtds, 0.0)
    return ds, kp, ds * q.to(tl.float32), p * do.to(tl.float32)


@triton.jit
def _own_key_second(q, gq, do, ra, rb, OWN, own, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF, __BUFFERS__
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """Double backward: the own key of each row as one [BLOCK_M, 1] column (double_backward.py
    has the math): (p, dP, A, u, Bm, f', du/ds) of that column, its raw score, and the rows kp, vp,
    gkp, gvp (GKP, GVP: the cotangents of the own keys' first-order gradients)."""
    kp = _load_rows(OWN.KP + own * D, offs_m, Sq, D, BLOCK_D, EVEN)
    vp = _load_rows(OWN.VP + own * DV, offs_m, Sq, DV, BLOCK_DV, EVEN)
    gkp = _load_rows(OWN.GKP + own * D, offs_m, Sq, D, BLOCK_D, EVEN)
    gvp = _load_rows(OWN.GVP + own * DV, offs_m, Sq, DV, BLOCK_DV, EVEN)
    s_raw = _row_dot(q, kp)
    VALID, mq_idx, q_idx, kv_idx, ZERO = _own_positions(offs_m, Sq, Q_OFF, BLOCK_M, EVEN)
    tu, dtds, d2tds2, ew, ewds = hook.score_second(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx,
                                                   kv_idx=kv_idx)
    keep = _own_keep(OWN.KEEP, VALID, qh, offs_m, Sq)
    p = tl.where(keep, _exp_from(tu, ra[:, None], rb[:, None]), 0.0)
    f1 = tl.where(keep, dtds, 0.0)
    dp = _row_dot(do, vp)
    a = (_row_dot(gq, kp) + _row_dot(q, gkp)) * scale
    bm = _row_dot(do, gvp)
    u = tl.where(keep, dtds * a + ew, 0.0)
    duds = tl.where(keep, d2tds2 * a + ewds, 0.0)
    return p, dp, a, u, bm, f1, duds, s_raw, kp, vp, gkp, gvp


@triton.jit
def _own_key_captured(s_raw, gt, dt, a, OWN, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF, __BUFFERS__
                      BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """Double backward: g_c of the own-key column (see _dbwd_captured)."""
    VALID, mq_idx, q_idx, kv_idx, ZERO = _own_positions(offs_m, Sq, Q_OFF, BLOCK_M, EVEN)
    tu, dtds, d2tds2, ew, ewds = hook.score_second(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx,
                                                   kv_idx=kv_idx)
    keep = _own_keep(OWN.KEEP, VALID, qh, offs_m, Sq)
    hook.captured_second_grad(gt=gt, dt=dt, a=a, keep=keep)


@triton.jit
def _own_key_jvp(q, dq, OWN, own, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF, __BUFFERS__
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """Forward mode: the own key's column, (tu, d t, keep) per row and the rows vp, d vp (DKP, DVP:
    the own keys' tangents)."""
    kp = _load_rows(OWN.KP + own * D, offs_m, Sq, D, BLOCK_D, EVEN)
    vp = _load_rows(OWN.VP + own * DV, offs_m, Sq, DV, BLOCK_DV, EVEN)
    dkp = _load_rows(OWN.DKP + own * D, offs_m, Sq, D, BLOCK_D, EVEN)
    dvp = _load_rows(OWN.DVP + own * DV, offs_m, Sq, DV, BLOCK_DV, EVEN)
    s_raw = _row_dot(q, kp)
    VALID, mq_idx, q_idx, kv_idx, ZERO = _own_positions(offs_m, Sq, Q_OFF, BLOCK_M, EVEN)
    tu, dtds = hook.score_grad(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx, kv_idx=kv_idx)
    keep = _own_keep(OWN.KEEP, VALID, qh, offs_m, Sq)
    ds = (tl.sum(dq.to(tl.float32) * kp.to(tl.float32), 1) + tl.sum(q.to(tl.float32) * dkp.to(tl.float32), 1))
    dt = tl.sum(tl.where(keep, dtds * ds[:, None] * scale, 0.0), 1)
    tu = tl.sum(tl.where(keep, tu, float("-inf")), 1)
    return tu, dt, tl.sum(keep.to(tl.int32), 1) > 0, vp, dvp
