"""The arguments of every kernel entry point, declared once.

A ``KernelSignature`` lists a pass's run-time parameters in order -- tensors, integers, floats,
tensor descriptors -- which of them may be absent, and its compile-time constants.  From it come
both sides of a launch:

- the kernel's parameter list: ``def flex_fwd(__SIGNATURE__):`` in a template becomes
  ``def flex_fwd(Q, K, ..., <captured tensors>, HEAD_GROUP, D: tl.constexpr, ...)``
  (flexebt/codegen/source.py);
- ``bind(**arguments)``: the launcher's positional arguments in that order, from keywords.  A
  parameter declared optional defaults to None, which Triton turns into a compile-time None: the
  kernel reads it only under the flag that says it is there (``HAS_SELF``, ``USE_TMA``, ...), so
  an absent input is absent, not a placeholder tensor.  A missing or unknown keyword is a
  ``TypeError`` naming it, and so is a launch whose compile-time constants differ from the
  declared ones (``check_constexprs``, worked out once per launch plan).

``bind`` is a generated Python function with the declared parameters, so binding costs one call
(the launch path runs it for every launch).
"""

from __future__ import annotations

import dataclasses

# The captured tensors' parameters stand between the declared run-time parameters and HEAD_GROUP
# (flexebt/codegen/source.py writes them); HEAD_GROUP and the constexprs travel as keywords.
BUFFERS = "__BUFFERS__"

# Parameter groups several passes share.
SHAPE = ("H", "Hkv", "Sq", "Skv")
KV_TABLES = ("KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX", "MB", "MH", "NQ_BLOCKS", "NKV_LIST", "NKV_LIST_FULL")
Q_TABLES = ("Q_NUM", "Q_IDX", "FULL_Q_NUM", "FULL_Q_IDX", "MB", "MH", "NKV_BLOCKS", "NQ_LIST", "NQ_LIST_FULL")
TILES = ("D", "DV", "BLOCK_D", "BLOCK_DV", "BLOCK_M", "BLOCK_N", "SPARSE_Q", "SPARSE_KV", "HAS_FULL", "EVEN",
         "IEEE", "UPCAST")


@dataclasses.dataclass(frozen=True)
class KernelSignature:
    """One kernel entry point: ``params`` (run-time, in order), the subset ``optional`` that may be
    absent (None), and ``constexprs`` (compile-time, passed by keyword)."""

    name: str
    params: tuple
    optional: frozenset
    constexprs: tuple

    def __post_init__(self):
        names = self.params + self.constexprs
        if len(set(names)) != len(names) or not self.optional <= set(self.params):
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

    def check_constexprs(self, given) -> None:
        """Raise unless ``given`` (the constexpr names a launch passes) are exactly the declared ones."""
        if set(given) != set(self.constexprs):
            extra, missing = sorted(set(given) - set(self.constexprs)), sorted(set(self.constexprs) - set(given))
            raise TypeError(f"{self.name}: constexprs not declared {extra}, declared but not given {missing}")


def _sig(name: str, params: tuple, optional: tuple, constexprs: tuple) -> KernelSignature:
    return KernelSignature(name, tuple(params), frozenset(optional), tuple(constexprs))


OWN = ("KP", "VP", "SELF_KEEP")  # the EBT own keys (absent without HAS_SELF)

