"""flex_attention inside ``torch.compile``: the kernels as ``torch.library`` custom ops.

Under ``torch.compile`` the call goes through two public mechanisms, so a model compiles with
``fullgraph=True`` and no graph break:

- ``torch.compiler.assume_constant_result``: ``_kernel_key(score_mod, mask_mod)`` builds (or finds)
  the generated kernels at trace time and returns a string key -- a constant in the graph, so a
  second call with the same mods does not recompile.
- ``torch.library.custom_op`` with ``register_autograd``: forward and backward kernels as opaque
  ops taking the captured tensors as a ``list[Tensor]``, read from the mods' closures by paths
  recorded when the kernels were built.

First order only: a double backward through a compiled region is refused by torch's
aot_autograd with an error ("does not currently support double backward"), never silently
wrong.  Eager mode keeps the ``autograd.Function`` chain, which does support it.
"""

from __future__ import annotations

import functools
import types
from typing import Optional

import torch
from torch import Tensor

from .codegen.source import get_kernels, position_extents
from .codegen.identity import captured_tensors, resolve
from .kernels.flex import BlockTables, flex_backward, flex_forward, tables_from_block_mask

_REGISTRY: dict[str, tuple] = {}  # key -> (ModKernels, buffer paths)


@torch.compiler.assume_constant_result
def _kernel_key(score_mod, mask_mod) -> str:
    kern = get_kernels("flex_attention", score_mod, mask_mod)
    key = f"flex_attention:{id(kern)}"
    if key not in _REGISTRY:
        if kern.internal:
            raise NotImplementedError("flexebt under torch.compile: a mod that creates tensors inside its body is "
                                      "not supported; create them outside and capture them.")
        paths = ([("score", b.steps) for b in captured_tensors(score_mod)] if score_mod is not None else []) + \
                ([("mask", b.steps) for b in captured_tensors(mask_mod)] if mask_mod is not None else [])
        _REGISTRY[key] = (kern, paths)
    _attach_guard_copies(*(m for m in (score_mod, mask_mod) if m is not None))
    return key


def _options(text: str) -> dict:
    """kernel_options travel through the op as "KEY=value;..." (a str argument); values are ints
    except the few string-valued options (FP32_PRODUCTS)."""
    return {k: int(v) if v.lstrip("-").isdigit() else v for k, v in (item.split("=") for item in text.split(";") if item)}


def _tables_list(t: BlockTables) -> list[Tensor]:
    return [t.kv_num, t.kv_idx, t.full_kv_num, t.full_kv_idx, t.q_num, t.q_idx, t.full_q_num, t.full_q_idx]


def _tables_from_list(ts: list[Tensor], sparse_q: int, sparse_kv: int, has_full: bool) -> BlockTables:
    return BlockTables(*ts, sparse_q=sparse_q, sparse_kv=sparse_kv, has_full=has_full, mask_mod=None)


@torch.library.custom_op("flexebt::flex_attention_fwd", mutates_args=())
def flex_attention_fwd(q: Tensor, k: Tensor, v: Tensor, tables: list[Tensor], buffers: list[Tensor], key: str,
                       scale: float, sparse_q: int, sparse_kv: int, has_full: bool,
                       options: str) -> tuple[Tensor, Tensor]:
    kern = _REGISTRY[key][0]
    return flex_forward(kern, q, k, v, scale, _tables_from_list(tables, sparse_q, sparse_kv, has_full), buffers,
                        _options(options))


@flex_attention_fwd.register_fake
def _(q, k, v, tables, buffers, key, scale, sparse_q, sparse_kv, has_full, options):
    B, H, Sq, _ = q.shape
    return q.new_empty(B, H, Sq, v.shape[-1]), q.new_empty(B, H, Sq, dtype=torch.float32)


@torch.library.custom_op("flexebt::flex_attention_bwd", mutates_args=())
def flex_attention_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                       dlse: Optional[Tensor], tables: list[Tensor], buffers: list[Tensor], key: str, scale: float,
                       sparse_q: int, sparse_kv: int, has_full: bool, options: str) -> list[Tensor]:
    kern = _REGISTRY[key][0]
    dq, dk, dv, dbuf = flex_backward(kern, q, k, v, out, lse, dout, dlse, scale,
                                     _tables_from_list(tables, sparse_q, sparse_kv, has_full), buffers,
                                     _options(options))
    return [dq, dk, dv] + [torch.zeros_like(b) if g is None else g for g, b in zip(dbuf, buffers)]


@flex_attention_bwd.register_fake
def _(q, k, v, out, lse, dout, dlse, tables, buffers, key, scale, sparse_q, sparse_kv, has_full, options):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)] + [torch.empty_like(b) for b in buffers]


def _setup_context(ctx, inputs, output):
    q, k, v, tables, buffers, key, scale, sparse_q, sparse_kv, has_full, options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tables, *buffers)
    ctx.meta = (len(tables), key, scale, sparse_q, sparse_kv, has_full, options)


def _backward(ctx, dout, dlse):
    n_tables, key, scale, sparse_q, sparse_kv, has_full, options = ctx.meta
    q, k, v, out, lse, *rest = ctx.saved_tensors
    tables, buffers = list(rest[:n_tables]), list(rest[n_tables:])
    grads = flex_attention_bwd(q, k, v, out, lse, dout.contiguous(), dlse, tables, buffers, key, scale, sparse_q,
                               sparse_kv, has_full, options)
    dq, dk, dv, dbuf = grads[0], grads[1], grads[2], grads[3:]
    return dq, dk, dv, [None] * n_tables, list(dbuf), None, None, None, None, None, None


