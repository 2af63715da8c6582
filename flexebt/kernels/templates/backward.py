# flexebt kernel template: the backward passes (see common.py for the layout and the hooks).
#
# Given dO (do_i), O and L, with D_i = do_i.o_i:
#   dP_ij = do_i.v_j,  dt_ij = P_ij (dP_ij - D_i),  ds_ij = dt_ij f'(s_ij),
#   dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i P_ij do_i,
#   and a captured tensor c read as c_k at one index gets dt_ij df/dc_k there (the dq pass does it).
# Two passes: flex_bwd_dq over query tiles (it also writes D_i for the second), flex_bwd_dkdv over
# key tiles.
import triton
import triton.language as tl
from common import _blocks, _key_program, _load_msum, _load_rows, _load_tile, _mm, _query_program, _row_table  # noqa
from common import _exp_from, _load_ref, _store_ref, _store_key_grads, _store_rows, _tile_positions  # noqa
from common import _tile_positions_t, _tile_start  # noqa
from own_key import _own_key_grads  # noqa


@triton.jit
def _dq_tile(dq, q, do, ra, rb, delta, K, V, K_DESC, V_DESC, kvh, start_n, offs_m, off_b, off_h, Sq, Skv, scale, Q_OFF,
             __BUFFERS__
             D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
             DOT: tl.constexpr, USE_TMA: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K + kvh * Skv * D, K_DESC, kvh, start_n, Skv, D, BLOCK_N, BLOCK_D, EVEN, USE_TMA)
    v = _load_tile(V + kvh * Skv * DV, V_DESC, kvh, start_n, Skv, DV, BLOCK_N, BLOCK_DV, EVEN, USE_TMA)
    s_raw = _mm(q, tl.trans(k), DOT)
    VALID, mq_idx, q_idx, kv_idx, ZERO = _tile_positions(offs_m, offs_n, Sq, Skv, Q_OFF, BLOCK_M, BLOCK_N, EVEN)
    tu, dtds = hook.score_grad(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx, kv_idx=kv_idx)
    keep = hook.keep(full=IS_FULL, b=off_b, h=off_h, q_idx=q_idx, mq_idx=mq_idx, kv_idx=kv_idx, valid=VALID)
    if IS_FULL and EVEN:
        p = _exp_from(tu, ra[:, None], rb[:, None])
    else:
        p = tl.where(keep, _exp_from(tu, ra[:, None], rb[:, None]), 0.0)
    dp = _mm(do, tl.trans(v), DOT)
    dt = p * (dp - delta[:, None])
    hook.captured_grad(dt=dt, keep=keep)
    # Where nothing is masked, p > 0 everywhere; elsewhere guard against a mod whose derivative
    # is not finite at a masked position (0 * nan).
    if IS_FULL and EVEN:
        ds = dt * dtds
    else:
        ds = tl.where(keep, dt * dtds, 0.0)
    dq += _mm(ds.to(k.dtype), k, DOT)
    return dq


