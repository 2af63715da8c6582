"""The tolerance rule: a kernel passes when its relative error vs float64 is at most 2x (outputs) /
3x (gradients) the error of plain eager PyTorch math in the same dtype, and in any case under a fixed
bound: fp32 1e-5 (tf32 3e-3), bf16 3e-2, fp16 5e-3.  NaN never passes."""

import torch

from helpers import rel_err

BOUND = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
TF32_BOUND = 3e-3


def eager_attention(q, k, v, score_mod=None, keep=None, scale=None):
    """Textbook attention in the inputs' own dtype (the baseline of the tolerance rule)."""
    H = q.shape[1]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    if score_mod is not None:
        B, _, Sq, Skv = s.shape
        dev = s.device
        b = torch.arange(B, device=dev).view(B, 1, 1, 1)
        h = torch.arange(H, device=dev).view(1, H, 1, 1)
        qi = torch.arange(Sq, device=dev).view(1, 1, Sq, 1)
        ki = torch.arange(Skv, device=dev).view(1, 1, 1, Skv)
        s = score_mod(s, b, h, qi, ki).to(q.dtype)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def check(name, got, eager, ref, dtype, factor):
    """Assert one tensor meets the tolerance rule above; returns (err, eager_err) for messages."""
    err, base = rel_err(got, ref), rel_err(eager, ref)
    bound = BOUND[dtype]
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        bound = TF32_BOUND
    assert err == err and err < bound, f"{name}: error {err:.2e} over the {dtype} bound {bound:.0e}"
    assert err <= max(factor * base, 1e-6 if dtype == torch.float32 else 1e-4), \
        f"{name}: error {err:.2e} > {factor}x eager math's {base:.2e}"
    return err, base
