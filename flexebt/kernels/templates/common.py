# flexebt kernel templates: what every pass shares.
#
# The kernels of one pair of mods are generated from these files, concatenated in the order
# common, own_key, forward, backward, double_backward, jvp (flexebt/codegen/source.py), and are
# never imported as they stand.  Mod code enters only at *hooks*: lines of the form
#
#     tu = hook.score(s_raw=s_raw, scale=scale, b=off_b, h=off_h, q_idx=q_idx, kv_idx=kv_idx)
#
# where the keyword arguments name the template variables the mod's inputs are bound to and the
# names on the left receive its outputs (the hooks and their inputs and outputs are declared in
# flexebt/codegen/hooks.py, which checks every hook line against that declaration).  The code a
# hook expands to may also read the tile's ZERO (int32 zeros of the tile's shape, to broadcast a
# value), VALID (the tile's positions inside both sequences) and the captured-tensor parameters
# that `__BUFFERS__` stands for in the signatures ("IDXERR, BUF0, BUF0_S0, ..., GBUF0, CBUF0, ...").
#
# Layout: q [B, H, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, DV], all contiguous.
# Entry points take grouped arguments as named tuples (flexebt/kernels/signatures.py): one
# direction of the block tables (BLOCKS.NUM, ...), a query stream, the EBT own keys (OWN.KP, ...).
# Block sparsity: torch BlockMask tables, contiguous, [MB, MH, nQ(, nKVmax)] with MB in {1, B},
# MH in {1, H}; a row of sparse Q blocks lists partial kv blocks (mask_mod applied) and full kv
# blocks (mask_mod skipped).  Kernel tiles (BLOCK_M x BLOCK_N) subdivide the sparse blocks
# (SPARSE_Q x SPARSE_KV).  A pass walks the tiles of a row's partial blocks, then those of its
# full blocks: `for FULL in tl.static_range(2)` is unrolled at compile time, so FULL (and the
# tile functions' IS_FULL) is a constant and a full tile carries no mask code.
#
# Math (one query row i, keys j):  s_ij = scale q_i.k_j,  t_ij = f(s_ij),
#   P_ij = exp(t_ij - L_i),  L_i = log sum_j exp(t_ij),  o_i = sum_j P_ij v_j.
# Units: every exponential is one exp2.  Without a score_mod the scores are taken to log2 units
# (tu = t log2 e, one multiply with the scale) and every reference they are compared with (row
# max, lse) too.  With a score_mod the hooks give t in natural units and a pass subtracts the
# row's reference first and changes base after, exp2((t - r) log2 e): a score next to its row's
# maximum subtracts exactly however large both are (a whole row of -1e9 or finfo.min scores, an
# additive mask), where t log2 e would round to 64 or more at 1e9 and overflow to -inf beyond
# about 2.4e38.  SCORE_LOG2 (a constant of each generated module) says which; _natural, _exp_shift,
# _load_msum and _exp_from are the only places that look.  lse and MSUM are stored in natural units.
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    """a @ b with fp32 accumulation.  DOT = 0: the tensor cores' default for the dtype; 1: exact fp32
    products (IEEE, no tf32); 2: fp32 products as three tf32 products (tensor cores); 3: Triton's
    CPU interpreter only -- the sums in fp64, rounded once to fp32.  The interpreter's bf16 dot is
    wrong, and its fp32 dot sums in whatever order the host's BLAS picks, which differs between a
    tile and its transpose on some CPUs: a pass that rebuilds a score from k q^T would not get the
    forward's q k^T bit for bit, and at logits in the hundreds one ulp of a score moves P by 3e-5."""
    if DOT == 3:
        return tl.dot(a.to(tl.float64), b.to(tl.float64)).to(tl.float32)
    elif DOT == 1:
        return tl.dot(a, b, input_precision="ieee")
    elif DOT == 2:
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
def _store_rows(ptr, value, rows, n_rows, ncols: tl.constexpr, BLOCK_C: tl.constexpr):
    """Store a [len(rows), BLOCK_C] tile as rows ``rows`` of a contiguous [n_rows, ncols] matrix, in
    the matrix's dtype (rows past n_rows and columns past ncols are not written)."""
    cols = tl.arange(0, BLOCK_C)
    tl.store(ptr + rows[:, None] * ncols + cols[None, :], value.to(ptr.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < ncols))


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
def _natural(x):
    """A row statistic (max) from the pass's units to natural units."""
    if SCORE_LOG2:
        return x * LN2
    else:
        return x


