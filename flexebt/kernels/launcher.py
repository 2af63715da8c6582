"""Re-launching an already compiled kernel without Triton's per-call binding.

``kernel[grid](*args, **constexprs)`` binds every argument, computes Triton's specialization of
each (dtype, 16-byte alignment, integer value classes), builds a cache key string and looks the
compiled kernel up -- 100-150 us of host time per launch on the GPU machine's CPU, against 27-48
us for calling the compiled kernel's launcher directly (``benchmarks/small_s.py``, design D45).  A
small-S fwd+bwd makes three launches and is host-bound, so this matters there.

``FastLaunches`` remembers, per launch signature, the compiled kernel Triton chose and the
argument values Triton bound after ours (the constexprs and HEAD_GROUP, in signature order).  The
signature is conservative: the kernel, the device, the grid, every keyword value, and per
positional argument the exact value of a number, or (dtype, 16-byte aligned) of a tensor, or
(dtype, shape, strides, block shape, aligned) of a tensor descriptor.  Everything Triton's choice
depends on is in it (Triton specializes numbers on their value class only; keying on the exact
value just makes more entries).  On a miss the launch goes through Triton and the entry is made
from Triton's own binding of the same arguments.  Triton's internal launcher API is used
defensively: if any step of building an entry fails, the fast path switches itself off and
every launch goes through ``kernel[grid]``.

Opt-in for now (``FLEXEBT_FAST_LAUNCH=1``): the path is unit-tested with a stand-in kernel and has
a GPU test against ``kernel[grid]`` (tests/test_gpu_fast_launch.py), which has not yet run on the
GPU machine; it becomes the default once it has, with its host time measured.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from torch import Tensor

MAX_ENTRIES = 4096  # launch signatures remembered (cleared when full: shapes churn, kernels stay)


def _arg_signature(args: tuple) -> Optional[tuple]:
    """What of each positional argument Triton's specialization (or the launcher) may depend on;
    None if an argument is of a kind not known here (such a launch always goes through Triton)."""
    sig = []
    for a in args:
        if isinstance(a, Tensor):
            sig.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, (int, float, bool)) or a is None:
            sig.append((type(a), a))  # type too: True == 1 == 1.0 as dict keys
        elif hasattr(a, "block_shape") and hasattr(a, "base"):  # a host-side TensorDescriptor
            sig.append((a.base.dtype, tuple(a.shape), tuple(a.strides), tuple(a.block_shape),
                        a.base.data_ptr() % 16 == 0))
        else:
            return None
    return tuple(sig)


class FastLaunches:
    """Compiled-kernel launchers by launch signature (see the module docstring)."""

    def __init__(self, enabled: Optional[bool] = None):
        if enabled is None:
            enabled = os.environ.get("FLEXEBT_FAST_LAUNCH", "0") not in ("0", "")
        self.enabled = enabled
        self.hits = 0  # launches re-issued (observability, tests)
        self._entries: dict = {}

    def key(self, kernel, device_index: int, grid: int, args: tuple, kwargs: dict) -> Optional[tuple]:
        """The launch signature (None if some value cannot be a dict key: never fast)."""
        sig = _arg_signature(args)
        if sig is None:
            return None
        k = (id(kernel), device_index, grid, tuple(kwargs.items()), sig)
        try:
            hash(k)
        except TypeError:
            return None
        return k

    def launch(self, key: Optional[tuple], kernel, args: tuple) -> bool:
        """Launch through the remembered launcher; False if there is none for ``key``."""
        if key is None:
            return False
        hit = self._entries.get(key)
        if hit is None or hit[0] is not kernel:  # (an id can be reused once a kernel is freed)
            return False
        hit[1](*args, *hit[2])
        self.hits += 1
        return True

    def remember(self, key: Optional[tuple], kernel, compiled, grid: int, args: tuple, kwargs: dict,
                 binder: Optional[Callable[..., Any]] = None) -> None:
        """Make the entry for ``key`` from the kernel Triton just compiled / found and Triton's
        binding of the same arguments (``binder``: the kernel's, for tests a stand-in)."""
        if key is None:
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
            self._entries.clear()
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = (kernel, runner, tail)

    def clear(self) -> None:
        self._entries.clear()
