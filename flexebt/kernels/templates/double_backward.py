# flexebt kernel template: the double backward (see common.py for the layout and the hooks;
# flexebt/reference/double_backward.py is the dense spec).
#
# Given cotangents Gq, Gk, Gv of dq, dk, dv, with D0 = sum_j P dP (= do.o) and D = D0 - dlse:
#   A = scale (Gq k^T + q Gk^T),  u = f' A,  Bm = do Gv^T,  dt = P (dP - D),  ds = dt f'
#   U = sum_j P u,  Wc = sum_j P dP u - D0 U,  Bbar = sum_j P Bm = do.(sum_j P Gv)  (row statistics)
#   gt = P ((dP - D) (u - U) - Wc + (Bm - Bbar)),  gs = f' gt + dt du/ds
# Every factor is centred (dP - D, u - U, Bm - Bbar, Wc) and D0 is summed from the same P and dP
# as the other statistics, not taken from do.o: where a score_mod has a large derivative (1/s
# near s = 0) u is huge, and the uncentred products U dP, D0 U cancel to far below their own
# rounding; centred, a row with one dominant key gives exact zeros as eager math does.
#   g_do = P u v - U o + P Gv,  g_v = (P (u - U))^T do,  g_q = scale (gs k + ds Gk),
#   g_k = scale (gs^T q + ds^T Gq),  g_dlse = U.
# The whole second-order loss is  sum dt u + sum P Bm,  so a captured tensor c read by the
# score_mod (t = f(s, c)) with cotangent Gc of its first-order gradient dc = sum dt df/dc adds
# Gc df/dc to u:   u = f' A + sum_c Gc f_c,   du/ds = f'' A + sum_c Gc f_sc,
# and its own gradient  g_c = sum [gt f_c + dt (f_sc A + sum_c' f_cc' Gc')]  (atomics, dq pass).
# The hook score_second gives tu, f' (dtds), f'' (d2tds2) and the captured tensors' terms
# ew = sum_c Gc f_c, ewds = sum_c Gc f_sc (zeros without captured tensors).
#
# Three passes: flex_dbwd_rows (row statistics and g_do) and flex_dbwd_dq over query tiles,
# flex_dbwd_dkdv over key tiles.
import triton
import triton.language as tl
from common import _blocks, _key_program, _load_msum, _load_rows, _load_tile, _mm, _query_program, _row_table  # noqa
from common import _exp_from, _load_ref, _store_ref, _store_key_grads, _store_rows, _tile_positions, _tile_start  # noqa
from own_key import _own_key_captured, _own_key_second  # noqa


@triton.jit
def _dbwd_scores(q, k, v, do, gq, gk, gv, ra, rb, offs_m, offs_n, off_b, off_h, Sq, Skv, scale, Q_OFF,
                 __BUFFERS__
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
                 DOT: tl.constexpr, WITH_BM: tl.constexpr):
    """Per tile: P, dP, A, u, Bm, f', du/ds (zero where masked) and the raw scores.  Without WITH_BM
    the product Bm = do Gv^T is not taken (zeros: the rows pass does not need it)."""
    s_raw = _mm(q, tl.trans(k), DOT)
    VALID, mq_idx, q_idx, kv_idx, ZERO = _tile_positions(offs_m, offs_n, Sq, Skv, Q_OFF, BLOCK_M, BLOCK_N, EVEN)
    tu, dtds, d2tds2, ew, ewds = hook.score_second(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx,
                                                   kv_idx=kv_idx)
    keep = hook.keep(full=IS_FULL, b=off_b, h=off_h, q_idx=q_idx, mq_idx=mq_idx, kv_idx=kv_idx, valid=VALID)
    p = tl.where(keep, _exp_from(tu, ra[:, None], rb[:, None]), 0.0)
    f1 = tl.where(keep, dtds, 0.0)
    dp = _mm(do, tl.trans(v), DOT)
    a = (_mm(gq, tl.trans(k), DOT) + _mm(q, tl.trans(gk), DOT)) * scale
    if WITH_BM:
        bm = _mm(do, tl.trans(gv), DOT)
    else:
        bm = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    u = tl.where(keep, dtds * a + ew, 0.0)
    duds = tl.where(keep, d2tds2 * a + ewds, 0.0)
    return p, dp, a, u, bm, f1, duds, s_raw


