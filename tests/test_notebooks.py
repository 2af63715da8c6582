"""Every notebook in examples/ runs top to bottom on CPU (small sizes, the Triton interpreter), so
the notebooks cannot rot."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "ebt_attention.ipynb", "second_order.ipynb",
                                          "piecewise_and_learned_biases.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    import os

    # the kernel is a subprocess: let it import this checkout even when flexebt is not installed
    root = str(EXAMPLES.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
                            ).execute()


def test_run_notebooks_without_jupyter(capsys):
    """examples/run_notebooks.py (for machines without Jupyter) runs a notebook's cells in order."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_notebooks", EXAMPLES / "run_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["quickstart"])
    out = capsys.readouterr().out
    assert "quickstart.ipynb: ok" in out and "flexebt vs float64 reference" in out
