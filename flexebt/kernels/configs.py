"""Tile configurations of every kernel family, in one place.

Kernel tiles must subdivide the block mask's sparse blocks, so a tile edge is the largest
power of two that divides the sparse block and does not exceed the preferred size.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from .options import TILE_KEYS, KernelOptions, PassOptions  # noqa: F401  (TILE_KEYS: read from here too)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


MIN_TILE = 16  # tl.dot needs every dimension >= 16


def _fit(preferred: int, sparse: int) -> int:
    tile = MIN_TILE
    while tile * 2 <= preferred and sparse % (tile * 2) == 0:
        tile *= 2
    return tile


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")




def flex_config(pass_name: str, head_dim: int, sparse_q: int, sparse_kv: int, options=None,
                gathers: bool = False, tiles: str = "bf16", tma: bool = False, kv_len: int = 0) -> TileConfig:
    """``tiles`` names the table: ``"bf16"`` (2-byte inputs), ``"tf32"`` or ``"ieee"`` (fp32 inputs,
    by the float32 matmul precision, see ``_precision`` in kernels/flex.py); ``tma``: the pass
    loads its tiles through tensor descriptors (some passes prefer other tiles then); ``kv_len``:
    the keys' length, where short key loops prefer other tiles (0: not given)."""
    asked = KernelOptions.of(options).for_pass(pass_name)
    short = 0 < kv_len <= SHORT_KV
    return _flex_config(pass_name, head_dim, sparse_q, sparse_kv, asked, gathers, tiles, interpreting(), tma, short)


@functools.lru_cache(maxsize=1024)
def _flex_config(pass_name: str, head_dim: int, sparse_q: int, sparse_kv: int, asked: PassOptions,
                 gathers: bool, tiles: str, interp: bool, tma: bool = False, short_kv: bool = False) -> TileConfig:
    """Tiles of one pass of the single-stream family.

    ``asked``: what the call's kernel_options set for this pass (options.KernelOptions.for_pass):
    the tiles (``BLOCK_M``/``BLOCK_N`` forward and JVP, ``BLOCK_M2``/``BLOCK_N2`` dq and the double
    backward's row and dq passes, ``BLOCK_M1``/``BLOCK_N1`` dk/dv and the double backward's dk/dv
    pass) and ``num_warps`` / ``num_stages`` (all passes) or ``<pass>_num_warps`` /
    ``<pass>_num_stages``.
    """
    cfg = _default_flex_config(pass_name, head_dim, sparse_q, sparse_kv, gathers, tiles, interp, tma, short_kv)
    km, kn = TILE_KEYS[pass_name]
    m = cfg.BLOCK_M if asked.BLOCK_M is None else asked.BLOCK_M
    n = cfg.BLOCK_N if asked.BLOCK_N is None else asked.BLOCK_N
    for key, tile, sparse in ((km, m, sparse_q), (kn, n, sparse_kv)):
        if tile < MIN_TILE or tile & (tile - 1) or sparse % tile:
            raise ValueError(f"kernel_options[{key!r}] = {tile} must be a power of two >= {MIN_TILE} dividing the "
                             f"block mask's block size {sparse}.")
    warps = cfg.num_warps if asked.num_warps is None else asked.num_warps
    stages = cfg.num_stages if asked.num_stages is None else asked.num_stages
    return TileConfig(m, n, warps, stages)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per pass and head-dim class (64 / 128 / 256).
