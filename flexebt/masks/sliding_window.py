"""Causal sliding window (attention-gym's ``generate_sliding_window``)."""

from attn_gym.masks import generate_sliding_window as _attn_gym_sliding_window


def generate_sliding_window(window_size: int):
    """Causal sliding-window mask_mod: keep ``0 <= q_idx - kv_idx <= window_size``.

    Each query sees itself and the ``window_size`` keys before it (attention-gym's convention).

    Examples:
        >>> import flexebt
        >>> flexebt.masks.generate_sliding_window(3).__name__
        'sliding_window_3'
    """
    from .._validation import check_builder_int

    return _attn_gym_sliding_window(check_builder_int("generate_sliding_window", "window_size", window_size, 0))


def main():
    """Run the small demo (``python -m flexebt.masks.sliding_window``)."""
    from flexebt._demo import demo_mask

    demo_mask(generate_sliding_window(3))


if __name__ == "__main__":
    main()
