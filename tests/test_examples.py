"""The EBT language-model example trains (the notebooks are run by test_notebooks.py)."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ebt_language_model_trains(capsys, tmp_path):
    """The EBT example: loss on MCMC-refined predictions (second order through flexebt attention)
    falls in a short CPU run; it reports the held batch's energy before and after refinement and
    saves the curves."""
    import re
    import sys

    sys.path.insert(0, str(EXAMPLES / "ebt"))
    plot = tmp_path / "curves.png"
    first, last = load("ebt/train").main(["--steps", "40", "--context", "32", "--eval-every", "20",
                                          "--plot", str(plot)])
    assert last < first - 0.2
    out = capsys.readouterr().out
    assert "sample:" in out and plot.stat().st_size > 1000
    before, after = (float(x) for x in re.search(r"first candidate (\S+), after MCMC refinement (\S+)", out).groups())
    assert after < before  # refinement descends the energy


def test_ebt_example_trains_compiled_like_eager(capsys):
    """``--compile``: the loss (MCMC steps with create_graph=True inside) compiled with
    fullgraph=True gives eager's losses (CPU: the reference backend; the kernels' compiled ops are
    tested in test_compile.py)."""
    import sys

    import torch

    sys.path.insert(0, str(EXAMPLES / "ebt"))
    train = load("ebt/train")
    args = ["--steps", "3", "--context", "16", "--dim", "32", "--layers", "1", "--batch", "4", "--plot", ""]
    eager = train.main(args)
    torch._dynamo.reset()
    try:
        compiled = train.main(args + ["--compile", "--compile-backend", "aot_eager"])
    finally:
        torch._dynamo.config.trace_autograd_ops = False
        torch._dynamo.reset()
    assert abs(compiled[0] - eager[0]) < 1e-4 and abs(compiled[1] - eager[1]) < 1e-4
    assert "sample:" in capsys.readouterr().out


@pytest.mark.interpreter
def test_ebt_step_runs_the_model_work_of_the_dense_math():
    """The EBT training step with flexebt's kernels runs exactly the model's matrix products that
    it runs with the dense reference math (whose attention is separate ops that autograd sees
    through): the energy's gradient with respect to the candidates must not back-propagate the
    observed stream through the layers above (it did when one autograd node held both streams:
    174 products against 150 at two layers)."""
    import collections
    import os
    import sys

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    sys.path.insert(0, str(EXAMPLES / "ebt"))
    from model import CharEBT

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):  # the model's linear layers
                self.count[tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))] += 1
            return func(*args, **(kwargs or {}))

    counts = {}
    for backend in ("REFERENCE", "TRITON"):
        os.environ["FLEXEBT_BACKEND"] = backend
        try:
            torch.manual_seed(0)
            model = CharEBT(16, 8, dim=32, heads=2, layers=2, mcmc_steps=2)
            tokens, targets = torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8))
            model.loss(tokens, targets).backward()  # kernels built outside the count
            with Products() as p:
                model.zero_grad()
                model.loss(tokens, targets).backward()
            counts[backend] = p.count
        finally:
            os.environ.pop("FLEXEBT_BACKEND", None)
    assert sum(counts["REFERENCE"].values()) > 100 and counts["TRITON"] == counts["REFERENCE"]
