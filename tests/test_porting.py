"""The porting guide's check (docs/porting-ebt.md): a small two-layer autoregressive EBT with rotary
embeddings at frame positions, its attention written the EBT reference code's way (one dense score
matrix per stream, the own-key diagonal swapped in) and ported to flex_ebt_attention: energies,
MCMC gradients (create_graph=True) and parameter gradients agree, in both layouts (r = 0, and
r = 1 with a time token first)."""

import pytest
import torch
from torch import nn

import flexebt
from flexebt import masks
from helpers import rel_err
from oracles import ebt_slicing_formula


def _rope(x, start):
    """Rotary embedding of [B, H, S, D] rows at positions start, start + 1, ..."""
    B, H, S, D = x.shape
    pos = torch.arange(start, start + S, dtype=x.dtype).unsqueeze(-1)
    freq = 1.0 / (100.0 ** (torch.arange(0, D, 2, dtype=x.dtype) / D))
    ang = pos * freq
    c, s = ang.cos(), ang.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)


class TinyEBT(nn.Module):
    def __init__(self, vocab=11, dim=16, heads=2, layers=2, r=0):
        super().__init__()
        self.heads, self.r = heads, r
        self.embed = nn.Embedding(vocab, dim)
        self.time = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.qkv = nn.ModuleList(nn.Linear(dim, 3 * dim, bias=False) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(layers))
        self.head = nn.Linear(dim, 1)

    def _split(self, lin, x):
        B, S, dim = x.shape
        return [t.view(B, S, self.heads, -1).transpose(1, 2) for t in lin(x).chunk(3, -1)]

    def energy(self, tokens, cand, attention):
        obs = self.embed(tokens)
        if self.r == 1:
            obs = torch.cat([self.time.expand(obs.shape[0], 1, -1), obs], 1)  # time token at frame 0
        pred = cand.softmax(-1) @ self.embed.weight
        S_o = obs.shape[1]
        for qkv, proj in zip(self.qkv, self.proj):
            q_o, k_o, v_o = self._split(qkv, obs)
            q_p, k_p, v_p = self._split(qkv, pred)
            q_o, k_o = _rope(q_o, 0), _rope(k_o, 0)  # observed token j at frame j
            q_p, k_p = _rope(q_p, self.r + 1), _rope(k_p, self.r + 1)  # candidate i at frame i + r + 1
            out_o, out_p = attention(q_o, k_o, v_o, q_p, k_p, v_p, S_o)
            merge = lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)  # noqa: E731
            obs, pred = obs + proj(merge(out_o)), pred + proj(merge(out_p))
        return self.head(pred).squeeze(-1)

    def loss_and_grads(self, tokens, targets, attention):
        cand = torch.zeros(*tokens.shape[:2], self.embed.num_embeddings, dtype=self.time.dtype, requires_grad=True)
        e = self.energy(tokens, cand, attention)
        (g,) = torch.autograd.grad(e.sum(), cand, create_graph=True)  # MCMC step: second order follows
        cand = cand - 0.5 * g
        loss = nn.functional.cross_entropy(cand.reshape(-1, cand.shape[-1]), targets.reshape(-1))
        params = list(self.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)  # (the time token is unused at r = 0)
        return e.detach(), g.detach(), loss.detach(), [torch.zeros_like(p) if x is None else x
                                                       for x, p in zip(grads, params)]


def _reference_code_attention(q_o, k_o, v_o, q_p, k_p, v_p, S_o):
    """The EBT reference code's attention: dense scores, causal additive frame mask."""
    F = S_o + 1
    frame = torch.zeros(F, F, dtype=q_o.dtype).masked_fill(~torch.ones(F, F, dtype=torch.bool).tril(), float("-inf"))
    return tuple(o.to(q_o.dtype) for o in ebt_slicing_formula(q_o, k_o, v_o, q_p, k_p, v_p, frame))


_MASKS = {}


def _ported(backend):
    def attention(q_o, k_o, v_o, q_p, k_p, v_p, S_o):
        key = (S_o, q_p.shape[2])
        if key not in _MASKS:  # built once per length pair, reused by every layer and step
            _MASKS[key] = flexebt.create_ebt_block_mask(masks.ebt_causal_mask, None, None, S_o, q_p.shape[2],
                                                        BLOCK_SIZE=16)
        return flexebt.flex_ebt_attention(q_o, k_o, v_o, q_p, k_p, v_p, block_mask=_MASKS[key],
                                          kernel_options={"BACKEND": backend})
    return attention


@pytest.mark.parametrize("backend,dtype,tol", [("REFERENCE", torch.float64, 1e-12),
                                               pytest.param("TRITON", torch.float32, 2e-5,
                                                            marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("r", [0, 1])
def test_ported_model_matches_the_reference_code(r, backend, dtype, tol):
    import copy

    torch.manual_seed(0)
    model = TinyEBT(r=r).double()
    tokens = torch.randint(0, 11, (2, 13))
    targets = torch.randint(0, 11, (2, 13))
    want = model.loss_and_grads(tokens, targets, _reference_code_attention)  # the original, float64
    got = copy.deepcopy(model).to(dtype).loss_and_grads(tokens, targets, _ported(backend))
    for a, b in zip(got[:3] + tuple(got[3]), want[:3] + tuple(want[3])):
        assert rel_err(a, b) < tol
