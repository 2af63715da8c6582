"""Re-launching an already compiled kernel without Triton's per-call binding.

``kernel[grid](*args, **constexprs)`` binds every argument, computes Triton's specialization of
each (dtype, 16-byte alignment, integer value classes), builds a cache key string and looks the
compiled kernel up -- 100-150 us of host time per launch on the GPU machine's CPU, against 27-48
us for calling the compiled kernel's launcher directly (``benchmarks/tools/small_s.py``, design D45).  A
small-S fwd+bwd makes three launches and is host-bound, so this matters there.

``FastLaunches`` remembers, per *launch plan key*, the compiled kernel Triton chose, the argument
values Triton bound after ours (the constexprs and HEAD_GROUP, in signature order) and the tile
configuration the pass settled on.  The key is made by the pass (kernels/flex.py ``_plan_key``)
from its inputs, before it works out tiles, grid order or constexprs: the pass's flags, the
block tables' layout, the kernel options, the fp32 matmul precision and, per input tensor, its
shape, strides, dtype and 16-byte alignment.  Every integer argument of a launch is a shape or
stride of those, every other tensor argument is allocated by the pass (aligned), so equal keys
mean an equal grid, equal constexprs and an equal Triton specialization -- a hit skips the
pass's planning as well as Triton's binding.  On a miss the launch goes through Triton and the
entry is made from Triton's own binding of the same arguments.  Triton's internal launcher API is
used defensively: if any step of building an entry fails, the fast path switches itself off and
every launch goes through ``kernel[grid]``.

On by default on CUDA; ``FLEXEBT_FAST_LAUNCH=0`` switches it off (every launch through Triton).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from ..runtime import Store

class FastLaunches:
    """Compiled-kernel launchers by launch plan key (see the module docstring)."""

    def __init__(self, enabled: Optional[bool] = None, store: Optional[Store] = None):
        if enabled is None:
            enabled = os.environ.get("FLEXEBT_FAST_LAUNCH", "1") not in ("0", "")
        self.enabled = enabled
        self.device_type = "cuda"  # where launches take the path (tests point it at stand-in kernels on CPU)
        self.hits = 0  # launches re-issued (observability, tests)
        # (kernel id, plan key) -> (runner, tail, extra), kept for that very kernel object (an id can be
        # reused once a kernel is freed); the process-wide one is flexebt.runtime.launches
        self.store = store if store is not None else Store("launches", 4096)

    def lookup(self, key: tuple, kernel) -> Optional[tuple]:
        """``(runner, tail, extra)`` remembered for ``key`` and this very kernel object, else None.
        Call ``runner(*args, *tail)``."""
        try:
            hit = self.store.get(key, kernel)
        except TypeError:  # an unhashable kernel option: never fast
            return None
        if hit is None:
            return None
        self.hits += 1
        return hit

    def remember(self, key: tuple, kernel, compiled, grid: int, args: tuple, kwargs: dict, extra: Any = None,
                 binder: Optional[Callable[..., Any]] = None) -> None:
        """Make the entry for ``key`` from the kernel Triton just compiled / found and Triton's
        binding of the same arguments (``binder``: the kernel's, for tests a stand-in); ``extra``
        travels with it (the pass's tile configuration)."""
        try:
            hash(key)
        except TypeError:
            return
        try:
            if binder is None:
                import triton

                binder = kernel.device_caches[triton.runtime.driver.active.get_current_device()][4]
            bound = binder(*args, **kwargs)[0]  # {parameter name: value}, in signature order
            names = list(bound)
            if [bound[n] is a for n, a in zip(names, args)].count(False):
                raise RuntimeError("positional arguments are not the kernel's first parameters")
            tail = tuple(bound[n] for n in names[len(args):])
            runner = compiled[(grid, 1, 1)]
        except Exception:  # Triton internals moved: stay correct, lose the speed
            self.enabled = False
            self.store.clear()
            return
        self.store.put(key, (runner, tail, extra), kernel)

    def clear(self) -> None:
        self.store.clear()
