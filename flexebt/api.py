"""Public functions: validate inputs, pick a backend, return outputs."""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import AuxOutput, BlockMask

from . import _validation as V
from .backends import composition_needs_reference, resolve_backend
from .blockmask import EBTBlockMask, sized_block_mask
from .autograd import AttentionCall, apply_attention
from .codegen.source import kernels_and_buffers, position_extents
from .kernels.flex import cached_tables
from .kernels.options import KernelOptions
from .kernels.plan import single_stream_plan
from .reference import ebt_attention_reference, flex_attention_reference, piecewise_attention_reference

__all__ = ["flex_attention", "flex_ebt_attention", "piecewise_attention"]


def flex_attention(query: Tensor, key: Tensor, value: Tensor, score_mod: Optional[Callable] = None,
                   block_mask: Optional[BlockMask] = None, scale: Optional[float] = None, enable_gqa: bool = False,
                   return_lse: bool = False, kernel_options: Optional[dict] = None, *, return_aux=None):
    """FlexAttention with second-order gradients; a drop-in for torch's ``flex_attention``.

    Computes ``softmax(score_mod(scale * Q K^T) masked by block_mask) V`` for each batch and head.

    Args:
        query: ``[B, Hq, Sq, D]``.
        key: ``[B, Hkv, Skv, D]``, or ``[1, Hkv, Skv, D]`` broadcast over a query batch ``B > 1``
            (as torch: then ``block_mask`` must be built for batch ``B``).  A dtype other than the
            query's is cast to the query's (torch's eager rule: the output has the query's dtype).
        value: ``[B, Hkv, Skv, Dv]`` (batch and dtype as ``key``).
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (torch convention); may
            capture tensors, which receive gradients (first and second order).
        block_mask: a torch ``BlockMask`` from ``create_block_mask`` for ``(Sq, Skv)``; its
            mask_mod decides which positions are kept. ``None`` keeps all.
        scale: multiplies ``Q K^T``; default ``D ** -0.5``.  A one-element tensor is read as its
            value (as torch); one that requires grad is refused -- multiply in the score_mod instead.
        enable_gqa: allow ``Hkv < Hq`` with ``Hq % Hkv == 0`` (query head ``h`` reads kv head
            ``h // (Hq // Hkv)``).
        return_lse: also return the log-sum-exp ``[B, Hq, Sq]`` (natural log, fp32; float64
            for float64 inputs). A query with no kept key has ``lse = -inf`` and output 0.
        return_aux: torch's ``AuxRequest(lse=..., max_scores=...)``: return ``(out, AuxOutput)``
            with the requested fields (``max_scores``: each row's largest kept modified score,
            natural units, fp32 (float64 for float64 inputs), ``-inf`` for a row that keeps
            nothing, no gradient, as torch).
            Not together with ``return_lse``.
        kernel_options: dict; ``{"BACKEND": "AUTO" | "TRITON" | "REFERENCE"}`` picks the
            backend (default: the ``FLEXEBT_BACKEND`` environment variable, else ``AUTO``).
            Tile and launch keys (torch's names where it has them: ``BLOCK_M``, ``num_warps``,
            ``USE_TMA``, ...) are declared in ``flexebt._validation.KERNEL_OPTIONS`` and checked
            on every backend (the reference ignores them); an unknown key or a value of the wrong
            type is refused.

    Returns:
        ``out`` ``[B, Hq, Sq, Dv]`` in the query's dtype, or ``(out, lse)``, or ``(out, aux)``.

    Raises:
        ValueError / TypeError: for shapes, dtypes, devices, head counts, a block mask built for
            other lengths, or an unknown backend (each message says how to fix it).

    Examples:
        >>> import torch, flexebt
        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
        >>> bm = torch.nn.attention.flex_attention.create_block_mask(causal, None, None, 8, 8, device="cpu")
        >>> flexebt.flex_attention(q, k, v, block_mask=bm).shape
        torch.Size([1, 2, 8, 16])
    """
    fn = "flex_attention"
    V.check_tensors(fn, [("query", query), ("key", key), ("value", value)], like_query=("key", "value"))
    block_mask = sized_block_mask(fn, block_mask, *query.shape[:2], query.shape[-2], key.shape[-2], query.device)
    V.check_layout(fn, query, key, block_mask.seq_lengths if isinstance(block_mask, BlockMask) else None)
    key, value = V.kv_like_query(fn, query, key, value, block_mask)
    V.check_qkv(fn, query, key, value, enable_gqa)
    scale = V.check_scale(fn, scale)
    V.check_callable(fn, "score_mod", score_mod)
    V.check_block_mask(fn, block_mask, query.shape[0], query.shape[1], query.shape[2], key.shape[2], query.device)
    V.check_kernel_options(fn, kernel_options)
    want_max = V.check_return_aux(fn, return_lse, return_aux)
    backend = _backend_for(fn, kernel_options, (query, key, value), value, (score_mod, block_mask))
    B, H, Sq = query.shape[:3]
    if backend == "TRITON" and (B * H * Sq == 0 or key.shape[2] == 0):  # nothing to launch
        out, lse = _empty_attention((query, key, value), [(B, H, Sq, value.shape[3])], [(B, H, Sq)])
        res = (out[0], lse[0], lse[0].detach().clone()) if want_max else (out[0], lse[0])
    elif backend == "TRITON" and torch.compiler.is_compiling():
        from .compiled import flex_attention_compiled

        res = flex_attention_compiled(query, key, value, score_mod, block_mask, scale, kernel_options, want_max)
    elif backend == "TRITON":
        res = _flex_attention_triton(query, key, value, score_mod, block_mask, scale, kernel_options, want_max)
    else:
        res = flex_attention_reference(query, key, value, score_mod, block_mask, scale, want_max)
    if return_aux is not None:
        return res[0], AuxOutput(lse=res[1] if return_aux.lse else None,
                                 max_scores=res[2] if return_aux.max_scores else None)
    return (res[0], res[1]) if return_lse else res[0]


