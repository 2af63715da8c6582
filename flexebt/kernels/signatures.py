"""The arguments of every kernel entry point, declared once.

A ``KernelSignature`` lists a pass's run-time parameters in order -- tensors, integers, floats,
tensor descriptors, and *groups* -- which of them may be absent, and its compile-time constants.
From it come both sides of a launch:

- the kernel's parameter list: ``def flex_fwd(__SIGNATURE__):`` in a template becomes
  ``def flex_fwd(Q, K, ..., <captured tensors>, HEAD_GROUP, D: tl.constexpr, ...)``
  (flexebt/codegen/source.py);
- ``bind(**arguments)``: the launcher's positional arguments in that order, from keywords.  A
  parameter declared optional defaults to None, which Triton turns into a compile-time None: the
  kernel reads it only under the flag that says it is there (``HAS_SELF``, ``USE_TMA``, ...), so
  an absent input is absent, not a placeholder tensor.  A missing or unknown keyword is a
  ``TypeError`` naming it, and so is a launch whose compile-time constants differ from the
  declared ones (``check_constexprs``, worked out once per launch plan).

A group is a named tuple (``BlockArgs``, ``StreamArgs``, ``OwnArgs``, ...) that travels as one
parameter: Triton passes a tuple's fields to the kernel one by one, and the template reads them
by name (``BLOCKS.NUM``, ``OWN.KP``).  Groups keep the parameters that belong together --
one direction of the block tables, one query stream of a key-tile pass, the EBT own keys --
together, so no entry point takes more than a few dozen parameters and a stream or the own keys
enter a pass as one argument.  A group is present or absent as a whole (its fields are never None),
and groups are not nested.

``bind`` is a generated Python function with the declared parameters, so binding costs one call
(the launch path runs it for every launch).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from torch import Tensor

# The captured tensors' parameters stand between the declared run-time parameters and HEAD_GROUP
# (flexebt/codegen/source.py writes them); HEAD_GROUP and the constexprs travel as keywords.
BUFFERS = "__BUFFERS__"


class BlockArgs(NamedTuple):
    """One direction of the block-sparse tables (torch BlockMask layout, int32, contiguous).
    For a pass over query tiles: per query block, the kv blocks it meets; for a pass over key
    tiles (the transposed tables): per kv block, the query blocks.  NUM / FULL_NUM: [MB, MH, N_ROWS]
    counts of partial / full blocks; IDX / FULL_IDX: [MB, MH, N_ROWS, N_LIST / N_LIST_FULL] their
    indices.  MB in {1, B}, MH in {1, H}: a table built without batch / head dims is shared."""

    NUM: Tensor
    IDX: Tensor
    FULL_NUM: Tensor
    FULL_IDX: Tensor
    MB: int
    MH: int
    N_ROWS: int
    N_LIST: int
    N_LIST_FULL: int


class StreamArgs(NamedTuple):
    """The queries a key-tile pass of the backward walks: q, dO, the rows' references REF
    ([B, H, 2, Sq], written by the dq pass from the forward's max and sum), D = do.o - dlse, length and
    frame offset (the EBT predicted stream's is r + 1).  Its block tables
    travel beside it (a tuple inside a tuple loses Triton's integer specialisation on Triton 3.6:
    groups are never nested)."""

    Q: Tensor
    DO: Tensor
    REF: Tensor
    DELTA: Tensor
    Sq: int
    Q_OFF: int


class SecondStreamArgs(NamedTuple):
    """The queries the double backward's key-tile pass walks: q, dO, the cotangent Gq of dq, the
    rows' references REF and the row statistics (both written by the rows pass), length and frame
    offset (block tables beside it)."""

    Q: Tensor
    DO: Tensor
    GQ: Tensor
    REF: Tensor
    STATS: Tensor
    Sq: int
    Q_OFF: int


class OwnArgs(NamedTuple):
    """The EBT own keys of a forward: query i of the predicted stream also attends to KP[i], VP[i]
    ([B, Hkv, Sq, D]) where KEEP[b, h, i] != 0 (int8 [B, H, Sq])."""

    KP: Tensor
    VP: Tensor
    KEEP: Tensor


class OwnFirstArgs(NamedTuple):
    """The own keys with the own-key rows of a first-order pass: their gradients DKP, DVP (the
    backward writes them, per query head) or their tangents (forward mode reads them)."""

    KP: Tensor
    VP: Tensor
    KEEP: Tensor
    DKP: Tensor
    DVP: Tensor


class OwnSecondArgs(NamedTuple):
    """The own keys in the double backward's rows pass: with GKP, GVP, the cotangents of their
    first-order gradients."""

    KP: Tensor
    VP: Tensor
    KEEP: Tensor
    GKP: Tensor
    GVP: Tensor


class OwnSecondGradArgs(NamedTuple):
    """The own keys in the double backward's dq pass: as OwnSecondArgs, plus the second-order
    gradients G_KP, G_VP it writes (per query head)."""

    KP: Tensor
    VP: Tensor
    KEEP: Tensor
    GKP: Tensor
    GVP: Tensor
    G_KP: Tensor
    G_VP: Tensor


# Parameter groups several passes share.
SHAPE = ("H", "Hkv", "Sq", "Skv")
TILES = ("D", "DV", "BLOCK_D", "BLOCK_DV", "BLOCK_M", "BLOCK_N", "SPARSE_Q", "SPARSE_KV", "HAS_FULL", "EVEN", "DOT")


@dataclasses.dataclass(frozen=True)
class KernelSignature:
    """One kernel entry point: ``params`` (run-time, in order), the subset ``optional`` that may be
    absent (None), and ``constexprs`` (compile-time, passed by keyword)."""

    name: str
    params: tuple
    optional: frozenset
    constexprs: tuple
    groups: tuple = ()  # (parameter, argument group type) of the grouped parameters

    def __post_init__(self):
        names = self.params + self.constexprs
        if len(set(names)) != len(names) or not self.optional <= set(self.params) or \
                not {g for g, _ in self.groups} <= set(self.params):
            raise ValueError(f"{self.name}: repeated or undeclared parameters")
        # bind(): a function whose parameters are the declared ones (keyword-only, optional ones
        # default to None) returning them in order
        ps = ", ".join(f"{p}=None" if p in self.optional else p for p in self.params)
        fn = f"def bind(*, {ps}):\n    return ({', '.join(self.params)},)\n"
        scope: dict = {}
        exec(compile(fn, f"<flexebt signature {self.name}>", "exec"), scope)  # noqa: S102 - our own declaration
        object.__setattr__(self, "bind", scope["bind"])

    def source(self) -> str:
        """The kernel's parameter list as template text (``__BUFFERS__`` where the captured
        tensors go)."""
        return ", ".join(self.params) + f", {BUFFERS} HEAD_GROUP, " + ", ".join(
            f"{c}: tl.constexpr" for c in self.constexprs)

    @property
    def width(self) -> int:
        """How many parameters the entry point declares (run-time and compile-time; a group counts
        once, the captured tensors' parameters, which depend on the mods, not at all)."""
        return len(self.params) + len(self.constexprs)

    def check_groups(self, args) -> None:
        """Raise unless each grouped parameter of the positional ``args`` holds its declared group
        type (or None where it may be absent): a pass handed another pass's group would read
        fields that are not there.  Checked once per launch plan, with the constexprs."""
        for name, kind in self.groups:
            value = args[self.params.index(name)]
            if not (isinstance(value, kind) or (value is None and name in self.optional)):
                raise TypeError(f"{self.name}: {name} must be a {kind.__name__}, got {type(value).__name__}")

    def check_constexprs(self, given) -> None:
        """Raise unless ``given`` (the constexpr names a launch passes) are exactly the declared ones."""
        if set(given) != set(self.constexprs):
            extra, missing = sorted(set(given) - set(self.constexprs)), sorted(set(self.constexprs) - set(given))
            raise TypeError(f"{self.name}: constexprs not declared {extra}, declared but not given {missing}")


def _sig(name: str, params: tuple, optional: tuple, constexprs: tuple, **groups) -> KernelSignature:
    return KernelSignature(name, tuple(params), frozenset(optional), tuple(constexprs), tuple(groups.items()))


# The keywords after the constexprs declare each grouped parameter's type (check_groups, and the
# templates' field reads in tests/test_templates.py).  OWN is absent without HAS_SELF.
SIGNATURES = {s.name: s for s in (
    _sig("flex_fwd",
         ("Q", "K", "V", "O", "LSE", "MSUM", "KV_BLOCKS", *SHAPE, "scale", "Q_OFF", "OWN", "K_DESC", "V_DESC"),
         ("OWN", "K_DESC", "V_DESC"),
         (*TILES, "REVERSE", "HAS_SELF", "USE_TMA", "LINEAR_SCORE"),
         KV_BLOCKS=BlockArgs, OWN=OwnArgs),
    _sig("flex_bwd_dq",
         ("Q", "K", "V", "O", "DO", "MSUM", "DLSE", "DELTA", "REF", "DQ", "KV_BLOCKS", *SHAPE, "scale", "Q_OFF",
          "OWN", "K_DESC", "V_DESC"),
         ("DLSE", "OWN", "K_DESC", "V_DESC"),
         (*TILES, "HAS_DLSE", "REVERSE", "HAS_SELF", "USE_TMA"),
         KV_BLOCKS=BlockArgs, OWN=OwnFirstArgs),
    _sig("flex_bwd_dkdv",
         ("K", "V", "DK", "DV_OUT", "ADD_K", "ADD_V", "STREAM", "Q_BLOCKS", "H", "Hkv", "Skv", "scale", "Q_DESC",
          "DO_DESC"),
         ("ADD_K", "ADD_V", "Q_DESC", "DO_DESC"),
         (*TILES, "ACCUMULATE", "USE_TMA"),
         STREAM=StreamArgs, Q_BLOCKS=BlockArgs),
    _sig("flex_dbwd_rows",
         ("Q", "K", "V", "O", "DO", "MSUM", "DLSE", "GQ", "GK", "GV", "G_DO", "STATS", "REF", "KV_BLOCKS", *SHAPE,
          "scale", "Q_OFF", "OWN", "K_DESC", "V_DESC", "GK_DESC", "GV_DESC"),
         ("DLSE", "OWN", "K_DESC", "V_DESC", "GK_DESC", "GV_DESC"),
         (*TILES, "HAS_DLSE", "HAS_SELF", "USE_TMA", "PARTIAL_ROWS"),
         KV_BLOCKS=BlockArgs, OWN=OwnSecondArgs),
    _sig("flex_dbwd_dq",
         ("Q", "K", "V", "DO", "MSUM", "DLSE", "GQ", "GK", "GV", "G_Q", "STATS", "GQ_ACC", "KV_BLOCKS", *SHAPE, "scale",
          "Q_OFF", "OWN", "K_DESC", "V_DESC", "GK_DESC", "GV_DESC"),
         ("DLSE", "GQ_ACC", "OWN", "K_DESC", "V_DESC", "GK_DESC", "GV_DESC"),
         (*TILES, "HAS_DLSE", "HAS_SELF", "CAPTURED_GRADS", "USE_TMA", "FROM_ACC"),
         KV_BLOCKS=BlockArgs, OWN=OwnSecondGradArgs),
    _sig("flex_dbwd_dkdv",
         ("K", "V", "GK", "GV", "G_K", "G_V", "ADD_K", "ADD_V", "STREAM", "Q_BLOCKS", "DLSE", "GQ_ACC", "H", "Hkv",
          "Skv", "scale", "Q_DESC", "DO_DESC", "GQ_DESC", "GQ_ACC_DESC"),
         ("DLSE", "ADD_K", "ADD_V", "GQ_ACC", "Q_DESC", "DO_DESC", "GQ_DESC", "GQ_ACC_DESC"),
         (*TILES, "HAS_DLSE", "ACCUMULATE", "USE_TMA", "DQ_ATOMIC"),
         STREAM=SecondStreamArgs, Q_BLOCKS=BlockArgs),
    _sig("flex_jvp",
         ("Q", "K", "V", "DQ", "DK", "DVT", "O", "LSE", "MSUM", "DO", "DLSE", "KV_BLOCKS", *SHAPE, "scale", "Q_OFF",
          "OWN"),
         ("OWN",),
         (*TILES, "HAS_SELF"),
         KV_BLOCKS=BlockArgs, OWN=OwnFirstArgs),
)}
