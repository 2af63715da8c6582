# flexebt kernel template: single-stream FlexAttention, forward and backward.
#
# This file is a *template*, never imported as is: flexebt.codegen replaces
#   __BUFFERS__            with the captured-tensor parameters "BUF0, BUF0_S0, ..., GBUF0, "
#   "# @SCORE_FWD"         with code computing `t2 = score_mod(s_raw * scale, ...) * log2(e)`
#   "# @SCORE_BWD"         the same `t2` and `dtds = d score_mod / d s` (+ the captured leaves)
#   "# @MASK"              with code computing `mask_keep = mask_mod(...)`
#   "# @CAPTURED_GRAD"     with atomic adds of `dt * d score_mod / d c_k` into GBUF{k}
#   `for start, IS_FULL in _visited_tiles(IDX, FULL_IDX, base, base_full, n_partial, n_full,
#   SPARSE, BLOCK):` with two loops, over the tiles of the row's partial blocks (IS_FULL =
#   False, the mask_mod runs) and then of its full blocks (IS_FULL = True, a constant: no mask)
# and writes the result to the kernel cache.  Names the mod code may use: s, off_b, off_h,
# q_idx [BLOCK_M, 1], kv_idx [1, BLOCK_N], VALID, ZERO (see flexebt/codegen/emit.py).
#
# Layout: q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, DV], all contiguous.
# Block sparsity: torch BlockMask tables, contiguous, [MB, MH, nQ(, nKVmax)] with MB in {1, B},
# MH in {1, H}; a row of sparse Q blocks lists partial kv blocks (mask_mod applied) and full kv
# blocks (mask_mod skipped).  Kernel tiles (BLOCK_M x BLOCK_N) subdivide the sparse blocks
# (SPARSE_Q x SPARSE_KV).
#
# Math (one query row i, keys j):  s_ij = scale q_i.k_j,  t_ij = f(s_ij),
#   P_ij = exp(t_ij - L_i),  L_i = log sum_j exp(t_ij),  o_i = sum_j P_ij v_j.
# The forward keeps a running max m_i and sum l_i (online softmax) and rescales the
# accumulator by exp(m_old - m_new) whenever the max grows.  Scores are kept in log2 units
# (t2 = t log2 e) so every exponential is one exp2; lse is stored in natural log units.
# Loops run over every tile of every block a table row lists, flat: tile `it` of a row sits in
# listed block it // MULT at offset (it % MULT) * BLOCK, MULT = SPARSE / BLOCK (the unrolled
# `_visited_tiles` loops, flexebt/codegen/source.py).
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation.  IEEE = 1: exact fp32 products (no tf32); IEEE = 2: fp32
    products as three tf32 products (tensor cores).  UPCAST: compute in fp32 (only for bf16 under
    Triton's CPU interpreter, whose bf16 dot is wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE == 1:
        return tl.dot(a, b, input_precision="ieee")
    elif IEEE == 2:
        return tl.dot(a, b, input_precision="tf32x3")
    else:
        return tl.dot(a, b)


@triton.jit
def _load_rows(ptr, rows, n_rows, ncols: tl.constexpr, BLOCK_C: tl.constexpr, EVEN: tl.constexpr):
    """Rows ``rows`` of a contiguous [n_rows, ncols] matrix as a [len(rows), BLOCK_C] tile (0-padded)."""
    cols = tl.arange(0, BLOCK_C)
    if EVEN and ncols == BLOCK_C:
        return tl.load(ptr + rows[:, None] * ncols + cols[None, :])
    return tl.load(ptr + rows[:, None] * ncols + cols[None, :],
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < ncols), other=0.0)


