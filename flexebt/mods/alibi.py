"""ALiBi (Press et al., 2021): a per-head linear bias on the distance ``kv_idx - q_idx``.

The builder is attention-gym's ``generate_alibi_bias``; flexebt only gives the closure a
readable name.  Head ``h`` of ``H`` gets slope ``2 ** (-8 (h + 1) / H)``.
"""

from attn_gym.mods import generate_alibi_bias as _attn_gym_alibi


def generate_alibi_bias(H: int):
    """ALiBi score_mod for ``H`` query heads: ``score + (kv_idx - q_idx) * 2 ** (-8 (h + 1) / H)``.

    Examples:
        >>> import flexebt
        >>> flexebt.mods.generate_alibi_bias(8).__name__
        'alibi_8heads'
    """
    from .._validation import check_builder_int

    H = check_builder_int("generate_alibi_bias", "H", H, 1)
    mod = _attn_gym_alibi(H)
    mod.__name__ = f"alibi_{H}heads"
    return mod


def main():
    """Run the small demo (``python -m flexebt.mods.alibi``)."""
    from flexebt._demo import demo_score_mod

    demo_score_mod(generate_alibi_bias(2))


if __name__ == "__main__":
    main()
