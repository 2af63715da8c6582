"""The context-parallel prototype (examples/context_parallel.py): attention computed as key shards
and merged exactly through the log-sum-exps equals the full attention -- outputs, lse, first and
second order, captured-bias gradients included; rows that a shard does not see at all merge
without NaN."""

import pathlib
import sys

import pytest
import torch

import flexebt

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
from context_parallel import sharded_attention  # noqa: E402

from helpers import rel_err  # noqa: E402


def _case(dtype, S=37, D=16):
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 2, S, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
    bias = (0.5 * torch.randn(2, S, S, generator=g, dtype=dtype)).requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx] - 0.05 * (q_idx - kv_idx)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return (q, k, v, bias), score_mod, causal


def _orders(out, lse, inputs):
    first = torch.autograd.grad(out.square().sum() + lse.exp().sum() * 1e-3, inputs, create_graph=True)
    second = torch.autograd.grad(sum(f.square().sum() for f in first), inputs)
    return [out, lse, *first, *second]


@pytest.mark.parametrize("shards", [2, 3])
def test_key_shards_merge_to_the_full_attention_float64(shards):
    inputs, sm, mm = _case(torch.float64)
    S = inputs[0].shape[2]
    full = flexebt.flex_attention(*inputs[:3], score_mod=sm, block_mask=flexebt.create_block_mask(
        mm, None, None, S, S, device="cpu"), return_lse=True)
    got = sharded_attention(*inputs[:3], sm, mm, shards=shards)
    for a, b in zip(_orders(*got, inputs), _orders(*full, inputs)):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 1e-12


def test_key_shards_on_the_kernels():
    T = {"BACKEND": "TRITON"}
    inputs, sm, mm = _case(torch.float32, S=17)
    S = inputs[0].shape[2]
    full = flexebt.flex_attention(*inputs[:3], score_mod=sm, block_mask=flexebt.create_block_mask(
        mm, None, None, S, S, device="cpu"), return_lse=True, kernel_options=T)
    got = sharded_attention(*inputs[:3], sm, mm, shards=2, kernel_options=T)
    for a, b in zip(_orders(*got, inputs), _orders(*full, inputs)):
        assert torch.isfinite(a).all()
        assert rel_err(a, b) < 2e-5
