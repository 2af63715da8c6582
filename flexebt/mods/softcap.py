"""Tanh soft-capping (Gemma 2, Grok-1): ``cap * tanh(score / cap)``, from attention-gym."""

from attn_gym.mods import generate_tanh_softcap as _attn_gym_softcap


def generate_tanh_softcap(soft_cap: float, approx: bool = False):
    """Soft-cap score_mod ``soft_cap * tanh(score / soft_cap)`` (attention-gym's builder).

    ``approx=True`` asks attention-gym for its ``tanh.approx`` PTX lowering (CUDA + Inductor only).

    Examples:
        >>> import flexebt
        >>> flexebt.mods.generate_tanh_softcap(30).__name__
        'tanh_softcap_30'
    """
    return _attn_gym_softcap(soft_cap, approx=approx)


def main():
    """Run the small demo (``python -m flexebt.mods.softcap``)."""
    from flexebt._demo import demo_score_mod

    demo_score_mod(generate_tanh_softcap(2.0))


if __name__ == "__main__":
    main()
