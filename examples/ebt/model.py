"""A small autoregressive Energy-Based Transformer (EBT) over characters, on flexebt.

The EBT recipe (Gladstone et al., 2025): the model reads the observed context and a *candidate*
next-token distribution for every position, and returns an energy per position (low = the
candidate fits the context).  Predictions are made by descending that energy: start from an
uninformed candidate, take a few gradient steps on the energy w.r.t. the candidate
(``create_graph=True``), and train with a loss on the refined candidates -- so training
back-propagates through gradients of the attention: second order.

Each layer runs EBT two-stream attention: the observed stream is an ordinary causal transformer;
predicted token i (the guess for token i + 1) sits at frame i + 1, sees observed tokens 0..i and
its own key (``flexebt.flex_ebt_attention`` with the causal frame mask).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import flexebt


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _split(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return [t.view(B, S, self.heads, -1).transpose(1, 2) for t in (q, k, v)]

    def forward(self, obs, pred, block_mask):
        q_o, k_o, v_o = self._split(self.norm1(obs))
        q_p, k_p, v_p = self._split(self.norm1(pred))
        out_o, out_p = flexebt.flex_ebt_attention(q_o, k_o, v_o, q_p, k_p, v_p, block_mask=block_mask)
        merge = lambda t: t.transpose(1, 2).reshape(obs.shape[0], -1, obs.shape[-1])  # noqa: E731
        obs = obs + self.proj(merge(out_o))
        pred = pred + self.proj(merge(out_p))
        return obs + self.mlp(self.norm2(obs)), pred + self.mlp(self.norm2(pred))


class CharEBT(nn.Module):
    def __init__(self, vocab: int, context: int, dim: int = 64, heads: int = 4, layers: int = 2,
                 mcmc_steps: int = 2, step_size: float = 10.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context + 1, dim)  # frame positions 0..context
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.energy_head = nn.Linear(dim, 1)
        # learned MCMC step size (one element, not a scalar: FSDP2 shards 1-d and larger parameters only)
        self.log_step = nn.Parameter(torch.tensor([float(step_size)]).log())
        self.init_logits = nn.Parameter(torch.zeros(vocab))  # the uninformed first candidate, learned
        self.mcmc_steps = mcmc_steps
        self.context = context
        self._masks = {}

    def block_mask(self, S: int, device):
        key = (S, str(device))
        if key not in self._masks:  # the autoregressive EBT: causal in frame coordinates
            self._masks[key] = flexebt.create_ebt_block_mask(flexebt.masks.ebt_causal_mask, None, None, S, S,
                                                             device=device)
        return self._masks[key]

    def energy(self, tokens, candidate_logits):
        """Energy per position: [B, S], for observed tokens [B, S] and candidates [B, S, vocab]."""
        B, S = tokens.shape
        frames = torch.arange(S + 1, device=tokens.device)
        obs = self.embed(tokens) + self.pos(frames[:S])
        # A candidate is a distribution over the vocabulary, embedded as its expected embedding.
        pred = candidate_logits.softmax(-1) @ self.embed.weight + self.pos(frames[1:])
        bm = self.block_mask(S, tokens.device)
        for block in self.blocks:
            obs, pred = block(obs, pred, bm)
        return self.energy_head(self.norm(pred)).squeeze(-1)

    def refine(self, tokens, create_graph: bool):
        """MCMC on the energy: candidate <- candidate - step * dE/dcandidate, a few times."""
        # every position starts from the same learned candidate; it requires grad as a function of a
        # parameter (a tensor made with requires_grad=True cannot be created inside torch.compile)
        logits = self.init_logits.expand(*tokens.shape, -1) + 0.0
        if not torch.is_grad_enabled() or not logits.requires_grad:
            logits = logits.detach().requires_grad_()
        for _ in range(self.mcmc_steps):
            e = self.energy(tokens, logits).sum()
            (g,) = torch.autograd.grad(e, logits, create_graph=create_graph)
            logits = logits - self.log_step.exp() * g
            if not create_graph:
                logits = logits.detach().requires_grad_()
        return logits

    def loss(self, tokens, targets):
        logits = self.refine(tokens, create_graph=True)  # second order through attention
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
