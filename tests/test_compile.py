"""flexebt.flex_attention inside torch.compile(fullgraph=True): no graph break, eager-equal results
for forward and backward (captured tensors included), no recompile on a second call, and a
clear error -- never a silent drop -- for double backward through the compiled region and for
torch.func transforms inside it."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import flexebt
from flexebt import masks, mods
from helpers import rel_err

T = {"BACKEND": "TRITON"}


def _model(device, S=48, H=2, D=16):
    bias = (0.3 * torch.randn(H, S, S, device=device)).requires_grad_()
    sm = mods.generate_bias_score_mod(bias)
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device=device, BLOCK_SIZE=16 if device == "cpu" else 128)

    def attend(q, k, v):
        return flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, kernel_options=T)

    x = [torch.randn(1, H, S, D, device=device, requires_grad=True) for _ in range(3)]
    return attend, bias, x


def _check(device, backend):
    attend, bias, x = _model(device)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(attend, fullgraph=True, backend=counter)
    out = compiled(*x)
    grads = torch.autograd.grad(out.square().sum(), x + [bias])
    ref = attend(*x)
    ref_grads = torch.autograd.grad(ref.square().sum(), x + [bias])
    assert rel_err(out, ref) < 1e-6
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-5
    x2 = [torch.randn_like(t).requires_grad_() for t in x]
    compiled(*x2)
    assert counter.frame_count == 1  # the second call reused the graph


@pytest.mark.interpreter
def test_fullgraph_forward_backward_cpu():
    _check("cpu", "aot_eager")


@pytest.mark.interpreter
def test_double_backward_in_compiled_region_raises():
    attend, bias, x = _model("cpu")
    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    out = compiled(*x)
    with pytest.raises(RuntimeError, match="double backward"):
        g = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        torch.autograd.grad(sum(t.square().sum() for t in g), x)


@pytest.mark.interpreter
def test_torch_func_grad_in_fullgraph_compile_raises_clearly():
    """torch.func.grad (and grad of grad) inside torch.compile(fullgraph=True): a clear error that
    names the limitation, never a silently dropped term."""
    attend, bias, x = _model("cpu")
    q, k, v = (t.detach() for t in x)

    def energy(q):
        return attend(q, k, v).square().sum()

    for fn in (torch.func.grad(energy), torch.func.grad(lambda t: torch.func.grad(energy)(t).square().sum())):
        torch._dynamo.reset()
        with pytest.raises(Exception, match="under torch.func transforms"):
            torch.compile(fn, fullgraph=True, backend="aot_eager")(q)


@pytest.mark.gpu
def test_fullgraph_inductor_gpu():
    _check("cuda", "inductor")
