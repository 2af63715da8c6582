"""The documentation site builds with `mkdocs build --strict` (API pages from the docstrings),
and every public function documents shapes, arguments, returns, errors and an example."""

import inspect
import pathlib
import subprocess
import sys

import pytest

import flexebt

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "site" / "api" / "flex_attention" / "index.html").exists()
    # the docstrings' examples render as code, not as nested quotes ('>>>' read as markdown quoting)
    for page in (tmp_path / "site" / "api").glob("*/index.html"):
        html = page.read_text()
        assert "<blockquote>" not in html, f"{page.parent.name}: an example renders as a quote"
    html = (tmp_path / "site" / "api" / "flex_attention" / "index.html").read_text()
    assert '<span class="gp">&gt;&gt;&gt; </span>' in html


@pytest.mark.parametrize("fn", [flexebt.flex_attention, flexebt.flex_ebt_attention, flexebt.piecewise_attention,
                                flexebt.create_ebt_block_mask, flexebt.compat.ebt_attention])
def test_public_docstrings(fn):
    doc = inspect.getdoc(fn)
    for part in ("Args:", "Returns:", "Raises:", "Examples:", "[B, H"):
        assert part in doc, f"{fn.__name__}: docstring lacks {part!r}"
