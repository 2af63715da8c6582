"""Input checks shared by the public functions.

Every message says what was expected, what came, and how to fix it.  User input never
reaches an ``assert`` or an ``IndexError``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
import types
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_builder_int(fn: str, name: str, value, minimum: int) -> int:
    """A builder's integer parameter (a Python or numpy int, at least ``minimum``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        least = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{fn}: {name} must be {least}, got {value!r}.")
    return int(value)


def check_tensors(fn: str, named: Sequence[tuple[str, object]], like_query: tuple = ()) -> None:
    """Rank 4, floating dtype, and one dtype, device and batch for all of ``named``.  The inputs
    named in ``like_query`` may differ from the first in dtype and batch (``kv_like_query`` casts
    and broadcasts them, as torch's flex_attention does); they must share one batch."""
    first_name, first = None, None
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dim() != 4:
            raise ValueError(
                f"{fn}: {name} must have 4 dimensions [B, H, S, D], got shape {tuple(t.shape)} "
                f"({t.dim()} dims). Reshape it, e.g. x.view(B, S, H, D).transpose(1, 2)."
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{fn}: {name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64."
            )
        if t.shape[-1] == 0:
            raise ValueError(
                f"{fn}: {name} has head dim D=0 (shape {tuple(t.shape)}); attention needs D >= 1 "
                f"(the last dimension of [B, H, S, D])."
            )
        if first is None:
            first_name, first = name, t
            continue
        if name in like_query:
            if name != like_query[0]:
                ref_name, ref = next((n, x) for n, x in named if n == like_query[0])
                if t.shape[0] != ref.shape[0]:
                    raise ValueError(
                        f"{fn}: {name} has batch {t.shape[0]} but {ref_name} has {ref.shape[0]}; they must match.")
            if t.device != first.device:
                raise ValueError(
                    f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}; "
                    f"move all inputs to one device."
                )
            continue
        if t.dtype != first.dtype:
            raise ValueError(
                f"{fn}: {name} has dtype {t.dtype} but {first_name} has {first.dtype}; "
                f"all inputs must share one dtype (cast with .to({first.dtype}))."
            )
        if t.device != first.device:
            raise ValueError(
                f"{fn}: {name} is on {t.device} but {first_name} is on {first.device}; "
                f"move all inputs to one device."
            )
        if t.shape[0] != first.shape[0]:
            raise ValueError(
                f"{fn}: batch size mismatch: {first_name} has B={first.shape[0]} but {name} has B={t.shape[0]}."
            )


LAYOUT_HINT = ("flexebt, like torch's flex_attention, takes [B, H, S, D]; tensors laid out [B, S, H, D] (as many "
               "transformer codes keep them) need x.transpose(1, 2)")


def check_layout(fn: str, first: Tensor, second: Tensor, lengths: Optional[tuple]) -> None:
    """Recognise inputs laid out ``[B, S, H, D]``: a block mask built for lengths that are the
    inputs' dim 1 rather than their sequence dim 2.  (``first``, ``second``: the tensors whose
    lengths the mask's two lengths describe.)"""
    if lengths is None:
        return
    want = tuple(int(n) for n in lengths)
    if (first.shape[2], second.shape[2]) != want and (first.shape[1], second.shape[1]) == want:
        raise ValueError(
            f"{fn}: the block mask was built for lengths {want}, which are the inputs' dim 1 "
            f"({tuple(first.shape)}, {tuple(second.shape)}), not their sequence dim 2: the inputs look laid out "
            f"[B, S, H, D]. {LAYOUT_HINT}.")


