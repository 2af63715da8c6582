"""The documentation site builds with `mkdocs build --strict` (API pages from the docstrings, a page
per example notebook with its stored outputs), and every public function documents shapes, arguments,
returns, errors and an example."""

import html
import inspect
import json
import pathlib
import subprocess
import sys

import pytest

import flexebt

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("mkdocs_jupyter")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "site" / "api" / "flex_attention" / "index.html").exists()
    # the docstrings' examples render as code, not as nested quotes ('>>>' read as markdown quoting)
    for page in (tmp_path / "site" / "api").glob("*/index.html"):
        html = page.read_text()
        assert "<blockquote>" not in html, f"{page.parent.name}: an example renders as a quote"
    page = (tmp_path / "site" / "api" / "flex_attention" / "index.html").read_text()
    assert '<span class="gp">&gt;&gt;&gt; </span>' in page
    _check_notebook_pages(tmp_path / "site")
    assert not list((tmp_path / "site").rglob("*.py")), "a docs/ tool was published as a page asset"


def _check_notebook_pages(site):
    """Each examples/*.ipynb is a page in the nav that shows the notebook's stored outputs: every plot,
    every printed line, and no error (test_notebooks.py checks that those outputs are current)."""
    nav = (ROOT / "mkdocs.yml").read_text()
    notebooks = sorted((ROOT / "examples").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        assert f"examples/{path.name}" in nav, f"{path.name} is not in the nav of mkdocs.yml"
        page = (site / "examples" / path.stem / "index.html").read_text()
        outputs = [o for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
        images = sum("image/png" in o.get("data", {}) for o in outputs)
        assert page.count('src="data:image/png;base64,') == images, f"{path.name}: plots missing on its page"
        for o in outputs:
            if o["output_type"] == "stream":
                for line in "".join(o["text"]).splitlines():
                    assert html.escape(line.strip(), quote=False) in page, f"{path.name}: output {line!r} not shown"
        assert "jp-OutputArea-error" not in page and "Traceback" not in page, f"{path.name}: shows an error"


@pytest.mark.parametrize("fn", [flexebt.flex_attention, flexebt.flex_ebt_attention, flexebt.piecewise_attention,
                                flexebt.create_ebt_block_mask, flexebt.compat.ebt_attention])
def test_public_docstrings(fn):
    doc = inspect.getdoc(fn)
    for part in ("Args:", "Returns:", "Raises:", "Examples:", "[B, H"):
        assert part in doc, f"{fn.__name__}: docstring lacks {part!r}"
