"""The example scripts run and show what they claim."""

import importlib.util
import pathlib
import warnings

import torch

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quickstart(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load("quickstart").main()
    out = capsys.readouterr().out
    assert float(out.split("torch flex_attention| = ")[1].split()[0]) < 1e-5


def test_ebt_attention(capsys):
    out_p = load("ebt_attention").main()
    assert torch.isfinite(out_p).all()
    text = capsys.readouterr().out
    assert float(text.split("max diff ")[1].split()[0]) < 1e-6


def test_second_order():
    exact, fd = load("second_order").main()
    assert exact < 1e-12 and fd < 1e-6


def test_ebt_language_model_trains(capsys):
    """The EBT example: loss on MCMC-refined predictions (second order through flexebt attention)
    falls in a short CPU run."""
    import sys

    sys.path.insert(0, str(EXAMPLES / "ebt"))
    first, last = load("ebt/train").main(["--steps", "40", "--context", "32"])
    assert last < first - 0.2
    assert "sample:" in capsys.readouterr().out