def kv_like_query(fn: str, query: Tensor, key: Tensor, value: Tensor, block_mask) -> tuple[Tensor, Tensor]:
    """torch's flex_attention rules for key/value that differ from the query (after check_tensors):
    another floating dtype is cast to the query's (the output takes the query's dtype; the cast is
    differentiable), and a key/value batch of 1 broadcasts over a larger query batch when the
    block mask was built for the query's batch (expanded: each batch element reads the same keys,
    and their gradients sum)."""
    key, value = key.to(query.dtype), value.to(query.dtype)  # (no copy where the dtype is already the query's)
    Bq, Bkv = query.shape[0], key.shape[0]
    if Bq == Bkv:
        return key, value
    if Bkv != 1:
        raise ValueError(
            f"{fn}: query has batch {Bq} but key/value have {Bkv}; they must match, or key/value may have batch 1 to "
            f"be shared by every query batch element (with a block_mask built for B={Bq}).")
    mask_b = block_mask.kv_num_blocks.shape[0] if isinstance(block_mask, BlockMask) else None
    if mask_b != Bq:
        got = "block_mask=None" if block_mask is None else f"a block_mask of batch {mask_b}"
        raise ValueError(
            f"{fn}: key/value of batch 1 broadcast over the query's batch {Bq} only with a block_mask built for that "
            f"batch (as in torch's flex_attention); got {got}. Build it with create_block_mask(mask_mod, B={Bq}, ...), "
            f"or expand key/value with key.expand({Bq}, -1, -1, -1).")
    return key.expand(Bq, *key.shape[1:]), value.expand(Bq, *value.shape[1:])


def check_return_aux(fn: str, return_lse: bool, return_aux) -> bool:
    """torch's ``return_aux=AuxRequest(lse=..., max_scores=...)``; returns whether max_scores are wanted."""
    if return_aux is None:
        return False
    if not (hasattr(return_aux, "lse") and hasattr(return_aux, "max_scores")):
        raise TypeError(f"{fn}: return_aux must be a torch.nn.attention.flex_attention.AuxRequest or None, got "
                        f"{type(return_aux).__name__}.")
    if return_lse:
        raise ValueError(f"{fn}: return_lse and return_aux cannot both be given; use "
                         f"return_aux=AuxRequest(lse=True) alone (as torch's flex_attention requires).")
    return bool(return_aux.max_scores)


def check_qkv(fn: str, q: Tensor, k: Tensor, v: Tensor, enable_gqa: bool, q_name="query", k_name="key",
              v_name="value") -> None:
    """Head dims, key/value lengths and head counts (GQA) of one q/k/v triple."""
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{fn}: head dim mismatch: {q_name} has D={q.shape[-1]} but {k_name} has D={k.shape[-1]}; "
            f"query and key must share D (value may differ)."
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(
            f"{fn}: {k_name} has {k.shape[2]} positions but {v_name} has {v.shape[2]}; they must match."
        )
    if k.shape[1] != v.shape[1]:
        raise ValueError(
            f"{fn}: {k_name} has {k.shape[1]} heads but {v_name} has {v.shape[1]}; they must match."
        )
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 and Hq > 0:
        raise ValueError(f"{fn}: {k_name}/{v_name} have 0 heads but {q_name} has {Hq}; give them at least one head.")
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(
                f"{fn}: {q_name} has {Hq} heads but {k_name}/{v_name} have {Hkv}; pass enable_gqa=True for "
                f"grouped-query attention, or give them the same number of heads. (If these are sequence "
                f"lengths: {LAYOUT_HINT}.)"
            )
        if Hq % Hkv != 0:
            raise ValueError(
                f"{fn}: grouped-query attention needs the query heads ({Hq}) to be a multiple of the "
                f"key/value heads ({Hkv})."
            )


