"""Everything flexebt remembers between calls, in one place and under one rule.

A training loop calls attention with the same mods, block masks and shapes every step; the work
that depends only on those -- generating kernels, converting block tables, planning passes and
launches -- is done once and remembered here.  Each kind of memory is a ``Store``:

=================  ==========================================================================
store              key -> value
=================  ==========================================================================
``kernels``        (template, mod fingerprints, interpreter, frame mask) -> generated kernels
``tables``         (block mask, lengths, device) -> the block tables the kernels read
``plans``          (block mask, score_mod, shapes) -> an EBT call's plan of kernel passes
``structures``     (lengths, device) -> the bare two-stream EBT block mask
``launches``       (kernel, launch plan key) -> a remembered launch (kernels/launcher.py)
``tile_fits``      (kernel, shape key, tiles asked) -> tiles that fit in shared memory
``residency``      (kernel, shape key, tiles) -> programs per SM of the compiled kernel
``index_flags``    device -> the flag the kernels clear on an out-of-range index
``code_names``     code object -> the names it reads (mod identity)
``user_classes``   class -> its method resolution order, library classes left out
``compiled``       key named by compiled graphs -> generated kernels (pinned)
``stashed``        key -> name of a module attribute compiled graphs read (pinned)
=================  ==========================================================================

The rule: a store keeps at most ``capacity`` entries and, when full, drops the one used least
recently.  An entry made *for* particular objects (a block mask, a mod, a kernel) keeps them and is
found only for those very objects -- never through a recycled ``id()``.  The two pinned stores
are never emptied: compiled graphs name their entries, so dropping one would break a graph that
is still in use.  ``clear()`` empties every other store (the next calls rebuild what they need).
"""

from __future__ import annotations

import collections
from typing import Any, Hashable, Optional


class Store:
    """A bounded map that forgets the least recently used entry (see the module docstring)."""

    def __init__(self, name: str, capacity: Optional[int]):
        self.name = name
        self.capacity = capacity  # None: pinned, never forgets
        self.puts = 0  # entries made so far (tests count what a call built)
        self.hits = 0  # lookups answered from the store
        self._entries: collections.OrderedDict = collections.OrderedDict()

    def get(self, key: Hashable, *owners: Any, default: Any = None) -> Any:
        """The value stored under ``key`` for these very ``owners`` (identity), else ``default``."""
        hit = self._entries.get(key)
        if hit is None:
            return default
        value, kept = hit
        if len(kept) != len(owners) or any(a is not b for a, b in zip(kept, owners)):
            return default
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: Any, *owners: Any) -> Any:
        """Store ``value`` under ``key`` for ``owners`` (kept alive with it); returns ``value``."""
        self._entries[key] = (value, owners)
        self.puts += 1
        self._entries.move_to_end(key)
        if self.capacity is not None:
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value

    def setdefault(self, key: Hashable, value: Any) -> Any:
        """The value under ``key`` if there is one (no owners), else store ``value``."""
        hit = self.get(key, default=_MISSING)
        return self.put(key, value) if hit is _MISSING else hit

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        if self.capacity is not None:
            self._entries.clear()


_MISSING = object()

kernels = Store("kernels", 256)
tables = Store("tables", 64)
plans = Store("plans", 64)
structures = Store("structures", 64)
launches = Store("launches", 4096)
tile_fits = Store("tile_fits", 1024)
residency = Store("residency", 1024)
index_flags = Store("index_flags", 16)
code_names = Store("code_names", 4096)
user_classes = Store("user_classes", 1024)
compiled = Store("compiled", None)
stashed = Store("stashed", None)

STORES = (kernels, tables, plans, structures, launches, tile_fits, residency, index_flags, code_names, user_classes,
          compiled, stashed)


def clear() -> None:
    """Forget everything that is not pinned: generated kernels (the on-disk cache of their source
    stays), block tables, plans and remembered launches.  For tests, or after changing something a
    cache cannot see."""
    for store in STORES:
        store.clear()


def sizes() -> dict:
    """Entries per store (for tests and for looking at a long-running process)."""
    return {store.name: len(store) for store in STORES}


def stats() -> dict:
    """Per store: entries held, entries made and lookups answered so far (e.g. ``stats()["launches"]``:
    launches remembered and re-issued without Triton's binding)."""
    return {store.name: {"entries": len(store), "made": store.puts, "hits": store.hits} for store in STORES}
