"""The EBT language-model example trains (the notebooks are run by test_notebooks.py)."""

import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name.replace("/", "_"), EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ebt_language_model_trains(capsys):
    """The EBT example: loss on MCMC-refined predictions (second order through flexebt attention)
    falls in a short CPU run."""
    import sys

    sys.path.insert(0, str(EXAMPLES / "ebt"))
    first, last = load("ebt/train").main(["--steps", "40", "--context", "32"])
    assert last < first - 0.2
    assert "sample:" in capsys.readouterr().out
