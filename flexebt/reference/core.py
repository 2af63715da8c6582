"""Dense building blocks shared by every reference oracle.

Everything here is plain PyTorch on materialised ``[B, H, Sq, Skv]`` score tensors, so
autograd gives exact first- and second-order gradients, ``torch.func`` transforms work,
and float64 inputs give a float64 oracle.  Memory is O(S^2): this is the oracle and the CPU
backend, not the fast path.

Mod semantics.  A ``score_mod(score, b, h, q_idx, kv_idx)`` or ``mask_mod(b, h, q_idx, kv_idx)``
is a function of *one* score and its scalar indices, exactly as in torch's FlexAttention.  The
reference applies it to every score on its own with nested ``torch.vmap`` over the grid
dimensions, so every argument the mod sees is a 0-d tensor: a reduction inside a mod
(``score.sum()``, ``score.norm()``) reduces one score, indexing a captured tensor with the
indices gathers one element per score (out of range is an ``IndexError``, negative indices
wrap), and a mod that needs a Python value of a tensor (``.item()``, ``float(score)``, an ``if``
on a tensor) is refused with an error naming it -- never evaluated as some other function.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor


class _Batching:
    """functorch's vmap primitives (``torch._C._functorch``): what ``torch.vmap`` runs on."""

    def __init__(self):
        from torch._C import _functorch as F
        from torch._functorch.vmap import lazy_load_decompositions

        self.increment, self.decrement = F._vmap_increment_nesting, F._vmap_decrement_nesting
        self.add, self.remove = F._add_batch_dim, F._remove_batch_dim
        lazy_load_decompositions()  # the batching decompositions torch.vmap loads on first use


_BATCHING: list = []


def _batching() -> Optional[_Batching]:
    """The primitives, loaded on first use; None on a torch without them (then plain torch.vmap)."""
    if not _BATCHING:
        try:
            _BATCHING.append(_Batching())
        except (ImportError, AttributeError):  # pragma: no cover - depends on the torch build
            _BATCHING.append(None)
    return _BATCHING[0]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: fp16/bf16 accumulate in fp32, fp32/fp64 keep theirs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is fp32 (natural log), or float64 for float64 inputs (as torch flex_attention)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def index_grid(B: int, H: int, Sq: int, Skv: int, device, q_offset: int = 0, kv_offset: int = 0):
    """Broadcastable int64 index tensors ``b, h, q_idx, kv_idx`` for a dense evaluation (int64 as
    torch's own eager flex_attention passes them: integer arithmetic in a mod is exact up to 2^63).

    Shapes are ``[B,1,1,1]``, ``[1,H,1,1]``, ``[1,1,Sq,1]``, ``[1,1,1,Skv]``; the mod evaluators
    below map each grid dimension with ``torch.vmap``, so a mod never sees these shapes, only
    one scalar index of each.
    """
    b = torch.arange(B, device=device, dtype=torch.int64).view(B, 1, 1, 1)
    h = torch.arange(H, device=device, dtype=torch.int64).view(1, H, 1, 1)
    q = (torch.arange(Sq, device=device, dtype=torch.int64) + q_offset).view(1, 1, Sq, 1)
    kv = (torch.arange(Skv, device=device, dtype=torch.int64) + kv_offset).view(1, 1, 1, Skv)
    return b, h, q, kv


def mod_name(mod: Callable) -> str:
    """A readable name of a score_mod / mask_mod for error messages."""
    name = getattr(mod, "__name__", None)
    if name is None:  # functools.partial and other callables
        name = getattr(getattr(mod, "func", None), "__name__", None) or type(mod).__name__
    return name


def _refusal(kind: str, mod: Callable, err: BaseException) -> NotImplementedError:
    return NotImplementedError(
        f"{kind} {mod_name(mod)!r} cannot be evaluated one score at a time: {err}\n"
        f"flexebt follows torch's flex_attention semantics: a {kind} is a function of "
        f"{'one score and its' if kind == 'score_mod' else 'one position given by its'} scalar indices "
        f"(b, h, q_idx, kv_idx), applied to every score separately through torch.vmap. Write it "
        f"with tensor operations only: torch.where instead of a Python `if` on a tensor, tensors instead of "
        f".item() / float() / int(), and no in-place updates of captured tensors.")


