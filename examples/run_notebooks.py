"""Run example notebooks top to bottom as plain Python, without Jupyter (e.g. on a GPU machine).

    python examples/run_notebooks.py                 # every examples/*.ipynb
    python examples/run_notebooks.py second_order    # the ones whose names contain an argument

Each notebook's code cells run in order in one namespace (figures go to the Agg backend); the
printed output is what the notebook would show.  The tests execute the notebooks with nbclient.
"""

import json
import os
import pathlib
import sys
import time
import types

HERE = pathlib.Path(__file__).resolve().parent


def run(path: pathlib.Path) -> float:
    import matplotlib

    matplotlib.use("Agg")
    cells = json.loads(path.read_text())["cells"]
    # a real module (not __main__): torch.compile / create_block_mask look globals up by module name
    module = types.ModuleType(f"notebook_{path.stem}")
    sys.modules[module.__name__] = module
    ns = module.__dict__
    start = time.time()
    cwd = os.getcwd()
    os.chdir(path.parent)
    try:
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                source = "".join(cell["source"])
                exec(compile(source, f"{path.name}[cell {i}]", "exec"), ns)
    finally:
        os.chdir(cwd)
    return time.time() - start


def main(argv=None):
    wanted = (sys.argv[1:] if argv is None else argv) or [""]
    for path in sorted(HERE.glob("*.ipynb")):
        if any(w in path.stem for w in wanted):
            print(f"== {path.name}", flush=True)
            print(f"== {path.name}: ok in {run(path):.1f} s", flush=True)


if __name__ == "__main__":
    main()
