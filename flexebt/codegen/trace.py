"""Trace a score_mod / mask_mod to aten graphs of pointwise ops, and derive its derivatives.

A mod is traced with ``make_fx`` on shape-``[1]`` tensors (score fp32, indices int32), so
``bias[h, q_idx, kv_idx]`` becomes ``aten.index.Tensor(constant, [h, q, kv])`` -- a *load*.
Captured tensors are found by walking the mod's closure (and nested closures, and the module
globals it names) so that later calls can pass the current tensors without re-tracing.

Derivatives come from autograd itself: the floating loads of the first trace become leaf
inputs of a second function, which runs the first graph and ``torch.autograd.grad`` on it;
``make_fx`` records that whole computation as another aten graph.  With ``t = f(s, c)``:

    fwd  graph -> t
    bwd  graph -> t, df/ds, df/dc_k              (c_k = each floating load)
    dbwd graph -> t, df/ds, df/dc_k, d2f/ds2, d2f/(ds dc_k), d2f/(dc_k dc_l)

``c_k`` is the *value* loaded from a captured tensor at one index; the kernels scatter
``dt * df/dc_k`` back to that index (atomic adds) to form the captured tensor's gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx

from .identity import Buffer, captured_tensors

aten = torch.ops.aten


@dataclasses.dataclass
class Load:
    """A floating-point load ``buffer[index...]`` that becomes a derivative leaf."""

    node_name: str
    buffer: int


@dataclasses.dataclass
class TracedMod:
    kind: str                       # "score" or "mask"
    graph: torch.fx.GraphModule     # fwd graph (score: s,b,h,q,kv -> t ; mask: b,h,q,kv -> bool)
    buffers: list[Buffer]           # captured tensors, in kernel-argument order
    constants: dict[str, int]       # graph attribute name -> buffer slot
    loads: list[Load]               # floating loads (score mods only)
    derivative: dict[str, torch.fx.GraphModule]  # "bwd" / "dbwd" graphs (score mods only)
    deriv_constants: dict[str, dict[str, int]]
    name: str


def _idx(device="cpu"):
    return torch.zeros((1,), dtype=torch.int32, device=device)


def _trace_device(buffers: list[Buffer]):
    """Trace where the captured tensors live, so indexing them with the trace's indices works."""
    return buffers[0].tensor.device if buffers else torch.device("cpu")


def _constant_map(gm: torch.fx.GraphModule, buffers: list[Buffer]) -> dict[str, int]:
    """Map each ``_tensor_constant*`` attribute of a traced graph to a buffer slot.

    A tensor the trace read must be one that ``captured_tensors`` located (so each call passes the
    current one) or one created inside the mod's body (``torch.tensor([...])``: make_fx lifts it
    with ``lift_fresh_copy``), which is added as an extra buffer.  Any other tensor would be baked
    into the cached kernel and silently reused for other mods; it is refused."""
    mapping = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        t = getattr(gm, node.target)
        slot = next((i for i, b in enumerate(buffers) if b.tensor is t), None)
        if slot is None:
            if not (node.users and all(u.target is aten.lift_fresh_copy.default for u in node.users)):
                name = getattr(buffers, "mod_name", "mod")
                raise NotImplementedError(
                    f"flexebt codegen: the mod {name} reads a tensor of shape {tuple(t.shape)} ({t.dtype}) that "
                    f"flexebt cannot locate: it is not in the mod's closure, default arguments, the globals it "
                    f"names or the attributes of the object it is bound to, nor created inside the mod. The "
                    f"compiled kernel would keep this tensor for every later call. Make it visible: capture it "
                    f"in a closure, store it as an attribute of the object the mod is a method of (self.bias, an "
                    f"nn.Module parameter or buffer) or pass it as a default argument.")
            buffers.append(Buffer(t, f"internal:{node.target}"))
            slot = len(buffers) - 1
        mapping[node.target] = slot
    return mapping


def direct_uses(node: torch.fx.Node) -> list:
    """Users of a captured tensor's get_attr node other than ``tensor[indices]`` loads."""
    return [u for u in node.users if not (u.target is aten.index.Tensor and u.args[0] is node)]


def _check_direct_uses(gm: torch.fx.GraphModule, buffers: list[Buffer], consts: dict[str, int]) -> None:
    """A captured tensor used as a value (``score * temperature``, ``dist < w``) must hold one
    element; the kernels read it as a scalar.  Its gradient is not scattered, so one that needs a
    gradient must be indexed instead (``temperature[h]`` with one value per head, say)."""
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not direct_uses(node):
            continue
        t = buffers[consts[node.target]].tensor
        if t.numel() != 1:
            raise NotImplementedError(
                f"flexebt codegen: a captured tensor of shape {tuple(t.shape)} is used without indexing; index it "
                f"with the mod's positions (e.g. bias[h, q_idx, kv_idx]) or capture a one-element tensor.")
        if t.is_floating_point() and t.requires_grad:
            raise NotImplementedError(
                "flexebt codegen: a captured scalar that requires grad is used without indexing, so its gradient "
                "cannot be scattered; index it (e.g. a temperature of shape [H] read as temperature[h]).")


