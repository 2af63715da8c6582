"""Prefix-LM: bidirectional over a prefix, causal after it (attention-gym's builder)."""

from attn_gym.masks import generate_prefix_lm_mask as _attn_gym_prefix_lm


def generate_prefix_lm_mask(prefix_length: int):
    """Prefix-LM mask_mod: keep ``kv_idx < prefix_length`` or ``q_idx >= kv_idx``.

    Examples:
        >>> import flexebt
        >>> flexebt.masks.generate_prefix_lm_mask(4).__name__
        'prefix_lm_causal_mask_4'
    """
    from .._validation import check_builder_int

    return _attn_gym_prefix_lm(check_builder_int("generate_prefix_lm_mask", "prefix_length", prefix_length, 0))


def main():
    """Run the small demo (``python -m flexebt.masks.prefix_lm``)."""
    from flexebt._demo import demo_mask

    demo_mask(generate_prefix_lm_mask(4))


if __name__ == "__main__":
    main()