def _grid_vmap(fn: Callable, args: Sequence[Tensor], shape) -> Tensor:
    """``fn`` applied to every element of the broadcast of ``args`` over ``shape``.

    ``fn`` receives 0-d tensors and returns a 0-d tensor.  Each grid dimension is one
    ``torch.vmap`` level; an argument is mapped at the levels where it has the full size and is
    passed unmapped (squeezed) where it is broadcast, so nothing is materialised beyond what the
    mod's own operations need.  A dimension along which no argument varies is not mapped: every
    score along it has identical arguments, so the result is expanded along it.
    """
    shape = tuple(shape)
    n = len(shape)
    flat, maps = [], []
    for a in args:
        size = tuple(a.shape)
        if len(size) < n:
            size = (1,) * (n - len(size)) + size
            a = a.reshape(size)
        mapped = tuple(x == g for x, g in zip(size, shape))
        if not all(m or x == 1 for m, x in zip(mapped, size)):
            raise ValueError(f"an argument of shape {size} does not broadcast to {shape}")
        flat.append(a if all(mapped) else a.squeeze(tuple(d for d in range(n) if not mapped[d])))
        maps.append(mapped)
    levels = [d for d in range(n) if any(m[d] for m in maps)]
    prims = None if torch.compiler.is_compiling() else _batching()
    if prims is not None:
        out = _nested_vmap(prims, fn, flat, maps, levels, shape)
    else:  # torch.compile traces torch.vmap itself
        f = fn
        for d in reversed(levels):  # the innermost vmap maps the last grid dimension
            f = torch.vmap(f, in_dims=tuple(0 if m[d] else None for m in maps))
        out = f(*flat)
    if len(levels) == n:
        return out
    return out.reshape([shape[d] if d in levels else 1 for d in range(n)]).expand(shape)


def _nested_vmap(prims: _Batching, fn: Callable, args: list, maps: list, levels: list, shape) -> Tensor:
    """Nested ``torch.vmap`` (``levels[0]`` outermost, out_dims 0, randomness "error") through
    functorch's own batching primitives -- the machinery ``torch.vmap`` runs on, without its
    per-call argument processing, which dominates the cost of the small grids the reference
    evaluates many times (gradcheck).  The same batching rules run, so results are identical."""
    entered = []  # (vmap level, grid dim), outermost first
    try:
        for d in levels:
            level = prims.increment(shape[d], "error")
            entered.append((level, d))
            args = [prims.add(a, 0, level) if m[d] else a for a, m in zip(args, maps)]
        out = fn(*args)
        while entered:  # innermost first: unwrap its batch dim, then leave the level
            level, d = entered[-1]
            out = prims.remove(out, level, shape[d], 0)
            entered.pop()
            prims.decrement()
        return out
    finally:
        for _ in entered:
            prims.decrement()


def _evaluate(kind: str, mod: Callable, one: Callable, args: Sequence[Tensor], shape) -> Tensor:
    """Run ``one`` per score; a mod vmap cannot evaluate per score is refused by name."""
    try:
        return _grid_vmap(one, args, shape)
    except (IndexError, TypeError):
        raise  # out-of-range indexing of a captured tensor, or our own message about the result
    except RuntimeError as err:
        if str(err).startswith(_ARITHMETIC_ERRORS):
            raise  # torch's own error for the mod's arithmetic (an integer divided by zero), as torch raises it
        raise _refusal(kind, mod, err) from err


# RuntimeErrors torch raises for a value a mod computes, not for how the mod is written: they reach
# the caller as they are, as from torch's flex_attention
_ARITHMETIC_ERRORS = ("ZeroDivisionError", "Integers to negative integer powers are not allowed")


def _one_result(kind: str, mod: Callable, out, dtype: torch.dtype, device) -> Tensor:
    """The value a mod returned for one score, as a 0-d tensor of ``dtype``."""
    if isinstance(out, Tensor):
        if out.dim() != 0:
            raise TypeError(f"{kind} {mod_name(mod)!r} must return one value per score (a 0-d tensor for its "
                            f"scalar arguments), got a tensor of shape {tuple(out.shape)}.")
        return out.to(dtype)
    if isinstance(out, (bool, int, float)):
        return torch.tensor(out, dtype=dtype, device=device)
    raise TypeError(f"{kind} {mod_name(mod)!r} must return a tensor (one value per score), got "
                    f"{type(out).__name__}.")


