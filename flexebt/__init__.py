"""flexebt: attention variants written as FlexAttention mods, with fused forward, backward and
double backward -- built for Energy-Based Transformers and anything else that needs exact
second-order gradients through attention.

Public API::

    flexebt.flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None,
                           enable_gqa=False, return_lse=False, kernel_options=None, *, return_aux=None)
    flexebt.flex_ebt_attention(q_o, k_o, v_o, q_p, k_p, v_p, ...)
    flexebt.create_ebt_block_mask(mask_mod, B, H, S_obs, S_pred, device=None, BLOCK_SIZE=128)
    flexebt.piecewise_attention(q1, k1, q2, k2, v, dist_threshold, causal=False, scale=None,
                                score_mod=None, block_mask=None, kernel_options=None)
    flexebt.compat.ebt_attention(q_o, k_o, v_o, q_p, k_p, v_p, attn_mask=None, causal=False, sm_scale=None)
    flexebt.mods / flexebt.masks
"""

from torch.nn.attention.flex_attention import AuxOutput, AuxRequest, BlockMask, create_block_mask

from . import compat, masks, mods
from .api import flex_attention, flex_ebt_attention, piecewise_attention
from .blockmask import EBTBlockMask, create_ebt_block_mask

__version__ = "0.1.0"

__all__ = [
    "AuxOutput", "AuxRequest", "BlockMask", "EBTBlockMask", "compat", "create_block_mask", "create_ebt_block_mask", "flex_attention",
    "flex_ebt_attention", "masks", "mods", "piecewise_attention",
]
