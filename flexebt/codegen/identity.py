"""Which objects a mod depends on: the tensors it captures and a fingerprint of everything else.

The kernel cache keys generated code on ``fingerprint(mod)``; each call finds the mod's current
captured tensors with ``captured_tensors(mod)`` (and ``resolve`` follows the recorded access steps
inside ``torch.compile``).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Callable

import torch


@dataclasses.dataclass
class Buffer:
    """A tensor the mod reads: its slot in the kernel's argument list."""

    tensor: torch.Tensor
    path: str  # where it was found, e.g. "closure[0]" or "global:bias"
    steps: tuple = ()  # the same as access steps: ("cell", i), ("item", j), ("global", name)


def _walk_tensors(fn: Callable, prefix: str, out: list[Buffer], seen: set, steps: tuple = ()) -> None:
    """Tensors reachable from ``fn``: closure cells, nested functions, named globals."""
    if id(fn) in seen:
        return
    seen.add(id(fn))
    code = getattr(fn, "__code__", None)
    for i, cell in enumerate(getattr(fn, "__closure__", None) or ()):
        try:
            val = cell.cell_contents
        except ValueError:  # empty cell
            continue
        _visit(val, f"{prefix}closure[{i}]", out, seen, steps + (("cell", i),))
    if code is not None:
        g = getattr(fn, "__globals__", {})
        for name in code.co_names:
            if name in g:
                _visit(g[name], f"{prefix}global:{name}", out, seen, steps + (("global", name),), globals_only=True)


def _visit(val, path, out, seen, steps, globals_only=False):
    if isinstance(val, torch.Tensor):
        if not any(b.tensor is val for b in out):
            out.append(Buffer(val, path, steps))
    elif isinstance(val, types.FunctionType):
        # Nested closures (and_masks, attn_gym builders) and module-level helper functions.
        if not (globals_only and (val.__module__ or "").startswith("torch")):
            _walk_tensors(val, path + ".", out, seen, steps)
    elif isinstance(val, (list, tuple)) and not globals_only:
        for j, item in enumerate(val):
            _visit(item, f"{path}[{j}]", out, seen, steps + (("item", j),))


def resolve(fn: Callable, steps: tuple):
    """Follow access steps from ``fn`` (plain attribute and index reads, traceable by dynamo)."""
    obj = fn
    for kind, arg in steps:
        if kind == "cell":
            obj = obj.__closure__[arg].cell_contents
        elif kind == "item":
            obj = obj[arg]
        else:
            obj = obj.__globals__[arg]
    return obj


def captured_tensors(fn: Callable) -> list[Buffer]:
    """The tensors a mod captures, in a deterministic order."""
    out: list[Buffer] = []
    _walk_tensors(fn, "", out, set())
    return out




def fingerprint(obj, seen=None):
    """A hashable description of a mod: its code, the non-tensor values it closes over, and the
    dtype / rank / requires_grad of the tensors it reads (not their values)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return ("T", obj.dtype, obj.dim(), obj.requires_grad, obj.device.type, obj.numel() >= 2 ** 31)
    if isinstance(obj, (int, float, bool, str, type(None), torch.dtype)):
        return ("V", type(obj).__name__, obj)
    if isinstance(obj, (list, tuple)):
        return ("L",) + tuple(fingerprint(x, seen) for x in obj)
    if isinstance(obj, types.FunctionType):
        if id(obj) in seen:
            return ("F-rec", obj.__code__)
        seen.add(id(obj))
        cells = []
        for c in obj.__closure__ or ():
            try:
                cells.append(fingerprint(c.cell_contents, seen))
            except ValueError:
                cells.append(("empty",))
        glb = []
        for name in obj.__code__.co_names:
            val = obj.__globals__.get(name)
            if isinstance(val, torch.Tensor) or (isinstance(val, types.FunctionType)
                                                 and not (val.__module__ or "").startswith("torch")):
                glb.append((name, fingerprint(val, seen)))
        return ("F", obj.__code__, tuple(cells), tuple(glb), obj.__defaults__)
    if isinstance(obj, types.ModuleType):
        return ("M", obj.__name__)
    return ("id", id(obj))  # unknown object: never shared between different objects
