"""flexebt as an attention implementation of Hugging Face transformers.

    import flexebt.integrations.transformers as flexebt_hf

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=flexebt_hf.register())

``register()`` adds two entries under one name: the attention function (``AttentionInterface``)
and the mask function that goes with it (``AttentionMaskInterface``: transformers' BlockMask
builder, which folds the causal structure, padding, sliding windows and a KV cache's offsets into
one block mask).  Registering only the attention function would leave the model without a mask
(transformers passes ``attention_mask=None`` to an implementation it has no mask function for):
every token would see the future.  Then every attention layer of the model runs
``flexebt.flex_attention``: exact first- and second-order gradients (``create_graph=True``),
grouped-query attention, soft-capping, attention sinks, ``generate`` with a KV cache, on CPU
(reference backend) and on CUDA (fused kernels).

Needs a transformers version with ``AttentionInterface`` and ``AttentionMaskInterface``.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..api import flex_attention
from ..mods.softcap import generate_tanh_softcap

__all__ = ["NAME", "attention_forward", "register"]

NAME = "flexebt"


def _dense_mask_mod(mask: torch.Tensor, first):
    """A dense mask [B or 1, H or 1, Sq, Skv] that a model hands over (a user's 4-D mask): bool
    (True = attend, as SDPA) or additive float, added after the score_mod ``first`` (the soft-cap,
    or None); size-1 batch and head dimensions broadcast."""
    bias = torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask
    per_batch, per_head = bias.shape[0] > 1, bias.shape[1] > 1

    def masked_score(score, b, h, q_idx, kv_idx):
        if first is not None:
            score = first(score, b, h, q_idx, kv_idx)
        return score + bias[b if per_batch else 0, h if per_head else 0, q_idx, kv_idx]

    return masked_score


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, scaling: float | None = None, dropout: float = 0.0,
                      softcap: float | None = None, s_aux: torch.Tensor | None = None, **kwargs):
    """transformers' attention-function contract: ``query`` ``[B, Hq, Sq, D]``, ``key`` / ``value``
    ``[B, Hkv, Skv, D]``, ``attention_mask`` a BlockMask (from the mask function ``register``
    installs), a dense 4-D mask (bool, True = attend, or additive float) or None; returns
    ``(out [B, Sq, Hq, D], None)``."""
    if dropout:
        raise ValueError(f"flexebt attention: attention dropout ({dropout}) is not supported; call model.eval() "
                         "or set the model config's attention_dropout to 0.")
    block_mask, score_mod = None, generate_tanh_softcap(softcap) if softcap is not None else None
    if isinstance(attention_mask, BlockMask):
        block_mask = attention_mask
    elif isinstance(attention_mask, torch.Tensor):
        score_mod = _dense_mask_mod(attention_mask[:, :, :, :key.shape[2]], score_mod)
    elif attention_mask is not None:
        raise TypeError(f"flexebt attention: attention_mask must be a BlockMask, a tensor or None, got "
                        f"{type(attention_mask).__name__}.")
    if s_aux is None:
        out = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                             enable_gqa=True)
    else:
        # attention sinks: one more logit per head that takes probability mass but adds no value;
        # renormalise through the log-sum-exp (differentiable at every order)
        out, lse = flex_attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                                  enable_gqa=True, return_lse=True)
        sink = s_aux.to(lse.dtype).view(1, -1, 1).expand_as(lse)
        total = torch.logaddexp(lse, sink)
        out = (out * torch.exp(lse - total).unsqueeze(-1).to(out.dtype)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Register flexebt's attention and its mask function with transformers under ``name``; returns
    ``name`` (pass it as ``attn_implementation=``, or to ``model.set_attn_implementation``)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise ImportError("flexebt.integrations.transformers needs a transformers version with AttentionInterface and "
                          f"AttentionMaskInterface: {e}") from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flex_attention_mask)
    return name
