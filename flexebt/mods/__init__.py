"""score_mod builders: ``generate_<name>(...)`` returns a named ``score_mod(score, b, h, q_idx, kv_idx)``.

All are plain PyTorch, so they also work with torch's own ``flex_attention``.  Where
attention-gym has the variant (ALiBi, soft-cap) flexebt uses its builder.
Run ``python -m flexebt.mods.<module>`` for a small demo.
"""

from .alibi import generate_alibi_bias
from .bias import generate_bias_score_mod
from .relative_bias import generate_relative_position_bias
from .softcap import generate_tanh_softcap

__all__ = ["generate_alibi_bias", "generate_bias_score_mod", "generate_relative_position_bias",
           "generate_tanh_softcap"]