SIGNATURES = {s.name: s for s in (
    _sig("flex_fwd",
         ("Q", "K", "V", "O", "LSE", "MAXS", *KV_TABLES, *SHAPE, "scale", "Q_OFF", *OWN, "K_DESC", "V_DESC"),
         ("MAXS", *OWN, "K_DESC", "V_DESC"),
         (*TILES, "REVERSE", "HAS_SELF", "USE_TMA", "LINEAR_SCORE", "RETURN_MAX")),
    _sig("flex_bwd_dq",
         ("Q", "K", "V", "O", "DO", "LSE", "DLSE", "DELTA", "DQ", *KV_TABLES, *SHAPE, "scale", "Q_OFF", *OWN,
          "DKP", "DVP", "K_DESC", "V_DESC"),
         ("DLSE", *OWN, "DKP", "DVP", "K_DESC", "V_DESC"),
         (*TILES, "HAS_DLSE", "REVERSE", "HAS_SELF", "USE_TMA")),
    _sig("flex_bwd_dkdv",
         ("Q", "K", "V", "DO", "LSE", "DELTA", "DK", "DV_OUT", "ADD_K", "ADD_V", *Q_TABLES, *SHAPE, "scale", "Q_OFF",
          "Q_DESC", "DO_DESC",
          # the second query stream (EBT), absent without TWO_STREAMS
          "Q2", "DO2", "LSE2", "DELTA2", "Q2_NUM", "Q2_IDX", "FULL_Q2_NUM", "FULL_Q2_IDX", "Sq2", "MB2", "MH2",
          "NQ2_LIST", "NQ2_LIST_FULL", "Q2_OFF", "Q2_DESC", "DO2_DESC"),
         ("ADD_K", "ADD_V", "Q_DESC", "DO_DESC", "Q2", "DO2", "LSE2", "DELTA2", "Q2_NUM", "Q2_IDX", "FULL_Q2_NUM",
          "FULL_Q2_IDX", "Sq2", "MB2", "MH2", "NQ2_LIST", "NQ2_LIST_FULL", "Q2_OFF", "Q2_DESC", "DO2_DESC"),
         (*TILES, "ACCUMULATE", "USE_TMA", "TWO_STREAMS", "HAS_FULL2", "EVEN2")),
    _sig("flex_dbwd_rows",
         ("Q", "K", "V", "O", "DO", "LSE", "DLSE", "GQ", "GK", "GV", "G_DO", "STATS", *KV_TABLES, *SHAPE, "scale",
          "Q_OFF", "KP", "VP", "GKP", "GVP", "SELF_KEEP", "K_DESC", "V_DESC", "GK_DESC", "GV_DESC"),
         ("DLSE", "KP", "VP", "GKP", "GVP", "SELF_KEEP", "K_DESC", "V_DESC", "GK_DESC", "GV_DESC"),
         (*TILES, "HAS_DLSE", "HAS_SELF", "USE_TMA", "PARTIAL_ROWS")),
    _sig("flex_dbwd_dq",
         ("Q", "K", "V", "DO", "LSE", "DLSE", "GQ", "GK", "GV", "G_Q", "STATS", *KV_TABLES, *SHAPE, "scale", "Q_OFF",
          "KP", "VP", "GKP", "GVP", "SELF_KEEP", "G_KP", "G_VP", "K_DESC", "V_DESC", "GK_DESC", "GV_DESC"),
         ("DLSE", "KP", "VP", "GKP", "GVP", "SELF_KEEP", "G_KP", "G_VP", "K_DESC", "V_DESC", "GK_DESC", "GV_DESC"),
         (*TILES, "HAS_DLSE", "HAS_SELF", "CAPTURED_GRADS", "USE_TMA")),
    _sig("flex_dbwd_dkdv",
         ("Q", "K", "V", "DO", "LSE", "DLSE", "GQ", "GK", "GV", "G_K", "G_V", "ADD_K", "ADD_V", "STATS", *Q_TABLES,
          *SHAPE, "scale", "Q_OFF", "Q_DESC", "DO_DESC", "GQ_DESC"),
         ("DLSE", "ADD_K", "ADD_V", "Q_DESC", "DO_DESC", "GQ_DESC"),
         (*TILES, "HAS_DLSE", "ACCUMULATE", "USE_TMA")),
    _sig("flex_jvp",
         ("Q", "K", "V", "DQ", "DK", "DVT", "O", "LSE", "DO", "DLSE", *KV_TABLES, *SHAPE, "scale", "Q_OFF", *OWN,
          "DKP", "DVP"),
         (*OWN, "DKP", "DVP"),
         (*TILES, "HAS_SELF")),
)}