@triton.jit
def flex_bwd_dq(__SIGNATURE__):
    """dq for one query tile; also writes D_i = do_i.o_i - dlse_i for the dk/dv pass (a cotangent
    of lse adds P_ij dlse_i to dt_ij, which is the same as lowering D_i by dlse_i).  With HAS_SELF
    (EBT) it also writes the own keys' gradients OWN.DKP, OWN.DVP, per query head [B, H, Sq, D].
    USE_TMA: K and V tiles through the descriptors K_DESC, V_DESC."""
    pid_m, off_b, off_h, offs_m, qh, kvh = _query_program(Sq, H, Hkv, HEAD_GROUP, BLOCK_M, REVERSE)
    row_ok = offs_m < Sq
    q = _load_rows(Q + qh * Sq * D, offs_m, Sq, D, BLOCK_D, EVEN)
    do = _load_rows(DO + qh * Sq * DV, offs_m, Sq, DV, BLOCK_DV, EVEN)
    o = _load_rows(O + qh * Sq * DV, offs_m, Sq, DV, BLOCK_DV, EVEN)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + qh * Sq + offs_m, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(DELTA + qh * Sq + offs_m, delta, mask=row_ok)
    ra, rb = _load_msum(MSUM, qh, offs_m, Sq)
    _store_ref(REF, ra, rb, qh, offs_m, Sq)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    IDX, FULL_IDX, base, base_full, n_partial, n_full = _row_table(KV_BLOCKS, off_b, off_h,
                                                                   (pid_m * BLOCK_M) // SPARSE_Q, HAS_FULL)
    for FULL in tl.static_range(2):
        LIST, row, n_tiles = _blocks(FULL, IDX, FULL_IDX, base, base_full, n_partial, n_full, SPARSE_KV, BLOCK_N)
        for it in range(n_tiles):
            dq = _dq_tile(dq, q, do, ra, rb, delta, K, V, K_DESC, V_DESC, kvh,
                          _tile_start(LIST, row, it, SPARSE_KV, BLOCK_N), offs_m, off_b, off_h, Sq, Skv, scale, Q_OFF,
                          __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, FULL == 1, EVEN, DOT, USE_TMA)
    if HAS_SELF:
        ds_self, kp, dkp, dvp = _own_key_grads(q, do, ra, rb, delta, OWN, kvh * Sq, qh, offs_m, off_b, off_h, Sq,
                                               scale, Q_OFF, __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, EVEN)
        dq += ds_self * kp.to(tl.float32)
        _store_rows(OWN.DKP + qh * Sq * D, dkp * scale, offs_m, Sq, D, BLOCK_D)
        _store_rows(OWN.DVP + qh * Sq * DV, dvp, offs_m, Sq, DV, BLOCK_DV)
    _store_rows(DQ + qh * Sq * D, dq * scale, offs_m, Sq, D, BLOCK_D)


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, Q_DESC, DO_DESC, REF, DELTA, qh, start_m, offs_n, off_b, off_h, Sq, Skv, scale,
               Q_OFF, __BUFFERS__
               D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
               DOT: tl.constexpr, USE_TMA: tl.constexpr):
    """Transposed orientation: tiles are [BLOCK_N keys, BLOCK_M queries], so P^T and dS^T come
    out of the products directly (the mod code is elementwise; only q_idx / kv_idx swap axes)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q + qh * Sq * D, Q_DESC, qh, start_m, Sq, D, BLOCK_M, BLOCK_D, EVEN, USE_TMA)
    do = _load_tile(DO + qh * Sq * DV, DO_DESC, qh, start_m, Sq, DV, BLOCK_M, BLOCK_DV, EVEN, USE_TMA)
    ra, rb = _load_ref(REF, qh, offs_m, Sq)
    delta = tl.load(DELTA + qh * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    s_raw = _mm(k, tl.trans(q), DOT)
    VALID, mq_idx, q_idx, kv_idx, ZERO = _tile_positions_t(offs_m, offs_n, Sq, Skv, Q_OFF, BLOCK_M, BLOCK_N, EVEN)
    tu, dtds = hook.score_grad(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx, kv_idx=kv_idx)
    keep = hook.keep(full=IS_FULL, b=off_b, h=off_h, q_idx=q_idx, mq_idx=mq_idx, kv_idx=kv_idx, valid=VALID)
    if IS_FULL and EVEN:
        pT = _exp_from(tu, ra[None, :], rb[None, :])
    else:
        pT = tl.where(keep, _exp_from(tu, ra[None, :], rb[None, :]), 0.0)
    dv += _mm(pT.to(do.dtype), do, DOT)
    dpT = _mm(v, tl.trans(do), DOT)
    if IS_FULL and EVEN:
        dsT = pT * (dpT - delta[None, :]) * dtds
    else:
        dsT = tl.where(keep, pT * (dpT - delta[None, :]) * dtds, 0.0)
    dk += _mm(dsT.to(q.dtype), q, DOT)
    return dk, dv


@triton.jit
def _dkdv_stream(dk, dv, k, v, STREAM, IDX, FULL_IDX, base, base_full, n_partial, n_full, Q_DESC, DO_DESC, qh,
                 offs_n, off_b, off_h, Skv, scale, __BUFFERS__
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, EVEN: tl.constexpr,
                 DOT: tl.constexpr, USE_TMA: tl.constexpr):
    """Add one query head's share of a query stream (signatures.StreamArgs) to a key tile's dk,
    dv: the query tiles of the blocks its transposed block tables list for this kv block (the
    row of the tables _row_table found)."""
    for FULL in tl.static_range(2):
        LIST, row, n_tiles = _blocks(FULL, IDX, FULL_IDX, base, base_full, n_partial, n_full, SPARSE_Q, BLOCK_M)
        for it in range(n_tiles):
            dk, dv = _dkdv_tile(dk, dv, k, v, STREAM.Q, STREAM.DO, Q_DESC, DO_DESC, STREAM.REF, STREAM.DELTA, qh,
                                _tile_start(LIST, row, it, SPARSE_Q, BLOCK_M), offs_n, off_b, off_h, STREAM.Sq, Skv,
                                scale, STREAM.Q_OFF, __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
                                FULL == 1, EVEN, DOT, USE_TMA)
    return dk, dv


@triton.jit
def flex_bwd_dkdv(__SIGNATURE__):
    """One program per (kv tile, batch, kv head); loops over the query heads of its GQA group
    and the query blocks the transposed block tables Q_BLOCKS of STREAM list for its kv block.
    ACCUMULATE adds ADD_K / ADD_V to what it writes.  USE_TMA: q and dO tiles through the
    descriptors Q_DESC, DO_DESC."""
    pid_n, off_b, off_hk, offs_n, kvh = _key_program(Skv, Hkv, HEAD_GROUP, BLOCK_N)
    k = _load_rows(K + kvh * Skv * D, offs_n, Skv, D, BLOCK_D, EVEN)
    v = _load_rows(V + kvh * Skv * DV, offs_n, Skv, DV, BLOCK_DV, EVEN)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    group = H // Hkv
    for g in range(group):
        off_h = off_hk * group + g
        qh = (off_b * H + off_h).to(tl.int64)
        block = (pid_n * BLOCK_N) // SPARSE_KV
        IDX, FULL_IDX, base, base_full, n_partial, n_full = _row_table(Q_BLOCKS, off_b, off_h, block, HAS_FULL)
        dk, dv = _dkdv_stream(dk, dv, k, v, STREAM, IDX, FULL_IDX, base, base_full, n_partial, n_full, Q_DESC, DO_DESC,
                              qh, offs_n, off_b, off_h, Skv, scale, __BUFFERS__
                              D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, SPARSE_Q, EVEN, DOT, USE_TMA)
    _store_key_grads(DK, DV_OUT, ADD_K, ADD_V, dk * scale, dv, kvh, offs_n, Skv, D, DV, BLOCK_D, BLOCK_DV,
                     ACCUMULATE)
