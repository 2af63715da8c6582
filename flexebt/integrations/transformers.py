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

import functools
import inspect
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask

from ..api import flex_attention
from ..mods.softcap import generate_tanh_softcap

__all__ = ["NAME", "attention_forward", "register"]

NAME = "flexebt"


def _broadcast_reader(t: torch.Tensor):
    """``read(b, h, q_idx, kv_idx)`` of a 4-D tensor whose size-1 dimensions broadcast (a padding
    mask ``[B, 1, 1, Skv]``, a relative-position bias ``[1, H, Sq, Skv]``), as SDPA and eager
    attention broadcast them."""
    wide = [n > 1 for n in t.shape]

    def read(b, h, q_idx, kv_idx):
        return t[b if wide[0] else 0, h if wide[1] else 0, q_idx if wide[2] else 0, kv_idx if wide[3] else 0]

    return read


def _dense_mask_mod(mask: torch.Tensor, position_bias, first):
    """The score_mod of what a model hands over besides a block mask: the soft-cap ``first`` (or
    None), a dense 4-D mask (bool, True = attend, as SDPA, or additive float; None if there is none)
    and an additive ``position_bias`` (T5's relative-position bias; None if there is none), applied
    in that order, every size-1 dimension broadcast."""
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"flexebt attention: attention_mask of dtype {mask.dtype}; pass a bool mask (True = attend) "
                        f"or an additive floating-point mask, as for SDPA.")
    mask_at = None if mask is None else _broadcast_reader(
        torch.where(mask, 0.0, float("-inf")) if mask.dtype == torch.bool else mask)
    bias_at = None if position_bias is None else _broadcast_reader(position_bias)

    def masked_score(score, b, h, q_idx, kv_idx):
        if first is not None:
            score = first(score, b, h, q_idx, kv_idx)
        if mask_at is not None:
            score = score + mask_at(b, h, q_idx, kv_idx)
        if bias_at is not None:
            score = score + bias_at(b, h, q_idx, kv_idx)
        return score

    return masked_score


# keywords some models pass that change the attention and that flexebt does not implement: refused
# rather than ignored -- a sparse selection of keys, by key (``indices``) or by key block
# (``block_indices``, MiniMax-M3's lightning indexer), and any other ``*_indices`` a model may pass
_REFUSED_KEYWORDS = {"indices": "sparse attention over selected keys",
                     "block_indices": "sparse attention over selected key blocks"}