def _empty_attention(inputs, out_shapes, lse_shapes):
    """Exact results of attention with no query or no key: outputs 0, ``lse = -inf``; a graph reaches
    every input (through a zero-element slice, so the values never matter), so gradients of any
    order are zeros of the inputs' shapes."""
    x = inputs[0]
    link = sum(t.reshape(-1)[:0].sum() for t in inputs)
    lse_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    outs = [torch.zeros(s, dtype=x.dtype, device=x.device) + link for s in out_shapes]
    lses = [torch.full(s, float("-inf"), dtype=lse_dtype, device=x.device) + link.to(lse_dtype) for s in lse_shapes]
    return outs, lses


def _backend_for(fn: str, kernel_options, tensors, value, mods=()) -> str:
    """"TRITON" or "REFERENCE" for this call: the requested backend (backends.resolve_backend),
    except that torch.func compositions the kernels' Functions do not cover take the reference
    (backends.composition_needs_reference; not decided while torch.compile traces).  ``mods``: the
    score_mod and block mask, whose captured tensors a transform may reach too."""
    q = tensors[0]
    backend = resolve_backend(kernel_options, q.device, fn, dtype=q.dtype,
                              head_dim=max(q.shape[-1], value.shape[-1]),
                              seq_len=max(t.shape[-2] for t in tensors))
    if backend == "TRITON" and not torch.compiler.is_compiling() and composition_needs_reference(
            fn, tensors, lambda: _captured_by(mods)):
        backend = "REFERENCE"
    return backend


def _captured_by(mods) -> list:
    """The tensors the score_mod and the block mask's mask_mod capture (an EBT mask's two streams
    are made from its frame mask_mod and capture what it captures)."""
    from .codegen.identity import captured_tensors

    score_mod, block_mask = mods
    fns = [f for f in (score_mod, getattr(block_mask, "mask_mod", None)) if callable(f)]
    return [b.tensor for f in fns for b in captured_tensors(f)]


