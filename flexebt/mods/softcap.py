"""Tanh soft-capping (Gemma 2, Grok-1): ``cap * tanh(score / cap)``, from attention-gym."""

from attn_gym.mods import generate_tanh_softcap as _attn_gym_softcap


def generate_tanh_softcap(soft_cap: float, approx: bool = False):
    """Soft-cap score_mod ``soft_cap * tanh(score / soft_cap)`` (attention-gym's builder).

    ``soft_cap``: a finite nonzero number (``-c`` gives the same mod as ``c``).  ``approx=True``
    is accepted for attention-gym's signature and gives the same exact mod: attention-gym's
    approximation is a PTX instruction for torch's Inductor kernels, while flexebt's kernels and
    its reference compute tanh themselves, in fp32 to a few ulps.

    Examples:
        >>> import flexebt
        >>> flexebt.mods.generate_tanh_softcap(30).__name__
        'tanh_softcap_30'
    """
    import math
    import numbers

    if isinstance(soft_cap, bool) or not isinstance(soft_cap, numbers.Real) or not math.isfinite(soft_cap) \
            or soft_cap == 0:
        raise ValueError(f"generate_tanh_softcap: soft_cap must be a finite nonzero number, got {soft_cap!r}.")
    return _attn_gym_softcap(soft_cap, approx=False)


def main():
    """Run the small demo (``python -m flexebt.mods.softcap``)."""
    from flexebt._demo import demo_score_mod

    demo_score_mod(generate_tanh_softcap(2.0))


if __name__ == "__main__":
    main()
