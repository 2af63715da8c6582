"""EBT two-stream attention as a plan of single-stream kernel passes (``kernels/plan.py``).

No concatenation: the observed stream is one ordinary pass over the observed keys; the
predicted stream is one pass over the *same* observed keys (its block mask already drops the
key at each query's own frame) whose score_mod sees frame positions (``Q_OFF = r + 1``), with
each query's own key as a row-wise term that seeds the online softmax -- no predicted x
predicted tile.  One generated kernel module serves both streams (its mask code reads the frame mask_mod
and drops the own-frame key where Q_OFF > 0).  The two passes write different rows from
different inputs, so they run as two autograd nodes (``AttentionPlan.row_groups``); the observed
keys' gradient is the sum of the two nodes' shares.
"""

from __future__ import annotations

from torch import Tensor

from .. import runtime
from ..codegen.source import ModKernels, kernels_and_buffers, position_extents
from .flex import BlockTables, block_mask_state, same_state, tables_from_block_mask
from .plan import AttentionPlan, KernelPass


def ebt_plan(kern: ModKernels, tables_o: BlockTables, tables_p: BlockTables, own_keep: Tensor, offset: int,
             n_buffers: int) -> AttentionPlan:
    """Inputs (q_o, k_o, v_o, q_p, k_p, v_p), row groups (observed, predicted); ``own_keep``:
    int8 [B, H, S_p], whether a predicted query keeps its own key; ``offset``: r + 1, the frame
    of predicted query 0."""
    b = (0, n_buffers)
    return AttentionPlan((KernelPass(0, 1, 2, 0, kern, tables_o, b),
                          KernelPass(3, 1, 2, 1, kern, tables_p, b, q_off=offset, own=(4, 5), own_keep=own_keep)),
                         6, 2)


def _keep_all(b, h, q_idx, kv_idx):
    return q_idx >= 0


def structure_mask(S_o: int, S_p: int, device):
    """The block mask of the bare two-stream structure (block_mask=None): every frame pair kept,
    except that a predicted query never sees the observed key at its own frame.  Built once per
    shape on the code-generation thread (create_block_mask uses vmap; the caller may be inside a
    torch.func transform), then cached."""
    from ..blockmask import create_ebt_block_mask
    from ..codegen.source import run_on_builder

    key = (S_o, S_p, str(device))
    hit = runtime.structures.get(key)
    if hit is None:
        hit = runtime.structures.put(key, run_on_builder(create_ebt_block_mask, _keep_all, None, None, S_o, S_p,
                                                         device=device))
    return hit


def plan(score_mod, block_mask, B: int, H: int, S_o: int, S_p: int, device) -> tuple:
    """(AttentionPlan, captured tensors) of one call (call with functorch dispatch off).

    The plan -- tables, kernels, the own-key mask -- is cached per (block mask, score_mod,
    shape): repeated calls in a training loop skip the table conversion, the own-key mask
    evaluation and the kernel lookup; the tensors are re-read from the closures every call."""
    if block_mask is None:
        block_mask = structure_mask(S_o, S_p, device)
    key = (id(block_mask), id(score_mod), B, H, S_o, S_p, str(device))
    # the kernel lookup runs every call: what the mods read (globals, attributes) may have changed
    kern, buffers = kernels_and_buffers("flex_attention", score_mod, block_mask.mask_mod,
                                        _frame_extents(B, H, S_o, S_p), frame_mask=True)
    # the two streams' BlockMasks are mutable torch objects: the plan holds while they are as they were
    state = (block_mask_state(block_mask.observed), block_mask_state(block_mask.predicted))
    hit = runtime.plans.get(key, block_mask, score_mod)
    if (hit is not None and all(map(same_state, hit[0], state)) and hit[1].passes[0].kern is kern
            and hit[1].passes[0].buffers[1] == len(buffers)):
        return hit[1], buffers
    tables_o = tables_from_block_mask(block_mask.observed, S_o, S_o, device)
    tables_p = tables_from_block_mask(block_mask.predicted, S_p, S_o, device)
    keep = block_mask.own_keep_for(B, H)  # evaluated once, when the mask was made
    fresh = ebt_plan(kern, tables_o, tables_p, keep, S_o - S_p + 1, len(buffers))
    runtime.plans.put(key, (state, fresh), block_mask, score_mod)
    return fresh, buffers


def _frame_extents(B: int, H: int, S_o: int, S_p: int) -> dict:
    """EBT mods see frame positions: S_o + 1 of them once there is a predicted stream (its last
    query and own key sit at frame S_o)."""
    n = S_o + 1 if S_p > 0 else S_o
    return position_extents(B, H, n, n, max(S_o, S_p))