def _flex_attention_triton(query, key, value, score_mod, block_mask, scale, kernel_options, return_max=False):
    Sq, Skv = query.shape[2], key.shape[2]
    with torch._C._DisableFuncTorch():  # plain int32 tables even inside torch.func transforms
        tables = cached_tables(block_mask, Sq, Skv, query.device)
    kernels, buffers = kernels_and_buffers("flex_attention", score_mod, tables.mask_mod,
                                           position_extents(query.shape[0], query.shape[1], Sq, Skv))
    for t in buffers:
        if t.device != query.device:
            raise ValueError(f"flex_attention: a tensor captured by score_mod/mask_mod is on {t.device} but the "
                             f"inputs are on {query.device}; move it to {query.device}.")
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)

    def reference(q, k, v):
        return flex_attention_reference(q, k, v, score_mod, block_mask, scale)

    call = AttentionCall(single_stream_plan(kernels, tables, len(buffers)), scale, KernelOptions.of(kernel_options),
                         reference, (score_mod,), return_max)
    return apply_attention(call, [query.contiguous(), key.contiguous(), value.contiguous()], buffers)


def flex_ebt_attention(q_o: Tensor, k_o: Tensor, v_o: Tensor, q_p: Tensor, k_p: Tensor, v_p: Tensor,
                       score_mod: Optional[Callable] = None, block_mask: Optional[EBTBlockMask] = None,
                       scale: Optional[float] = None, enable_gqa: bool = False, return_lse: bool = False,
                       kernel_options: Optional[dict] = None):
    """EBT two-stream attention with second-order gradients.

    The frame has ``S_o + 1`` positions: observed token ``j`` sits at frame ``j``, predicted
    token ``i`` at frame ``t = i + r + 1`` where ``r = S_o - S_p >= 0``.  Observed queries attend
    to observed keys; predicted query ``i`` attends to the observed keys except the one at frame
    ``t`` (the token it replaces) and to its own key ``k_p[i], v_p[i]`` at frame ``t``.
    ``score_mod`` and the block mask see frame coordinates, so the ordinary causal mask gives
    the autoregressive EBT.

    Args:
        q_o, k_o, v_o: observed stream, ``[B, Hq, S_o, D]``, ``[B, Hkv, S_o, D]``, ``[B, Hkv, S_o, Dv]``.
        q_p, k_p, v_p: predicted stream, ``[B, Hq, S_p, D]``, ``[B, Hkv, S_p, D]``, ``[B, Hkv, S_p, Dv]``.
        score_mod: ``score_mod(score, b, h, q_frame, kv_frame)``; may capture tensors.
        block_mask: an :class:`~flexebt.EBTBlockMask` from :func:`create_ebt_block_mask` for
            these lengths.  ``None`` applies no mask beyond the two-stream structure: every query
            also sees later frames (not causal), and a ``UserWarning`` says so at the calling line;
            the autoregressive EBT passes ``create_ebt_block_mask(flexebt.masks.ebt_causal_mask, ...)``.
        scale: default ``D ** -0.5``.
        enable_gqa: allow fewer key/value heads than query heads.
        return_lse: also return ``lse_o [B, Hq, S_o]`` and ``lse_p [B, Hq, S_p]``.
        kernel_options: ``{"BACKEND": ...}`` as in :func:`flex_attention`.

    Returns:
        ``(out_o, out_p)`` of shapes ``[B, Hq, S_o, Dv]`` and ``[B, Hq, S_p, Dv]``, or
        ``(out_o, out_p, lse_o, lse_p)`` with ``return_lse=True``.

    Raises:
        ValueError: if ``S_p > S_o``, the streams disagree in batch, heads or head dim, or the
            block mask was built for other lengths; TypeError for a wrong block mask type.

    Examples:
        >>> import torch, flexebt
        >>> x = lambda S: torch.randn(2, 4, S, 32)
        >>> bm = flexebt.create_ebt_block_mask(None, None, None, S_obs=16, S_pred=16)
        >>> out_o, out_p = flexebt.flex_ebt_attention(x(16), x(16), x(16), x(16), x(16), x(16), block_mask=bm)
    """
    fn = "flex_ebt_attention"
    V.check_tensors(fn, [("q_o", q_o), ("k_o", k_o), ("v_o", v_o), ("q_p", q_p), ("k_p", k_p), ("v_p", v_p)])
    V.check_layout(fn, q_o, q_p, (block_mask.S_obs, block_mask.S_pred) if isinstance(block_mask, EBTBlockMask)
                   else None)
    V.check_qkv(fn, q_o, k_o, v_o, enable_gqa, "q_o", "k_o", "v_o")
    V.check_qkv(fn, q_p, k_p, v_p, enable_gqa, "q_p", "k_p", "v_p")
    for a, b, what in ((q_o, q_p, "q"), (k_o, k_p, "k"), (v_o, v_p, "v")):
        if a.shape[1] != b.shape[1] or a.shape[3] != b.shape[3]:
            raise ValueError(
                f"{fn}: {what}_o has (heads, dim) = ({a.shape[1]}, {a.shape[3]}) but {what}_p has "
                f"({b.shape[1]}, {b.shape[3]}); both streams must use the same heads and head dims."
            )
    if q_o.shape[2] != k_o.shape[2]:
        raise ValueError(f"{fn}: q_o has {q_o.shape[2]} positions but k_o has {k_o.shape[2]}; they must match. "
                         f"({V.LAYOUT_HINT}.)")
    if q_p.shape[2] != k_p.shape[2]:
        raise ValueError(f"{fn}: q_p has {q_p.shape[2]} positions but k_p has {k_p.shape[2]}; they must match. "
                         f"({V.LAYOUT_HINT}.)")
    S_o, S_p = q_o.shape[2], q_p.shape[2]
    if S_p > S_o:
        raise ValueError(
            f"{fn}: the predicted stream (S_p={S_p}) is longer than the observed stream (S_o={S_o}); "
            f"expected S_o = S_p + r with r >= 0."
        )
    scale = V.check_scale(fn, scale)
    V.check_callable(fn, "score_mod", score_mod)
    _check_ebt_block_mask(fn, block_mask, q_o.shape[0], q_o.shape[1], S_o, S_p, q_o.device)
    if block_mask is None and not torch.compiler.is_compiling():
        _warn_not_causal(fn, S_o, S_p)
    V.check_kernel_options(fn, kernel_options)
    backend = _backend_for(fn, kernel_options, (q_o, k_o, v_o, q_p, k_p, v_p), v_o, (score_mod, block_mask))
    B, H = q_o.shape[:2]
    if backend == "TRITON" and (B * H * S_o == 0 or S_p == 0):  # nothing to launch for some stream
        return _ebt_with_an_empty_stream((q_o, k_o, v_o, q_p, k_p, v_p), score_mod, block_mask, scale, return_lse,
                                         kernel_options)
    if backend == "TRITON" and torch.compiler.is_compiling():
        from .compiled import ebt_attention_compiled

        out_o, out_p, lse_o, lse_p = ebt_attention_compiled(q_o, k_o, v_o, q_p, k_p, v_p, score_mod, block_mask,
                                                            scale, kernel_options)
    elif backend == "TRITON":
        out_o, out_p, lse_o, lse_p = _flex_ebt_attention_triton(q_o, k_o, v_o, q_p, k_p, v_p, score_mod, block_mask,
                                                                scale, kernel_options)
    else:
        out_o, out_p, lse_o, lse_p = ebt_attention_reference(q_o, k_o, v_o, q_p, k_p, v_p, score_mod, block_mask,
                                                             scale)
    return (out_o, out_p, lse_o, lse_p) if return_lse else (out_o, out_p)


