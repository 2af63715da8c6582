"""Run the code generator's output for one score_mod elementwise, outside attention.

``probe(mod, s, q, kv, b, h)`` traces ``mod`` as the kernels do, emits its value ``t`` and its
first and second derivatives in the score (``dt/ds``, ``d2t/ds2``) with the same ``Emitter`` the
kernel templates are filled with, and evaluates them in a one-dimensional Triton kernel over
operand vectors ``s`` (fp32) and ``q`` / ``kv`` (int32, negative values allowed), so every op of
the table can be checked on chosen operands against torch.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import tempfile

import torch

from flexebt.codegen.emit import Emitter
from flexebt.codegen.identity import wide_offsets
from flexebt.codegen.source import buffer_params
from flexebt.codegen.trace import trace_score_mod
from flexebt.kernels.flex import _buffer_args, index_flag

_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def probe(S, Q, KV, T, D1, D2, N, off_b, off_h, {params}BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[:, None]
    VALID = offs < N
    ZERO = tl.zeros([BLOCK, 1], dtype=tl.int32)
    s = tl.load(S + offs, mask=VALID, other=0.0)
    q_idx = tl.load(Q + offs, mask=VALID, other=0)
    kv_idx = tl.load(KV + offs, mask=VALID, other=0)
{body}
    tl.store(T + offs, ({t}) + ZERO.to(tl.float32), mask=VALID)
    tl.store(D1 + offs, ({d1}) + ZERO.to(tl.float32), mask=VALID)
    tl.store(D2 + offs, ({d2}) + ZERO.to(tl.float32), mask=VALID)
'''

_MODULES: dict = {}
# one folder for the probe kernels of this process, removed at exit (Triton reads a kernel's source
# file while it compiles it, so the files stay until then)
_FOLDER = tempfile.TemporaryDirectory(prefix="flexebt_probe_")


def _kernel(mod):
    traced = trace_score_mod(mod, want_second_order=True)
    buffers = [b.tensor for b in traced.buffers]
    em = Emitter("p_", [wide_offsets(b) for b in buffers], traced.name)
    names = ["s", "off_b", "off_h", "q_idx", "kv_idx"]
    (t,) = em.emit(traced.graph, names, traced.constants)
    outs = em.emit(traced.derivative["dbwd"], names + [f"p_{ld.node_name}" for ld in traced.loads],
                   traced.deriv_constants["dbwd"], tag="d_")
    n_loads = len(traced.loads)
    source = _KERNEL.format(params=buffer_params(buffers), body="\n".join("    " + ln for ln in em.lines), t=t, d1=outs[1],
                            d2=outs[2 + n_loads])
    name = f"flexebt_probe_{len(_MODULES)}"
    path = pathlib.Path(_FOLDER.name) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = _MODULES[name] = module
    return module.probe, buffers, source


def probe(mod, s: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, b: int = 0, h: int = 0):
    """``(t, dt/ds, d2t/ds2, generated source)`` of ``mod`` at each operand, from generated code."""
    kernel, buffers, source = _kernel(mod)
    n = s.numel()
    out = [torch.full((n,), float("nan")) for _ in range(3)]
    block = 1024
    flag = index_flag(s.device)
    kernel[(triton_cdiv(n, block),)](s.float().contiguous(), q.int().contiguous(), kv.int().contiguous(), *out, n, b,
                                     h, *_buffer_args(buffers, {}), BLOCK=block)
    if buffers and int(flag.item()) == 0:
        flag.fill_(1)
        raise IndexError("index out of range in probe")
    return (*out, source)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