def _trace(fn, args) -> torch.fx.GraphModule:
    gm = make_fx(fn, tracing_mode="real", _allow_non_fake_inputs=True)(*args)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def trace_mask_mod(mask_mod: Callable) -> TracedMod:
    buffers = captured_tensors(mask_mod)
    dev = _trace_device(buffers)
    gm = _trace(lambda b, h, q, kv: _as_bool(mask_mod(b, h, q, kv), q), tuple(_idx(dev) for _ in range(4)))
    consts = _constant_map(gm, buffers)
    _check_direct_uses(gm, buffers, consts)
    return TracedMod("mask", gm, buffers, consts, [], {}, {}, getattr(mask_mod, "__name__", "mask_mod"))


def _as_bool(x, like):
    if not isinstance(x, torch.Tensor):
        return torch.full_like(like, bool(x), dtype=torch.bool)
    return x.to(torch.bool).expand(like.shape)


def _as_float(x, like):
    if not isinstance(x, torch.Tensor):
        return torch.full_like(like, float(x))
    return x.to(torch.float32).expand(like.shape)


def trace_score_mod(score_mod: Callable, want_second_order: bool = False) -> TracedMod:
    buffers = captured_tensors(score_mod)
    dev = _trace_device(buffers)
    args = (torch.zeros((1,), dtype=torch.float32, device=dev), *(_idx(dev) for _ in range(4)))
    gm = _trace(lambda s, b, h, q, kv: _as_float(score_mod(s, b, h, q, kv), s), args)
    consts = _constant_map(gm, buffers)
    _check_direct_uses(gm, buffers, consts)

    # Floating loads become derivative leaves.
    loads = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.index.Tensor:
            src = node.args[0]
            if src.op == "get_attr" and getattr(gm, src.target).is_floating_point():
                loads.append(Load(node.name, consts[src.target]))
    derivative, deriv_consts = {}, {}
    for which in (("bwd", "dbwd") if want_second_order else ("bwd",)):
        dg = _trace_derivatives(gm, loads, second=(which == "dbwd"), device=dev)
        derivative[which] = dg
        deriv_consts[which] = _constant_map(dg, buffers)
    return TracedMod("score", gm, buffers, consts, loads, derivative, deriv_consts,
                     getattr(score_mod, "__name__", "score_mod"))


class _LeafInterpreter(torch.fx.Interpreter):
    """Runs the fwd graph with each floating load replaced by a given leaf tensor."""

    def __init__(self, gm, leaves: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.leaves = leaves

    def run_node(self, n):
        if n.name in self.leaves:
            return self.leaves[n.name]
        return super().run_node(n)


def _trace_derivatives(gm: torch.fx.GraphModule, loads: list[Load], second: bool,
                       device="cpu") -> torch.fx.GraphModule:
    names = [ld.node_name for ld in loads]

    def derivs(s, b, h, q, kv, *leaves):
        with torch.enable_grad():
            s = s.detach().requires_grad_(True)
            leaves = [x.detach().requires_grad_(True) for x in leaves]
            t = _LeafInterpreter(gm, dict(zip(names, leaves))).run(s, b, h, q, kv)
            wrt = [s, *leaves]
            first = torch.autograd.grad(t.sum(), wrt, create_graph=second, allow_unused=True)
            first = [torch.zeros_like(s) if g is None else g for g in first]
            outs = [t.detach(), *[g.detach() for g in first]]
            if second:
                ds = first[0]
                if ds.requires_grad:
                    sec = torch.autograd.grad(ds.sum(), wrt, allow_unused=True, retain_graph=True)
                    sec = [torch.zeros_like(s) if g is None else g for g in sec]
                else:
                    sec = [torch.zeros_like(s) for _ in wrt]
                outs += sec  # d2f/ds2, then d2f/(ds dc_k)
                for k in range(len(leaves)):  # then d2f/(dc_k dc_l), k-major
                    fc = first[1 + k]
                    cc = torch.autograd.grad(fc.sum(), leaves, allow_unused=True, retain_graph=True) \
                        if fc.requires_grad \
                        else [None] * len(leaves)
                    outs += [torch.zeros_like(s) if g is None else g for g in cc]
        return tuple(outs)

    f32 = lambda: torch.zeros((1,), dtype=torch.float32, device=device)  # noqa: E731
    return _trace(derivs, (f32(), *(_idx(device) for _ in range(4)), *(f32() for _ in loads)))
