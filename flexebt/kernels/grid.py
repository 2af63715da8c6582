"""The order in which a pass's programs run: heads in groups, heavy tiles first.

A first-order pass launches one program per (tile, batch x head) in a 1-d grid; the template's
``_program_tile`` maps a program id to a tile and a head.  Heads go in groups of ``HEAD_GROUP``,
and inside a group the programs run tile index by tile index across its heads (the forward and
dq passes start from the last query tiles, which under a causal mask see the most keys).  Two
things decide the best group (measured on an H100, design D44):

* **the tail**: a group should fill the GPU at least once -- about one wave of resident
  programs (SMs x programs per SM) -- so that every heavy tile of the group starts before its
  light ones, and the launch ends on light tiles.  With one head per group (the plain order) the
  last heads' heavy tiles start near the end and run alone;
* **the L2 cache**: the programs of a group read their heads' K/V (q/dO in the dk/dv pass)
  at about the same time, so a group's working set should stay within half of the L2.

``kernel_options`` ``HEAD_GROUP`` (all passes) or ``fwd_head_group`` / ``dq_head_group`` /
``dkdv_head_group`` set the group by hand; 0 or less means all heads in one group.  The
double-backward and JVP passes use the same 1-d grid but keep the plain order (one head per
group, tiles in order) unless ``HEAD_GROUP`` or ``dbwd_rows_head_group`` / ``dbwd_dq_head_group``
/ ``dbwd_dkdv_head_group`` / ``jvp_head_group`` ask for groups: they were not measured with them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch

from .options import KernelOptions

DEFAULT_RESIDENT = 2  # programs per SM assumed before a kernel's first launch has been seen


@dataclasses.dataclass(frozen=True)
class GridOrder:
    """A pass's programs: ``n_bh`` (batch x head) rows of ``n_rows`` rows each, tiled by the config's
    ``block`` (``"BLOCK_M"`` or ``"BLOCK_N"``); ``bytes_per_head``: what one head's programs read in
    their inner loops (the L2 working set of one head); ``which``: the pass's kernel_options prefix
    (fwd, dq, dkdv; dbwd_rows, dbwd_dq, dbwd_dkdv, jvp -- these run the plain order unless asked:
    ``auto=False``, not measured with groups)."""

    which: str
    n_bh: int
    n_rows: int
    block: str
    bytes_per_head: int
    auto: bool = True  # False: the plain order unless kernel_options ask for a group

    def tiles(self, cfg) -> int:
        b = getattr(cfg, self.block)
        return -(-self.n_rows // b)


def device_index(device: torch.device) -> int:
    """The CUDA device a launch goes to: the tensor's, or the current one for a bare "cuda"."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _device_facts(index: int) -> tuple:
    p = torch.cuda.get_device_properties(index)
    return (p.multi_processor_count, getattr(p, "L2_cache_size", 50 << 20),
            getattr(p, "regs_per_multiprocessor", 65536), getattr(p, "shared_memory_per_multiprocessor", 228 << 10),
            getattr(p, "max_threads_per_multi_processor", 2048))


def head_group(order: GridOrder, cfg, options: Optional[dict], device: torch.device, resident: int) -> int:
    """Heads per group: at most enough tiles to fill one wave of ``resident`` programs on every
    SM and no more heads than half the L2 holds, a divisor of the head count; 1 (the plain order)
    off CUDA."""
    asked = KernelOptions.of(options).for_pass(order.which).head_group
    if asked is not None:
        asked = int(asked)
        return order.n_bh if asked <= 0 else min(asked, order.n_bh)
    if device.type != "cuda" or not order.auto:
        return 1
    return _default_group(order.n_bh, order.tiles(cfg), resident, order.bytes_per_head, device_index(device))


@functools.lru_cache(maxsize=1024)
def _default_group(n_bh: int, tiles: int, resident: int, bytes_per_head: int, index: int) -> int:
    """head_group's default, cached per shape and device: it is asked before every launch."""
    sms, l2 = _device_facts(index)[:2]
    fill = -(-sms * resident // tiles)
    fits = max(1, (l2 // 2) // max(1, bytes_per_head))
    # the largest divisor of the head count within both: groups that did not divide the heads
    # measured slower (EBT B8 H8 S4096 forward: 9 heads 0.776 ms, 8 heads 0.743-0.757)
    want = min(fill, fits, n_bh)
    return max(g for g in range(1, want + 1) if n_bh % g == 0)


def resident_programs(compiled, num_warps: int, device: torch.device) -> int:
    """Programs of a compiled kernel that fit on one SM at once (registers, shared memory,
    threads); DEFAULT_RESIDENT where the compiled kernel does not say (the interpreter)."""
    regs, shared = getattr(compiled, "n_regs", None), getattr(getattr(compiled, "metadata", None), "shared", None)
    if device.type != "cuda" or not regs or shared is None:
        return DEFAULT_RESIDENT
    _, _, sm_regs, sm_shared, sm_threads = _device_facts(device_index(device))
    threads = 32 * num_warps
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_regs = sm_regs // (per_warp * num_warps)
    by_shared = sm_shared // (shared + 1024) if shared else 32  # the driver reserves 1 KiB per block
    return max(1, min(by_regs, by_shared, sm_threads // threads, 32))
