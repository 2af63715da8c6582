"""Torch-only dense oracles (float64-capable); also flexebt's CPU backend.

Memory is O(S^2): these are the ground truth and the CPU path, not the fast path.  Mods follow
torch's semantics: each score_mod / mask_mod call sees one score and its scalar indices
(``core.apply_score_mod`` / ``core.eval_mask_mod`` map it over the grid with vmap).
"""

from .ebt import ebt_attention_reference
from .flex import flex_attention_reference
from .piecewise import piecewise_attention_reference

__all__ = ["ebt_attention_reference", "flex_attention_reference", "piecewise_attention_reference"]
