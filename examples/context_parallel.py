"""Context parallelism for attention, prototyped in one process: the keys split into shards.

On several GPUs each rank would hold one shard of the keys and values (a contiguous range of
positions) and compute the attention of every query over its shard alone -- a partial softmax
``(out_a, lse_a)``.  The full attention is an exact merge of the partials through their
log-sum-exps (the same merge flexebt uses between the passes of one call):

    lse = log sum_a e^(lse_a),        out = sum_a e^(lse_a - lse) out_a.

Here the shards run one after the other in one process and the merge is written in torch, so
autograd differentiates it: first and second order come out exact, and the shape of the
computation shows what a multi-GPU version communicates --

- forward: each rank's ``(out_a, lse_a)`` for the queries it does not own (an all-gather of
  ``S_q x (D + 1)`` per shard, never ``S_q x S_k``);
- backward: the merge's cotangents ``(d out_a, d lse_a)`` go back to each shard, which runs its own
  backward; the queries' gradient is a sum over shards (a reduce), the keys' and values' stay
  local;
- double backward: autograd through the merge and each shard's double backward again -- the
  cotangents of the first-order gradients travel the same way, and the row statistics a shard's
  double backward needs are the merged ``(out, lse)`` and their cotangents, so nothing of size
  ``S_q x S_k`` is ever sent.

Mods see global positions: each shard's mods are the user's with ``kv_idx`` shifted by the
shard's first key position.

    python examples/context_parallel.py      # checks the sharded attention against the full one
"""

from __future__ import annotations

import torch

import flexebt


def _shifted(mod, offset: int, mask: bool):
    """``mod`` seeing global key positions inside a shard whose first key is ``offset``."""
    if mod is None:
        return None
    if mask:
        def shard_mask(b, h, q_idx, kv_idx):
            return mod(b, h, q_idx, kv_idx + offset)
        return shard_mask

    def shard_score(score, b, h, q_idx, kv_idx):
        return mod(score, b, h, q_idx, kv_idx + offset)
    return shard_score


def merge(parts: list) -> tuple:
    """Exact merge of partial softmaxes ``[(out_a, lse_a), ...]`` over disjoint key sets, written
    with torch operations so that autograd differentiates it at every order.  A row with no key in
    any shard gives out 0 and lse -inf, with zero (not NaN) gradients."""
    lses = torch.stack([lse for _, lse in parts])            # [shards, B, H, S]
    m = lses.amax(0)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()  # any constant is exact here
    total = torch.exp(lses - m_safe).sum(0)
    kept = total > 0
    total_safe = torch.where(kept, total, torch.ones_like(total))
    lse = torch.where(kept, m_safe + torch.log(total_safe), torch.full_like(total, float("-inf")))
    lse_safe = torch.where(kept, lse, torch.zeros_like(lse))
    out = sum(torch.exp(la - lse_safe).unsqueeze(-1).to(o.dtype) * o for o, la in parts)
    return out, lse


def sharded_attention(q, k, v, score_mod=None, mask_mod=None, shards: int = 2, **kwargs) -> tuple:
    """``flexebt.flex_attention(q, k, v, score_mod, block_mask from mask_mod)`` computed as
    ``shards`` key shards and merged; returns ``(out, lse)``."""
    S_q, S_k = q.shape[2], k.shape[2]
    bounds = [round(i * S_k / shards) for i in range(shards + 1)]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mm = _shifted(mask_mod, lo, mask=True)
        bm = None if mm is None else flexebt.create_block_mask(mm, None, None, S_q, hi - lo, device=q.device)
        parts.append(flexebt.flex_attention(q, k[:, :, lo:hi], v[:, :, lo:hi], score_mod=_shifted(score_mod, lo, False),
                                            block_mask=bm, return_lse=True, **kwargs))
    return merge(parts)


def _check() -> None:
    torch.manual_seed(0)
    B, H, S, D = 1, 2, 50, 16
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(H, S, S, dtype=torch.float64, requires_grad=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    full_bm = flexebt.create_block_mask(causal, None, None, S, S, device="cpu")
    want, want_lse = flexebt.flex_attention(q, k, v, score_mod=score_mod, block_mask=full_bm, return_lse=True)
    got, got_lse = sharded_attention(q, k, v, score_mod, causal, shards=3)
    print("out", (got - want).abs().max().item(), "lse", (got_lse - want_lse).abs().max().item())
    inputs = (q, k, v, bias)
    for name, (a, b) in {"first": (got, want)}.items():
        ga = torch.autograd.grad(a.square().sum(), inputs, create_graph=True)
        gb = torch.autograd.grad(b.square().sum(), inputs, create_graph=True)
        print(name, "order", max((x - y).abs().max().item() for x, y in zip(ga, gb)))
        h_a = torch.autograd.grad(sum(g.square().sum() for g in ga), inputs)
        h_b = torch.autograd.grad(sum(g.square().sum() for g in gb), inputs)
        print("second order", max((x - y).abs().max().item() for x, y in zip(h_a, h_b)))


if __name__ == "__main__":
    _check()