def apply_score_mod(score_mod: Optional[Callable], scores: Tensor, b: Tensor, h: Tensor, q_idx: Tensor,
                    kv_idx: Tensor) -> Tensor:
    """``score_mod(score, b, h, q_idx, kv_idx)`` applied to every score of ``scores`` (4-D).

    The index tensors broadcast to ``scores.shape`` (see :func:`index_grid`).  The result has the
    dtype of ``scores``: a mod returning an int / bool tensor, a Python number or a value that does
    not depend on the score is cast (and broadcast) like torch does.  Differentiable to any order
    in ``scores`` and in the tensors the mod captures.
    """
    if score_mod is None:
        return scores
    if scores.numel() == 0:
        return scores
    dtype = scores.dtype

    def one(score, b, h, q_idx, kv_idx):
        return _one_result("score_mod", score_mod, score_mod(score, b, h, q_idx, kv_idx), dtype, score.device)

    return _evaluate("score_mod", score_mod, one, (scores, b, h, q_idx, kv_idx), scores.shape)


def kept_scores(scores: Tensor, keep: Tensor) -> Tensor:
    """The scores a score_mod is applied to: at positions the mask removes they carry no gradient.

    A mod may be undefined where the mask removes a pair (``score / sqrt(q_idx - kv_idx + 1)``
    under a causal mask: NaN above the diagonal).  Those positions cannot change any result, yet
    autograd would multiply their zero cotangent by the mod's NaN derivative and spread the NaN
    into dq and dk.  ``where`` routes the gradient of a removed position nowhere (it selects, it
    does not multiply), as the kernels zero ``ds`` there."""
    if not scores.requires_grad:
        return scores
    return torch.where(keep, scores, scores.detach())


def eval_mask_mod(mask_mod: Optional[Callable], shape, b: Tensor, h: Tensor, q_idx: Tensor,
                  kv_idx: Tensor) -> Tensor:
    """``mask_mod(b, h, q_idx, kv_idx)`` at every position of ``shape``; a bool tensor of ``shape``."""
    shape = tuple(shape)
    device = q_idx.device
    if mask_mod is None or any(s == 0 for s in shape):
        return torch.ones(shape, dtype=torch.bool, device=device)

    def one(b, h, q_idx, kv_idx):
        return _one_result("mask_mod", mask_mod, mask_mod(b, h, q_idx, kv_idx), torch.bool, device)

    return _evaluate("mask_mod", mask_mod, one, (b, h, q_idx, kv_idx), shape)


def masked_softmax(t: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim restricted to ``keep``; returns ``(P, lse)``.

    A row with no kept entry (or whose kept scores are all ``-inf``) gets ``P = 0`` and
    ``lse = -inf``, with zero (never NaN) gradients.  Written so that no masked position ever
    produces an ``inf`` inside autograd (the usual ``where`` NaN trap): masked scores are
    replaced by the row shift itself before ``exp``, and the sum is guarded before ``log``.
    Rows over zero keys (``t.shape[-1] == 0``) are empty rows: ``lse = -inf``.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=t.dtype, device=t.device)
    if t.shape[-1] == 0:
        # No candidate at all.  The empty sum keeps lse in the graph (its gradient is empty).
        return t, t.sum(-1) + neg_inf
    # The shift m is only for stability: softmax is shift invariant, so detaching it leaves
    # first- and second-order gradients exact.
    m = torch.where(keep, t, neg_inf).amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(keep, torch.exp(torch.where(keep, t, m) - m), torch.zeros_like(t))
    denom = e.sum(dim=-1, keepdim=True)
    nonempty = denom != 0  # (a NaN row is not empty: its lse is NaN, as torch's)
    safe = torch.where(nonempty, denom, torch.ones_like(denom))
    p = e / safe
    lse = torch.where(nonempty, torch.log(safe) + m, neg_inf).squeeze(-1)
    return p, lse


def expand_kv_heads(x: Tensor, n_q_heads: int) -> Tensor:
    """GQA: query head ``h`` reads key/value head ``h // (Hq // Hkv)``."""
    n_kv = x.shape[1]
    if n_kv == n_q_heads:
        return x
    return x.repeat_interleave(n_q_heads // n_kv, dim=1)