def _ebt_with_an_empty_stream(inputs, score_mod, block_mask, scale, return_lse, kernel_options):
    """EBT attention where a stream is empty.  Without predicted tokens the observed stream is plain
    attention over the observed keys (under the EBT mask's observed part), whose frame positions
    are their stream positions; everything else is empty."""
    q_o, k_o, v_o, q_p = inputs[:4]
    B, H, S_o, S_p, Dv = q_o.shape[0], q_o.shape[1], q_o.shape[2], q_p.shape[2], v_o.shape[3]
    (out_p,), (lse_p,) = _empty_attention(inputs, [(B, H, S_p, Dv)], [(B, H, S_p)])
    if B * H * S_o == 0:
        (out_o,), (lse_o,) = _empty_attention(inputs, [(B, H, S_o, Dv)], [(B, H, S_o)])
    else:
        observed = block_mask.observed if block_mask is not None else None
        out_o, lse_o = flex_attention(q_o, k_o, v_o, score_mod=score_mod, block_mask=observed, scale=scale,
                                      enable_gqa=True, return_lse=True, kernel_options=kernel_options)
        out_p = out_p.to(out_o.dtype)
    return (out_o, out_p, lse_o, lse_p) if return_lse else (out_o, out_p)


def _flex_ebt_attention_triton(q_o, k_o, v_o, q_p, k_p, v_p, score_mod, block_mask, scale, kernel_options):
    from .kernels.ebt import plan, structure_mask

    B, H, S_o = q_o.shape[:3]
    if block_mask is None:
        structure_mask(S_o, q_p.shape[2], q_o.device)  # build (and cache) outside the guard below
    with torch._C._DisableFuncTorch():  # plain tables even inside torch.func transforms
        pl, buffers = plan(score_mod, block_mask, B, H, S_o, q_p.shape[2], q_o.device)
    for t in buffers:
        if t.device != q_o.device:
            raise ValueError(f"flex_ebt_attention: a tensor captured by score_mod/mask_mod is on {t.device} but the "
                             f"inputs are on {q_o.device}; move it to {q_o.device}.")
    scale = q_o.shape[-1] ** -0.5 if scale is None else float(scale)

    def reference(*x):
        return ebt_attention_reference(*x, score_mod, block_mask, scale)

    call = AttentionCall(pl, scale, KernelOptions.of(kernel_options), reference, (score_mod,))
    return apply_attention(call, [x.contiguous() for x in (q_o, k_o, v_o, q_p, k_p, v_p)], buffers)