@triton.jit
def _load_tile(ptr, DESC, head, start, n_rows, ncols: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
               EVEN: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows start .. start + BLOCK of one head's contiguous [n_rows, ncols] matrix at ``ptr``.
    USE_TMA: through the tensor descriptor DESC over [heads, n_rows, ncols] instead -- the copy
    engine fetches the tile and fills rows past n_rows and columns past ncols with zeros, as the
    pointer loads do."""
    if USE_TMA:
        return DESC.load([head.to(tl.int32), start, 0]).reshape(BLOCK, BLOCK_C)
    return _load_rows(ptr, start + tl.arange(0, BLOCK), n_rows, ncols, BLOCK_C, EVEN)


@triton.jit
def _mod_indices(offs_m, offs_n, Sq, Skv, EVEN: tl.constexpr):
    """Positions the mods see.  Past the end of a sequence they are clamped to the last position so
    a mod's loads stay in bounds (those scores are masked anyway); when every tile is inside
    (EVEN) no clamp is needed, which keeps the offsets visibly contiguous for vectorized loads."""
    if EVEN:
        return offs_m, offs_n
    return tl.minimum(offs_m, Sq - 1), tl.minimum(offs_n, Skv - 1)


@triton.jit
def _tile_positions(offs_m, offs_n, Sq, Skv, Q_OFF, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    EVEN: tl.constexpr):
    """What the mod code of a [BLOCK_M queries, BLOCK_N keys] tile sees: VALID (inside both
    sequences), mq_idx (stream-local query position, for block-mask mods), q_idx (frame position,
    for score_mods), kv_idx, and ZERO (to broadcast values to the tile)."""
    VALID = (offs_m[:, None] < Sq) & (offs_n[None, :] < Skv)
    mq_idx, kv_idx = _mod_indices(offs_m, offs_n, Sq, Skv, EVEN)
    return (VALID, mq_idx[:, None], mq_idx[:, None] + Q_OFF, kv_idx[None, :],
            tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32))


@triton.jit
def _own_positions(offs_m, Sq, Q_OFF, BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """Mod inputs of the EBT own-key column ([BLOCK_M, 1]): query i meets its own key at its
    own frame position (kv_idx = q_idx), the one-column form of _tile_positions."""
    VALID = (offs_m < Sq)[:, None]
    mq_idx, _unused = _mod_indices(offs_m, offs_m, Sq, Sq, EVEN)
    q_idx = mq_idx[:, None] + Q_OFF
    return VALID, mq_idx, q_idx, q_idx, tl.zeros([BLOCK_M, 1], dtype=tl.int32)


@triton.jit
def _own_key_scores(q, KP, VP, SELF_KEEP, kv_head_base, v_head_base, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF,
                    __BUFFERS__
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """EBT own key as a row-wise term: t2_i = f(scale q_i.kp_i) log2 e at frame (t, t), t = i + Q_OFF,
    or -inf where it is dropped; one [BLOCK_M] column, no tile.  Returns (t2, keep, vp)."""
    kp = _load_rows(KP + kv_head_base, offs_m, Sq, D, BLOCK_D, EVEN)
    vp = _load_rows(VP + v_head_base, offs_m, Sq, DV, BLOCK_DV, EVEN)
    s_raw = tl.sum(q.to(tl.float32) * kp.to(tl.float32), 1)[:, None]  # [BLOCK_M, 1]
    VALID, mq_idx, q_idx, kv_idx, ZERO = _own_positions(offs_m, Sq, Q_OFF, BLOCK_M, EVEN)
    # @SCORE_FWD
    keep = VALID & (tl.load(SELF_KEEP + qh * Sq + offs_m, mask=offs_m < Sq, other=0) != 0)[:, None]
    t2 = tl.sum(tl.where(keep, t2, float("-inf")), 1)
    return t2, tl.sum(keep.to(tl.int32), 1) > 0, vp


@triton.jit
def _own_key_grads(q, do, lse2, delta, KP, VP, SELF_KEEP, kv_head_base, v_head_base, qh, offs_m, off_b, off_h, Sq,
                   scale, Q_OFF, __BUFFERS__
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """Backward of the own-key term of one query tile: returns (ds_self [BLOCK_M, 1], kp, dkp
    without scale, dvp) and scatters its captured-tensor gradients.  p_i = exp(t_i - L_i),
    dt_i = p_i (do_i.vp_i - D_i), ds_i = dt_i f'(s_i); dq_i += ds_i kp_i, dkp_i = ds_i q_i,
    dvp_i = p_i do_i (times scale where the score had it)."""
    kp = _load_rows(KP + kv_head_base, offs_m, Sq, D, BLOCK_D, EVEN)
    vp = _load_rows(VP + v_head_base, offs_m, Sq, DV, BLOCK_DV, EVEN)
    s_raw = tl.sum(q.to(tl.float32) * kp.to(tl.float32), 1)[:, None]
    VALID, mq_idx, q_idx, kv_idx, ZERO = _own_positions(offs_m, Sq, Q_OFF, BLOCK_M, EVEN)
    # @SCORE_BWD
    keep = VALID & (tl.load(SELF_KEEP + qh * Sq + offs_m, mask=offs_m < Sq, other=0) != 0)[:, None]
    p = tl.where(keep, tl.math.exp2(t2 - lse2[:, None]), 0.0)
    dp = tl.sum(do.to(tl.float32) * vp.to(tl.float32), 1)[:, None]
    dt = p * (dp - delta[:, None])
    # @CAPTURED_GRAD
    ds = tl.where(keep, dt * dtds, 0.0)
    return ds, kp, ds * q.to(tl.float32), p * do.to(tl.float32)


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, K_DESC, V_DESC, kvh, kv_head_base, v_head_base, start_n, offs_m, off_b, off_h,
              Sq, Skv, scale, Q_OFF, __BUFFERS__
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
              IEEE: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr, LINEAR_SCORE: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K + kv_head_base, K_DESC, kvh, start_n, Skv, D, BLOCK_N, BLOCK_D, EVEN, USE_TMA)
    v = _load_tile(V + v_head_base, V_DESC, kvh, start_n, Skv, DV, BLOCK_N, BLOCK_DV, EVEN, USE_TMA)
    s_raw = _mm(q, tl.trans(k), IEEE, UPCAST)
    VALID, mq_idx, q_idx, kv_idx, ZERO = _tile_positions(offs_m, offs_n, Sq, Skv, Q_OFF, BLOCK_M, BLOCK_N, EVEN)
    # @SCORE_FWD
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
        # @MASK
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
def _row_table(NUM, IDX, FULL_NUM, FULL_IDX, off_b, off_h, block, MB, MH, N_ROWS, N_LIST, N_LIST_FULL,
               HAS_FULL: tl.constexpr):
    """Where one row of the block tables starts, and its partial and full block counts.  A table
    built with B/H = None has MB/MH = 1 and is shared by all batches/heads (x % 1 == 0)."""
    row = ((off_b % MB) * MH + (off_h % MH)) * N_ROWS + block
    n_partial = tl.load(NUM + row)
    n_full = 0
    if HAS_FULL:
        n_full = tl.load(FULL_NUM + row)
    return row * N_LIST, row * N_LIST_FULL, n_partial, n_full


@triton.jit
def _program_tile(n_tiles, HEAD_GROUP, REVERSE: tl.constexpr):
    """(tile, batch x head) of this program in a 1-d grid of n_tiles x (B * heads) programs.

    The hardware starts programs roughly in launch order.  Heads go in groups of HEAD_GROUP; a
    group's programs run tile index by tile index across its heads.  With REVERSE (last tiles
    first: under a causal mask they see the most keys) a group starts all its heavy tiles before
    any light one, and the launch ends on light tiles -- a short tail.  When HEAD_GROUP does not
    divide the heads, the narrower group goes first: last, its heavy tiles would start near the
    end and run alone.  HEAD_GROUP = 1 is the plain head-by-head order; a larger group shortens
    the tail but spreads the programs running at one time over more heads, whose K/V (or q/dO)
    must share the L2 cache (kernels/grid.py chooses it)."""
    pid = tl.program_id(0)
    n_bh = tl.num_programs(0) // n_tiles
    narrow = n_bh % HEAD_GROUP
    if narrow == 0:
        narrow = HEAD_GROUP
    if pid < narrow * n_tiles:
        first = pid * 0
        width = narrow
    else:
        rest = pid - narrow * n_tiles
        first = narrow + (rest // (HEAD_GROUP * n_tiles)) * HEAD_GROUP  # first head of the group
        width = HEAD_GROUP
    within = pid - first * n_tiles
    pid_t = within // width
    if REVERSE:
        pid_t = n_tiles - 1 - pid_t
    return pid_t, first + within % width


@triton.jit
def flex_fwd(Q, K, V, O, LSE, MAXS, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
             H, Hkv, Sq, Skv, MB, MH, NQ_BLOCKS, NKV_LIST, NKV_LIST_FULL, scale, Q_OFF, KP, VP, SELF_KEEP,
             K_DESC, V_DESC, __BUFFERS__ HEAD_GROUP,
             D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
             HAS_FULL: tl.constexpr, EVEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
             REVERSE: tl.constexpr, HAS_SELF: tl.constexpr, USE_TMA: tl.constexpr, LINEAR_SCORE: tl.constexpr,
             RETURN_MAX: tl.constexpr):
    """One query tile.  Q_OFF shifts the query positions the score_mod sees (frame coordinates of
    the EBT predicted stream; 0 otherwise).  HAS_SELF: each query i also attends to its own key
    KP[i], VP[i] (EBT), kept iff SELF_KEEP[b, h, i]; that key seeds the online softmax.
    USE_TMA: K and V tiles come through the tensor descriptors K_DESC, V_DESC (Hopper's TMA).
    RETURN_MAX: also store each row's largest kept modified score (MAXS, natural units; -inf for
    a row that keeps nothing) -- the online softmax's final running max."""
    pid_m, pid_bh = _program_tile(tl.cdiv(Sq, BLOCK_M), HEAD_GROUP, REVERSE)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hk = off_h // (H // Hkv)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qh = (off_b * H + off_h).to(tl.int64)
    q = _load_rows(Q + qh * Sq * D, offs_m, Sq, D, BLOCK_D, EVEN)
    kvh = off_b * Hkv + off_hk
    kv_head_base = kvh.to(tl.int64) * Skv * D
    v_head_base = kvh.to(tl.int64) * Skv * DV

    if HAS_SELF:
        own = (off_b * Hkv + off_hk).to(tl.int64) * Sq  # own keys: [B, Hkv, Sq, D] like q's rows
        t2_self, keep_self, vp = _own_key_scores(q, KP, VP, SELF_KEEP, own * D, own * DV, qh, offs_m, off_b,
                                                 off_h, Sq, scale, Q_OFF, __BUFFERS__
                                                 D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, EVEN)
        m_i = t2_self  # -inf where the own key is dropped
        l_i = tl.where(keep_self, 1.0, 0.0)
        acc = tl.where(keep_self[:, None], vp.to(tl.float32), 0.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    base, base_full, n_partial, n_full = _row_table(KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, off_b, off_h,
                                                    (pid_m * BLOCK_M) // SPARSE_Q, MB, MH, NQ_BLOCKS, NKV_LIST,
                                                    NKV_LIST_FULL, HAS_FULL)
    for start_n, IS_FULL in _visited_tiles(KV_IDX, FULL_IDX, base, base_full, n_partial, n_full,
                                           SPARSE_KV, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, K_DESC, V_DESC, kvh, kv_head_base, v_head_base,
                                  start_n, offs_m, off_b, off_h, Sq, Skv, scale, Q_OFF,
                                  __BUFFERS__
                                  D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, IS_FULL, EVEN, IEEE, UPCAST, USE_TMA,
                                  LINEAR_SCORE)

    # A query that kept nothing: output 0 and lse = -inf (never NaN).
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(O + qh * Sq * DV + offs_m[:, None] * DV + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < Sq) & (offs_dv[None, :] < DV))
    tl.store(LSE + qh * Sq + offs_m, lse, mask=offs_m < Sq)
    if RETURN_MAX:
        tl.store(MAXS + qh * Sq + offs_m, m_i * LN2, mask=offs_m < Sq)