@triton.jit
def _dbwd_gs(p, dp, u, bm, f1, duds, dsh, U, Wc, Bbar):
    """gs, ds, gt and dt of one tile from its scores and the row statistics ([BLOCK_M] each)."""
    dpc = dp - dsh[:, None]
    dt = p * dpc
    gt = p * (dpc * (u - U[:, None]) - Wc[:, None] + (bm - Bbar[:, None]))
    return f1 * gt + dt * duds, dt * f1, gt, dt


@triton.jit
def _dbwd_captured(s_raw, gt, dt, a, offs_m, offs_n, off_b, off_h, Sq, Skv, scale, Q_OFF, __BUFFERS__
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr):
    """Scatter one tile's share of the captured tensors' second-order gradient g_c (fp32 atomics)."""
    VALID, mq_idx, q_idx, kv_idx, ZERO = _tile_positions(offs_m, offs_n, Sq, Skv, Q_OFF, BLOCK_M, BLOCK_N, EVEN)
    tu, dtds, d2tds2, ew, ewds = hook.score_second(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx,
                                                   kv_idx=kv_idx)
    keep = hook.keep(full=IS_FULL, b=off_b, h=off_h, q_idx=q_idx, mq_idx=mq_idx, kv_idx=kv_idx, valid=VALID)
    hook.captured_second_grad(gt=gt, dt=dt, a=a, keep=keep)