flex_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result
def _active_transforms() -> str:
    """torch.func transforms active while dynamo traces this call (Grad/Jvp/Vmap levels it has
    entered), as a constant string for the graph."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    wanted = {TransformType.Grad: "grad", TransformType.Jvp: "jvp", TransformType.Vmap: "vmap"}
    return ",".join(wanted[i.key()] for i in retrieve_all_functorch_interpreters() if i.key() in wanted)


def _guard_copy(fn, memo: dict):
    """``fn`` with fresh closure cells holding the same objects (nested closures copied alike).
    Dynamo reads the captured tensors through the mod's own cells (``resolve``); it cannot also
    inline a call that reads those cells, so the guard probe calls this copy instead."""
    t = type(fn)
    if t is types.MethodType:
        return types.MethodType(_guard_copy(fn.__func__, memo), fn.__self__)
    if t is functools.partial:
        return functools.partial(_guard_copy(fn.func, memo), *fn.args, **fn.keywords)
    if t is not types.FunctionType or not fn.__closure__:
        return fn
    if id(fn) in memo:
        return memo[id(fn)]
    cells = tuple(types.CellType() for _ in fn.__closure__)
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, cells)
    new.__kwdefaults__ = fn.__kwdefaults__
    memo[id(fn)] = new
    for fresh, cell in zip(cells, fn.__closure__):
        try:
            fresh.cell_contents = _guard_copy(cell.cell_contents, memo)
        except ValueError:  # an empty cell stays empty
            pass
    return new


def _attach_guard_copies(*mods) -> None:
    """Give each closure function a ``_flexebt_guard`` copy (once; runs outside dynamo)."""
    for m in mods:
        fn = m.__func__ if type(m) is types.MethodType else m.func if type(m) is functools.partial else m
        if type(fn) is types.FunctionType and fn.__closure__ and "_flexebt_guard" not in fn.__dict__:
            fn._flexebt_guard = _guard_copy(fn, {})


def _probe(mod, *args) -> None:
    """Call ``mod`` (through its guard copy where it has one) at one position, traced by dynamo."""
    if type(mod) is types.MethodType:
        fn = mod.__func__
        fn.__dict__.get("_flexebt_guard", fn)(mod.__self__, *args)
    elif type(mod) is functools.partial:
        fn = mod.func
        getattr(fn, "__dict__", {}).get("_flexebt_guard", fn)(*mod.args, *args, **mod.keywords)
    elif type(mod) is types.FunctionType:
        mod.__dict__.get("_flexebt_guard", mod)(*args)
    else:
        mod(*args)


def _trace_mod_reads(score_mod, mask_mod, query: Tensor) -> None:
    """Call the mods once at position 0 while dynamo traces, so that it installs its guards on
    everything they read (module globals, attributes of ``self``, objects in their closures,
    captured tensors).  ``_kernel_key`` is a constant of the graph: without these guards a global
    number changed after compiling would keep the graph, and with it the kernel generated for the
    old value.  The results are unused and removed from the graph."""
    i = torch.zeros(1, dtype=torch.int32, device=query.device)  # one position: indexing stays a gather
    if score_mod is not None:
        _probe(score_mod, torch.zeros(1, dtype=query.dtype, device=query.device), i, i, i, i)
    if mask_mod is not None:
        _probe(mask_mod, i, i, i, i)


def refuse_torch_func(fn: str) -> None:
    """Raise, while dynamo traces, when torch.func transforms are active (see _active_transforms)."""
    transforms = _active_transforms()
    if transforms:
        raise NotImplementedError(
            f"flexebt.{fn} inside torch.compile under torch.func transforms ({transforms}) is not supported: "
            "the compiled path has no functorch rules, and torch.compile does not support double backward. Run the "
            "torch.func transform outside torch.compile (eager flexebt kernels support torch.func.grad, grad of "
            "grad and jvp), or use kernel_options={'BACKEND': 'REFERENCE'} inside it.")


def flex_attention_compiled(query, key, value, score_mod, block_mask, scale, kernel_options):
    """The Triton path as custom ops (used while ``torch.compiler.is_compiling()``)."""
    refuse_torch_func("flex_attention")
    Sq, Skv = query.shape[2], key.shape[2]
    tables = tables_from_block_mask(block_mask, Sq, Skv, query.device)
    mask_mod = block_mask.mask_mod if block_mask is not None else None
    k_ = _kernel_key(score_mod, mask_mod)
    kern, paths = _REGISTRY[k_]
    buffers = kern.prepare([resolve(score_mod if which == "score" else mask_mod, p) for which, p in paths],
                           position_extents(query.shape[0], query.shape[1], Sq, Skv))
    _trace_mod_reads(score_mod, mask_mod, query)  # after the captured tensors are read through their paths
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    opts = ";".join(f"{k}={v if isinstance(v, str) else int(v)}"
                    for k, v in sorted((kernel_options or {}).items()) if k != "BACKEND")
    return flex_attention_fwd(query.contiguous(), key.contiguous(), value.contiguous(), _tables_list(tables), buffers,
                              k_, scale, tables.sparse_q, tables.sparse_kv, tables.has_full, opts)
