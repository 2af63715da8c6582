"""mask_mod builders: ``generate_<name>(...)`` returns a named ``mask_mod(b, h, q_idx, kv_idx)``.

All are plain PyTorch, so they also work with torch's own ``flex_attention``.  Causal, sliding
window, prefix-LM and document masks come from attention-gym.
Run ``python -m flexebt.masks.<module>`` for a small demo.
"""

from .causal import causal_mask, generate_causal_mask
from .document import generate_doc_mask_mod, generate_document_mask
from .ebt import ebt_causal_mask, generate_ebt_causal_mask, generate_frame_mask
from .piecewise import generate_end_aligned_causal_mask, generate_piecewise_far_mask, generate_piecewise_near_mask
from .prefix_lm import generate_prefix_lm_mask
from .sliding_window import generate_sliding_window

__all__ = [
    "causal_mask", "ebt_causal_mask", "generate_causal_mask", "generate_doc_mask_mod", "generate_document_mask",
    "generate_ebt_causal_mask", "generate_end_aligned_causal_mask", "generate_frame_mask",
    "generate_piecewise_far_mask", "generate_piecewise_near_mask", "generate_prefix_lm_mask",
    "generate_sliding_window",
]