# Backward, given dO (do_i), O and L.  With D_i = do_i.o_i (computed before the launch):
#   dP_ij = do_i.v_j,  dt_ij = P_ij (dP_ij - D_i),  ds_ij = dt_ij f'(s_ij),
#   dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i P_ij do_i,
#   and a captured tensor c read as c_k at one index gets dt_ij df/dc_k there (the dq pass does it).
@triton.jit
def _dq_tile(dq, q, do, lse2, delta, K, V, K_DESC, V_DESC, kvh, kv_head_base, v_head_base, start_n, offs_m, off_b,
             off_h, Sq, Skv, scale, Q_OFF, __BUFFERS__
             D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
             IEEE: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K + kv_head_base, K_DESC, kvh, start_n, Skv, D, BLOCK_N, BLOCK_D, EVEN, USE_TMA)
    v = _load_tile(V + v_head_base, V_DESC, kvh, start_n, Skv, DV, BLOCK_N, BLOCK_DV, EVEN, USE_TMA)
    s_raw = _mm(q, tl.trans(k), IEEE, UPCAST)
    VALID, mq_idx, q_idx, kv_idx, ZERO = _tile_positions(offs_m, offs_n, Sq, Skv, Q_OFF, BLOCK_M, BLOCK_N, EVEN)
    # @SCORE_BWD
    if IS_FULL:
        keep = VALID
    else:
        # @MASK
        keep = VALID & mask_keep
    if IS_FULL and EVEN:
        p = tl.math.exp2(t2 - lse2[:, None])
    else:
        p = tl.where(keep, tl.math.exp2(t2 - lse2[:, None]), 0.0)
    dp = _mm(do, tl.trans(v), IEEE, UPCAST)
    dt = p * (dp - delta[:, None])
    # @CAPTURED_GRAD
    # Where nothing is masked, p > 0 everywhere; elsewhere guard against a mod whose derivative
    # is not finite at a masked position (0 * nan).
    if IS_FULL and EVEN:
        ds = dt * dtds
    else:
        ds = tl.where(keep, dt * dtds, 0.0)
    dq += _mm(ds.to(k.dtype), k, IEEE, UPCAST)
    return dq


