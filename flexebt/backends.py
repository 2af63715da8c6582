"""Backend selection.

``kernel_options={"BACKEND": ...}`` wins over the ``FLEXEBT_BACKEND`` environment variable;
both take ``AUTO``, ``TRITON`` or ``REFERENCE`` (and torch's ``FLASH`` / ``TRITON_DECODE``, which
mean ``TRITON``).  ``AUTO`` means the Triton kernels on CUDA and
the reference on CPU.  ``TRITON`` on CPU tensors runs the kernels in Triton's interpreter, which
must be switched on with ``TRITON_INTERPRET=1`` before the first kernel is built.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch.autograd import forward_ad as _forward_ad

BACKENDS = ("AUTO", "TRITON", "REFERENCE")
# torch flex_attention's names for its fused kernels (FlashAttention-style CuTe kernels, the decoding
# kernel): code written for torch asks for fused kernels by them, which here are flexebt's
TORCH_BACKENDS = {"FLASH": "TRITON", "TRITON_DECODE": "TRITON"}
ENV_VAR = "FLEXEBT_BACKEND"
MAX_HEAD_DIM = 256
# the most elements one head (one [S, D] matrix of q, k, v or the output) may hold on the kernels
MAX_HEAD_ELEMENTS = 2 ** 31 - 1


def requested_backend(kernel_options: Optional[dict]) -> str:
    """The backend the caller asked for, validated and upper-cased."""
    source = "kernel_options['BACKEND']"
    value = (kernel_options or {}).get("BACKEND")
    if value is None:
        value, source = os.environ.get(ENV_VAR), f"the environment variable {ENV_VAR}"
    if value is None or value == "":
        return "AUTO"
    if isinstance(value, str) and value.upper() in TORCH_BACKENDS:
        return TORCH_BACKENDS[value.upper()]
    if not isinstance(value, str) or value.upper() not in BACKENDS:
        raise ValueError(f"Unknown backend {value!r} from {source}; expected one of {', '.join(BACKENDS)}.")
    return value.upper()


def _find_triton() -> bool:
    # find_spec, not import: importing triton fixes its interpreter mode for the process.
    import importlib.util

    return importlib.util.find_spec("triton") is not None


_TRITON = _find_triton()  # once, at import: a plain global that torch.compile reads as a constant


def _triton_available() -> bool:
    return _TRITON


def resolve_backend(kernel_options: Optional[dict], device: torch.device, fn: str,
                    dtype: Optional[torch.dtype] = None, head_dim: int = 0, seq_len: int = 0) -> str:
    """``"REFERENCE"`` or ``"TRITON"`` for a call on ``device``: ``AUTO`` takes the kernels on CUDA
    for the dtypes and head dims they cover, the reference otherwise; ``TRITON`` says why it
    cannot run where it cannot.  ``seq_len``: the longest sequence of the call's tensors (with
    ``head_dim``, the largest head of any of them)."""
    backend = requested_backend(kernel_options)
    kernel_ok = dtype != torch.float64 and head_dim <= MAX_HEAD_DIM
    if backend == "AUTO":
        backend = "TRITON" if (device.type == "cuda" and kernel_ok and _triton_available()) else "REFERENCE"
    if backend == "REFERENCE":
        return "REFERENCE"
    if seq_len * head_dim > MAX_HEAD_ELEMENTS:
        # (the head offset is 64-bit; a row's offset inside one head is a 32-bit row * width)
        raise ValueError(
            f"{fn}: one head of the inputs holds {seq_len} rows of {head_dim} = {seq_len * head_dim} elements; the "
            f"Triton kernels address the rows inside a head with 32-bit offsets, up to {MAX_HEAD_ELEMENTS} "
            f"elements. Attention is independent per query: process the queries in chunks of fewer than "
            f"{MAX_HEAD_ELEMENTS // max(head_dim, 1) + 1} rows; split longer keys into chunks and merge the chunks' "
            f"outputs with their lse (return_lse=True).")
    if dtype == torch.float64:
        raise ValueError(f"{fn}: the Triton kernels take float16, bfloat16 or float32; float64 runs on "
                         f"BACKEND='REFERENCE' (or 'AUTO').")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{fn}: the Triton kernels support head dims up to {MAX_HEAD_DIM}, got {head_dim}; "
                         f"use BACKEND='REFERENCE' (or 'AUTO').")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError(
            f"{fn}: BACKEND='TRITON' on CPU tensors runs the kernels in Triton's interpreter; set the environment "
            f"variable TRITON_INTERPRET=1 before triton is first imported (or move the tensors to CUDA).")
    if not _triton_available():
        raise RuntimeError(f"{fn}: BACKEND='TRITON' needs the triton package (pip install triton).")
    return "TRITON"



def _requires_grad_underneath(tensors) -> bool:
    """Whether a tensor wrapped by torch.func transforms is, at the bottom, part of an autograd graph."""
    from torch._C import _functorch

    for t in tensors:
        while _functorch.is_functorch_wrapped_tensor(t):
            t = _functorch.get_unwrapped(t)
        if t.requires_grad:
            return True
    return False


def composition_needs_reference(fn: str, tensors, captured=lambda: ()) -> bool:
    """True (with a one-time warning) when the active torch.func transforms ask for something the
    kernels' autograd Functions do not provide, so the call must run the dense reference instead:

    * ``vmap`` (``jacrev``, ``jacfwd``, ``hessian`` batch their products with it): the Functions
      have no batching rule;
    * forward mode over or under reverse mode (``jvp(grad(f))``, ``hessian``; ``jvp`` or
      ``torch.autograd.forward_ad`` inside an autograd graph): the kernels' JVP covers the
      forward outputs, not the backward's.

    * a mod that captures a tensor of the transform (``grad`` with respect to a learned bias, a
      ``functional_call`` of a model's parameters, ``vmap`` over a batch of biases, any tensor made
      inside the transformed function): the kernels take captured tensors by identity, not
      through functorch's wrappers;
    * three or more nested ``grad``: the fused double backward differentiates once more only
      through autograd (``autograd.grad``), not inside a functorch transform.

    Plain ``grad``, ``grad(grad)``, ``jvp`` and ``autograd.grad(create_graph=True)`` stay on the
    kernels.  The reference gives the same values with O(S^2) memory (small inputs).  ``captured``:
    a function giving the tensors the call's mods capture (asked only under a transform)."""
    if _in_dual_level() and torch.is_grad_enabled() and any(t.requires_grad and _has_forward_tangent(t)
                                                            for t in tensors):
        reason = "forward-mode AD (torch.autograd.forward_ad) inside an autograd graph"
        return _warn_once(fn, reason)
    if not torch._C._are_functorch_transforms_active():
        return False
    if any(_is_wrapped(t) for t in captured()):
        return _warn_once(fn, "a mod capturing a tensor of a torch.func transform (made or differentiated inside it)")
    if not any(_is_wrapped(t) for t in tensors):  # no transform reaches this call's inputs
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    levels = [i.key() for i in retrieve_all_functorch_interpreters()]
    kinds = set(levels)
    reason = None
    if levels.count(TransformType.Grad) >= 3:
        reason = "three or more nested torch.func.grad"
    elif TransformType.Vmap in kinds:
        reason = "torch.func.vmap (also used by jacrev / jacfwd / hessian)"
    elif TransformType.Jvp in kinds and (TransformType.Grad in kinds or
                                          (torch.is_grad_enabled() and _requires_grad_underneath(tensors))):
        reason = "forward-mode AD combined with reverse mode (e.g. jvp(grad(f)), hessian)"
    if reason is None:
        return False
    return _warn_once(fn, reason)


def _warn_once(fn: str, reason: str) -> bool:
    # Python's default warning filter shows this once per calling line
    warnings.warn(f"{fn}: {reason} is not fused in the Triton kernels yet; such calls run the dense "
                  f"reference implementation (same values, O(S^2) memory).", stacklevel=5)
    return True


def _in_dual_level() -> bool:
    """Inside torch.autograd.forward_ad.dual_level() (a cheap check before unpacking tensors)."""
    return _forward_ad._current_level >= 0


def _has_forward_tangent(t) -> bool:
    from torch.autograd import forward_ad

    return forward_ad.unpack_dual(t).tangent is not None


def _is_wrapped(t) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(t)