@triton.jit
def _row_results(m_i, l_i, empty):
    """A finished row's max (natural units) and lse = m + log l, as torch gives them where a score
    is not finite: -inf for a row that keeps nothing; a +inf score gives lse +inf (its sum is
    inf - inf = NaN); a NaN score gives max NaN (the running max's maximum skips NaN, the sum
    keeps it)."""
    m_nat = _natural(m_i)
    lse = tl.where(empty, float("-inf"), m_nat + tl.log2(tl.where(empty, 1.0, l_i)) * LN2)
    lse = tl.where(m_nat == float("inf"), float("inf"), lse)
    m_nat = tl.where((l_i != l_i) & (m_nat != float("inf")), float("nan"), m_nat)
    return m_nat, lse


@triton.jit
def _exp_shift(x, m):
    """exp(t - m) for a score and a row max in the pass's units (the online softmax)."""
    if SCORE_LOG2:
        return tl.math.exp2(x - m)
    else:
        return tl.math.exp2((x - m) * LOG2E)


@triton.jit
def _load_msum(MSUM, qh, offs_m, Sq):
    """A row tile's softmax statistics (MSUM [B, H, Sq, 2]: each row's max m, natural units, and
    its sum l = sum_j exp(t_j - m), as the forward stores them) as the pair (ra, rb) that
    _exp_from turns into P = exp(t - m) / l.  They are kept apart, not as lse = m + log l: a row
    whose scores are all huge (an additive -1e9 or finfo.min mask over the whole row) has its
    log l far below the spacing of m, and the lse alone would recompute P = exp(t - m), l times
    too large.  An empty row (m = -inf, l = 0) gives (0, 0): its probabilities are masked anyway."""
    rows = (qh * Sq + offs_m) * 2
    m = tl.load(MSUM + rows, mask=offs_m < Sq, other=float("-inf"))
    l_sum = tl.load(MSUM + rows + 1, mask=offs_m < Sq, other=0.0)
    empty = l_sum == 0.0
    lg = tl.where(empty, 0.0, tl.log2(tl.where(empty, 1.0, l_sum)))
    m = tl.where(empty, 0.0, m)
    return m, lg


@triton.jit
def _store_msum(MSUM, m, l_sum, m_i, qh, offs_m, Sq):
    """Store a row tile's max m (natural units; -inf for a row that keeps nothing) and sum (0 there).
    Without a score_mod the passes computed the sum against m_i, the max in log2 units, and the
    backward subtracts m log2 e instead, which can be an ulp off m_i (an ulp of 500 is 3e-5, so
    every P of the row would be off by that much): the stored sum is l 2^(m_i - m log2 e), the
    same row sum taken against the backward's reference, so its P = exp2(x - m log2 e) / l is
    the forward's."""
    if SCORE_LOG2:
        # m_i - m log2 e with the product unrounded (a fused multiply-add, as _exp_from takes it:
        # the compiler would fuse a plain product in some places and not in others)
        d = tl.fma(m, -LOG2E, m_i)
        l_sum = tl.where(tl.abs(d) < float("inf"), l_sum * tl.math.exp2(d), l_sum)
    rows = (qh * Sq + offs_m) * 2
    tl.store(MSUM + rows, m, mask=offs_m < Sq)
    tl.store(MSUM + rows + 1, l_sum, mask=offs_m < Sq)


@triton.jit
def _store_ref(REF, ra, rb, qh, offs_m, Sq):
    """Store a row tile's (ra, rb) for the passes over key tiles, as two contiguous planes of REF
    [B, H, 2, Sq] (rb only where it is read).  A key-tile pass meets every query tile once per key
    tile, and its row vectors are replicated across the tile's threads: there, two plain loads
    per query tile cost a fraction of _load_msum's interleaved loads and log2."""
    ref = REF + qh * 2 * Sq + offs_m
    tl.store(ref, ra, mask=offs_m < Sq)
    tl.store(ref + Sq, rb, mask=offs_m < Sq)


@triton.jit
def _load_ref(REF, qh, offs_m, Sq):
    """(ra, rb) of a row tile as _store_ref left them."""
    ref = REF + qh * 2 * Sq + offs_m
    ra = tl.load(ref, mask=offs_m < Sq, other=0.0)
    rb = tl.load(ref + Sq, mask=offs_m < Sq, other=0.0)
    return ra, rb


