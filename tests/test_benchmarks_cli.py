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


def _ab_tool():
    spec = importlib.util.spec_from_file_location(
        "ab_commits", pathlib.Path(__file__).parent.parent / "benchmarks" / "tools" / "ab_commits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ab_comparison_takes_each_commits_best_round_and_flags_slower_rows():
    ab = _ab_tool()

    def row(impl, S, ms):
        return dict(suite="B2", impl=impl, variant="causal", dtype="bfloat16", B="4", H="16", S=str(S), D="64",
                    mode="fwd", ms=str(ms))

    old = [row("flexebt", 1024, 1.00), row("flexebt", 1024, 0.90), row("flexebt", 4096, 2.0), row("sdpa", 1024, 5.0),
           row("flexebt", 8192, "nan")]
    new = [row("flexebt", 1024, 0.95), row("flexebt", 1024, 0.91), row("flexebt", 4096, 2.1), row("flexebt", 8192, 3)]
    table = {(t["impl"], t["S"]): t for t in ab.compare(old, new, tolerance=0.02)}
    assert set(table) == {("flexebt", "1024"), ("flexebt", "4096")}  # rows measured for both commits only
    assert table["flexebt", "1024"]["old_ms"] == 0.90 and table["flexebt", "1024"]["new_ms"] == 0.91
    assert not table["flexebt", "1024"]["slower"] and table["flexebt", "4096"]["slower"]


def test_bench_measures_the_flexebt_of_another_checkout_when_asked(tmp_path):
    (tmp_path / "flexebt").mkdir()
    (tmp_path / "flexebt" / "__init__.py").write_text("import sys\nprint('the other flexebt')\nsys.exit(3)\n")
    script = pathlib.Path(__file__).parent.parent / "benchmarks" / "bench.py"
    env = dict(__import__("os").environ, FLEXEBT_IMPORT_ROOT=str(tmp_path))
    res = subprocess.run([sys.executable, str(script), "--suite", "B2", "--out", "/nonexistent/x"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 3 and "the other flexebt" in res.stdout
