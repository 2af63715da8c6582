"""Document (packed-sequence) masks: tokens attend only within their own document.

Uses attention-gym's ``generate_doc_mask_mod``; flexebt adds a readable name and a helper that
takes document lengths.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from attn_gym.masks import generate_doc_mask_mod as _attn_gym_doc_mask
from attn_gym.masks.document_mask import length_to_offsets


def generate_doc_mask_mod(mask_mod, offsets: torch.Tensor):
    """Apply ``mask_mod`` inside each document of a packed sequence.

    Args:
        mask_mod: the mask inside a document, in document-local positions (e.g. causal).
        offsets: ``[num_docs + 1]`` cumulative lengths, e.g. ``[0, 2, 6, 9]`` for lengths 2, 4, 3.

    Examples:
        >>> import torch, flexebt
        >>> offsets = torch.tensor([0, 2, 6, 9])
        >>> flexebt.masks.generate_doc_mask_mod(flexebt.masks.causal_mask, offsets).__name__
        'document_causal_mask_3docs'
    """
    if not callable(mask_mod):
        raise TypeError(f"generate_doc_mask_mod: mask_mod must be a callable, got {type(mask_mod).__name__}.")
    if not isinstance(offsets, torch.Tensor):
        offsets = torch.as_tensor(offsets)
    if (offsets.dim() != 1 or offsets.numel() < 2 or offsets.is_floating_point() or offsets.is_complex()
            or int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any())):
        raise ValueError(f"generate_doc_mask_mod: offsets must be a 1-d integer tensor of cumulative document "
                         f"lengths starting at 0 and never decreasing (e.g. [0, 2, 6, 9]; an empty document repeats an "
                         f"offset), got {offsets.tolist()!r}.")
    mod = _attn_gym_doc_mask(mask_mod, offsets)
    mod.__name__ = f"document_{getattr(mask_mod, '__name__', 'mask')}_{len(offsets) - 1}docs"
    return mod


def generate_document_mask(lengths: Sequence[int], mask_mod=None, device: Optional[torch.device] = None):
    """Document mask from a list of document lengths; ``mask_mod`` defaults to causal."""
    from .causal import causal_mask

    from .._validation import check_builder_int

    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"generate_document_mask: lengths must be a list or a 1-d integer tensor, got a tensor "
                             f"of shape {tuple(lengths.shape)} and dtype {lengths.dtype}.")
        lengths = lengths.tolist()
    lengths = list(lengths)
    if not lengths:
        raise ValueError("generate_document_mask: lengths must list at least one document, got [].")
    for n in lengths:
        check_builder_int("generate_document_mask", "each length", n, 0)  # 0: an empty document
    if mask_mod is not None and not callable(mask_mod):
        raise TypeError(f"generate_document_mask: mask_mod must be a callable or None, got {type(mask_mod).__name__}.")
    return generate_doc_mask_mod(causal_mask if mask_mod is None else mask_mod,
                                 length_to_offsets([int(n) for n in lengths], device or "cpu"))


def main():
    """Run the small demo (``python -m flexebt.masks.document``)."""
    from flexebt._demo import demo_mask

    demo_mask(generate_document_mask([3, 5, 4]))


if __name__ == "__main__":
    main()