def _refused_keyword(name: str) -> str:
    """What a keyword asks that flexebt does not implement ("" where nothing is refused)."""
    if name in _REFUSED_KEYWORDS:
        return _REFUSED_KEYWORDS[name]
    return "a selection of keys" if name.endswith("_indices") else ""


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, scaling: float | None = None, dropout: float = 0.0,
                      softcap: float | None = None, s_aux: torch.Tensor | None = None,
                      position_bias: torch.Tensor | None = None, **kwargs):
    """transformers' attention-function contract: ``query`` ``[B, Hq, Sq, D]``, ``key`` / ``value``
    ``[B, Hkv, Skv, D]``, ``attention_mask`` a BlockMask (from the mask function ``register``
    installs), a dense 4-D mask (bool, True = attend, or additive float) or None; ``softcap``,
    attention sinks ``s_aux`` (one logit per head) or ``sinks`` (``[B, Hq, Sq, 1]``, one per query
    token), an additive ``position_bias`` (T5's relative-position bias) and ``kernel_options``;
    returns ``(out [B, Sq, Hq, D], None)``."""
    if dropout:
        raise ValueError(f"flexebt attention: attention dropout ({dropout}) is not supported; call model.eval() "
                         "or set the model config's attention_dropout to 0.")
    if kwargs.get("output_attentions", False):
        warnings.warn("flexebt attention does not return attention weights (output_attentions=True): the model's "
                      "`attentions` stay empty; use attn_implementation='eager' for them.", stacklevel=2)
    for name, given in kwargs.items():
        what = _refused_keyword(name)
        if what and given is not None:
            raise NotImplementedError(
                f"flexebt attention: {type(module).__name__} passes {name}= ({what}), which flexebt does not "
                f"implement; run this model with attn_implementation='eager' or 'sdpa'.")
    block_mask, dense = None, None
    if isinstance(attention_mask, BlockMask):
        block_mask = attention_mask
    elif isinstance(attention_mask, torch.Tensor):
        dense = attention_mask[:, :, :, :key.shape[2]]
    elif attention_mask is not None:
        raise TypeError(f"flexebt attention: attention_mask must be a BlockMask, a tensor or None, got "
                        f"{type(attention_mask).__name__}.")
    score_mod = generate_tanh_softcap(softcap) if softcap is not None else None
    if dense is not None or position_bias is not None:
        score_mod = _dense_mask_mod(dense, position_bias, score_mod)
    call = dict(score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=True,
                kernel_options=kwargs.get("kernel_options"))
    per_token = kwargs.get("sinks")
    if s_aux is None and per_token is None:
        out = flex_attention(query, key, value, **call)
    else:
        # attention sinks: one more logit per row -- per head (s_aux [H]) or per query token
        # (sinks [B, H, Sq, 1]) -- that takes probability mass but adds no value.  The rows' weight
        # exp(lse) / (exp(lse) + exp(sink)) is sigmoid(lse - sink): unlike
        # exp(lse - logaddexp(lse, sink)) it has finite derivatives of every order where a row keeps
        # no key (lse = -inf, a padded query)
        out, lse = flex_attention(query, key, value, return_lse=True, **call)
        sink = None if s_aux is None else s_aux.to(lse.dtype).view(1, -1, 1)
        if per_token is not None:
            token_sink = per_token.to(lse.dtype)[..., 0]
            sink = token_sink if sink is None else torch.logaddexp(sink, token_sink)
        weight = torch.sigmoid(lse - sink)
        out = (out * weight.unsqueeze(-1).to(out.dtype)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


@functools.lru_cache(maxsize=4)
def _signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


class _QuerySliceableBlockMask(BlockMask):
    """The block mask the mask function hands to a model.  Some models select query tokens of every
    layer's mask themselves, as of a dense ``[B, H, Sq, Skv]`` mask: Gemma 4's KV-shared layers take
    ``mask[:, :, -n:, :]`` (the last ``n`` tokens, ``logits_to_keep``; all of them for ``n = 0``).
    torch's BlockMask would index query *blocks* there and drop the mask_mod; this one builds the
    mask of the selected query tokens (a contiguous range), the mask_mod shifted to their positions.
    Other indexing is torch's.  ``ndim`` is 4, as for the dense mask it stands for: models written
    for dense masks test ``attention_mask.ndim`` before handing the mask on (GPT-2, when ``generate``
    precomputes the mask of a static cache)."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index):
        if not (isinstance(index, tuple) and len(index) in (3, 4) and isinstance(index[2], slice)
                and all(isinstance(i, slice) and i == slice(None) for i in (*index[:2], *index[3:]))):
            return super().__getitem__(index)
        q_len, kv_len = self.seq_lengths
        start, stop, step = index[2].indices(q_len)
        if step != 1:
            return super().__getitem__(index)
        if (start, stop) == (0, q_len):
            return self
        from torch.nn.attention.flex_attention import create_block_mask

        inner, n = self.mask_mod, max(stop - start, 0)

        def selected_queries(b, h, q_idx, kv_idx):
            return inner(b, h, q_idx + start, kv_idx)

        B, H = self.kv_num_blocks.shape[:2]
        sliced = create_block_mask(selected_queries, B, H, n, kv_len, device=self.kv_num_blocks.device,
                                   BLOCK_SIZE=self.BLOCK_SIZE)
        sliced.__class__ = _QuerySliceableBlockMask
        return sliced


def _model_takes_block_masks(config) -> bool:
    """Whether the model of ``config`` declares support for flex attention's block masks
    (``_supports_flex_attn``).  A model that does not works on its mask as a tensor -- Falcon adds
    its ALiBi bias to it, GPT-2 reads ``mask.ndim`` -- so it gets a dense one; an unknown config
    (no model class registered for it) gets the block mask."""
    if config is None:
        return True
    try:
        from transformers import AutoModel

        model_class = AutoModel._model_mapping[type(config)]
    except Exception:  # noqa: BLE001 - configs of sub-models and custom models have no entry
        return True
    return bool(getattr(model_class, "_supports_flex_attn", True))


def _mask_of_offsets_as_they_are(*args, **kwargs):
    """transformers' BlockMask builder, with tensor arguments (the cache offsets) copied when the
    mask is made.  A static KV cache hands over its live length tensor as the offset and bumps it in
    place when a layer writes its keys, before that layer's attention; the mask_mod, read at call
    time, would then let every query see the next, still empty slot of the cache.  For a model that
    does not take block masks (``_model_takes_block_masks``): the dense boolean mask SDPA gets,
    always materialized, which flexebt's attention takes exactly as well."""
    from transformers.masking_utils import flex_attention_mask, sdpa_mask

    if not _model_takes_block_masks(kwargs.get("config")):
        return sdpa_mask(*args, **{**kwargs, "allow_is_causal_skip": False, "allow_is_bidirectional_skip": False})
    bound = _signature(flex_attention_mask).bind_partial(*args, **kwargs)
    for name in ("q_offset", "kv_offset"):
        if isinstance(bound.arguments.get(name), torch.Tensor):
            bound.arguments[name] = bound.arguments[name].clone()
    mask = flex_attention_mask(*bound.args, **bound.kwargs)
    if type(mask) is BlockMask:
        mask.__class__ = _QuerySliceableBlockMask
    return mask


def register(name: str = NAME) -> str:
    """Register flexebt's attention and its mask function with transformers under ``name``; returns
    ``name`` (pass it as ``attn_implementation=``, or to ``model.set_attn_implementation``)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise ImportError("flexebt.integrations.transformers needs a transformers version with AttentionInterface and "
                          f"AttentionMaskInterface: {e}") from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, _mask_of_offsets_as_they_are)
    return name
