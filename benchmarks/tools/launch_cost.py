"""Host time of one re-issued launch (GPU): the same trivial kernel with its run-time arguments
passed flat, and grouped into named tuples the way flexebt's entry kernels take their block
tables, query streams and own keys (kernels/signatures.py).  Both are re-issued through the
fast launch path (kernels/launcher.py: Triton's compiled-kernel launcher, no binding), so the
difference is what Triton's launcher pays to take the tuples apart.

    python benchmarks/tools/launch_cost.py --args 30 --groups 3
"""

import argparse
import collections
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
from flexebt.kernels.launcher import FastLaunches  # noqa: E402


def _sources(n: int, groups: int) -> tuple:
    """Source of two kernels with ``n`` run-time parameters after OUT: flat, and in ``groups``
    named-tuple parameters (each read once, so none is dropped)."""
    flat = ", ".join(f"A{i}" for i in range(n))
    per = -(-n // groups)
    grouped = ", ".join(f"G{g}" for g in range(groups))
    reads = " + ".join(f"tl.load(G{g}[0])" for g in range(groups))
    flat_reads = " + ".join(f"tl.load(A{g * per})" for g in range(groups))
    return (f"@triton.jit\ndef flat(OUT, {flat}):\n    tl.store(OUT + tl.program_id(0), {flat_reads})\n",
            f"@triton.jit\ndef grouped(OUT, {grouped}):\n    tl.store(OUT + tl.program_id(0), {reads})\n")


def _compile(src: str, name: str):
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"flexebt_launch_cost_{name}.py")
    with open(path, "w") as f:
        f.write("import triton\nimport triton.language as tl\n\n" + src)
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"flexebt_launch_cost_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, name)


def _host_us(kernel, args: tuple, n: int) -> tuple:
    """(through Triton's binding, re-issued) host microseconds per launch."""
    fast = FastLaunches(enabled=True)
    compiled = kernel[(1,)](*args)
    fast.remember(("k",), kernel, compiled, 1, args, {})
    hit = fast.lookup(("k",), kernel)
    if hit is None:
        raise RuntimeError("the fast launch path switched itself off: Triton's launcher internals differ")
    runner, tail, _ = hit
    out = []
    for launch in (lambda: kernel[(1,)](*args), lambda: runner(*args, *tail)):
        for _ in range(100):
            launch()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                launch()
            best = min(best, (time.perf_counter() - t) / n)
            torch.cuda.synchronize()
        out.append(best * 1e6)
    return tuple(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--args", type=int, default=30, help="run-time parameters after OUT (tensors and ints)")
    p.add_argument("--groups", type=int, default=3)
    p.add_argument("--n", type=int, default=2000)
    a = p.parse_args(argv)
    out = torch.zeros(1, device="cuda")
    per = -(-a.args // a.groups)
    # every third argument of a group an int (a size), the rest tensors, as in flexebt's groups
    values = [7 if (i % per) % 3 == 2 else torch.zeros(4, device="cuda") for i in range(a.args)]
    parts = [values[g * per:(g + 1) * per] for g in range(a.groups)]
    types = [collections.namedtuple(f"G{g}", [f"f{i}" for i in range(len(part))]) for g, part in enumerate(parts)]
    flat_src, grouped_src = _sources(a.args, a.groups)
    flat, grouped = _compile(flat_src, "flat"), _compile(grouped_src, "grouped")
    rows = {"flat": _host_us(flat, (out, *values), a.n),
            "grouped": _host_us(grouped, (out, *(t(*part) for t, part in zip(types, parts))), a.n)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"{a.args} run-time arguments, grouped into {a.groups} named tuples")
    for name, (bound, reissued) in rows.items():
        print(f"{name:8s} through Triton's binding {bound:7.1f} us, re-issued {reissued:6.1f} us per launch")


if __name__ == "__main__":
    main()