# bf16: measured on an H200, bf16, S = 4096 (benchmarks/tools/tune.py;
# benchmarks/results/h200_2026-11-21/tune_h200_*.txt).
# The double backward keeps ~3x the tiles of a first-order pass live, the JVP two extra accumulators:
# smaller tiles, fewer stages.  D64 second order: EBT step, B8 H8 S4096
# (benchmarks/tools/tune_second_order.py; results/h200_2026-11-21/tune_dbwd_h200_ebt_s4096.txt):
# g_k/g_v pass 8.5 -> 4.0 ms at 64 x 64 with 2 stages, row + g_q passes 5.9 -> 5.1 ms at 64 x 32. D128
# dq and dk/dv (H100, B2 causal, B*S = 16k, H16, S = 1k..8k; benchmarks/tools/tune.py,
# results/h100_2026-11-21/tune_d128_bwd_h100_5aabe51.txt): 64 x 64 tiles, 4 warps, 2 stages for both
# passes, where they were 128 x 128 (dq) and 64 x 128 (dk/dv) with 8 warps; the backward 0.76 -> 0.65
# ms at S1k, 1.16 -> 1.00-1.03 at 2k, 2.05 -> 1.79-1.82 at 4k, 3.68 -> 3.46-3.51 ms at 8k (the old
# tiles re-timed: results/h100_2026-11-21/tune_d128_bwd_old_defaults_h100_71d0160.txt); EBT D128 S4096
# fwd+bwd 5.56 -> 5.09 ms.
_BF16 = {
    "fwd": {64: (128, 64, 4, 6), 128: (128, 128, 8, 3), 256: (64, 32, 4, 2)},
    "dq": {64: (64, 64, 4, 2), 128: (64, 64, 4, 2), 256: (32, 32, 4, 2)},
    "dkdv": {64: (32, 128, 4, 3), 128: (64, 64, 4, 2), 256: (32, 32, 4, 2)},
    "dbwd_rows": {64: (64, 32, 4, 3), 128: (64, 32, 4, 2), 256: (32, 32, 4, 1)},
    "dbwd_dq": {64: (64, 32, 4, 3), 128: (64, 32, 4, 2), 256: (32, 32, 4, 1)},
    "dbwd_dkdv": {64: (64, 64, 4, 2), 128: (32, 64, 4, 2), 256: (32, 32, 4, 1)},
    "jvp": {64: (128, 128, 4, 3), 128: (64, 64, 4, 2), 256: (32, 32, 4, 1)},
}
# fp32 with IEEE products: Triton computes the dot with FMAs, not tensor cores, and keeps its
# operands in registers; 128-wide tiles spill and the compiler takes minutes on the second-order
# kernels (H200: the fp32 JVP at 128 x 128 did not finish compiling in 300 s). Small tiles.
_IEEE = {
    "fwd": {64: (64, 32, 4, 2), 128: (32, 32, 4, 2), 256: (16, 32, 4, 1)},
    "dq": {64: (64, 32, 4, 2), 128: (32, 32, 4, 2), 256: (16, 32, 4, 1)},
    "dkdv": {64: (32, 64, 4, 2), 128: (32, 32, 4, 2), 256: (16, 32, 4, 1)},
    "dbwd_rows": {64: (32, 32, 4, 1), 128: (16, 32, 4, 1), 256: (16, 16, 4, 1)},
    "dbwd_dq": {64: (32, 32, 4, 1), 128: (16, 32, 4, 1), 256: (16, 16, 4, 1)},
    "dbwd_dkdv": {64: (32, 32, 4, 1), 128: (16, 32, 4, 1), 256: (16, 16, 4, 1)},
    "jvp": {64: (32, 32, 4, 2), 128: (16, 32, 4, 1), 256: (16, 16, 4, 1)},
}
# fp32 with tf32 products: tensor cores, but fp32 tiles take twice the shared memory of bf16.
_TF32 = {
    "fwd": {64: (64, 64, 4, 3), 128: (64, 64, 4, 2), 256: (32, 32, 4, 1)},
    "dq": {64: (64, 64, 4, 2), 128: (64, 32, 4, 2), 256: (32, 32, 4, 1)},
    "dkdv": {64: (64, 64, 4, 2), 128: (32, 64, 4, 2), 256: (32, 32, 4, 1)},
    "dbwd_rows": {64: (32, 64, 4, 2), 128: (32, 32, 4, 1), 256: (16, 32, 4, 1)},
    "dbwd_dq": {64: (32, 64, 4, 2), 128: (32, 32, 4, 1), 256: (16, 32, 4, 1)},
    "dbwd_dkdv": {64: (32, 64, 4, 2), 128: (32, 32, 4, 1), 256: (16, 32, 4, 1)},
    "jvp": {64: (64, 32, 4, 2), 128: (32, 32, 4, 1), 256: (16, 32, 4, 1)},
}
# fp32 double backward with tf32x3 products (three tf32 dots per product: each operand split into hi
# and lo parts, so ~2x the live registers of a tf32 tile).  A head-dim class 32 of its own: the best
# tiles at D32 spill at D64.  H200, EBT step (benchmarks/tools/tune_second_order.py;
# results/h200_2026-11-21/tune_dbwd_fp32_*.txt): D32 S512 B16 H12 rows + dq + g_k/g_v 37.8 + 6.5 + 1.4
# ms at the tf32 table's 32 x 64 tiles -> 0.85 + 0.88 + 1.05 ms (IEEE: 3.1 + 3.0 + 3.0); D64 S1024 B8
# H8 3.4 + 23.2 + 5.9 -> ~2.7 + 2.3 + 2.4 ms.  At D128 every tile tried spilled (> 10 ms), so the
# default there stays IEEE (flex._precision); these entries serve an explicit FP32_PRODUCTS.
_TF32X3_SECOND_ORDER = {
    "dbwd_rows": {32: (64, 64, 4, 1), 64: (32, 32, 4, 1), 128: (16, 32, 4, 1), 256: (16, 16, 4, 1)},
    "dbwd_dq": {32: (64, 64, 4, 1), 64: (32, 32, 4, 1), 128: (16, 32, 4, 1), 256: (16, 16, 4, 1)},
    "dbwd_dkdv": {32: (64, 64, 4, 1), 64: (16, 32, 4, 1), 128: (16, 32, 4, 1), 256: (16, 16, 4, 1)},
}
# bf16 with TMA loads, where other tiles win (H100, bf16 causal S4096 B2 H16, benchmarks/tools/tune.py
# --options USE_TMA=1; results/h100_2026-11-21/tune_bwd_tma_h100_3b07fca.txt): the dk/dv pass at D64
# takes 64 x 64 tiles, 0.668 -> 0.620 ms for the whole backward (torch's compiled flex_attention:
# 0.668).
# D64 on the H100 (EBT B8 H8 S4096, benchmarks/tools/profile_ebt.py --sweep,
# results/h100_2026-11-21/ebt_sweep_h100_8bcea66.txt, ebt_fwd_sweep_h100_224ce16.txt, and the
# single-stream sweeps): two stages in the dq and dk/dv passes (EBT fwd+bwd 3.41 -> 3.35 ms each),
# forward 128 x 64 with six stages (EBT fwd 0.85-0.86 -> 0.79-0.80 ms; single stream causal B2 H16
# 0.227 -> 0.221 ms; odd: four stages are slower than three or five, 0.88 ms).
_BF16_TMA = {"dkdv": {64: (64, 64, 4, 2)}}
# bf16 where the keys are at most SHORT_KV long: a program's key loop is then at most 8 tiles of 128,
# and the pipeline's fill and drain weigh more than smaller tiles' lower reuse (H100, B2 shapes,
# benchmarks/bench.py side by side; results/h100_2026-11-21/B2_h100_d128_71d0160): D128 forward at S1k
# causal 0.251 -> 0.237 ms, ALiBi 0.271 -> 0.257, soft-cap 0.358 -> 0.326; at S2k 64 x 64 is no better
# (0.380 -> 0.386 causal), at 4k slower (0.640 -> 0.694).
SHORT_KV = 1024
_BF16_SHORT_KV = {"fwd": {128: (64, 64, 4, 3)}}
_TABLES = {"bf16": _BF16, "ieee": _IEEE, "tf32": _TF32, "tf32x3": _TF32X3_SECOND_ORDER}


def _default_flex_config(pass_name: str, head_dim: int, sparse_q: int, sparse_kv: int, gathers: bool,
                         tiles: str, interp: bool, tma: bool = False, short_kv: bool = False) -> TileConfig:
    if interp:  # tiny tiles keep the interpreter fast
        return TileConfig(MIN_TILE, MIN_TILE, 4, 1)
    table = _TABLES[tiles][pass_name]
    if tma and tiles == "bf16":
        table = {**table, **_BF16_TMA.get(pass_name, {})}
    if short_kv and tiles == "bf16":
        table = {**table, **_BF16_SHORT_KV.get(pass_name, {})}
    cls = 32 if head_dim <= 32 and 32 in table else 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    m, n, warps, stages = table[cls]
    if gathers and pass_name == "fwd" and head_dim <= 64 and tiles == "bf16":
        # A mod that gathers a [BLOCK_M, BLOCK_N] tile from a tensor (a learned bias) runs best
        # on 64 x 64 tiles: 0.66 ms vs 0.95 ms at 128 x 128 (H200, bf16, B4 H16 S4096).
        m, n, warps, stages = 64, 64, 4, 3
    return TileConfig(_fit(m, sparse_q), _fit(n, sparse_kv), warps, stages)
