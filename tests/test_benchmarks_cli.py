"""The benchmark CLI on a machine without CUDA: one line that says so, a non-zero exit."""

import pathlib
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
