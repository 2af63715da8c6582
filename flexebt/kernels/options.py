"""kernel_options as one typed, frozen value per call.

The options are declared once (``flexebt._validation.KERNEL_OPTIONS``: name, kind, meaning); the
public functions check a user's dict against that declaration, then turn it into a
``KernelOptions``: an immutable, hashable mapping of the keys that tune the kernels (``BACKEND``
is the backend choice and is dropped).  Everything below the public functions receives that one
value -- the eager chain and the compiled ops alike:

- a pass reads its resolved settings with ``options.for_pass(name)``: the tiles, warps, stages and
  head group of that pass, the per-pass key winning over the all-passes key (``BLOCK_M1`` then the
  pass's defaults; ``dkdv_num_warps`` then ``num_warps``) -- worked out once per pass and kept;
- launch plans and tile tables key on the value itself (it hashes by its items);
- the compiled ops carry it as text, ``encode()`` / ``decode()``, written from the declared kinds
  (ints, flags, the string-valued choices), so a new option needs nothing here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Optional

# kernel_options keys that override a pass's tiles (torch flex_attention's names where it has them).
# The double-backward and JVP passes walk the same loops as dq / dk-dv / fwd and share their keys.
TILE_KEYS = {"fwd": ("BLOCK_M", "BLOCK_N"), "dq": ("BLOCK_M2", "BLOCK_N2"), "dkdv": ("BLOCK_M1", "BLOCK_N1"),
             "dbwd_rows": ("BLOCK_M2", "BLOCK_N2"), "dbwd_dq": ("BLOCK_M2", "BLOCK_N2"),
             "dbwd_dkdv": ("BLOCK_M1", "BLOCK_N1"), "jvp": ("BLOCK_M", "BLOCK_N")}


# torch flex_attention's kernel_options that tune or hint its own kernels and change no result
# (name -> kind, as in flexebt._validation): accepted, so that code written for torch runs as it is,
# and left out of the options the kernels see.
TORCH_HINTS = {"PRESCALE_QK": "flag", "ROWS_GUARANTEED_SAFE": "flag", "BLOCKS_ARE_CONTIGUOUS": "flag",
               "WRITE_DQ": "flag", "FORCE_USE_FLEX_ATTENTION": "flag", "kpack": "int", "matrix_instr_nonkdim": "int",
               "waves_per_eu": "int"}


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """What the options ask of one pass (None: the pass's own default)."""

    BLOCK_M: Optional[int] = None
    BLOCK_N: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    head_group: Optional[int] = None


class KernelOptions(Mapping):
    """Checked kernel_options, frozen: a read-only mapping that hashes and compares by its items."""

    __slots__ = ("_items", "_dict", "_hash", "_passes")

    def __init__(self, options: Optional[Mapping] = None):
        items = _items_of(options)
        object.__setattr__(self, "_items", items)
        object.__setattr__(self, "_dict", dict(items))
        object.__setattr__(self, "_hash", None)  # worked out on first use: see __hash__
        object.__setattr__(self, "_passes", {})

    @classmethod
    def of(cls, options) -> "KernelOptions":
        """``options`` as a KernelOptions (a dict or None is converted; a KernelOptions is itself)."""
        return options if isinstance(options, KernelOptions) else _of_items(_items_of(options))

    @staticmethod
    def text_of(options) -> str:
        """``KernelOptions.of(options).encode()`` without building the value: the compiled path calls
        this inside traced code, where only plain sorting and formatting can be traced on every
        supported torch (torch 2.11's tracer cannot call ``hash`` on a tuple)."""
        return _encode(options._items if isinstance(options, KernelOptions) else _items_of(options))

    def __setattr__(self, name, value):
        raise AttributeError("KernelOptions is immutable")

    def __getitem__(self, key):
        return self._dict[key]

    def __iter__(self):
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            object.__setattr__(self, "_hash", hash(self._items))
        return self._hash

    def __eq__(self, other) -> bool:
        if isinstance(other, KernelOptions):
            return self._items == other._items
        return isinstance(other, Mapping) and self._dict == {k: v for k, v in other.items() if k != "BACKEND"}

    def __repr__(self) -> str:
        return f"KernelOptions({self._dict!r})"

    @property
    def items_key(self) -> tuple:
        """The sorted (key, value) pairs: a cache key."""
        return self._items

    def for_pass(self, pass_name: str) -> PassOptions:
        """The settings of pass ``pass_name`` (a key of TILE_KEYS)."""
        hit = self._passes.get(pass_name)
        if hit is None:
            km, kn = TILE_KEYS[pass_name]
            d = self._dict
            hit = self._passes[pass_name] = PassOptions(
                BLOCK_M=d.get(km), BLOCK_N=d.get(kn),
                num_warps=d.get(f"{pass_name}_num_warps", d.get("num_warps")),
                num_stages=d.get(f"{pass_name}_num_stages", d.get("num_stages")),
                head_group=d.get(f"{pass_name}_head_group", d.get("HEAD_GROUP")))
        return hit

    def encode(self) -> str:
        """``KEY=value;...`` (values are ints, except the declared string choices)."""
        return _encode(self._items)

    @staticmethod
    def decode(text: str) -> "KernelOptions":
        return _decoded(text)


def _items_of(options) -> tuple:
    """The sorted (key, normalised value) pairs of a kernel_options mapping, BACKEND and torch's
    hints (TORCH_HINTS) left out."""
    return tuple(sorted((k, _normal(v)) for k, v in (options or {}).items()
                        if k != "BACKEND" and k not in TORCH_HINTS))


def _encode(items: tuple) -> str:
    return ";".join(f"{k}={v}" for k, v in items)


def _normal(value):
    """Flags and integer kinds as plain ints (True -> 1), strings as they are."""
    return value if isinstance(value, str) else int(value)


@functools.lru_cache(maxsize=256)
def _of_items(items: tuple) -> KernelOptions:
    return KernelOptions(dict(items))


@functools.lru_cache(maxsize=256)
def _decoded(text: str) -> KernelOptions:
    from .._validation import KERNEL_OPTIONS

    out = {}
    for item in text.split(";"):
        if not item:
            continue
        key, _, value = item.partition("=")
        kind = KERNEL_OPTIONS[key][0]
        out[key] = value if isinstance(kind, tuple) else int(value)
    return _of_items(tuple(sorted(out.items())))
