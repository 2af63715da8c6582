"""The README's Python blocks: each runs as written on its own and prints what it did."""

import pathlib
import re
import warnings

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_python_block_runs_on_its_own(index, capsys):
    """Each block runs as written in a fresh namespace (its own imports) and prints what it did."""
    import torch._dynamo

    torch._dynamo.reset()
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_blocks()[index], f"README.md block {index}", "exec"), ns)
    assert capsys.readouterr().out.strip(), "the block prints nothing"
    if "bias" in ns and isinstance(ns["bias"], torch.Tensor) and ns["bias"].requires_grad:
        assert ns["bias"].grad is not None and ns["bias"].grad.abs().sum() > 0
    if "out_p" in ns and "S_p" in ns:
        assert ns["out_p"].shape[-2] == ns["S_p"]
