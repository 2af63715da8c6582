"""Run the example notebooks top to bottom.

    python examples/run_notebooks.py                 # every examples/*.ipynb, as plain Python (no Jupyter)
    python examples/run_notebooks.py second_order    # the ones whose names contain an argument
    python examples/run_notebooks.py --save          # execute in a Jupyter kernel on the CPU and write the
                                                     # outputs into the .ipynb files (what the docs site shows)

Plain mode: each notebook's code cells run in order in one namespace (figures go to the Agg backend);
the printed output is what the notebook would show.  It needs no Jupyter, e.g. on a GPU machine.

`--save` executes each notebook with nbclient exactly as tests/test_notebooks.py does (CPU only,
so the stored outputs are the small-size run that every machine reproduces) and stores the outputs,
plots included, in the notebook.  The docs site renders those stored outputs; the test executes the
notebooks again and fails when the stored outputs no longer match the code.  Run it after editing a
notebook.
"""

import json
import os
import pathlib
import sys
import time
import types

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


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


def execute(path: pathlib.Path, timeout: int = 900):
    """The notebook at `path`, executed top to bottom in a fresh Jupyter kernel on the CPU.

    The kernel imports this checkout (PYTHONPATH) and sees no GPU, so the outputs are the same on
    every machine up to round-off.  Raises nbclient's CellExecutionError when a cell fails.
    Nothing machine- or time-dependent is recorded (no timings, no Python patch version).
    """
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": "", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)   # the kernel is a subprocess and inherits this environment
    try:
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    nb.metadata.get("language_info", {}).pop("version", None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = coalesce_streams(cell.outputs)
    return nb


def coalesce_streams(outputs):
    """`outputs` with consecutive writes to the same stream joined into one output (how a print
    loop's lines are split up depends on the kernel's flush timing)."""
    import nbformat

    merged = []
    for out in outputs:
        if out.output_type == "stream" and merged and merged[-1].output_type == "stream" \
                and merged[-1].name == out.name:
            merged[-1] = nbformat.v4.new_output("stream", name=out.name, text=merged[-1].text + out.text)
        else:
            merged.append(out)
    return merged


def save(path: pathlib.Path) -> float:
    import nbformat

    start = time.time()
    nb = execute(path)
    nbformat.write(nb, path)
    return time.time() - start


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    store = "--save" in args
    wanted = [a for a in args if a != "--save"] or [""]
    for path in sorted(HERE.glob("*.ipynb")):
        if any(w in path.stem for w in wanted):
            print(f"== {path.name}", flush=True)
            seconds = save(path) if store else run(path)
            print(f"== {path.name}: {'outputs saved' if store else 'ok'} in {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
