"""Quickstart: write a score_mod and a mask_mod, look at the mask, compare with torch.

    python examples/quickstart.py
"""

import warnings

import torch
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import flexebt
from flexebt._demo import ascii_mask


def main(S: int = 24, H: int = 2, D: int = 32):
    # A mask_mod: causal, and at most 8 tokens back.
    def local_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 8)

    # A score_mod that captures a learned per-head scalar (gradients reach it).
    temperature = torch.ones(H, requires_grad=True)

    def tempered(score, b, h, q_idx, kv_idx):
        return score * temperature[h]

    print("mask (# = attend):")
    print(ascii_mask(local_causal, S, S))

    q, k, v = (torch.randn(1, H, S, D, requires_grad=True) for _ in range(3))
    block_mask = flexebt.create_block_mask(local_causal, None, None, S, S, device="cpu", BLOCK_SIZE=8)
    out = flexebt.flex_attention(q, k, v, score_mod=tempered, block_mask=block_mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch's flex_attention has no CPU backward, so it only gets detached inputs here.
        ref = torch_flex_attention(q.detach(), k.detach(), v.detach(), score_mod=tempered, block_mask=block_mask)
    print(f"max |flexebt - torch flex_attention| = {(out - ref).abs().max().item():.2e}")

    # What torch cannot do on CPU, or at all: backward here, and a gradient of a gradient.
    (g_q,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    g_q.square().sum().backward()
    print(f"second-order gradient reached the captured temperature: {temperature.grad.tolist()}")
    return out


if __name__ == "__main__":
    main()
