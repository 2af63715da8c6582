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


def _ebt_energy(S=20):
    bm = flexebt.create_ebt_block_mask(None, None, None, S, S, BLOCK_SIZE=16)
    x = [torch.randn(1, 2, S, 16) for _ in range(6)]

    def energy(q_p, backend=T):
        return flexebt.flex_ebt_attention(*x[:3], q_p, *x[4:], block_mask=bm, kernel_options=backend)[1].square().sum()

    return energy, torch.randn(1, 2, S, 16)


@pytest.mark.interpreter
def test_ebt_and_piecewise_in_a_compiled_model():
    """Their kernels run eagerly inside a compiled function (a graph break): same values."""
    energy, q = _ebt_energy()
    got = torch.compile(energy, backend="aot_eager")(q)
    assert rel_err(got, energy(q, {"BACKEND": "REFERENCE"})) < 1e-5
    x = [torch.randn(1, 2, 24, 16) for _ in range(5)]

    def pw(*a):
        return flexebt.piecewise_attention(*a, dist_threshold=5, causal=True, kernel_options=T)

    assert rel_err(torch.compile(pw, backend="aot_eager")(*x), pw(*x)) < 1e-6


@pytest.mark.interpreter
def test_ebt_second_order_under_compile_is_exact_or_refused():
    """autograd.grad(create_graph=True) inside a compiled function: exact with backend='eager'
    (the kernels' autograd Functions run eagerly), refused by torch under aot_autograd; torch.func
    inside a fullgraph compile: a clear error.  Never a silent drop."""
    energy, q = _ebt_energy()
    want = torch.func.grad(lambda t: torch.func.grad(lambda y: energy(y, {"BACKEND": "REFERENCE"}))(t)
                           .square().sum())(q)

    def step(qq):
        qq = qq.clone().requires_grad_()
        (g,) = torch.autograd.grad(energy(qq), qq, create_graph=True)
        return torch.autograd.grad(g.square().sum(), qq)[0]

    torch._dynamo.reset()
    assert rel_err(torch.compile(step, backend="eager")(q), want) < 1e-5
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.compile(step, backend="aot_eager")(q)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="under torch.func transforms"):
        torch.compile(torch.func.grad(lambda t: torch.func.grad(energy)(t).square().sum()), fullgraph=True,
                      backend="aot_eager")(q)