def _warn_not_causal(fn: str, S_o: int, S_p: int) -> None:
    """block_mask=None is the bare two-stream structure -- every frame pair kept, later frames
    included -- which the autoregressive EBT must not use; a forgotten mask would silently leak the
    future, so it is said at the caller's line (once per line, Python's default warning filter)."""
    warnings.warn(
        f"{fn}: block_mask=None keeps every frame pair, so each query also sees the keys of later frames "
        f"(not causal). The autoregressive EBT needs flexebt.create_ebt_block_mask(flexebt.masks.ebt_causal_mask, "
        f"B, H, S_obs={S_o}, S_pred={S_p}) (mask_mod=None also means causal; build it once and reuse it). To "
        f"attend to every frame on purpose, pass create_ebt_block_mask(torch.nn.attention.flex_attention.noop_mask, "
        f"B, H, {S_o}, {S_p}), which does not warn.", UserWarning, stacklevel=3)


def _check_ebt_block_mask(fn: str, block_mask, B: int, H: int, S_o: int, S_p: int, device=None) -> None:
    if block_mask is None:
        return
    if isinstance(block_mask, BlockMask):
        raise TypeError(
            f"{fn}: got a torch BlockMask; EBT attention needs the two-stream structure from "
            f"flexebt.create_ebt_block_mask(mask_mod, B, H, S_obs={S_o}, S_pred={S_p}) "
            f"(pass your frame mask_mod, e.g. block_mask.mask_mod)."
        )
    if not isinstance(block_mask, EBTBlockMask):
        raise TypeError(f"{fn}: block_mask must be an EBTBlockMask or None, got {type(block_mask).__name__}.")
    if (block_mask.S_obs, block_mask.S_pred) != (S_o, S_p):
        raise ValueError(
            f"{fn}: block_mask was built for (S_obs, S_pred) = ({block_mask.S_obs}, {block_mask.S_pred}) but the "
            f"inputs have ({S_o}, {S_p}); rebuild it with create_ebt_block_mask(mask_mod, B, H, {S_o}, {S_p})."
        )
    V.check_mask_batch_heads(fn, block_mask.B, block_mask.H, B, H)
    V.check_callable(fn, "mask_mod", block_mask.mask_mod)
    V.check_block_mask(fn, block_mask.observed, B, H, S_o, S_o, device)
    V.check_block_mask(fn, block_mask.predicted, B, H, S_p, S_o, device)


