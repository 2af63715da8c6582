"""Piecewise (NLPE) helpers: the regions of ``piecewise_attention`` as mask_mods.

With ``M`` queries aligned to the end of ``N`` keys (``P = N - M``), query ``m`` and key ``n``
are ``dist = P + m - n`` apart.  ``piecewise_attention`` uses ``(q1, k1)`` where ``dist < w``
and ``(q2, k2)`` where ``dist >= w``.  These masks describe those regions, e.g. to combine
piecewise attention with other masks, or to draw it.
"""

from __future__ import annotations

import math


def _integer(dist_threshold):
    """``ceil(w)`` for a finite threshold: distances are integers, and an integer compares exactly
    (a float compared with a position tensor is first rounded to the default dtype)."""
    return math.ceil(dist_threshold) if math.isfinite(dist_threshold) else dist_threshold


def generate_piecewise_near_mask(dist_threshold, M: int, N: int):
    """mask_mod of the near region ``dist < dist_threshold`` (scored with ``q1 k1``)."""
    P, w = N - M, _integer(dist_threshold)

    def piecewise_near(b, h, q_idx, kv_idx):
        return (P + q_idx - kv_idx) < w

    piecewise_near.__name__ = f"piecewise_near_{dist_threshold}"
    return piecewise_near


def generate_piecewise_far_mask(dist_threshold, M: int, N: int):
    """mask_mod of the far region ``dist >= dist_threshold`` (scored with ``q2 k2``)."""
    P, w = N - M, _integer(dist_threshold)

    def piecewise_far(b, h, q_idx, kv_idx):
        return (P + q_idx - kv_idx) >= w

    piecewise_far.__name__ = f"piecewise_far_{dist_threshold}"
    return piecewise_far


def generate_end_aligned_causal_mask(M: int, N: int):
    """Causal mask with queries aligned to the end of the keys: keep ``kv_idx <= N - M + q_idx``.

    Examples:
        >>> import flexebt
        >>> flexebt.masks.generate_end_aligned_causal_mask(4, 6).__name__
        'end_aligned_causal_4x6'
    """
    P = N - M

    def end_aligned_causal(b, h, q_idx, kv_idx):
        return kv_idx <= P + q_idx

    end_aligned_causal.__name__ = f"end_aligned_causal_{M}x{N}"
    return end_aligned_causal


def main():
    """Run the small demo (``python -m flexebt.masks.piecewise``)."""
    from flexebt._demo import ascii_mask

    M, N, w = 6, 8, 3
    print(f"piecewise regions, M={M}, N={N}, w={w}: near (q1 k1) within the causal region")
    causal, near = generate_end_aligned_causal_mask(M, N), generate_piecewise_near_mask(w, M, N)
    print(ascii_mask(lambda b, h, q, k: causal(b, h, q, k) & near(b, h, q, k), M, N))


if __name__ == "__main__":
    main()