@triton.jit
def _dbwd_row_inputs(Q, DO, GQ, Q_DESC, DO_DESC, GQ_DESC, ROWS, DLSE, qh, start_m, Sq, D: tl.constexpr,
                     DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     EVEN: tl.constexpr, HAS_DLSE: tl.constexpr, USE_TMA: tl.constexpr, FROM_REF: tl.constexpr):
    """The query-side rows of tile start_m (q, Gq, dO through the descriptors with USE_TMA), the
    rows' (ra, rb) from ROWS -- the forward's MSUM, or with FROM_REF the REF planes the rows pass
    wrote -- and dlse (0 without HAS_DLSE).  O is not read: the passes take D0 = sum_j P dP from
    the row statistics (the rows pass reads O for g_do itself)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q + qh * Sq * D, Q_DESC, qh, start_m, Sq, D, BLOCK_M, BLOCK_D, EVEN, USE_TMA)
    gq = _load_tile(GQ + qh * Sq * D, GQ_DESC, qh, start_m, Sq, D, BLOCK_M, BLOCK_D, EVEN, USE_TMA)
    do = _load_tile(DO + qh * Sq * DV, DO_DESC, qh, start_m, Sq, DV, BLOCK_M, BLOCK_DV, EVEN, USE_TMA)
    if FROM_REF:
        ra, rb = _load_ref(ROWS, qh, offs_m, Sq)
    else:
        ra, rb = _load_msum(ROWS, qh, offs_m, Sq)
    dl = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_DLSE:
        dl = tl.load(DLSE + qh * Sq + offs_m, mask=offs_m < Sq, other=0.0).to(tl.float32)
    return q, gq, do, ra, rb, dl


@triton.jit
def _dbwd_kv_rows(K, V, GK, GV, K_DESC, V_DESC, GK_DESC, GV_DESC, kvh, start_n, Skv, D: tl.constexpr,
                  DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  EVEN: tl.constexpr, USE_TMA: tl.constexpr):
    """The key-side rows of tile start_n: k, v, Gk, Gv (through the descriptors with USE_TMA)."""
    k = _load_tile(K + kvh * Skv * D, K_DESC, kvh, start_n, Skv, D, BLOCK_N, BLOCK_D, EVEN, USE_TMA)
    v = _load_tile(V + kvh * Skv * DV, V_DESC, kvh, start_n, Skv, DV, BLOCK_N, BLOCK_DV, EVEN, USE_TMA)
    gk = _load_tile(GK + kvh * Skv * D, GK_DESC, kvh, start_n, Skv, D, BLOCK_N, BLOCK_D, EVEN, USE_TMA)
    gv = _load_tile(GV + kvh * Skv * DV, GV_DESC, kvh, start_n, Skv, DV, BLOCK_N, BLOCK_DV, EVEN, USE_TMA)
    return k, v, gk, gv


@triton.jit
def _dbwd_rows_tile(U, W, D0, puv, pgv, q, gq, do, ra, rb, K, V, GK, GV, K_DESC, V_DESC, GK_DESC, GV_DESC, kvh,
                    start_n, offs_m, off_b, off_h, Sq, Skv, scale, Q_OFF, __BUFFERS__
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
                    DOT: tl.constexpr, USE_TMA: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v, gk, gv = _dbwd_kv_rows(K, V, GK, GV, K_DESC, V_DESC, GK_DESC, GV_DESC, kvh, start_n, Skv, D, DV, BLOCK_N,
                                 BLOCK_D, BLOCK_DV, EVEN, USE_TMA)
    p, dp, a, u, bm, f1, duds, s_raw = _dbwd_scores(q, k, v, do, gq, gk, gv, ra, rb, offs_m, offs_n, off_b, off_h,
                                                    Sq, Skv, scale, Q_OFF, __BUFFERS__
                                                    BLOCK_M, BLOCK_N, IS_FULL, EVEN, DOT, False)
    pu = p * u
    U += tl.sum(pu, 1)
    W += tl.sum(pu * dp, 1)
    D0 += tl.sum(p * dp, 1)
    puv += _mm(pu.to(v.dtype), v, DOT)
    pgv += _mm(p.to(gv.dtype), gv, DOT)
    return U, W, D0, puv, pgv


@triton.jit
def flex_dbwd_rows(__SIGNATURE__):
    """Pass 1 of the double backward, per query tile: the row statistics U, Wc, Bbar and D
    (STATS [B, H, Sq, 4]) and g_do.  HAS_SELF: the EBT own key is one more column.
    USE_TMA: the key-side tiles through the descriptors.  PARTIAL_ROWS: these keys are one part
    of the rows' keys (another pass holds the rest; O and L are the merged ones): store the raw
    sums U, W, Bbar, D0 and the part P u v + P Gv of g_do (fp32), which the caller adds over the
    parts before it forms Wc = W - D0 U, D = D0 - dlse and g_do -= U o."""
    pid_m, off_b, off_h, offs_m, qh, kvh = _query_program(Sq, H, Hkv, HEAD_GROUP, BLOCK_M, False)
    # the program's own rows, loaded once: pointer loads (the descriptor slots are unused)
    q, gq, do, ra, rb, dl = _dbwd_row_inputs(Q, DO, GQ, Q, DO, GQ, MSUM, DLSE, qh, pid_m * BLOCK_M, Sq,
                                           D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, EVEN, HAS_DLSE, False, False)
    _store_ref(REF, ra, rb, qh, offs_m, Sq)  # for the key-tile pass
    if HAS_SELF:
        p_s, dp_s, a_s, u_s, bm_s, f1_s, duds_s, s_s, kp, vp, gkp, gvp = _own_key_second(
            q, gq, do, ra, rb, OWN, kvh * Sq, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF, __BUFFERS__
            D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, EVEN)
        pu_s = p_s * u_s
        U = tl.sum(pu_s, 1)
        W = tl.sum(pu_s * dp_s, 1)
        D0 = tl.sum(p_s * dp_s, 1)
        puv = pu_s * vp.to(tl.float32)
        pgv = p_s * gvp.to(tl.float32)
    else:
        U = tl.zeros([BLOCK_M], dtype=tl.float32)
        W = tl.zeros([BLOCK_M], dtype=tl.float32)
        D0 = tl.zeros([BLOCK_M], dtype=tl.float32)
        puv = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        pgv = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    IDX, FULL_IDX, base, base_full, n_partial, n_full = _row_table(KV_BLOCKS, off_b, off_h,
                                                                   (pid_m * BLOCK_M) // SPARSE_Q, HAS_FULL)
    for FULL in tl.static_range(2):
        LIST, row, n_tiles = _blocks(FULL, IDX, FULL_IDX, base, base_full, n_partial, n_full, SPARSE_KV, BLOCK_N)
        for it in range(n_tiles):
            U, W, D0, puv, pgv = _dbwd_rows_tile(
                U, W, D0, puv, pgv, q, gq, do, ra, rb, K, V, GK, GV, K_DESC, V_DESC, GK_DESC, GV_DESC, kvh,
                _tile_start(LIST, row, it, SPARSE_KV, BLOCK_N), offs_m, off_b, off_h, Sq, Skv, scale, Q_OFF,
                __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, FULL == 1, EVEN, DOT, USE_TMA)
    # Bbar = sum_j P Bm = sum_j P (do . Gv_j) = do . (sum_j P Gv_j): the row's P Gv (which g_do needs
    # anyway) dotted with do, instead of one more [BLOCK_M, BLOCK_N] product per tile.  Linear in
    # the keys, so with PARTIAL_ROWS it is this part's share.
    Bbar = tl.sum(do.to(tl.float32) * pgv, 1)
    if PARTIAL_ROWS:
        g_do = puv + pgv
    else:
        o = _load_rows(O + qh * Sq * DV, offs_m, Sq, DV, BLOCK_DV, EVEN)
        g_do = puv - U[:, None] * o.to(tl.float32) + pgv
    row_ok = offs_m < Sq
    _store_rows(G_DO + qh * Sq * DV, g_do, offs_m, Sq, DV, BLOCK_DV)
    st = STATS + (qh * Sq + offs_m) * 4
    tl.store(st + 0, U, mask=row_ok)
    tl.store(st + 2, Bbar, mask=row_ok)
    if PARTIAL_ROWS:
        tl.store(st + 1, W, mask=row_ok)
        tl.store(st + 3, D0, mask=row_ok)
    else:
        tl.store(st + 1, W - D0 * U, mask=row_ok)
        tl.store(st + 3, D0 - dl, mask=row_ok)


@triton.jit
def _load_stats(STATS, qh, offs_m, Sq):
    row_ok = offs_m < Sq
    st = STATS + (qh * Sq + offs_m) * 4
    return (tl.load(st + 0, mask=row_ok, other=0.0), tl.load(st + 1, mask=row_ok, other=0.0),
            tl.load(st + 2, mask=row_ok, other=0.0), tl.load(st + 3, mask=row_ok, other=0.0))


@triton.jit
def _dbwd_dq_tile(g_q, q, gq, do, ra, rb, U, Wc, Bbar, dsh, K, V, GK, GV, K_DESC, V_DESC, GK_DESC, GV_DESC, kvh,
                  start_n, offs_m, off_b, off_h, Sq, Skv, scale, Q_OFF, __BUFFERS__
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
                  DOT: tl.constexpr, CAPTURED_GRADS: tl.constexpr, USE_TMA: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v, gk, gv = _dbwd_kv_rows(K, V, GK, GV, K_DESC, V_DESC, GK_DESC, GV_DESC, kvh, start_n, Skv, D, DV, BLOCK_N,
                                 BLOCK_D, BLOCK_DV, EVEN, USE_TMA)
    p, dp, a, u, bm, f1, duds, s_raw = _dbwd_scores(q, k, v, do, gq, gk, gv, ra, rb, offs_m, offs_n, off_b, off_h,
                                                    Sq, Skv, scale, Q_OFF, __BUFFERS__
                                                    BLOCK_M, BLOCK_N, IS_FULL, EVEN, DOT, True)
    gs, ds, gt, dt = _dbwd_gs(p, dp, u, bm, f1, duds, dsh, U, Wc, Bbar)
    if CAPTURED_GRADS:
        _dbwd_captured(s_raw, gt, dt, a, offs_m, offs_n, off_b, off_h, Sq, Skv, scale, Q_OFF, __BUFFERS__
                       BLOCK_M, BLOCK_N, IS_FULL, EVEN)
    g_q += _mm(gs.to(k.dtype), k, DOT) + _mm(ds.to(gk.dtype), gk, DOT)
    return g_q


@triton.jit
def flex_dbwd_dq(__SIGNATURE__):
    """Pass 2 of the double backward, per query tile: g_q = scale sum_j (gs k + ds Gk).  HAS_SELF:
    the own key's column adds to g_q and gives its g_kp, g_vp (OWN.G_KP, OWN.G_VP, per query head;
    fp32 under GQA).
    CAPTURED_GRADS: also scatter the captured tensors' second-order gradients.  USE_TMA: the
    key-side tiles through the descriptors.  FROM_ACC: the key tiles' sums are already in the fp32
    rows GQ_ACC (the dk/dv pass added them, DQ_ATOMIC): no key loop, only the own key's column."""
    pid_m, off_b, off_h, offs_m, qh, kvh = _query_program(Sq, H, Hkv, HEAD_GROUP, BLOCK_M, False)
    # the program's own rows, loaded once: pointer loads (the descriptor slots are unused)
    q, gq, do, ra, rb, dl = _dbwd_row_inputs(Q, DO, GQ, Q, DO, GQ, MSUM, DLSE, qh, pid_m * BLOCK_M, Sq,
                                           D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, EVEN, HAS_DLSE, False, False)
    U, Wc, Bbar, dsh = _load_stats(STATS, qh, offs_m, Sq)
    if FROM_ACC:
        g_q = _load_rows(GQ_ACC + qh * Sq * D, offs_m, Sq, D, BLOCK_D, EVEN).to(tl.float32)
    else:
        g_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        IDX, FULL_IDX, base, base_full, n_partial, n_full = _row_table(KV_BLOCKS, off_b, off_h,
                                                                       (pid_m * BLOCK_M) // SPARSE_Q, HAS_FULL)
        for FULL in tl.static_range(2):
            LIST, row, n_tiles = _blocks(FULL, IDX, FULL_IDX, base, base_full, n_partial, n_full, SPARSE_KV,
                                         BLOCK_N)
            for it in range(n_tiles):
                g_q = _dbwd_dq_tile(g_q, q, gq, do, ra, rb, U, Wc, Bbar, dsh, K, V, GK, GV, K_DESC, V_DESC, GK_DESC,
                                    GV_DESC, kvh, _tile_start(LIST, row, it, SPARSE_KV, BLOCK_N), offs_m, off_b, off_h,
                                    Sq, Skv, scale, Q_OFF, __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
                                    FULL == 1, EVEN, DOT, CAPTURED_GRADS, USE_TMA)
    if HAS_SELF:
        p_s, dp_s, a_s, u_s, bm_s, f1_s, duds_s, s_s, kp, vp, gkp, gvp = _own_key_second(
            q, gq, do, ra, rb, OWN, kvh * Sq, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF, __BUFFERS__
            D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, EVEN)
        gs_s, ds_s, gt_s, dt_s = _dbwd_gs(p_s, dp_s, u_s, bm_s, f1_s, duds_s, dsh, U, Wc, Bbar)
        if CAPTURED_GRADS:
            _own_key_captured(s_s, gt_s, dt_s, a_s, OWN, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF, __BUFFERS__
                              BLOCK_M, EVEN)
        g_q += gs_s * kp.to(tl.float32) + ds_s * gkp.to(tl.float32)
        g_kp = (gs_s * q.to(tl.float32) + ds_s * gq.to(tl.float32)) * scale
        _store_rows(OWN.G_KP + qh * Sq * D, g_kp, offs_m, Sq, D, BLOCK_D)
        _store_rows(OWN.G_VP + qh * Sq * DV, p_s * (u_s - U[:, None]) * do.to(tl.float32), offs_m, Sq, DV, BLOCK_DV)
    _store_rows(G_Q + qh * Sq * D, g_q * scale, offs_m, Sq, D, BLOCK_D)


@triton.jit
def _dbwd_dkdv_tile(g_k, g_v, k, v, gk, gv, Q, DO, GQ, Q_DESC, DO_DESC, GQ_DESC, REF, DLSE, STATS, GQ_ACC, GQ_ACC_DESC, qh,
                    start_m, offs_n, off_b, off_h, Sq, Skv, scale, Q_OFF, __BUFFERS__
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
                    DOT: tl.constexpr, HAS_DLSE: tl.constexpr, USE_TMA: tl.constexpr, DQ_ATOMIC: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q, gq, do, ra, rb, dl = _dbwd_row_inputs(Q, DO, GQ, Q_DESC, DO_DESC, GQ_DESC, REF, DLSE, qh,
                                           start_m, Sq, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, EVEN, HAS_DLSE,
                                           USE_TMA, True)
    U, Wc, Bbar, dsh = _load_stats(STATS, qh, offs_m, Sq)
    p, dp, a, u, bm, f1, duds, s_raw = _dbwd_scores(q, k, v, do, gq, gk, gv, ra, rb, offs_m, offs_n, off_b, off_h,
                                                    Sq, Skv, scale, Q_OFF, __BUFFERS__
                                                    BLOCK_M, BLOCK_N, IS_FULL, EVEN, DOT, True)
    gs, ds, gt, dt = _dbwd_gs(p, dp, u, bm, f1, duds, dsh, U, Wc, Bbar)
    g_k += _mm(tl.trans(gs.to(q.dtype)), q, DOT) + _mm(tl.trans(ds.to(gq.dtype)), gq, DOT)
    g_v += _mm(tl.trans((p * (u - U[:, None])).to(do.dtype)), do, DOT)
    if DQ_ATOMIC:
        # this tile's share of g_q / scale, added into the fp32 rows GQ_ACC (read by the dq pass)
        part = _mm(gs.to(k.dtype), k, DOT) + _mm(ds.to(gk.dtype), gk, DOT)
        if DQ_ATOMIC == 2:  # one bulk reduce-add of the tile (rows past Sq, columns past D dropped)
            GQ_ACC_DESC.atomic_add([qh.to(tl.int32), start_m, 0], part.reshape(1, BLOCK_M, BLOCK_D))
        else:
            offs_d = tl.arange(0, BLOCK_D)
            tl.atomic_add(GQ_ACC + qh * Sq * D + offs_m[:, None] * D + offs_d[None, :], part,
                          mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < D), sem="relaxed")
    return g_k, g_v


@triton.jit
def flex_dbwd_dkdv(__SIGNATURE__):
    """Pass 3 of the double backward, per key tile: g_k = scale sum_i (gs^T q + ds^T Gq) and
    g_v = sum_i (P (u - U))^T do, over the query heads of a GQA group and the query blocks the
    transposed block tables Q_BLOCKS of STREAM (signatures.SecondStreamArgs) list for the kv block
    (ACCUMULATE: add ADD_K, ADD_V).  USE_TMA: the query-side tiles through the descriptors.
    DQ_ATOMIC: also add each tile's share of g_q / scale into the fp32 rows GQ_ACC with atomic
    adds (2: one bulk reduce-add per tile through GQ_ACC_DESC); the dq pass then skips its key
    loop (FROM_ACC)."""
    pid_n, off_b, off_hk, offs_n, kvh = _key_program(Skv, Hkv, HEAD_GROUP, BLOCK_N)
    # the program's own keys, loaded once: pointer loads (the descriptor slots are unused)
    k, v, gk, gv = _dbwd_kv_rows(K, V, GK, GV, K, V, GK, GV, kvh, pid_n * BLOCK_N, Skv, D, DV, BLOCK_N, BLOCK_D,
                                 BLOCK_DV, EVEN, False)
    g_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    g_v = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    group = H // Hkv
    for g in range(group):
        off_h = off_hk * group + g
        qh = (off_b * H + off_h).to(tl.int64)
        IDX, FULL_IDX, base, base_full, n_partial, n_full = _row_table(Q_BLOCKS, off_b, off_h,
                                                                       (pid_n * BLOCK_N) // SPARSE_KV, HAS_FULL)
        for FULL in tl.static_range(2):
            LIST, row, n_tiles = _blocks(FULL, IDX, FULL_IDX, base, base_full, n_partial, n_full, SPARSE_Q, BLOCK_M)
            for it in range(n_tiles):
                g_k, g_v = _dbwd_dkdv_tile(g_k, g_v, k, v, gk, gv, STREAM.Q, STREAM.DO, STREAM.GQ, Q_DESC, DO_DESC,
                                           GQ_DESC, STREAM.REF, DLSE, STREAM.STATS, GQ_ACC, GQ_ACC_DESC, qh,
                                           _tile_start(LIST, row, it, SPARSE_Q, BLOCK_M), offs_n, off_b, off_h,
                                           STREAM.Sq, Skv, scale, STREAM.Q_OFF, __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV,
                                           BLOCK_M, BLOCK_N, FULL == 1, EVEN, DOT, HAS_DLSE, USE_TMA, DQ_ATOMIC)
    _store_key_grads(G_K, G_V, ADD_K, ADD_V, g_k * scale, g_v, kvh, offs_n, Skv, D, DV, BLOCK_D, BLOCK_DV,
                     ACCUMULATE)
