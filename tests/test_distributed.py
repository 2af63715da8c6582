"""EBT training step under data parallelism, on CPU (gloo, two processes): the parameter gradients
of one step -- MCMC refinement with create_graph=True, loss backward, second order through every
attention layer -- equal the single-process gradients of the same global batch.

DDP and FSDP2 run through ``examples/ebt/distributed.py`` (the example's recipe)."""

import os
import pathlib
import sys
import tempfile

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "ebt"
sys.path.insert(0, str(EXAMPLE))

from distributed import LossStep, finish_fsdp2_step, wrap_ddp, wrap_fsdp2  # noqa: E402
from model import CharEBT  # noqa: E402

GLOBAL_BATCH, WORLD = 4, 2


def _model(dtype, layers):
    torch.manual_seed(0)
    # the one-layer runs (kernels in the interpreter, the compiled loss) take one MCMC step: still second order
    return CharEBT(29, 10, dim=16, heads=2, layers=layers, mcmc_steps=2 if layers > 1 else 1).to(dtype)


def _context(layers):
    """Tokens per sequence: shorter for the one-layer runs (the kernels run in the interpreter)."""
    return 10 if layers > 1 else 6


def _batch(layers=2):
    g = torch.Generator().manual_seed(1)
    S = _context(layers)
    return (torch.randint(0, 29, (GLOBAL_BATCH, S), generator=g),
            torch.randint(0, 29, (GLOBAL_BATCH, S), generator=g))


def _single_process_grads(dtype, backend, layers=2):
    os.environ["FLEXEBT_BACKEND"] = backend
    model = _model(dtype, layers)
    LossStep(model)(*_batch(layers)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _worker(rank, init, wrapper, dtype, backend, compile_backend, layers, out, reshard_after_forward=True):
    import torch.distributed as dist

    os.environ["FLEXEBT_BACKEND"] = backend
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        model = _model(dtype, layers)
        x, y = (t[rank * GLOBAL_BATCH // WORLD:(rank + 1) * GLOBAL_BATCH // WORLD] for t in _batch(layers))
        if wrapper == "ddp":
            step = wrap_ddp(model, torch.device("cpu"))
            if compile_backend:
                torch._dynamo.config.trace_autograd_ops = True
                model.loss = torch.compile(model.loss, fullgraph=True, backend=compile_backend)
            step(x, y).backward()
            grads = {n: p.grad for n, p in model.named_parameters()}
        else:
            from torch.distributed.device_mesh import init_device_mesh

            step = wrap_fsdp2(model, init_device_mesh("cpu", (WORLD,)), reshard_after_forward)
            step(x, y).backward()
            finish_fsdp2_step(step)
            grads = {n: None if p.grad is None else p.grad.full_tensor() for n, p in model.named_parameters()}
            assert all(type(p).__name__ == "DTensor" for p in model.parameters())  # sharded again
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


def _parallel_grads(wrapper, dtype, backend, compile_backend=None, layers=2, reshard_after_forward=True):
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "grads.pt")
        mp.spawn(_worker, args=(f"file://{d}/init", wrapper, dtype, backend, compile_backend, layers, out,
                                      reshard_after_forward), nprocs=WORLD)
        return torch.load(out)


def _compare(got, want, tol):
    assert set(got) == set(want)
    # the last norm's and the energy head's biases get no gradient (they shift every candidate's energy alike)
    assert {n for n, g in want.items() if g is None} == {n for n, g in got.items() if g is None} \
        == {"norm.bias", "energy_head.bias"}
    for name, g in want.items():
        if g is not None:
            err = ((got[name] - g).norm() / g.norm()).item()
            assert err < tol, f"{name}: relative error {err:.2e}"


@pytest.fixture(autouse=True)
def _restore_backend():
    before = os.environ.get("FLEXEBT_BACKEND")
    yield
    if before is None:
        os.environ.pop("FLEXEBT_BACKEND", None)
    else:
        os.environ["FLEXEBT_BACKEND"] = before


def test_ddp_second_order_step_equals_single_process_float64():
    _compare(_parallel_grads("ddp", torch.float64, "REFERENCE"),
             _single_process_grads(torch.float64, "REFERENCE"), 1e-12)


def test_ddp_second_order_step_equals_single_process_kernels():
    """The Triton kernels (interpreter), fp32, one layer: the all-reduce's averaging rounds differently."""
    _compare(_parallel_grads("ddp", torch.float32, "TRITON", layers=1),
             _single_process_grads(torch.float32, "TRITON", layers=1), 2e-5)


def test_ddp_compiled_second_order_step_equals_single_process():
    """The loss compiled (fullgraph, trace_autograd_ops) inside DDP's forward."""
    _compare(_parallel_grads("ddp", torch.float64, "REFERENCE", "aot_eager", layers=1),
             _single_process_grads(torch.float64, "REFERENCE", layers=1), 1e-12)


def test_fsdp2_second_order_step_equals_single_process():
    """reshard_after_forward on (FSDP2's default: the step's backward gathers the parameters again);
    off gives the same gradients too (checked when the recipe was written)."""
    _compare(_parallel_grads("fsdp2", torch.float64, "REFERENCE", reshard_after_forward=True),
             _single_process_grads(torch.float64, "REFERENCE"), 1e-12)
