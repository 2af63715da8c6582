"""Every notebook in examples/ runs top to bottom on CPU (small sizes, the Triton interpreter), so
the notebooks cannot rot; and the outputs stored in them (what the docs site shows) are the ones the
code produces now."""

import base64
import importlib.util
import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
SAVE = "python examples/run_notebooks.py --save"


def _run_notebooks():
    spec = importlib.util.spec_from_file_location("run_notebooks", EXAMPLES / "run_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# a float as the notebooks print it (1.03e-07, 0.0746): its digits depend on the CPU, nothing else does
_FLOAT = re.compile(r"\d+\.\d+(?:e[+-]?\d+)?|\d+e[+-]?\d+")


def _png_size(b64: str) -> tuple[int, int]:
    png = base64.b64decode(b64)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _shown(output) -> list:
    """What an output shows, up to the digits of printed floats and the pixels of a plot."""
    if output.output_type == "stream":
        return [output.name, _FLOAT.sub("<float>", output.text)]
    if output.output_type == "error":
        return ["error", output.ename, output.evalue]
    data = output.get("data", {})
    return [output.output_type, sorted(data), _FLOAT.sub("<float>", data.get("text/plain", "")),
            _png_size(data["image/png"]) if "image/png" in data else None]


def stale_outputs(stored, fresh) -> list[str]:
    """Why the outputs stored in a notebook are not those of a fresh top-to-bottom run (empty if they are)."""
    problems = []
    code = [c for c in stored.cells if c.cell_type == "code"]
    if [c.source for c in stored.cells] != [c.source for c in fresh.cells]:
        return ["the cells differ"]
    if [c.execution_count for c in code] != list(range(1, len(code) + 1)):
        problems.append(f"not one top-to-bottom run: execution counts {[c.execution_count for c in code]}")
    fresh_code = [c for c in fresh.cells if c.cell_type == "code"]
    for i, (old, new) in enumerate(zip(code, fresh_code)):
        first_line = old.source.splitlines()[0] if old.source else ""
        for out in old.outputs:
            if out.output_type == "error" or (out.output_type == "stream" and out.name == "stderr"):
                problems.append(f"code cell {i} ({first_line!r}) stores an error or stderr output")
        # stderr (library warnings) depends on the installed versions; everything else must match
        want = [_shown(o) for o in new.outputs if not (o.output_type == "stream" and o.name == "stderr")]
        have = [_shown(o) for o in old.outputs if not (o.output_type == "stream" and o.name == "stderr")]
        if want != have:
            problems.append(f"code cell {i} ({first_line!r}): stored {have!r}\n    but a fresh run shows {want!r}")
    return problems


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "ebt_attention.ipynb", "second_order.ipynb",
                                          "piecewise_and_learned_biases.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_stored_outputs_are_current(path):
    """Each notebook executes without error in a Jupyter kernel, and its stored outputs (prints and plots)
    are those of that run: same outputs cell by cell, a plot where the code draws one, no error."""
    stored = nbformat.read(path, as_version=4)
    fresh = _run_notebooks().execute(path)   # a failing cell raises nbclient's CellExecutionError
    problems = stale_outputs(stored, fresh)
    assert not problems, (f"{path.name}: the stored outputs are stale; run `{SAVE} {path.stem}` and commit.\n"
                          + "\n".join(problems))
    for cell in fresh.cells:   # the kernel renders figures (a headless backend would leave none to compare)
        if cell.cell_type == "code" and "plt.show()" in cell.source:
            images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert len(images) == cell.source.count("plt.show()"), f"{path.name}: a plot is missing"


def test_stale_outputs_are_caught():
    """The check above fails when the code changed but its stored outputs did not, or when outputs are missing."""
    path = EXAMPLES / "quickstart.ipynb"
    stored = nbformat.read(path, as_version=4)
    assert stale_outputs(stored, stored) == []
    # a print that now says something else, a plot that went missing, a cleared notebook, an error
    changed = nbformat.read(path, as_version=4)
    cell = next(c for c in changed.cells if c.cell_type == "code" and c.outputs and c.outputs[0].output_type == "stream")
    cell.outputs[0].text = cell.outputs[0].text.replace("device", "dev")
    assert stale_outputs(stored, changed)
    no_plot = nbformat.read(path, as_version=4)
    for c in no_plot.cells:
        if c.cell_type == "code":
            c.outputs = [o for o in c.outputs if "image/png" not in o.get("data", {})]
    assert stale_outputs(no_plot, stored)
    cleared = nbformat.read(path, as_version=4)
    for c in cleared.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    assert stale_outputs(cleared, stored)
    failed = nbformat.read(path, as_version=4)
    code = [c for c in failed.cells if c.cell_type == "code"]
    code[-1].outputs = [nbformat.v4.new_output("error", ename="RuntimeError", evalue="boom", traceback=[])]
    assert stale_outputs(failed, stored)
    # the digits of a printed float may differ between CPUs
    digits = nbformat.read(path, as_version=4)
    for c in digits.cells:
        for o in c.get("outputs", []):
            if o.output_type == "stream":
                o.text = _FLOAT.sub("9.99e-09", o.text)
    assert stale_outputs(digits, stored) == []


def test_run_notebooks_without_jupyter(capsys):
    """examples/run_notebooks.py (for machines without Jupyter) runs a notebook's cells in order."""
    _run_notebooks().main(["quickstart"])
    out = capsys.readouterr().out
    assert "quickstart.ipynb: ok" in out and "flexebt vs float64 reference" in out