@triton.jit
def flex_bwd_dq(Q, K, V, O, DO, LSE, DLSE, DELTA, DQ, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
                H, Hkv, Sq, Skv, MB, MH, NQ_BLOCKS, NKV_LIST, NKV_LIST_FULL, scale, Q_OFF, KP, VP, SELF_KEEP,
                DKP, DVP, K_DESC, V_DESC, __BUFFERS__ HEAD_GROUP,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
                HAS_FULL: tl.constexpr, EVEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                HAS_DLSE: tl.constexpr, REVERSE: tl.constexpr, HAS_SELF: tl.constexpr, USE_TMA: tl.constexpr):
    """dq for one query tile; also writes D_i = do_i.o_i - dlse_i for the dk/dv pass (a cotangent
    of lse adds P_ij dlse_i to dt_ij, which is the same as lowering D_i by dlse_i).  With HAS_SELF
    (EBT) it also writes the own keys' gradients DKP, DVP, per query head [B, H, Sq, D].
    USE_TMA: K and V tiles through the descriptors K_DESC, V_DESC."""
    pid_m, pid_bh = _program_tile(tl.cdiv(Sq, BLOCK_M), HEAD_GROUP, REVERSE)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hk = off_h // (H // Hkv)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Sq
    qh = (off_b * H + off_h).to(tl.int64)
    q = _load_rows(Q + qh * Sq * D, offs_m, Sq, D, BLOCK_D, EVEN)
    do = _load_rows(DO + qh * Sq * DV, offs_m, Sq, DV, BLOCK_DV, EVEN)
    o = _load_rows(O + qh * Sq * DV, offs_m, Sq, DV, BLOCK_DV, EVEN)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + qh * Sq + offs_m, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(DELTA + qh * Sq + offs_m, delta, mask=row_ok)
    lse = tl.load(LSE + qh * Sq + offs_m, mask=row_ok, other=float("-inf"))
    # lse = -inf marks a row with nothing kept; shifting by 0 keeps exp2() finite there.
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    kvh = off_b * Hkv + off_hk
    kv_head_base = kvh.to(tl.int64) * Skv * D
    v_head_base = kvh.to(tl.int64) * Skv * DV
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    base, base_full, n_partial, n_full = _row_table(KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, off_b, off_h,
                                                    (pid_m * BLOCK_M) // SPARSE_Q, MB, MH, NQ_BLOCKS, NKV_LIST,
                                                    NKV_LIST_FULL, HAS_FULL)
    for start_n, IS_FULL in _visited_tiles(KV_IDX, FULL_IDX, base, base_full, n_partial, n_full,
                                           SPARSE_KV, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse2, delta, K, V, K_DESC, V_DESC, kvh, kv_head_base, v_head_base,
                      start_n, offs_m, off_b, off_h, Sq, Skv, scale, Q_OFF,
                      __BUFFERS__
                      D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, IS_FULL, EVEN, IEEE, UPCAST, USE_TMA)
    offs_d = tl.arange(0, BLOCK_D)
    if HAS_SELF:
        own = (off_b * Hkv + off_hk).to(tl.int64) * Sq
        ds_self, kp, dkp, dvp = _own_key_grads(q, do, lse2, delta, KP, VP, SELF_KEEP, own * D, own * DV, qh, offs_m,
                                               off_b, off_h, Sq, scale, Q_OFF, __BUFFERS__
                                               D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, EVEN)
        dq += ds_self * kp.to(tl.float32)
        offs_dv = tl.arange(0, BLOCK_DV)
        tl.store(DKP + qh * Sq * D + offs_m[:, None] * D + offs_d[None, :], (dkp * scale).to(DKP.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < D))
        tl.store(DVP + qh * Sq * DV + offs_m[:, None] * DV + offs_dv[None, :], dvp.to(DVP.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(DQ + qh * Sq * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_tile(dk, dv, k, v, Q, DO, Q_DESC, DO_DESC, LSE, DELTA, qh, start_m, offs_n, off_b, off_h, Sq, Skv, scale,
               Q_OFF, __BUFFERS__
               D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
               IEEE: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    """Transposed orientation: tiles are [BLOCK_N keys, BLOCK_M queries], so P^T and dS^T come
    out of the products directly (the mod code is elementwise; only q_idx / kv_idx swap axes)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Sq
    q = _load_tile(Q + qh * Sq * D, Q_DESC, qh, start_m, Sq, D, BLOCK_M, BLOCK_D, EVEN, USE_TMA)
    do = _load_tile(DO + qh * Sq * DV, DO_DESC, qh, start_m, Sq, DV, BLOCK_M, BLOCK_DV, EVEN, USE_TMA)
    lse = tl.load(LSE + qh * Sq + offs_m, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    delta = tl.load(DELTA + qh * Sq + offs_m, mask=row_ok, other=0.0)
    s_raw = _mm(k, tl.trans(q), IEEE, UPCAST)
    VALID = (offs_m[None, :] < Sq) & (offs_n[:, None] < Skv)
    mq_idx, kv_idx = _mod_indices(offs_m, offs_n, Sq, Skv, EVEN)
    mq_idx = mq_idx[None, :]
    q_idx = mq_idx + Q_OFF
    kv_idx = kv_idx[:, None]
    ZERO = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    # @SCORE_BWD
    if IS_FULL:
        keep = VALID
    else:
        # @MASK
        keep = VALID & mask_keep
    if IS_FULL and EVEN:
        pT = tl.math.exp2(t2 - lse2[None, :])
    else:
        pT = tl.where(keep, tl.math.exp2(t2 - lse2[None, :]), 0.0)
    dv += _mm(pT.to(do.dtype), do, IEEE, UPCAST)
    dpT = _mm(v, tl.trans(do), IEEE, UPCAST)
    if IS_FULL and EVEN:
        dsT = pT * (dpT - delta[None, :]) * dtds
    else:
        dsT = tl.where(keep, pT * (dpT - delta[None, :]) * dtds, 0.0)
    dk += _mm(dsT.to(q.dtype), q, IEEE, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_stream(dk, dv, k, v, Q, DO, Q_DESC, DO_DESC, LSE, DELTA, Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX, qh, pid_n,
                 offs_n, off_b, off_h, Sq, Skv, MB, MH, NKV_BLOCKS, NQ_LIST, NQ_LIST_FULL, scale, Q_OFF, __BUFFERS__
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
                 HAS_FULL: tl.constexpr, EVEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """Add one query head's share to a key tile's dk, dv: the query tiles of the blocks the
    transposed block tables list for this kv block."""
    base, base_full, n_partial, n_full = _row_table(Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX, off_b, off_h,
                                                    (pid_n * BLOCK_N) // SPARSE_KV, MB, MH, NKV_BLOCKS, NQ_LIST,
                                                    NQ_LIST_FULL, HAS_FULL)
    for start_m, IS_FULL in _visited_tiles(Q_IDX, FULL_Q_IDX, base, base_full, n_partial, n_full,
                                           SPARSE_Q, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, Q, DO, Q_DESC, DO_DESC, LSE, DELTA, qh, start_m,
                            offs_n, off_b, off_h, Sq, Skv, scale, Q_OFF,
                            __BUFFERS__
                            D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, IS_FULL, EVEN, IEEE, UPCAST, USE_TMA)
    return dk, dv


@triton.jit
def flex_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV_OUT, ADD_K, ADD_V, Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,
                  H, Hkv, Sq, Skv, MB, MH, NKV_BLOCKS, NQ_LIST, NQ_LIST_FULL, scale, Q_OFF, Q_DESC, DO_DESC,
                  Q2, DO2, LSE2, DELTA2, Q2_NUM, Q2_IDX, FULL_Q2_NUM, FULL_Q2_IDX, Sq2, MB2, MH2, NQ2_LIST,
                  NQ2_LIST_FULL, Q2_OFF, Q2_DESC, DO2_DESC, __BUFFERS__ HEAD_GROUP,
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
                  HAS_FULL: tl.constexpr, EVEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                  ACCUMULATE: tl.constexpr, USE_TMA: tl.constexpr, TWO_STREAMS: tl.constexpr,
                  HAS_FULL2: tl.constexpr, EVEN2: tl.constexpr):
    """One program per (kv tile, batch, kv head); loops over the query heads of its GQA group
    and the query blocks the transposed block tables list for its kv block.  TWO_STREAMS (EBT):
    a second query stream (Q2, DO2, ... with its own tables, length and frame offset Q2_OFF) sees
    the same keys, and its share is added in the same program -- dk, dv stay in registers.
    ACCUMULATE adds ADD_K / ADD_V to what it writes.  USE_TMA: q and dO tiles through the
    descriptors Q_DESC, DO_DESC (Q2_DESC, DO2_DESC)."""
    pid_n, pid_bh = _program_tile(tl.cdiv(Skv, BLOCK_N), HEAD_GROUP, False)
    off_b = pid_bh // Hkv
    off_hk = pid_bh % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kvh = (off_b * Hkv + off_hk).to(tl.int64)
    k = _load_rows(K + kvh * Skv * D, offs_n, Skv, D, BLOCK_D, EVEN)
    v = _load_rows(V + kvh * Skv * DV, offs_n, Skv, DV, BLOCK_DV, EVEN)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    group = H // Hkv
    for g in range(group):
        off_h = off_hk * group + g
        qh = (off_b * H + off_h).to(tl.int64)
        dk, dv = _dkdv_stream(dk, dv, k, v, Q, DO, Q_DESC, DO_DESC, LSE, DELTA, Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,
                              qh, pid_n, offs_n, off_b, off_h, Sq, Skv, MB, MH, NKV_BLOCKS, NQ_LIST, NQ_LIST_FULL,
                              scale, Q_OFF, __BUFFERS__
                              D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, SPARSE_Q, SPARSE_KV, HAS_FULL, EVEN, IEEE,
                              UPCAST, USE_TMA)
        if TWO_STREAMS:
            dk, dv = _dkdv_stream(dk, dv, k, v, Q2, DO2, Q2_DESC, DO2_DESC, LSE2, DELTA2, Q2_NUM, Q2_IDX, FULL_Q2_NUM,
                                  FULL_Q2_IDX, qh, pid_n, offs_n, off_b, off_h, Sq2, Skv, MB2, MH2, NKV_BLOCKS,
                                  NQ2_LIST, NQ2_LIST_FULL, scale, Q2_OFF, __BUFFERS__
                                  D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, SPARSE_Q, SPARSE_KV, HAS_FULL2, EVEN2,
                                  IEEE, UPCAST, USE_TMA)
    _store_key_grads(DK, DV_OUT, ADD_K, ADD_V, dk * scale, dv, kvh, offs_n, Skv, D, DV, BLOCK_D, BLOCK_DV,
                     ACCUMULATE)


@triton.jit
def _store_key_grads(DK, DV_OUT, ADD_K, ADD_V, dk, dv, kvh, offs_n, Skv, D: tl.constexpr, DV: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Write one key tile's gradients [BLOCK_N, D] / [BLOCK_N, DV].  ACCUMULATE: first add what
    ADD_K / ADD_V hold (an earlier pass's fp32 partial sums; they may be DK / DV_OUT themselves),
    so the last pass can write the final dtype directly."""
    col_ok = offs_n < Skv
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_off = kvh * Skv * D + offs_n[:, None] * D + offs_d[None, :]
    dv_off = kvh * Skv * DV + offs_n[:, None] * DV + offs_dv[None, :]
    dk_ok = col_ok[:, None] & (offs_d[None, :] < D)
    dv_ok = col_ok[:, None] & (offs_dv[None, :] < DV)
    if ACCUMULATE:
        dk += tl.load(ADD_K + dk_off, mask=dk_ok, other=0.0).to(tl.float32)
        dv += tl.load(ADD_V + dv_off, mask=dv_ok, other=0.0).to(tl.float32)
    tl.store(DK + dk_off, dk.to(DK.dtype.element_ty), mask=dk_ok)
    tl.store(DV_OUT + dv_off, dv.to(DV_OUT.dtype.element_ty), mask=dv_ok)


# Double backward (flexebt/reference/double_backward.py is the dense spec).
# Given cotangents Gq, Gk, Gv of dq, dk, dv, with D0 = sum_j P dP (= do.o) and D = D0 - dlse:
#   A = scale (Gq k^T + q Gk^T),  u = f' A,  Bm = do Gv^T,  dt = P (dP - D),  ds = dt f'
#   U = sum_j P u,  Wc = sum_j P dP u - D0 U,  Bbar = sum_j P Bm                (row statistics)
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
@triton.jit
def _dbwd_scores(q, k, v, do, gq, gk, gv, lse2, offs_m, offs_n, off_b, off_h, Sq, Skv, scale, Q_OFF,
                 __BUFFERS__
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
                 IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Per tile: P, dP, A, u, Bm, f', du/ds (zero where masked) and the raw scores."""
    s_raw = _mm(q, tl.trans(k), IEEE, UPCAST)
    VALID, mq_idx, q_idx, kv_idx, ZERO = _tile_positions(offs_m, offs_n, Sq, Skv, Q_OFF, BLOCK_M, BLOCK_N, EVEN)
    # @SCORE_DBWD
    if IS_FULL:
        keep = VALID
    else:
        # @MASK
        keep = VALID & mask_keep
    p = tl.where(keep, tl.math.exp2(t2 - lse2[:, None]), 0.0)
    f1 = tl.where(keep, dtds, 0.0)
    dp = _mm(do, tl.trans(v), IEEE, UPCAST)
    a = (_mm(gq, tl.trans(k), IEEE, UPCAST) + _mm(q, tl.trans(gk), IEEE, UPCAST)) * scale
    bm = _mm(do, tl.trans(gv), IEEE, UPCAST)
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
    # @SCORE_DBWD
    if IS_FULL:
        keep = VALID
    else:
        # @MASK
        keep = VALID & mask_keep
    # @DBWD_CAPTURED_GRAD


@triton.jit
def _dbwd_row_inputs(Q, DO, GQ, Q_DESC, DO_DESC, GQ_DESC, LSE, DLSE, qh, start_m, Sq, D: tl.constexpr,
                     DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     EVEN: tl.constexpr, HAS_DLSE: tl.constexpr, USE_TMA: tl.constexpr):
    """The query-side rows of tile start_m (q, Gq, dO through the descriptors with USE_TMA), lse in
    log2 units and dlse (0 without HAS_DLSE).  O is not read: the passes take D0 = sum_j P dP from
    the row statistics (the rows pass reads O for g_do itself)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Sq
    q = _load_tile(Q + qh * Sq * D, Q_DESC, qh, start_m, Sq, D, BLOCK_M, BLOCK_D, EVEN, USE_TMA)
    gq = _load_tile(GQ + qh * Sq * D, GQ_DESC, qh, start_m, Sq, D, BLOCK_M, BLOCK_D, EVEN, USE_TMA)
    do = _load_tile(DO + qh * Sq * DV, DO_DESC, qh, start_m, Sq, DV, BLOCK_M, BLOCK_DV, EVEN, USE_TMA)
    lse = tl.load(LSE + qh * Sq + offs_m, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    dl = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_DLSE:
        dl = tl.load(DLSE + qh * Sq + offs_m, mask=row_ok, other=0.0).to(tl.float32)
    return q, gq, do, lse2, dl


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
def _dbwd_rows_tile(U, W, Bbar, D0, puv, pgv, q, gq, do, lse2, K, V, GK, GV, K_DESC, V_DESC, GK_DESC, GV_DESC, kvh,
                    start_n, offs_m, off_b, off_h, Sq, Skv, scale, Q_OFF, __BUFFERS__
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
                    IEEE: tl.constexpr, UPCAST: tl.constexpr, USE_TMA: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v, gk, gv = _dbwd_kv_rows(K, V, GK, GV, K_DESC, V_DESC, GK_DESC, GV_DESC, kvh, start_n, Skv, D, DV, BLOCK_N,
                                 BLOCK_D, BLOCK_DV, EVEN, USE_TMA)
    p, dp, a, u, bm, f1, duds, s_raw = _dbwd_scores(q, k, v, do, gq, gk, gv, lse2, offs_m, offs_n, off_b, off_h,
                                                    Sq, Skv, scale, Q_OFF, __BUFFERS__
                                                    BLOCK_M, BLOCK_N, IS_FULL, EVEN, IEEE, UPCAST)
    pu = p * u
    U += tl.sum(pu, 1)
    W += tl.sum(pu * dp, 1)
    Bbar += tl.sum(p * bm, 1)
    D0 += tl.sum(p * dp, 1)
    puv += _mm(pu.to(v.dtype), v, IEEE, UPCAST)
    pgv += _mm(p.to(gv.dtype), gv, IEEE, UPCAST)
    return U, W, Bbar, D0, puv, pgv


@triton.jit
def _dbwd_own(q, gq, do, lse2, KP, VP, GKP, GVP, SELF_KEEP, kp_base, vp_base, qh, offs_m, off_b, off_h, Sq, scale,
              Q_OFF, __BUFFERS__
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """The EBT own key of each row as one [BLOCK_M, 1] column of the double backward:
    (p, dP, A, u, Bm, f', du/ds) of that column, its raw score, and the rows kp, vp, gkp, gvp."""
    kp = _load_rows(KP + kp_base, offs_m, Sq, D, BLOCK_D, EVEN)
    vp = _load_rows(VP + vp_base, offs_m, Sq, DV, BLOCK_DV, EVEN)
    gkp = _load_rows(GKP + kp_base, offs_m, Sq, D, BLOCK_D, EVEN)
    gvp = _load_rows(GVP + vp_base, offs_m, Sq, DV, BLOCK_DV, EVEN)
    s_raw = tl.sum(q.to(tl.float32) * kp.to(tl.float32), 1)[:, None]
    VALID, mq_idx, q_idx, kv_idx, ZERO = _own_positions(offs_m, Sq, Q_OFF, BLOCK_M, EVEN)
    # @SCORE_DBWD
    keep = VALID & (tl.load(SELF_KEEP + qh * Sq + offs_m, mask=offs_m < Sq, other=0) != 0)[:, None]
    p = tl.where(keep, tl.math.exp2(t2 - lse2[:, None]), 0.0)
    f1 = tl.where(keep, dtds, 0.0)
    dp = tl.sum(do.to(tl.float32) * vp.to(tl.float32), 1)[:, None]
    a = (tl.sum(gq.to(tl.float32) * kp.to(tl.float32), 1) + tl.sum(q.to(tl.float32) * gkp.to(tl.float32), 1))[:, None]
    a = a * scale
    bm = tl.sum(do.to(tl.float32) * gvp.to(tl.float32), 1)[:, None]
    u = tl.where(keep, dtds * a + ew, 0.0)
    duds = tl.where(keep, d2tds2 * a + ewds, 0.0)
    return p, dp, a, u, bm, f1, duds, s_raw, kp, vp, gkp, gvp


@triton.jit
def _dbwd_own_captured(s_raw, gt, dt, a, SELF_KEEP, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF, __BUFFERS__
                       BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """g_c of the EBT own-key column (see _dbwd_captured)."""
    VALID, mq_idx, q_idx, kv_idx, ZERO = _own_positions(offs_m, Sq, Q_OFF, BLOCK_M, EVEN)
    # @SCORE_DBWD
    keep = VALID & (tl.load(SELF_KEEP + qh * Sq + offs_m, mask=offs_m < Sq, other=0) != 0)[:, None]
    # @DBWD_CAPTURED_GRAD


@triton.jit
def flex_dbwd_rows(Q, K, V, O, DO, LSE, DLSE, GQ, GK, GV, G_DO, STATS, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
                   H, Hkv, Sq, Skv, MB, MH, NQ_BLOCKS, NKV_LIST, NKV_LIST_FULL, scale, Q_OFF,
                   KP, VP, GKP, GVP, SELF_KEEP, K_DESC, V_DESC, GK_DESC, GV_DESC, __BUFFERS__ HEAD_GROUP,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
                   HAS_FULL: tl.constexpr, EVEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   HAS_DLSE: tl.constexpr, HAS_SELF: tl.constexpr, USE_TMA: tl.constexpr,
                   PARTIAL_ROWS: tl.constexpr):
    """Pass 1 of the double backward, per query tile: the row statistics U, Wc, Bbar and D
    (STATS [B, H, Sq, 4]) and g_do.  HAS_SELF: the EBT own key is one more column.
    USE_TMA: the key-side tiles through the descriptors.  PARTIAL_ROWS: these keys are one part
    of the rows' keys (another pass holds the rest; O and L are the merged ones): store the raw
    sums U, W, Bbar, D0 and the part P u v + P Gv of g_do (fp32), which the caller adds over the
    parts before it forms Wc = W - D0 U, D = D0 - dlse and g_do -= U o."""
    pid_m, pid_bh = _program_tile(tl.cdiv(Sq, BLOCK_M), HEAD_GROUP, False)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hk = off_h // (H // Hkv)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qh = (off_b * H + off_h).to(tl.int64)
    # the program's own rows, loaded once: pointer loads (the descriptor slots are unused)
    q, gq, do, lse2, dl = _dbwd_row_inputs(Q, DO, GQ, Q, DO, GQ, LSE, DLSE, qh, pid_m * BLOCK_M, Sq,
                                           D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, EVEN, HAS_DLSE, False)
    kvh = (off_b * Hkv + off_hk).to(tl.int64)
    if HAS_SELF:
        own = kvh * Sq
        p_s, dp_s, a_s, u_s, bm_s, f1_s, duds_s, s_s, kp, vp, gkp, gvp = _dbwd_own(
            q, gq, do, lse2, KP, VP, GKP, GVP, SELF_KEEP, own * D, own * DV, qh, offs_m, off_b, off_h, Sq, scale,
            Q_OFF, __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, EVEN)
        pu_s = p_s * u_s
        U = tl.sum(pu_s, 1)
        W = tl.sum(pu_s * dp_s, 1)
        Bbar = tl.sum(p_s * bm_s, 1)
        D0 = tl.sum(p_s * dp_s, 1)
        puv = pu_s * vp.to(tl.float32)
        pgv = p_s * gvp.to(tl.float32)
    else:
        U = tl.zeros([BLOCK_M], dtype=tl.float32)
        W = tl.zeros([BLOCK_M], dtype=tl.float32)
        Bbar = tl.zeros([BLOCK_M], dtype=tl.float32)
        D0 = tl.zeros([BLOCK_M], dtype=tl.float32)
        puv = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        pgv = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    base, base_full, n_partial, n_full = _row_table(KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, off_b, off_h,
                                                    (pid_m * BLOCK_M) // SPARSE_Q, MB, MH, NQ_BLOCKS, NKV_LIST,
                                                    NKV_LIST_FULL, HAS_FULL)
    for start_n, IS_FULL in _visited_tiles(KV_IDX, FULL_IDX, base, base_full, n_partial, n_full,
                                           SPARSE_KV, BLOCK_N):
        U, W, Bbar, D0, puv, pgv = _dbwd_rows_tile(U, W, Bbar, D0, puv, pgv, q, gq, do, lse2, K, V, GK, GV,
                                               K_DESC, V_DESC, GK_DESC, GV_DESC, kvh,
                                               start_n, offs_m, off_b, off_h, Sq, Skv,
                                               scale, Q_OFF, __BUFFERS__
                                               D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, IS_FULL, EVEN, IEEE, UPCAST,
                                               USE_TMA)
    if PARTIAL_ROWS:
        g_do = puv + pgv
    else:
        o = _load_tile(O + qh * Sq * DV, O, qh, pid_m * BLOCK_M, Sq, DV, BLOCK_M, BLOCK_DV, EVEN, False)
        g_do = puv - U[:, None] * o.to(tl.float32) + pgv
    row_ok = offs_m < Sq
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(G_DO + qh * Sq * DV + offs_m[:, None] * DV + offs_dv[None, :], g_do.to(G_DO.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
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
def _dbwd_dq_tile(g_q, q, gq, do, lse2, U, Wc, Bbar, dsh, K, V, GK, GV, K_DESC, V_DESC, GK_DESC, GV_DESC, kvh,
                  start_n, offs_m, off_b, off_h, Sq, Skv, scale, Q_OFF, __BUFFERS__
                  D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
                  IEEE: tl.constexpr, UPCAST: tl.constexpr, CAPTURED_GRADS: tl.constexpr, USE_TMA: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k, v, gk, gv = _dbwd_kv_rows(K, V, GK, GV, K_DESC, V_DESC, GK_DESC, GV_DESC, kvh, start_n, Skv, D, DV, BLOCK_N,
                                 BLOCK_D, BLOCK_DV, EVEN, USE_TMA)
    p, dp, a, u, bm, f1, duds, s_raw = _dbwd_scores(q, k, v, do, gq, gk, gv, lse2, offs_m, offs_n, off_b, off_h,
                                                    Sq, Skv, scale, Q_OFF, __BUFFERS__
                                                    BLOCK_M, BLOCK_N, IS_FULL, EVEN, IEEE, UPCAST)
    gs, ds, gt, dt = _dbwd_gs(p, dp, u, bm, f1, duds, dsh, U, Wc, Bbar)
    if CAPTURED_GRADS:
        _dbwd_captured(s_raw, gt, dt, a, offs_m, offs_n, off_b, off_h, Sq, Skv, scale, Q_OFF, __BUFFERS__
                       BLOCK_M, BLOCK_N, IS_FULL, EVEN)
    g_q += _mm(gs.to(k.dtype), k, IEEE, UPCAST) + _mm(ds.to(gk.dtype), gk, IEEE, UPCAST)
    return g_q


@triton.jit
def flex_dbwd_dq(Q, K, V, O, DO, LSE, DLSE, GQ, GK, GV, G_Q, STATS, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
                 H, Hkv, Sq, Skv, MB, MH, NQ_BLOCKS, NKV_LIST, NKV_LIST_FULL, scale, Q_OFF,
                 KP, VP, GKP, GVP, SELF_KEEP, G_KP, G_VP, K_DESC, V_DESC, GK_DESC, GV_DESC, __BUFFERS__ HEAD_GROUP,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
                 HAS_FULL: tl.constexpr, EVEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                 HAS_DLSE: tl.constexpr, HAS_SELF: tl.constexpr, CAPTURED_GRADS: tl.constexpr,
                 USE_TMA: tl.constexpr):
    """Pass 2 of the double backward, per query tile: g_q = scale sum_j (gs k + ds Gk).  HAS_SELF:
    the own key's column adds to g_q and gives its g_kp, g_vp (per query head; fp32 under GQA).
    CAPTURED_GRADS: also scatter the captured tensors' second-order gradients.  USE_TMA: the
    key-side tiles through the descriptors."""
    pid_m, pid_bh = _program_tile(tl.cdiv(Sq, BLOCK_M), HEAD_GROUP, False)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hk = off_h // (H // Hkv)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qh = (off_b * H + off_h).to(tl.int64)
    # the program's own rows, loaded once: pointer loads (the descriptor slots are unused)
    q, gq, do, lse2, dl = _dbwd_row_inputs(Q, DO, GQ, Q, DO, GQ, LSE, DLSE, qh, pid_m * BLOCK_M, Sq,
                                           D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, EVEN, HAS_DLSE, False)
    U, Wc, Bbar, dsh = _load_stats(STATS, qh, offs_m, Sq)
    kvh = (off_b * Hkv + off_hk).to(tl.int64)
    g_q = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    base, base_full, n_partial, n_full = _row_table(KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, off_b, off_h,
                                                    (pid_m * BLOCK_M) // SPARSE_Q, MB, MH, NQ_BLOCKS, NKV_LIST,
                                                    NKV_LIST_FULL, HAS_FULL)
    for start_n, IS_FULL in _visited_tiles(KV_IDX, FULL_IDX, base, base_full, n_partial, n_full,
                                           SPARSE_KV, BLOCK_N):
        g_q = _dbwd_dq_tile(g_q, q, gq, do, lse2, U, Wc, Bbar, dsh, K, V, GK, GV, K_DESC, V_DESC, GK_DESC, GV_DESC,
                            kvh, start_n, offs_m, off_b, off_h, Sq, Skv, scale, Q_OFF,
                            __BUFFERS__
                            D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, IS_FULL, EVEN, IEEE, UPCAST, CAPTURED_GRADS,
                            USE_TMA)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Sq
    if HAS_SELF:
        own = kvh * Sq
        p_s, dp_s, a_s, u_s, bm_s, f1_s, duds_s, s_s, kp, vp, gkp, gvp = _dbwd_own(
            q, gq, do, lse2, KP, VP, GKP, GVP, SELF_KEEP, own * D, own * DV, qh, offs_m, off_b, off_h, Sq, scale,
            Q_OFF, __BUFFERS__ D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, EVEN)
        gs_s, ds_s, gt_s, dt_s = _dbwd_gs(p_s, dp_s, u_s, bm_s, f1_s, duds_s, dsh, U, Wc, Bbar)
        if CAPTURED_GRADS:
            _dbwd_own_captured(s_s, gt_s, dt_s, a_s, SELF_KEEP, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF,
                               __BUFFERS__ BLOCK_M, EVEN)
        g_q += gs_s * kp.to(tl.float32) + ds_s * gkp.to(tl.float32)
        g_kp = (gs_s * q.to(tl.float32) + ds_s * gq.to(tl.float32)) * scale
        g_vp = p_s * (u_s - U[:, None]) * do.to(tl.float32)
        offs_dv = tl.arange(0, BLOCK_DV)
        tl.store(G_KP + qh * Sq * D + offs_m[:, None] * D + offs_d[None, :], g_kp.to(G_KP.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < D))
        tl.store(G_VP + qh * Sq * DV + offs_m[:, None] * DV + offs_dv[None, :], g_vp.to(G_VP.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(G_Q + qh * Sq * D + offs_m[:, None] * D + offs_d[None, :], (g_q * scale).to(G_Q.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dbwd_dkdv_tile(g_k, g_v, k, v, gk, gv, Q, O, DO, GQ, Q_DESC, O_DESC, DO_DESC, GQ_DESC, LSE, DLSE, STATS, qh,
                    start_m, offs_n, off_b, off_h, Sq, Skv, scale, Q_OFF, __BUFFERS__
                    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
                    IEEE: tl.constexpr, UPCAST: tl.constexpr, HAS_DLSE: tl.constexpr, USE_TMA: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q, gq, do, lse2, dl = _dbwd_row_inputs(Q, DO, GQ, Q_DESC, DO_DESC, GQ_DESC, LSE, DLSE, qh,
                                           start_m, Sq, D, DV, BLOCK_M, BLOCK_D, BLOCK_DV, EVEN, HAS_DLSE,
                                           USE_TMA)
    U, Wc, Bbar, dsh = _load_stats(STATS, qh, offs_m, Sq)
    p, dp, a, u, bm, f1, duds, s_raw = _dbwd_scores(q, k, v, do, gq, gk, gv, lse2, offs_m, offs_n, off_b, off_h,
                                                    Sq, Skv, scale, Q_OFF, __BUFFERS__
                                                    BLOCK_M, BLOCK_N, IS_FULL, EVEN, IEEE, UPCAST)
    gs, ds, gt, dt = _dbwd_gs(p, dp, u, bm, f1, duds, dsh, U, Wc, Bbar)
    g_k += _mm(tl.trans(gs.to(q.dtype)), q, IEEE, UPCAST) + _mm(tl.trans(ds.to(gq.dtype)), gq, IEEE, UPCAST)
    g_v += _mm(tl.trans((p * (u - U[:, None])).to(do.dtype)), do, IEEE, UPCAST)
    return g_k, g_v


@triton.jit
def flex_dbwd_dkdv(Q, K, V, O, DO, LSE, DLSE, GQ, GK, GV, G_K, G_V, ADD_K, ADD_V, STATS, Q_NUM, Q_IDX, FULL_Q_NUM,
                   FULL_Q_IDX,
                   H, Hkv, Sq, Skv, MB, MH, NKV_BLOCKS, NQ_LIST, NQ_LIST_FULL, scale, Q_OFF,
                   Q_DESC, O_DESC, DO_DESC, GQ_DESC, __BUFFERS__ HEAD_GROUP,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
                   HAS_FULL: tl.constexpr, EVEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   HAS_DLSE: tl.constexpr, ACCUMULATE: tl.constexpr, USE_TMA: tl.constexpr):
    """Pass 3 of the double backward, per key tile: g_k = scale sum_i (gs^T q + ds^T Gq) and
    g_v = sum_i (P (u - U))^T do, over the query heads of a GQA group (ACCUMULATE: add ADD_K, ADD_V).
    USE_TMA: the query-side tiles through the descriptors."""
    pid_n, pid_bh = _program_tile(tl.cdiv(Skv, BLOCK_N), HEAD_GROUP, False)
    off_b = pid_bh // Hkv
    off_hk = pid_bh % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    kvh = (off_b * Hkv + off_hk).to(tl.int64)
    # the program's own keys, loaded once: pointer loads (the descriptor slots are unused)
    k, v, gk, gv = _dbwd_kv_rows(K, V, GK, GV, K, V, GK, GV, kvh, pid_n * BLOCK_N, Skv, D, DV, BLOCK_N, BLOCK_D,
                                 BLOCK_DV, EVEN, False)
    g_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    g_v = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    group = H // Hkv
    for g in range(group):
        off_h = off_hk * group + g
        qh = (off_b * H + off_h).to(tl.int64)
        base, base_full, n_partial, n_full = _row_table(Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX, off_b, off_h,
                                                        (pid_n * BLOCK_N) // SPARSE_KV, MB, MH, NKV_BLOCKS, NQ_LIST,
                                                        NQ_LIST_FULL, HAS_FULL)
        for start_m, IS_FULL in _visited_tiles(Q_IDX, FULL_Q_IDX, base, base_full, n_partial, n_full,
                                               SPARSE_Q, BLOCK_M):
            g_k, g_v = _dbwd_dkdv_tile(g_k, g_v, k, v, gk, gv, Q, O, DO, GQ, Q_DESC, O_DESC, DO_DESC, GQ_DESC,
                                       LSE, DLSE, STATS, qh, start_m, offs_n, off_b, off_h, Sq, Skv, scale, Q_OFF,
                                       __BUFFERS__
                                       D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, IS_FULL, EVEN, IEEE, UPCAST,
                                       HAS_DLSE, USE_TMA)
    _store_key_grads(G_K, G_V, ADD_K, ADD_V, g_k * scale, g_v, kvh, offs_n, Skv, D, DV, BLOCK_D, BLOCK_DV,
                     ACCUMULATE)


# Forward-mode (JVP).  With tangents dq, dk, dv of q, k, v:
#   ds = scale (dq k^T + q dk^T),  dt = f'(s) ds,  dP = P (dt - m),  m_i = sum_j P_ij dt_ij,
#   d o_i = sum_j P_ij (dt_ij - m_i) v_j + sum_j P_ij dv_j,   d lse_i = m_i.
# One pass with the forward's online softmax: sum P dt v, sum P dv and sum P dt are rescaled by the
# same factor as the output accumulator, so the tangents come out normalised at the end.
@triton.jit
def _jvp_tile(acc, tacc, macc, l_i, m_i, q, dq, K, V, DK, DVT, kv_head_base, v_head_base, start_n, offs_m, off_b,
              off_h, Sq, Skv, scale, Q_OFF, __BUFFERS__
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FULL: tl.constexpr, EVEN: tl.constexpr,
              IEEE: tl.constexpr, UPCAST: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_rows(K + kv_head_base, offs_n, Skv, D, BLOCK_D, EVEN)
    v = _load_rows(V + v_head_base, offs_n, Skv, DV, BLOCK_DV, EVEN)
    dk = _load_rows(DK + kv_head_base, offs_n, Skv, D, BLOCK_D, EVEN)
    dv = _load_rows(DVT + v_head_base, offs_n, Skv, DV, BLOCK_DV, EVEN)
    s_raw = _mm(q, tl.trans(k), IEEE, UPCAST)
    VALID, mq_idx, q_idx, kv_idx, ZERO = _tile_positions(offs_m, offs_n, Sq, Skv, Q_OFF, BLOCK_M, BLOCK_N, EVEN)
    # @SCORE_BWD
    if IS_FULL:
        keep = VALID
    else:
        # @MASK
        keep = VALID & mask_keep
    t2 = tl.where(keep, t2, float("-inf"))
    dt = tl.where(keep, dtds * (_mm(dq, tl.trans(k), IEEE, UPCAST) + _mm(q, tl.trans(dk), IEEE, UPCAST)) * scale, 0.0)
    m_new = tl.maximum(m_i, tl.max(t2, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(t2 - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE, UPCAST)
    pdt = p * dt
    tacc = tacc * alpha[:, None] + _mm(pdt.to(v.dtype), v, IEEE, UPCAST) + _mm(p.to(dv.dtype), dv, IEEE, UPCAST)
    macc = macc * alpha + tl.sum(pdt, 1)
    return acc, tacc, macc, l_i, m_new


@triton.jit
def _own_key_jvp(q, dq, KP, VP, DKP, DVP, SELF_KEEP, kp_base, vp_base, qh, offs_m, off_b, off_h, Sq, scale, Q_OFF,
                 __BUFFERS__
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_M: tl.constexpr, EVEN: tl.constexpr):
    """The EBT own key's column for the JVP: (t2, d t, keep) per row and the rows vp, d vp."""
    kp = _load_rows(KP + kp_base, offs_m, Sq, D, BLOCK_D, EVEN)
    vp = _load_rows(VP + vp_base, offs_m, Sq, DV, BLOCK_DV, EVEN)
    dkp = _load_rows(DKP + kp_base, offs_m, Sq, D, BLOCK_D, EVEN)
    dvp = _load_rows(DVP + vp_base, offs_m, Sq, DV, BLOCK_DV, EVEN)
    s_raw = tl.sum(q.to(tl.float32) * kp.to(tl.float32), 1)[:, None]
    VALID, mq_idx, q_idx, kv_idx, ZERO = _own_positions(offs_m, Sq, Q_OFF, BLOCK_M, EVEN)
    # @SCORE_BWD
    keep = VALID & (tl.load(SELF_KEEP + qh * Sq + offs_m, mask=offs_m < Sq, other=0) != 0)[:, None]
    ds = (tl.sum(dq.to(tl.float32) * kp.to(tl.float32), 1) + tl.sum(q.to(tl.float32) * dkp.to(tl.float32), 1))
    dt = tl.sum(tl.where(keep, dtds * ds[:, None] * scale, 0.0), 1)
    t2 = tl.sum(tl.where(keep, t2, float("-inf")), 1)
    return t2, dt, tl.sum(keep.to(tl.int32), 1) > 0, vp, dvp


@triton.jit
def flex_jvp(Q, K, V, DQ, DK, DVT, O, LSE, DO, DLSE, KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
             H, Hkv, Sq, Skv, MB, MH, NQ_BLOCKS, NKV_LIST, NKV_LIST_FULL, scale, Q_OFF,
             KP, VP, DKP, DVP, SELF_KEEP, __BUFFERS__ HEAD_GROUP,
             D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
             HAS_FULL: tl.constexpr, EVEN: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
             HAS_SELF: tl.constexpr):
    """Forward and JVP in one pass: O, LSE and their tangents DO (d out), DLSE (d lse).  HAS_SELF:
    the EBT own key (and its tangents DKP, DVP) seeds the accumulators, as in the forward."""
    pid_m, pid_bh = _program_tile(tl.cdiv(Sq, BLOCK_M), HEAD_GROUP, False)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_hk = off_h // (H // Hkv)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qh = (off_b * H + off_h).to(tl.int64)
    q = _load_rows(Q + qh * Sq * D, offs_m, Sq, D, BLOCK_D, EVEN)
    dq = _load_rows(DQ + qh * Sq * D, offs_m, Sq, D, BLOCK_D, EVEN)
    kv_head_base = (off_b * Hkv + off_hk).to(tl.int64) * Skv * D
    v_head_base = (off_b * Hkv + off_hk).to(tl.int64) * Skv * DV
    if HAS_SELF:
        own = (off_b * Hkv + off_hk).to(tl.int64) * Sq
        t2_s, dt_s, keep_s, vp, dvp = _own_key_jvp(q, dq, KP, VP, DKP, DVP, SELF_KEEP, own * D, own * DV, qh,
                                                   offs_m, off_b, off_h, Sq, scale, Q_OFF, __BUFFERS__
                                                   D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, EVEN)
        m_i = t2_s
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
    base, base_full, n_partial, n_full = _row_table(KV_NUM, KV_IDX, FULL_NUM, FULL_IDX, off_b, off_h,
                                                    (pid_m * BLOCK_M) // SPARSE_Q, MB, MH, NQ_BLOCKS, NKV_LIST,
                                                    NKV_LIST_FULL, HAS_FULL)
    for start_n, IS_FULL in _visited_tiles(KV_IDX, FULL_IDX, base, base_full, n_partial, n_full,
                                           SPARSE_KV, BLOCK_N):
        acc, tacc, macc, l_i, m_i = _jvp_tile(acc, tacc, macc, l_i, m_i, q, dq, K, V, DK, DVT, kv_head_base,
                                              v_head_base, start_n, offs_m, off_b, off_h,
                                              Sq, Skv, scale, Q_OFF, __BUFFERS__
                                              D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N, IS_FULL, EVEN, IEEE, UPCAST)
    empty = l_i == 0.0
    inv = 1.0 / tl.where(empty, 1.0, l_i)
    out = acc * inv[:, None]
    mbar = macc * inv
    dout = tacc * inv[:, None] - mbar[:, None] * out
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
    row_ok = offs_m < Sq
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptr = qh * Sq * DV + offs_m[:, None] * DV + offs_dv[None, :]
    o_ok = row_ok[:, None] & (offs_dv[None, :] < DV)
    tl.store(O + o_ptr, out.to(O.dtype.element_ty), mask=o_ok)
    tl.store(DO + o_ptr, dout.to(DO.dtype.element_ty), mask=o_ok)
    tl.store(LSE + qh * Sq + offs_m, lse, mask=row_ok)
    tl.store(DLSE + qh * Sq + offs_m, mbar, mask=row_ok)