def piecewise_attention(q1: Tensor, k1: Tensor, q2: Tensor, k2: Tensor, v: Tensor, dist_threshold,
                        causal: bool = False, scale: Optional[float] = None, score_mod: Optional[Callable] = None,
                        block_mask: Optional[BlockMask] = None, kernel_options: Optional[dict] = None) -> Tensor:
    """Piecewise attention (NLPE, FlagAttention semantics) with second-order gradients.

    Queries are aligned to the end of the keys: with ``P = N - M``, query ``m`` and key ``n``
    are ``dist = P + m - n`` apart.  The score is ``scale * <q2[m], k2[n]>`` where
    ``dist >= dist_threshold`` and ``scale * <q1[m], k1[n]>`` otherwise.

    Args:
        q1, q2: ``[B, H, M, D]``.  k1, k2: ``[B, H, N, D]``.  v: ``[B, H, N, Dv]``.
        dist_threshold: ``w >= 0`` (int or float); pairs at distance ``>= w`` use ``(q2, k2)``.
            ``math.inf`` (or any ``w > N - 1``) makes every pair near; NaN is refused.
            A runtime value: a new threshold does not recompile the kernels.
        causal: keep only keys ``n <= P + m``.
        scale: default ``D ** -0.5``.
        score_mod: optional, applied to the chosen score as in ``flex_attention`` (positions
            ``(m, n)``).
        block_mask: optional ``BlockMask`` over ``M x N`` (``create_block_mask``), ANDed with
            the piecewise structure, e.g. a sliding window.
        kernel_options: ``{"BACKEND": ...}`` and tile options, as in ``flex_attention``.

    Returns:
        ``[B, H, M, Dv]`` in the input dtype.  A query with no key gives 0.

    Raises:
        ValueError: mismatched shapes (``q1``/``q2``, ``k1``/``k2``, heads, head dims), a negative
            threshold, a ``block_mask`` of the wrong size, a bad backend or kernel option.
        TypeError: a non-tensor input, a non-numeric threshold, a ``score_mod`` that is not callable.

    On the kernels each region (near, far) is one block-sparse ``flex_attention`` pass, so a tile
    wholly on one side of the threshold computes one product; the two passes merge exactly
    through each row's max and softmax sum (``flexebt/piecewise.py``).

    Examples:
        >>> import torch, flexebt
        >>> x = torch.randn(1, 2, 10, 16)
        >>> flexebt.piecewise_attention(x, x, x, x, x, dist_threshold=4, causal=True).shape
        torch.Size([1, 2, 10, 16])
    """
    fn = "piecewise_attention"
    V.check_tensors(fn, [("q1", q1), ("k1", k1), ("q2", q2), ("k2", k2), ("v", v)])
    for qa, qb, na, nb in ((q1, q2, "q1", "q2"), (k1, k2, "k1", "k2")):
        if qa.shape != qb.shape:
            raise ValueError(f"{fn}: {na} has shape {tuple(qa.shape)} but {nb} has {tuple(qb.shape)}; they must match.")
    V.check_layout(fn, q1, k1, block_mask.seq_lengths if isinstance(block_mask, BlockMask) else None)
    V.check_qkv(fn, q1, k1, v, enable_gqa=False, q_name="q1", k_name="k1", v_name="v")
    V.check_dist_threshold(fn, dist_threshold)
    scale = V.check_scale(fn, scale)
    V.check_callable(fn, "score_mod", score_mod)
    V.check_block_mask(fn, block_mask, q1.shape[0], q1.shape[1], q1.shape[2], k1.shape[2], q1.device)
    V.check_kernel_options(fn, kernel_options)
    backend = _backend_for(fn, kernel_options, (q1, k1, q2, k2, v), v, (score_mod, block_mask))
    B, H, M = q1.shape[:3]
    dist_threshold = V.effective_dist_threshold(dist_threshold, M, k1.shape[2])
    if backend == "TRITON" and (B * H * M == 0 or k1.shape[2] == 0):  # nothing to launch
        return _empty_attention((q1, k1, q2, k2, v), [(B, H, M, v.shape[3])], [])[0][0]
    if backend == "TRITON" and torch.compiler.is_compiling():
        from .compiled import piecewise_attention_compiled

        out = piecewise_attention_compiled(q1, k1, q2, k2, v, dist_threshold, causal, scale, score_mod, block_mask,
                                           kernel_options)
    elif backend == "TRITON":
        from .piecewise import piecewise_attention_kernels

        out, _ = piecewise_attention_kernels(q1, k1, q2, k2, v, dist_threshold, causal, scale, score_mod, block_mask,
                                             kernel_options)
    else:
        out, _ = piecewise_attention_reference(q1, k1, q2, k2, v, dist_threshold, causal, scale, score_mod,
                                               block_mask)
    return out
