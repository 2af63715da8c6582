"""The README's Python snippets run as written (in order, one namespace)."""

import pathlib
import re
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 5
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for block in blocks:
            if "table, max_distance" in block or "torch.compile(" in block:
                continue  # the variants listing names placeholders; compile is tested in test_compile.py
            exec(compile(block, "README.md", "exec"), ns)
    assert ns["out_p"].shape[-2] == ns["S_p"]
    assert ns["bias"].grad is not None and ns["bias"].grad.abs().sum() > 0
