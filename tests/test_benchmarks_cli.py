"""The benchmark CLI on a machine without CUDA: one line that says so, a non-zero exit; the index of
the result files lists every file, each in its device-and-day folder."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_bench_without_cuda_says_so_in_one_line():
    script = pathlib.Path(__file__).parent.parent / "benchmarks" / "bench.py"
    res = subprocess.run([sys.executable, str(script), "--suite", "B2", "--out", "/nonexistent/x"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no CUDA device" in lines[0]
    assert "Traceback" not in res.stderr + res.stdout


def test_every_bench_flag_has_help_text():
    bench_dir = pathlib.Path(__file__).parent.parent / "benchmarks"
    sys.path.insert(0, str(bench_dir))
    try:
        spec = importlib.util.spec_from_file_location("bench_cli", bench_dir / "bench.py")
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(bench_dir))
    actions = [a for a in bench.build_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) >= 15
    assert [a.option_strings[0] for a in actions if not (a.help or "").strip()] == []


RESULTS = pathlib.Path(__file__).parent.parent / "benchmarks" / "results"


def _index_tool():
    path = RESULTS.parent / "tools" / "index_results.py"
    spec = importlib.util.spec_from_file_location("index_results", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_index_links_every_result_file():
    """benchmarks/results/README.md links each file under results/ (and nothing that is not there)."""
    index = (RESULTS / "README.md").read_text()
    linked = {target for target in re.findall(r"\]\(([^)\s]+)\)", index) if not target.startswith("../")}
    files = {p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*")
             if p.is_file() and p != RESULTS / "README.md"}
    assert files, "no result files found"
    assert not files - linked, f"result files missing from the index: {sorted(files - linked)}"
    assert not linked - files, f"the index links files that do not exist: {sorted(linked - files)}"


def test_results_are_in_device_and_date_folders():
    """Every result file lies in <device>_<YYYY-MM-DD>/ (or invalid/), matching its rows' device and day."""
    assert _index_tool().misplaced() == []


def test_results_index_is_current():
    """The index is what tools/index_results.py writes today (run it after adding or moving a file)."""
    assert (RESULTS / "README.md").read_text() == _index_tool().render()
