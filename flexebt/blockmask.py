"""Block-sparse structure: torch's ``BlockMask`` and the EBT two-stream mask built on it.

flexebt uses torch's own ``BlockMask`` (``torch.nn.attention.flex_attention``) for a single
stream, so a mask built with torch's ``create_block_mask`` works unchanged.  The EBT
two-stream layout is described by :class:`EBTBlockMask`, which holds two ordinary
``BlockMask`` objects in *stream-local* coordinates whose mask_mods translate to *frame*
coordinates, plus the frame mask_mod itself for the row-wise own-key term.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from .reference.core import eval_mask_mod, index_grid
from .reference.masking import _block_table, dense_keep

__all__ = ["EBTBlockMask", "create_ebt_block_mask", "frame_causal_mask", "tables_in_range"]


def _listed_in_range(num: Tensor, idx: Tensor, n_rows: int, n_cols: int) -> tuple[Tensor, Tensor]:
    """One ordered block table (``num [.., R]``, ``idx [.., R, W]``: row ``r`` lists the blocks
    ``idx[.., r, :num[.., r]]``) cut to its first ``n_rows`` rows and listing only blocks in
    ``[0, n_cols)``, in their listed order; the slots past a row's count hold 0.  A count past the
    row's width ``W`` lists the whole row, a negative one nothing (the kernels never read past a
    row)."""
    num, idx = num[..., :n_rows], idx[..., :n_rows, :]
    slots = torch.arange(idx.shape[-1], device=idx.device)
    keep = (slots < num.unsqueeze(-1)) & (idx >= 0) & (idx < n_cols)
    # eager: tables whose every count is what they list in range are used as they are; while
    # torch.compile traces, the (cheap, data-independent) compaction always runs, so the graph has no
    # data-dependent branch
    if not torch.compiler.is_compiling() and bool(torch.equal(keep.sum(-1).to(num.dtype), num)):
        return num, idx
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)  # kept entries first, in order
    num = keep.sum(-1).to(num.dtype)
    idx = torch.where(slots < num.unsqueeze(-1), idx.gather(-1, order), torch.zeros_like(idx))
    return num, idx


def _from_dense(dense: Tensor) -> tuple[Tensor, Tensor]:
    """The ordered table (int32 counts and indices, ascending) of a ``[.., R, C]`` bool table."""
    return (dense.sum(-1, dtype=torch.int32),
            torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32))


def _transposed(num: Tensor, idx: Tensor, n_rows: int, n_cols: int) -> tuple[Tensor, Tensor]:
    """The ordered table of the transpose (``[.., n_cols]`` counts, ``[.., n_cols, n_rows]`` indices)
    of an in-range table with ``n_rows`` rows over ``n_cols`` columns."""
    return _from_dense(_block_table(num, idx, n_cols).transpose(-1, -2))


def _as_sets(kv: tuple, full: Optional[tuple], nkv: int) -> tuple:
    """``(kv, full, kv_set, full_set)``: the kv tables as flex_attention's reference reads them --
    each listed block once, a block listed both partial and full as full -- and those sets as
    ``[.., nq, nkv]`` bool tables.  Tables that list a block twice (hand-built with
    ``BlockMask.from_kv_blocks``) would otherwise add its scores twice in the kernels; such tables
    are rebuilt from their sets (ascending order), others kept as they are."""
    dp = _block_table(*kv, nkv)
    twice = (dp.sum(-1, dtype=torch.int32) != kv[0]).any()
    df = None
    if full is not None:
        df = _block_table(*full, nkv)
        twice = twice | (df.sum(-1, dtype=torch.int32) != full[0]).any() | (dp & df).any()
    if not bool(twice):  # (one host sync)
        return kv, full, dp, df
    if df is not None:
        dp = dp & ~df
    return _from_dense(dp), (_from_dense(df) if df is not None else None), dp, df


def tables_in_range(block_mask: BlockMask, Sq: int, Skv: int) -> tuple:
    """The eight block tables of a torch ``BlockMask`` for inputs of lengths ``(Sq, Skv)``:
    ``(kv_num, kv_idx, full_kv_num, full_kv_idx, q_num, q_idx, full_q_num, full_q_idx)`` (the
    full ones None when the mask has none), listing only blocks that hold positions.

    A mask made for longer sequences, or cropped with ``BlockMask._adjust`` (which keeps the
    listed indices of its rows), can list blocks at or past ``ceil(Skv / BLOCK)`` (or
    ``ceil(Sq / BLOCK)`` in its q tables) and have rows past the end.  Those blocks hold no
    position, so dropping them is exact: what remains is the mask's meaning on ``Sq x Skv``.

    The kv tables define the mask (the forward reads them).  The q tables (their transpose, read
    by the dk/dv passes) are derived from them where the mask has none (``compute_q_blocks=False``)
    or too few rows, and -- outside torch.compile, once per conversion -- where they do not list
    the transpose of the kv tables (a kv table edited in place or replaced after the mask was
    made): otherwise the gradients of k and v would be those of another mask.  Outside
    torch.compile, kv tables that list a block twice are read as sets (``_as_sets``).  Raises
    ValueError when the kv tables have fewer rows than ``ceil(Sq / BLOCK)``.
    """
    bq, bkv = (int(b) for b in block_mask.BLOCK_SIZE)
    nq, nkv = -(-Sq // bq), -(-Skv // bkv)
    if block_mask.kv_num_blocks.shape[-1] < nq or block_mask.kv_indices.shape[-2] < nq:
        raise ValueError(
            f"block_mask has {block_mask.kv_num_blocks.shape[-1]} rows of query blocks but Q_LEN={Sq} needs {nq} "
            f"(BLOCK_SIZE {bq}); rebuild it with create_block_mask(mask_mod, B, H, {Sq}, {Skv}).")
    kv = _listed_in_range(block_mask.kv_num_blocks, block_mask.kv_indices, nq, nkv)
    full = None
    if block_mask.full_kv_num_blocks is not None:
        if block_mask.full_kv_num_blocks.shape[-1] < nq or block_mask.full_kv_indices.shape[-2] < nq:
            raise ValueError(
                f"block_mask has {block_mask.full_kv_num_blocks.shape[-1]} rows of full query blocks but "
                f"Q_LEN={Sq} needs {nq}; rebuild it with create_block_mask(mask_mod, B, H, {Sq}, {Skv}).")
        full = _listed_in_range(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, nq, nkv)
    # outside torch.compile: the kv tables as sets, and those sets (while tracing: tables as given)
    sets = (None, None)
    if not torch.compiler.is_compiling():
        kv, full, *sets = _as_sets(kv, full, nkv)

    def q_side(num, idx, kv_side, kv_set):
        whole = num is not None and idx is not None and num.shape[-1] >= nkv and idx.shape[-2] >= nkv
        if kv_set is None:  # tracing: the mask's q tables as given, if it has them
            return _listed_in_range(num, idx, nkv, nq) if whole else _transposed(*kv_side, nq, nkv)
        transposed = kv_set.transpose(-1, -2)
        if whole:
            listed = _listed_in_range(num, idx, nkv, nq)
            listed_set = _block_table(*listed, nq)
            if listed_set.shape == transposed.shape and not bool(
                    (listed_set.sum(-1, dtype=torch.int32) != listed[0]).any() | (listed_set != transposed).any()):
                return listed  # the mask's own q tables say the same: kept (with their order)
        return _from_dense(transposed)

    q = q_side(block_mask.q_num_blocks, block_mask.q_indices, kv, sets[0])
    full_q = q_side(block_mask.full_q_num_blocks, block_mask.full_q_indices, full, sets[1]) if full is not None \
        else None
    return (*kv, *(full or (None, None)), *q, *(full_q or (None, None)))


# torch's block size of its "no-op" block mask (``_create_empty_block_mask``, what torch's
# flex_attention makes for ``block_mask=None``): one block over sequences of any length, for which
# torch skips its check of the mask's lengths against the inputs'
LARGE_BLOCK = 1 << 30


def sized_block_mask(fn: str, block_mask: Optional[BlockMask], B: int, H: int, Sq: int, Skv: int,
                     device) -> Optional[BlockMask]:
    """``block_mask``, or for a mask of one block of ``LARGE_BLOCK`` (torch's no-op form) the block
    mask it means at these lengths: every position where it lists its block as full (None), the
    mask_mod at every position where it lists it as partial (None for torch's ``noop_mask``),
    nothing where it lists no block.  A mask whose batches or heads differ in that is refused."""
    if not isinstance(block_mask, BlockMask) or tuple(block_mask.BLOCK_SIZE) != (LARGE_BLOCK, LARGE_BLOCK):
        return block_mask
    from torch.nn.attention.flex_attention import noop_mask

    if torch.compiler.is_compiling():
        # the tables' values cannot be read while dynamo traces: torch's own form (its mask_mod keeps
        # everything; torch reads nothing else of it either) is taken, anything else refused
        if block_mask.mask_mod in (None, noop_mask) and block_mask.full_kv_num_blocks is None:
            return None
        raise NotImplementedError(
            f"{fn}: under torch.compile, a block_mask of torch's block size {LARGE_BLOCK} (one block over any "
            f"lengths) is taken only in torch's own form (noop_mask, no full blocks); build this one with "
            f"create_block_mask(mask_mod, B, H, {Sq}, {Skv}) instead.")

    def listed(num, idx) -> Tensor:
        if num is None:
            return torch.zeros((), dtype=torch.bool)
        return ((num[..., :1] > 0) & (idx[..., :1, :1].squeeze(-1) == 0)).reshape(-1)

    full, partial = torch.broadcast_tensors(listed(block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
                                            listed(block_mask.kv_num_blocks, block_mask.kv_indices))
    kinds = {"full" if f else "partial" if p else "none" for f, p in zip(full.tolist(), partial.tolist())}
    if len(kinds) != 1:
        raise ValueError(
            f"{fn}: block_mask has torch's block size {LARGE_BLOCK} (one block over any lengths) and lists that "
            f"block as full in some batches or heads, partial or not at all in others; build it with "
            f"create_block_mask(mask_mod, B, H, {Sq}, {Skv}) instead.")
    kind = kinds.pop()
    if kind == "full" or (kind == "partial" and block_mask.mask_mod in (None, noop_mask)):
        return None
    mask_mod = block_mask.mask_mod if kind == "partial" else _keeps_nothing
    return create_block_mask(mask_mod, B, H, Sq, Skv, device=device)


def _keeps_nothing(b, h, q_idx, kv_idx):
    return q_idx < 0


def frame_causal_mask(b, h, q_idx, kv_idx):
    """The causal mask in frame coordinates (what ``mask_mod=None`` means in
    :func:`create_ebt_block_mask`)."""
    return q_idx >= kv_idx


@dataclass(frozen=True)
class EBTBlockMask:
    """Block-sparse structure of EBT two-stream attention.

    Attributes:
        mask_mod: the frame mask_mod ``(b, h, q_frame, kv_frame) -> bool``.
        observed: ``BlockMask`` of observed queries x observed keys, ``S_obs x S_obs``
            (stream index ``j`` is frame position ``j``).
        predicted: ``BlockMask`` of predicted queries x observed keys, ``S_pred x S_obs``;
            predicted row ``i`` sits at frame ``t = i + r + 1`` and its mask_mod also drops the
            observed key at frame ``t`` (the token the prediction replaces).
        S_obs, S_pred: stream lengths; ``offset = S_obs - S_pred`` is ``r``.
        B, H: batch and head sizes the masks were built for (1 means broadcast).
        own_keep: ``[B, H, S_pred]`` int8, whether each predicted query keeps its own key
            (computed from ``mask_mod`` when the mask is made; the kernels read it).
    The own key of each predicted query is a row-wise term, kept iff
    ``mask_mod(b, h, t, t)``; it has no tile in either ``BlockMask``.
    """

    mask_mod: Callable
    observed: BlockMask
    predicted: BlockMask
    S_obs: int
    S_pred: int
    B: int
    H: int
    own_keep: Optional[Tensor] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        for name, bm, lengths in (("observed", self.observed, (self.S_obs, self.S_obs)),
                                  ("predicted", self.predicted, (self.S_pred, self.S_obs))):
            if not isinstance(bm, BlockMask):
                raise TypeError(f"EBTBlockMask: {name} must be a torch BlockMask, got {type(bm).__name__}.")
            if tuple(int(n) for n in bm.seq_lengths) != lengths:
                raise ValueError(
                    f"EBTBlockMask: the {name} BlockMask was built for (Q_LEN, KV_LEN) = {tuple(bm.seq_lengths)} but "
                    f"S_obs={self.S_obs}, S_pred={self.S_pred} need {lengths}; crop it with "
                    f"{name}._adjust{lengths} or build the mask with create_ebt_block_mask.")
        if self.own_keep is None:
            # evaluated per score with vmap, on the code-generation thread: the caller may be inside a
            # torch.func transform (a mask made inside torch.compile is traced in place instead)
            from .codegen.source import run_on_builder

            device = self.observed.kv_num_blocks.device
            keep = self.self_keep(self.B, self.H, device) if torch.compiler.is_compiling() else \
                run_on_builder(self.self_keep, self.B, self.H, device)
            object.__setattr__(self, "own_keep", keep.to(torch.int8).contiguous())

    def own_keep_for(self, B: int, H: int) -> Tensor:
        """``own_keep`` for inputs with ``B`` batches and ``H`` heads (int8, contiguous)."""
        return self.own_keep.expand(B, H, self.S_pred).contiguous()

    @property
    def offset(self) -> int:
        return self.S_obs - self.S_pred

    @property
    def BLOCK_SIZE(self):
        return self.observed.BLOCK_SIZE

    def self_keep(self, B: int, H: int, device) -> Tensor:
        """``[B, H, S_pred]`` bool: whether each predicted query keeps its own key."""
        b, h, t, _ = index_grid(B, H, self.S_pred, 1, device, q_offset=self.offset + 1)
        # q and kv index are the same frame, as two tensors (one tensor in both places confuses vmap)
        return eval_mask_mod(self.mask_mod, (B, H, self.S_pred, 1), b, h, t, t.clone())[..., 0]

    def to_dense_frame(self, b: int = 0, h: int = 0) -> Tensor:
        """Keep matrix over the concatenated streams ``[observed; predicted]`` for one batch /
        head, ``(S_obs + S_pred)`` square -- handy for pictures and tests."""
        So, Sp = self.S_obs, self.S_pred
        dev = self.observed.kv_num_blocks.device
        b, h = (b if self.B > 1 else 0), (h if self.H > 1 else 0)
        out = torch.zeros(So + Sp, So + Sp, dtype=torch.bool, device=dev)
        out[:So, :So] = dense_keep(self.observed, self.B, self.H, So, So, dev)[b, h]
        out[So:, :So] = dense_keep(self.predicted, self.B, self.H, Sp, So, dev)[b, h]
        out[So:, So:] = torch.diag(self.own_keep[b, h].bool())
        return out

    def __repr__(self) -> str:
        return (f"EBTBlockMask(mask_mod={getattr(self.mask_mod, '__name__', self.mask_mod)!r}, "
                f"S_obs={self.S_obs}, S_pred={self.S_pred}, offset={self.offset}, B={self.B}, H={self.H}, "
                f"BLOCK_SIZE={self.BLOCK_SIZE})")


def _predicted_stream_mod(mask_mod: Callable, first_frame: int) -> Callable:
    """Lift a frame mask_mod to predicted-query x observed-key local coordinates."""

    def predicted_mask(b, h, q_idx, kv_idx):
        t = q_idx + first_frame
        return mask_mod(b, h, t, kv_idx) & (kv_idx != t)

    predicted_mask.__name__ = f"ebt_predicted[{getattr(mask_mod, '__name__', 'mask_mod')}]"
    return predicted_mask


def create_ebt_block_mask(mask_mod: Optional[Callable], B: Optional[int], H: Optional[int], S_obs: int,
                          S_pred: int, device=None, BLOCK_SIZE=128) -> EBTBlockMask:
    """Build the block-sparse structure of EBT two-stream attention for a frame mask_mod.

    Args:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` in frame coordinates (observed
            token ``j`` at frame ``j``, predicted token ``i`` at frame ``i + r + 1`` with
            ``r = S_obs - S_pred``).  ``None`` means causal (``q_idx >= kv_idx``), the
            autoregressive EBT.
        B, H: batch size and number of query heads of the ``[B, H, S, D]`` inputs, or ``None`` to
            broadcast over them.
        S_obs, S_pred: lengths of the observed and predicted streams, ``S_obs >= S_pred``.
        device: where the block tables live (default: the current default device).
        BLOCK_SIZE: tile size (int or ``(BLOCK_Q, BLOCK_KV)``), as in ``create_block_mask``.

    Returns:
        An :class:`EBTBlockMask` to pass as ``block_mask`` to :func:`flexebt.flex_ebt_attention`.

    Raises:
        ValueError: non-positive lengths, ``S_obs < S_pred``, or a bad ``B`` / ``H`` / ``BLOCK_SIZE``.
        TypeError: a ``mask_mod`` that is not callable.

    Examples:
        >>> bm = create_ebt_block_mask(None, 1, 1, S_obs=5, S_pred=4)
        >>> bm.offset
        1
    """
    from ._validation import check_builder_int, check_ebt_lengths, check_mod_signature

    fn = "create_ebt_block_mask"
    check_builder_int(fn, "S_obs", S_obs, 1)
    check_builder_int(fn, "S_pred", S_pred, 1)
    check_ebt_lengths(S_obs, S_pred)
    for name, val in (("B", B), ("H", H)):
        if val is not None:
            check_builder_int(fn, name, val, 1)
    if mask_mod is None:
        mask_mod = frame_causal_mask
    elif not callable(mask_mod):
        raise TypeError(f"create_ebt_block_mask: mask_mod must be callable or None, got {type(mask_mod).__name__}.")
    check_mod_signature("create_ebt_block_mask", "mask_mod", mask_mod)
    device = torch.device(device) if device is not None else torch.empty(0).device
    r = S_obs - S_pred
    observed = create_block_mask(mask_mod, B, H, S_obs, S_obs, device=device, BLOCK_SIZE=BLOCK_SIZE)
    predicted = create_block_mask(_predicted_stream_mod(mask_mod, r + 1), B, H, S_pred, S_obs, device=device,
                                  BLOCK_SIZE=BLOCK_SIZE)
    return EBTBlockMask(mask_mod=mask_mod, observed=observed, predicted=predicted, S_obs=S_obs, S_pred=S_pred,
                        B=1 if B is None else B, H=1 if H is None else H)
