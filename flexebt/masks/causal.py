"""Causal mask ``q_idx >= kv_idx`` (attention-gym's ``causal_mask``)."""

from attn_gym.masks import causal_mask


def generate_causal_mask():
    """The causal mask_mod ``q_idx >= kv_idx`` (attention-gym's ``causal_mask``).

    Examples:
        >>> import flexebt
        >>> flexebt.masks.generate_causal_mask().__name__
        'causal_mask'
    """
    return causal_mask


def main():
    """Run the small demo (``python -m flexebt.masks.causal``)."""
    from flexebt._demo import demo_mask

    demo_mask(causal_mask)


if __name__ == "__main__":
    main()