@triton.jit
def _exp_from(tu, ra, rb):
    """P = exp(t - m) / l from a score in the pass's units and a row's (ra, rb) (_load_msum):
    the max subtracted first (exact next to it, however large both are), then log2 l."""
    if SCORE_LOG2:  # tu - m log2 e in one fused multiply-add, as _store_msum took the sum against it
        return tl.math.exp2(tl.fma(ra, -LOG2E, tu) - rb)
    else:
        return tl.math.exp2((tu - ra) * LOG2E - rb)


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
def _tile_positions_t(offs_m, offs_n, Sq, Skv, Q_OFF, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      EVEN: tl.constexpr):
    """_tile_positions of a transposed [BLOCK_N keys, BLOCK_M queries] tile (the dk/dv pass)."""
    VALID = (offs_m[None, :] < Sq) & (offs_n[:, None] < Skv)
    mq_idx, kv_idx = _mod_indices(offs_m, offs_n, Sq, Skv, EVEN)
    return (VALID, mq_idx[None, :], mq_idx[None, :] + Q_OFF, kv_idx[:, None],
            tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32))


@triton.jit
def _row_dot(a, b):
    """Row-wise dot products of two [BLOCK_M, BLOCK_C] tiles in fp32, as a [BLOCK_M, 1] column."""
    return tl.sum(a.to(tl.float32) * b.to(tl.float32), 1)[:, None]


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
def _query_program(Sq, H, Hkv, HEAD_GROUP, BLOCK_M: tl.constexpr, REVERSE: tl.constexpr):
    """Who a program of a pass over query tiles is: its query tile pid_m (rows offs_m), batch off_b,
    query head off_h, the flat query head qh = b * H + h and its key head kvh = b * Hkv + h // (H / Hkv)
    (int64, for the head offsets)."""
    pid_m, pid_bh = _program_tile(tl.cdiv(Sq, BLOCK_M), HEAD_GROUP, REVERSE)
    off_b = pid_bh // H
    off_h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qh = (off_b * H + off_h).to(tl.int64)
    kvh = (off_b * Hkv + off_h // (H // Hkv)).to(tl.int64)
    return pid_m, off_b, off_h, offs_m, qh, kvh


@triton.jit
def _key_program(Skv, Hkv, HEAD_GROUP, BLOCK_N: tl.constexpr):
    """Who a program of a pass over key tiles is: its key tile pid_n (keys offs_n), batch off_b,
    key head off_hk and the flat key head kvh (int64)."""
    pid_n, pid_bh = _program_tile(tl.cdiv(Skv, BLOCK_N), HEAD_GROUP, False)
    off_b = pid_bh // Hkv
    off_hk = pid_bh % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_n, off_b, off_hk, offs_n, (off_b * Hkv + off_hk).to(tl.int64)


@triton.jit
def _row_table(BLOCKS, off_b, off_h, block, HAS_FULL: tl.constexpr):
    """Row ``block`` of the block tables BLOCKS (signatures.BlockArgs): its partial and full index
    lists (IDX, FULL_IDX), where each list's row starts, and the row's partial and full block
    counts.  A table built with B/H = None has MB/MH = 1 and is shared by all batches/heads
    (x % 1 == 0).  Called where BLOCKS is the entry kernel's own argument: on Triton 3.6 a group
    nested in another and read from a helper it was handed to lost its specialised integers
    (design D63)."""
    row = ((off_b % BLOCKS.MB) * BLOCKS.MH + (off_h % BLOCKS.MH)) * BLOCKS.N_ROWS + block
    n_partial = tl.load(BLOCKS.NUM + row)
    n_full = 0
    if HAS_FULL:
        n_full = tl.load(BLOCKS.FULL_NUM + row)
    return BLOCKS.IDX, BLOCKS.FULL_IDX, row * BLOCKS.N_LIST, row * BLOCKS.N_LIST_FULL, n_partial, n_full


@triton.jit
def _blocks(FULL: tl.constexpr, IDX, FULL_IDX, base, base_full, n_partial, n_full, SPARSE: tl.constexpr,
            BLOCK: tl.constexpr):
    """The block list a row walks for FULL = 0 (its partial blocks) or 1 (its full blocks): the
    list's start in the table, where it begins, and how many tiles of BLOCK it holds."""
    if FULL:
        return FULL_IDX, base_full, n_full * (SPARSE // BLOCK)
    return IDX, base, n_partial * (SPARSE // BLOCK)


@triton.jit
def _tile_start(IDX, base, it, SPARSE: tl.constexpr, BLOCK: tl.constexpr):
    """First position of tile ``it`` of a row's block list: tile it sits in listed block
    it // MULT at offset (it % MULT) * BLOCK, MULT = SPARSE / BLOCK tiles per sparse block."""
    return tl.load(IDX + base + it // (SPARSE // BLOCK)) * SPARSE + (it % (SPARSE // BLOCK)) * BLOCK


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
