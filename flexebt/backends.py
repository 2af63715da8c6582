"""Backend selection (SPEC §1).

``kernel_options={"BACKEND": ...}`` wins over the ``FLEXEBT_BACKEND`` environment variable;
both take ``AUTO``, ``TRITON`` or ``REFERENCE``.  ``AUTO`` means the Triton kernels on CUDA and
the reference on CPU.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("AUTO", "TRITON", "REFERENCE")
ENV_VAR = "FLEXEBT_BACKEND"


def requested_backend(kernel_options: Optional[dict]) -> str:
    """The backend the caller asked for, validated and upper-cased."""
    source = "kernel_options['BACKEND']"
    value = (kernel_options or {}).get("BACKEND")
    if value is None:
        value, source = os.environ.get(ENV_VAR), f"the environment variable {ENV_VAR}"
    if value is None or value == "":
        return "AUTO"
    if not isinstance(value, str) or value.upper() not in BACKENDS:
        raise ValueError(f"Unknown backend {value!r} from {source}; expected one of {', '.join(BACKENDS)}.")
    return value.upper()


def resolve_backend(kernel_options: Optional[dict], device: torch.device, fn: str) -> str:
    """``"REFERENCE"`` or ``"TRITON"`` for a call on ``device``.

    Until the Triton kernels land (issues #3-#6), ``AUTO`` resolves to the reference everywhere
    and an explicit ``TRITON`` raises ``NotImplementedError``.
    """
    backend = requested_backend(kernel_options)
    if backend == "TRITON":
        raise NotImplementedError(
            f"{fn}: the Triton backend is not available yet in this version of flexebt; "
            f"use BACKEND='REFERENCE' or 'AUTO'."
        )
    return "REFERENCE"
