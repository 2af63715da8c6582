"""EBT Triton kernels on CUDA at real sizes against the float64 reference (pytest -m gpu)."""

import pytest
import torch

import flexebt
from flexebt import masks, mods
from helpers import rel_err
from spec_tolerance import BOUND

pytestmark = pytest.mark.gpu
T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("r,mod", [(0, "none"), (1, "frame_bias"), (3, "softcap")])
def test_ebt_kernels(r, mod, dtype):
    B, H, S_p, D = 2, 4, 700, 64
    S_o = S_p + r
    F = S_o + 1
    bias = (0.5 * torch.randn(H, F, F, device="cuda")).requires_grad_()
    sm = {"none": None, "frame_bias": mods.generate_bias_score_mod(bias),
          "softcap": mods.generate_tanh_softcap(20.0)}[mod]
    bm = flexebt.create_ebt_block_mask(masks.ebt_causal_mask, None, None, S_o, S_p, device="cuda")
    x0 = [torch.randn(B, H, S, D, device="cuda") for S in (S_o, S_o, S_o, S_p, S_p, S_p)]
    cts = [torch.randn(B, H, S, D, device="cuda", dtype=torch.float64) for S in (S_o, S_p)]
    cap = [bias] if mod == "frame_bias" else []

    def run(xd, backend):
        x = [t.to(xd).requires_grad_() for t in x0]
        o = flexebt.flex_ebt_attention(*x, score_mod=sm, block_mask=bm, kernel_options=backend)
        return o, torch.autograd.grad(sum((a.double() * c).sum() for a, c in zip(o, cts)), x + cap)

    out, g = run(dtype, T)
    ref, rg = run(torch.float64, R)
    for a, b in zip(out, ref):
        assert rel_err(a, b) < BOUND[dtype]
    for a, b in zip(g, rg):
        assert rel_err(a, b) < 3 * BOUND[dtype]


def test_ebt_gqa_cuda():
    x = [torch.randn(1, h, S, 128, device="cuda", dtype=torch.bfloat16) for h, S in
         ((8, 513), (2, 513), (2, 513), (8, 512), (2, 512), (2, 512))]
    bm = flexebt.create_ebt_block_mask(None, None, None, 513, 512, device="cuda")
    out = flexebt.flex_ebt_attention(*x, block_mask=bm, enable_gqa=True, kernel_options=T)
    ref = flexebt.flex_ebt_attention(*[t.double() for t in x], block_mask=bm, enable_gqa=True, kernel_options=R)
    assert rel_err(out[0], ref[0]) < 3e-2 and rel_err(out[1], ref[1]) < 3e-2
