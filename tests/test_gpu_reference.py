"""The reference backend on CUDA tensors agrees with the CPU float64 oracle (run: pytest -m gpu)."""

import pytest
import torch

import flexebt
from flexebt import masks, mods
from helpers import rel_err

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_flex_on_cuda(dtype, tol):
    q, k, v = (torch.randn(2, 4, 300, 64, dtype=torch.float64) for _ in range(3))
    bm_cpu = flexebt.create_block_mask(masks.causal_mask, None, None, 300, 300, device="cpu")
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, 300, 300, device="cuda")
    sm = mods.generate_alibi_bias(4)
    ref = flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm_cpu)
    out = flexebt.flex_attention(*(x.to("cuda", dtype) for x in (q, k, v)), score_mod=sm, block_mask=bm)
    assert out.device.type == "cuda" and rel_err(out.cpu(), ref) < tol


def test_ebt_second_order_on_cuda():
    x = [torch.randn(2, 2, S, 32, dtype=torch.float64) for S in (129, 129, 129, 128, 128, 128)]
    bias = torch.randn(130, 130, dtype=torch.float64)

    def run(device):
        xs = [t.to(device).requires_grad_() for t in x]
        b = bias.to(device).requires_grad_()
        bm = flexebt.create_ebt_block_mask(None, None, None, 129, 128, device=device)
        out_o, out_p = flexebt.flex_ebt_attention(*xs, score_mod=mods.generate_bias_score_mod(b), block_mask=bm)
        g = torch.autograd.grad(out_p.square().sum() + out_o.sum(), xs[3], create_graph=True)[0]
        second = torch.autograd.grad(g.square().sum(), xs + [b], allow_unused=True)
        assert second[0] is None  # q_o does not reach the gradient w.r.t. q_p
        return [t.cpu() for t in second[1:]]

    for a, b in zip(run("cuda"), run("cpu")):
        assert rel_err(a, b) < 1e-10


def test_piecewise_on_cuda():
    x = [torch.randn(1, 2, S, 64, dtype=torch.float64) for S in (200, 257, 200, 257, 257)]
    ref = flexebt.piecewise_attention(*x, dist_threshold=40, causal=True)
    out = flexebt.piecewise_attention(*(t.cuda() for t in x), dist_threshold=40, causal=True)
    assert rel_err(out.cpu(), ref) < 1e-12