def check_scale(fn: str, scale):
    """The scale as a Python number (or None).  torch also takes a one-element tensor: its value is
    read once (a host sync for a GPU tensor).  A tensor that requires grad is refused: the kernels
    take the scale as a constant, and dropping its gradient would be silently wrong."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.is_complex() or scale.dtype == torch.bool:
            raise TypeError(f"{fn}: scale must be a float, a one-element real tensor or None, got a tensor of "
                            f"shape {tuple(scale.shape)} and dtype {scale.dtype}.")
        if torch.compiler.is_compiling():
            raise NotImplementedError(
                f"{fn}: scale is a tensor inside torch.compile; flexebt's kernels take the scale as a constant of "
                f"the graph. Pass a Python float (e.g. scale=float(s) outside the compiled function).")
        from torch.autograd import forward_ad

        differentiated = (scale.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(scale)
                          or forward_ad.unpack_dual(scale).tangent is not None)
        if differentiated:
            raise NotImplementedError(
                f"{fn}: scale is a tensor that requires grad (or carries a forward-mode tangent, or is transformed "
                f"by torch.func); flexebt takes the scale as a constant and would drop its derivative. For a "
                f"learned scale, pass scale=1.0 and multiply in the score_mod, e.g. score_mod=lambda score, b, h, "
                f"q_idx, kv_idx: score * w (w receives derivatives of every order).")
        return scale.item()
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)):
        raise TypeError(f"{fn}: scale must be a float or None, got {type(scale).__name__}.")
    return scale


def check_callable(fn: str, name: str, mod) -> None:
    """``mod`` is None or a callable; a ``score_mod`` / ``mask_mod`` must also accept the positional
    arguments torch passes (checked on its signature, before any tracing)."""
    if mod is not None and not callable(mod):
        raise TypeError(f"{fn}: {name} must be a callable or None, got {type(mod).__name__}.")
    if name in MOD_SIGNATURES:
        check_mod_signature(fn, name, mod)


# The positional arguments torch's flex_attention passes to each kind of mod.
MOD_SIGNATURES = {"score_mod": ("score", "b", "h", "q_idx", "kv_idx"), "mask_mod": ("b", "h", "q_idx", "kv_idx")}


def mod_display_name(mod) -> str:
    name = getattr(mod, "__name__", None)
    if name is None:  # functools.partial, callable objects
        name = getattr(getattr(mod, "func", None), "__name__", None) or type(mod).__name__
    return name


_SIGNATURES_OK: set = set()  # signature keys that accepted their kind's arguments


def _signature_key(mod, kind: str):
    """What a function's or bound method's signature depends on (its code, how many defaults,
    which keyword defaults), so a passed check is not repeated on every call; None for other
    callables (checked each time)."""
    t = type(mod)
    if t is types.MethodType:
        inner = _signature_key(mod.__func__, kind)
        return None if inner is None else ("method",) + inner
    if t is types.FunctionType:
        return (kind, mod.__code__, len(mod.__defaults__ or ()), tuple(mod.__kwdefaults__ or ()))
    return None


def check_mod_signature(fn: str, kind: str, mod: Optional[Callable]) -> None:
    """TypeError unless ``mod`` can be called with the positional arguments of ``kind``
    (``*args`` and parameters with defaults are fine; required keyword-only ones are not)."""
    if mod is None or torch.compiler.is_compiling():  # checked by the eager call; dynamo traces the mod itself
        return
    key = _signature_key(mod, kind)
    if key is not None and key in _SIGNATURES_OK:
        return
    params = MOD_SIGNATURES[kind]
    try:
        sig = inspect.signature(mod)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check here
        return
    try:
        sig.bind(*params)
        if key is not None:
            _SIGNATURES_OK.add(key)
    except TypeError as err:
        name = mod_display_name(mod)
        raise TypeError(
            f"{fn}: {kind} {name!r} has the signature {name}{sig}, but a {kind} is called with "
            f"{len(params)} positional arguments: {kind}({', '.join(params)}) ({err}). "
            f"Write it as def {name}({', '.join(params)}): ..."
        ) from None


def check_block_mask(fn: str, block_mask: Optional[BlockMask], B: int, H: int, Sq: int, Skv: int,
                     device: Optional[torch.device] = None) -> None:
    """A torch BlockMask that fits inputs of lengths ``(Sq, Skv)``.

    Like torch's flex_attention: the mask must have been made (or ``_adjust``-ed) for exactly these
    lengths, and a sliced mask (whose mask_mod torch replaces) is refused.  Beyond torch, its
    tables must cover every block of the inputs; block indices it lists past the ends (a mask
    cropped with ``BlockMask._adjust``) hold no position and are dropped where tables are built.
    """
    if block_mask is None:
        return
    if not isinstance(block_mask, BlockMask):
        raise TypeError(
            f"{fn}: block_mask must be a torch.nn.attention.flex_attention.BlockMask (from create_block_mask) "
            f"or None, got {type(block_mask).__name__}."
        )
    if getattr(block_mask, "mask_mod", None) is _SLICED_MASK_MOD:
        raise SlicedBlockMaskError(
            f"{fn}: block_mask was sliced (block_mask[...]), which replaces its mask_mod with one that cannot be "
            f"called; give it the original mask_mod back (sliced.mask_mod = original.mask_mod) or build a mask "
            f"with create_block_mask for these lengths."
        )
    mq, mkv = (int(n) for n in block_mask.seq_lengths)
    if (mq, mkv) != (Sq, Skv):
        longer = mq >= Sq and mkv >= Skv
        hint = (f"crop it with block_mask._adjust({Sq}, {Skv}) (exact for masks whose upper-left corner is the "
                f"mask at the shorter lengths, e.g. causal), or rebuild it" if longer else "rebuild it")
        raise ValueError(
            f"{fn}: block_mask was built for (Q_LEN, KV_LEN) = ({mq}, {mkv}) but the inputs have "
            f"({Sq}, {Skv}); {hint} with create_block_mask(mask_mod, B, H, {Sq}, {Skv})."
        )
    check_table_ranks(fn, block_mask)
    if device is not None and block_mask.kv_num_blocks.device != device:
        raise ValueError(f"{fn}: block_mask is on {block_mask.kv_num_blocks.device} but the inputs are on {device}; "
                         f"expected q/k/v and block_mask on the same device (block_mask.to({str(device)!r})).")
    check_mask_batch_heads(fn, block_mask.kv_num_blocks.shape[0], block_mask.kv_num_blocks.shape[1], B, H)
    check_block_tables(fn, block_mask, Sq, Skv)
    check_mod_signature(fn, "mask_mod", block_mask.mask_mod)


class SlicedBlockMaskError(ValueError, RuntimeError):
    """A sliced BlockMask was passed (torch's flex_attention raises RuntimeError here)."""


def _sliced_mask_mod():
    from torch.nn.attention import flex_attention as _fa

    return getattr(_fa, "_sliced_mask_mod_error", None)


_SLICED_MASK_MOD = _sliced_mask_mod()


_TABLE_RANKS = (("kv_num_blocks", 3), ("kv_indices", 4), ("full_kv_num_blocks", 3), ("full_kv_indices", 4),
                ("q_num_blocks", 3), ("q_indices", 4), ("full_q_num_blocks", 3), ("full_q_indices", 4))


def check_table_ranks(fn: str, block_mask: BlockMask) -> None:
    """Block tables are ``[B, H, rows]`` counts and ``[B, H, rows, width]`` indices with the same
    ``[B, H]``, as create_block_mask makes them (``BlockMask.from_kv_blocks`` also takes fewer
    leading dims, or tables of different ones)."""
    for name, rank in _TABLE_RANKS:
        t = getattr(block_mask, name, None)
        if t is not None and t.dim() != rank:
            raise ValueError(
                f"{fn}: block_mask.{name} has shape {tuple(t.shape)}; flexebt reads block tables as [B, H, ...] "
                f"({rank} dims), as create_block_mask makes them. Add the leading batch / head dims (size 1 "
                f"broadcasts), e.g. BlockMask.from_kv_blocks(kv_num_blocks[None], kv_indices[None], ...).")
    lead = tuple(block_mask.kv_num_blocks.shape[:2])
    for name, _ in _TABLE_RANKS[1:]:
        t = getattr(block_mask, name, None)
        if t is not None and tuple(t.shape[:2]) != lead:
            raise ValueError(
                f"{fn}: block_mask.{name} has leading [B, H] dims {tuple(t.shape[:2])} but kv_num_blocks has "
                f"{lead}; all of a mask's tables must have the same batch and head dims (expand the smaller ones, "
                f"e.g. t.expand({lead[0]}, {lead[1]}, ...)).")


def check_block_tables(fn: str, block_mask: BlockMask, Sq: int, Skv: int) -> None:
    """The block size is a pair of positive ints and the tables have a row for every query block
    (kv tables) and every key block (q tables, where present) of ``(Sq, Skv)``."""
    bs = block_mask.BLOCK_SIZE
    if (len(bs) != 2 or any(isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1 for b in bs)):
        raise ValueError(f"{fn}: block_mask.BLOCK_SIZE must be two positive ints, got {bs!r}.")
    bq = int(bs[0])
    nq = -(-Sq // bq)
    tables = [("kv_num_blocks", block_mask.kv_num_blocks, nq), ("kv_indices", block_mask.kv_indices, nq),
              ("full_kv_num_blocks", block_mask.full_kv_num_blocks, nq),
              ("full_kv_indices", block_mask.full_kv_indices, nq)]
    for name, t, need in tables:
        rows = None if t is None else (t.shape[-1] if name.endswith("num_blocks") else t.shape[-2])
        if rows is not None and rows < need:
            raise ValueError(
                f"{fn}: block_mask.{name} has {rows} rows of query blocks but inputs of Q_LEN={Sq} need "
                f"{need} (BLOCK_SIZE {bq}); the mask was made for shorter sequences than its seq_lengths "
                f"{tuple(block_mask.seq_lengths)} say -- rebuild it with "
                f"create_block_mask(mask_mod, B, H, {Sq}, {Skv})."
            )


def check_mask_batch_heads(fn: str, mB: int, mH: int, B: int, H: int) -> None:
    if mB not in (1, B):
        raise ValueError(f"{fn}: block_mask was built for B={mB}, inputs have B={B}; use B={B} or None.")
    if mH not in (1, H):
        raise ValueError(f"{fn}: block_mask was built for H={mH}, inputs have H={H} query heads; use H={H} or None.")


def check_ebt_lengths(S_obs: int, S_pred: int) -> None:
    if S_pred > S_obs:
        raise ValueError(
            f"EBT attention: the predicted stream (S_pred={S_pred}) is longer than the observed stream "
            f"(S_obs={S_obs}); expected S_obs = S_pred + r with r >= 0."
        )


# kernel_options, declared once: name -> (kind, meaning).  Kinds: "tile" (a power of two >= 16 that
# divides the block mask's blocks), "warps" (a power of two), "count" (an int >= 1), "group" (an
# int; <= 0 means all heads), "flag" (bool or 0 / 1), "int" (any int), or a tuple of the accepted
# strings.  The tile keys and the per-pass keys follow the passes of kernels/options.py (TILE_KEYS);
# torch's hints (TORCH_HINTS) are accepted and have no effect.
def _declare_kernel_options() -> dict:
    from .kernels.options import TILE_KEYS, TORCH_HINTS

    decl = {
        "BACKEND": (("AUTO", "TRITON", "REFERENCE", "FLASH", "TRITON_DECODE"),
                    "which implementation runs (also FLEXEBT_BACKEND); torch's 'FLASH' and 'TRITON_DECODE' "
                    "mean 'TRITON'"),
        "FP32_PRODUCTS": (("ieee", "tf32x3"), "how fp32 products are computed under matmul precision 'highest'"),
        "USE_TMA": ("flag", "load K/V tiles through tensor descriptors (Hopper)"),
        "REVERSE_Q_ORDER": ("flag", "heaviest query tiles first (default on)"),
        "LINEAR_SCORE": ("flag", "forward without a score_mod: the running row max taken on the raw products, "
                                 "scaled once (default on; 0 scales every score first)"),
        "DBWD_DQ_ATOMIC": ("flag", "double backward: the dk/dv pass also adds g_q with atomic adds (one bulk "
                                   "reduce-add per tile where the GPU has TMA) and the dq pass skips its key loop "
                                   "(default: on for 16-bit CUDA inputs of head dim <= 64; never under deterministic "
                                   "algorithms)"),
        "num_warps": ("warps", "warps of every pass"),
        "num_stages": ("count", "pipeline stages of every pass"),
        "HEAD_GROUP": ("group", "heads per group of the grid order, every pass"),
    }
    for pass_name, keys in TILE_KEYS.items():
        for key in keys:
            decl.setdefault(key, ("tile", f"{'query' if 'M' in key else 'key'} tile of the {pass_name} pass"))
        decl[f"{pass_name}_num_warps"] = ("warps", f"warps of the {pass_name} pass")
        decl[f"{pass_name}_num_stages"] = ("count", f"pipeline stages of the {pass_name} pass")
        decl[f"{pass_name}_head_group"] = ("group", f"heads per group of the {pass_name} pass")
    for key, kind in TORCH_HINTS.items():
        decl[key] = (kind, "a hint to torch's own kernels: accepted for code written for torch, no effect")
    return decl


KERNEL_OPTIONS = _declare_kernel_options()


def kernel_options_table() -> str:
    """The kernel options as a markdown table (docs/kernel-options.md is this text; a test keeps them
    equal)."""
    rows = ["| key | value | meaning |", "| --- | --- | --- |"]
    for key, (kind, meaning) in KERNEL_OPTIONS.items():
        value = " / ".join(f"`{v!r}`" for v in kind) if isinstance(kind, tuple) else _KIND_TEXT[kind]
        rows.append(f"| `{key}` | {value} | {meaning} |")
    return "\n".join(rows) + "\n"


_KIND_TEXT = {"tile": "a power of two >= 16 (an int)", "warps": "a power of two >= 1 (an int)",
              "count": "an int >= 1", "group": "an int (<= 0: all heads)", "flag": "a bool (or 0 / 1)",
              "int": "an int"}


def check_kernel_options(fn: str, kernel_options) -> None:
    """Every key declared in KERNEL_OPTIONS, every value of its declared type and range."""
    if kernel_options is None:
        return
    if not isinstance(kernel_options, dict):
        raise TypeError(f"{fn}: kernel_options must be a dict or None, got {type(kernel_options).__name__}.")
    for key, value in kernel_options.items():
        if key not in KERNEL_OPTIONS:
            close = difflib.get_close_matches(str(key), list(KERNEL_OPTIONS), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{fn}: unknown kernel_options key {key!r}.{hint} flexebt's kernel options are: "
                f"{', '.join(sorted(KERNEL_OPTIONS))}."
            )
        kind, meaning = KERNEL_OPTIONS[key]
        if key == "BACKEND":
            continue  # backends.requested_backend checks it (with FLEXEBT_BACKEND)
        if isinstance(kind, tuple):
            if not isinstance(value, str):
                raise TypeError(f"{fn}: kernel_options[{key!r}] = {value!r} ({type(value).__name__}); expected one "
                                f"of the strings {', '.join(map(repr, kind))} ({meaning}).")
            if value not in kind:
                raise ValueError(f"{fn}: kernel_options[{key!r}] = {value!r}; expected one of "
                                 f"{', '.join(map(repr, kind))} ({meaning}).")
            continue
        expected = _KIND_TEXT[kind]
        if kind == "flag":
            ok_type = isinstance(value, (bool, numbers.Integral))
            ok_value = ok_type and int(value) in (0, 1)
        else:
            ok_type = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            v = int(value) if ok_type else 0
            ok_value = ok_type and {"tile": v >= 16 and v & (v - 1) == 0, "warps": v >= 1 and v & (v - 1) == 0,
                                    "count": v >= 1, "group": True, "int": True}[kind]
        if not ok_type:
            raise TypeError(f"{fn}: kernel_options[{key!r}] = {value!r} is a {type(value).__name__}; expected "
                            f"{expected} ({meaning}).")
        if not ok_value:
            raise ValueError(f"{fn}: kernel_options[{key!r}] = {value!r}; expected {expected} ({meaning}).")


def check_dist_threshold(fn: str, dist_threshold) -> None:
    """A real number >= 0 (``inf`` allowed: every pair is near); NaN and non-numbers refused."""
    if isinstance(dist_threshold, bool) or not isinstance(dist_threshold, numbers.Real):
        raise TypeError(f"{fn}: dist_threshold must be a number (int or float), got {dist_threshold!r} "
                        f"({type(dist_threshold).__name__}).")
    if dist_threshold != dist_threshold:  # NaN (a comparison, which torch.compile traces for symbolic numbers too)
        raise ValueError(f"{fn}: dist_threshold is NaN; pass a number >= 0 (math.inf makes every pair near).")
    if dist_threshold < 0:
        raise ValueError(f"{fn}: dist_threshold must be >= 0, got {dist_threshold}.")


def effective_dist_threshold(dist_threshold, M: int, N: int):
    """The threshold with the same meaning inside the reachable distances: ``dist = N - M + m - n``
    is at most ``N - 1``, so any threshold above ``N`` (``inf``, or one past int32) keeps every pair
    near exactly as ``N`` does.  Distances are integers, so ``dist >= w`` is ``dist >= ceil(w)``:
    the threshold is returned as that integer, which every backend compares exactly (a float
    compared with an integer tensor is rounded to the default dtype first: ``2 + 1e-12`` would
    read as 2)."""
    return N if dist_threshold > N else math.ceil(dist_threshold)
