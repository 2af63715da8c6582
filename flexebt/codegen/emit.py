"""Emit Triton code for a traced mod graph.

The emitted lines run inside a kernel tile, where these names exist:

    s        fp32 [BLOCK_M, BLOCK_N]   the scaled score (score mods only)
    off_b    int32 scalar              batch index
    off_h    int32 scalar              query head index
    q_idx    int32 [BLOCK_M, 1]        query position, clamped into [0, Sq) (frame position for EBT)
    kv_idx   int32 [1, BLOCK_N]        key position, clamped into [0, Skv)
    VALID    bool  [BLOCK_M, BLOCK_N]  the tile positions inside the tensors
    ZERO     int32 [BLOCK_M, BLOCK_N]  zeros, to broadcast a value to the tile
    BUF{k}, BUF{k}_S{d}                pointer and strides of captured tensor k
    GBUF{k}                            fp32 gradient buffer of captured tensor k
    CBUF{k}                            cotangent of its first-order gradient (double backward)

Each graph node becomes one assignment ``{prefix}{name} = <expr>``.  Unsupported ops raise
``NotImplementedError`` naming the op and listing the supported ones.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx

aten = torch.ops.aten

_BINARY = {
    aten.add.Tensor: "({0} + {1})", aten.add.Scalar: "({0} + {1})",
    aten.sub.Tensor: "({0} - {1})", aten.sub.Scalar: "({0} - {1})", aten.rsub.Scalar: "({1} - {0})",
    aten.mul.Tensor: "({0} * {1})", aten.mul.Scalar: "({0} * {1})",
    aten.div.Tensor: "({0} / {1})", aten.div.Scalar: "({0} / {1})",
    aten.eq.Tensor: "({0} == {1})", aten.eq.Scalar: "({0} == {1})",
    aten.ne.Tensor: "({0} != {1})", aten.ne.Scalar: "({0} != {1})",
    aten.lt.Tensor: "({0} < {1})", aten.lt.Scalar: "({0} < {1})",
    aten.le.Tensor: "({0} <= {1})", aten.le.Scalar: "({0} <= {1})",
    aten.gt.Tensor: "({0} > {1})", aten.gt.Scalar: "({0} > {1})",
    aten.ge.Tensor: "({0} >= {1})", aten.ge.Scalar: "({0} >= {1})",
    aten.bitwise_and.Tensor: "({0} & {1})", aten.bitwise_and.Scalar: "({0} & {1})",
    aten.bitwise_or.Tensor: "({0} | {1})", aten.bitwise_or.Scalar: "({0} | {1})",
    aten.bitwise_xor.Tensor: "({0} ^ {1})", aten.bitwise_xor.Scalar: "({0} ^ {1})",
    aten.logical_and.default: "({0} & {1})", aten.logical_or.default: "({0} | {1})",
    aten.logical_xor.default: "({0} ^ {1})",
    aten.maximum.default: "tl.maximum({0}, {1})", aten.minimum.default: "tl.minimum({0}, {1})",
    aten.pow.Tensor_Tensor: "tl.exp2(tl.log2({0}) * {1})",
    aten.remainder.Scalar: "({0} % {1})", aten.remainder.Tensor: "({0} % {1})",
    aten.floor_divide.default: "({0} // {1})",
    # d/dx tanh given y = tanh(x): g (1 - y^2); sigmoid: g y (1 - y)
    aten.tanh_backward.default: "({0} * (1.0 - {1} * {1}))",
    aten.sigmoid_backward.default: "({0} * {1} * (1.0 - {1}))",
}
_UNARY = {
    aten.neg.default: "(-{0})", aten.abs.default: "tl.abs({0})",
    aten.exp.default: "tl.exp({0})", aten.exp2.default: "tl.exp2({0})",
    aten.log.default: "tl.log({0})", aten.log2.default: "tl.log2({0})",
    aten.sqrt.default: "tl.sqrt({0})", aten.rsqrt.default: "tl.rsqrt({0})",
    aten.sigmoid.default: "tl.sigmoid({0})", aten.sin.default: "tl.sin({0})", aten.cos.default: "tl.cos({0})",
    aten.reciprocal.default: "(1.0 / {0})",
    # tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): accurate for small and large |x|.
    aten.tanh.default: "tl.where({0} >= 0, 1.0, -1.0) * (1.0 - tl.exp(-2.0 * tl.abs({0}))) / "
                       "(1.0 + tl.exp(-2.0 * tl.abs({0})))",
    aten.bitwise_not.default: "(~{0})", aten.logical_not.default: "(~{0})",
    aten.floor.default: "tl.floor({0})", aten.ceil.default: "tl.ceil({0})",
}
_IDENTITY = {aten.detach.default, aten.alias.default, aten.clone.default, aten.expand.default, aten.view.default,
             aten.sum.default, aten.lift_fresh_copy.default, aten._unsafe_view.default, aten.squeeze.default,
             aten.unsqueeze.default, aten.reshape.default}
_TL_DTYPE = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
             torch.float64: "tl.float64", torch.int32: "tl.int32", torch.int64: "tl.int64", torch.int16: "tl.int16",
             torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.bool: "tl.int1"}


def supported_ops() -> list[str]:
    ops = list(_BINARY) + list(_UNARY) + list(_IDENTITY) + [
        aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.clamp.default, aten.clamp.Tensor,
        aten.index.Tensor, aten._to_copy.default, aten.ones_like.default, aten.zeros_like.default,
        aten.full_like.default, aten.new_ones.default, aten.new_zeros.default, aten.pow.Tensor_Scalar,
        aten.scalar_tensor.default, aten.threshold_backward.default]
    return sorted(str(o) for o in ops)


def _lit(v) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, float):
        if math.isinf(v):
            return "float('inf')" if v > 0 else "float('-inf')"
        if math.isnan(v):
            return "float('nan')"
        return repr(v)
    if isinstance(v, int):
        return repr(v)
    raise NotImplementedError(f"flexebt codegen: constant {v!r} of type {type(v).__name__} is not supported.")


class Emitter:
    """Turns graphs into Triton lines; one instance per generated kernel body."""

    def __init__(self, prefix: str, buffers_dtypes: list[torch.dtype], mod_name: str):
        self.prefix = prefix
        self.buffer_dtypes = buffers_dtypes
        self.mod_name = mod_name
        self.lines: list[str] = []
        self.load_offsets: dict[str, str] = {}  # node name -> offset expression var (floating loads)

    def _var(self, node) -> str:
        return f"{self.prefix}{node.name}"

    def emit(self, gm: torch.fx.GraphModule, placeholders: list[str], constants: dict[str, int],
             leaves: dict[int, str] | None = None) -> list[str]:
        """Emit ``gm``; ``placeholders`` names its inputs in order.  Returns the output exprs."""
        env: dict[str, str] = {}
        ph = iter(placeholders)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = next(ph)
            elif node.op == "get_attr":
                k = constants[node.target]
                env[node.name] = f"@buf{k}"  # read through aten.index (see _load)
                if any(not (u.target is aten.index.Tensor and u.args[0] is node) for u in node.users):
                    # used as a value: a one-element tensor (checked when tracing), read as a scalar
                    var = self._var(node)
                    cast = ".to(tl.float32)" if getattr(gm, node.target).is_floating_point() else ""
                    self.lines.append(f"{var} = tl.load(BUF{k}){cast}")
                    env[node.name] = var
            elif node.op == "call_function":
                expr = self._expr(node, env, gm, constants)
                if expr is None:
                    env[node.name] = env[node.args[0].name] if isinstance(node.args[0], torch.fx.Node) \
                        else _lit(node.args[0])
                    continue
                var = self._var(node)
                self.lines.append(f"{var} = {expr}")
                env[node.name] = var
            elif node.op == "output":
                outs = node.args[0]
                outs = outs if isinstance(outs, (tuple, list)) else (outs,)
                return [env[o.name] if isinstance(o, torch.fx.Node) else _lit(o) for o in outs]
        raise RuntimeError("graph without output")

    def _a(self, x, env):
        if isinstance(x, torch.fx.Node):
            return env[x.name]
        return _lit(x)

    def _expr(self, node, env, gm, constants):
        t, args = node.target, node.args
        a = lambda i: self._a(args[i], env)
        if t in _IDENTITY:
            return None
        if t in _BINARY:
            if t is aten.div.Tensor and "rounding_mode" in node.kwargs:
                raise NotImplementedError("flexebt codegen: div with rounding_mode is not supported")
            return _BINARY[t].format(a(0), a(1))
        if t is aten.div.Tensor_mode:
            mode = node.kwargs.get("rounding_mode")
            if mode == "floor":
                return f"tl.floor({a(0)} / {a(1)})" if self._is_float(args[0]) else f"({a(0)} // {a(1)})"
            raise NotImplementedError(f"flexebt codegen: div rounding_mode={mode!r} is not supported")
        if t in _UNARY:
            return _UNARY[t].format(a(0))
        if t is aten.pow.Tensor_Scalar:
            e = args[1]
            if e == 2:
                return f"({a(0)} * {a(0)})"
            if e == 0.5:
                return f"tl.sqrt({a(0)})"
            if e == 1:
                return a(0)
            if isinstance(e, int) and e in (3, 4):
                return "(" + " * ".join([a(0)] * e) + ")"
            if e == -1:
                return f"(1.0 / {a(0)})"
            return f"tl.exp2(tl.log2({a(0)}) * {_lit(float(e))})"
        if t in (aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther):
            return f"tl.where({a(0)}, {a(1)}, {a(2)})"
        if t in (aten.clamp.default, aten.clamp.Tensor):
            x = a(0)
            lo = args[1] if len(args) > 1 else node.kwargs.get("min")
            hi = args[2] if len(args) > 2 else node.kwargs.get("max")
            if lo is not None:
                x = f"tl.maximum({x}, {self._a(lo, env)})"
            if hi is not None:
                x = f"tl.minimum({x}, {self._a(hi, env)})"
            return x
        if t is aten.threshold_backward.default:  # relu'(x) g: g where x > threshold
            return f"tl.where({a(1)} <= {a(2)}, 0.0, {a(0)})"
        if t is aten._to_copy.default:
            dt = node.kwargs.get("dtype")
            return a(0) if dt is None else f"({a(0)}).to({_TL_DTYPE[dt]})"
        if t in (aten.ones_like.default, aten.new_ones.default):
            return self._fill(node, 1)
        if t in (aten.zeros_like.default, aten.new_zeros.default):
            return self._fill(node, 0)
        if t is aten.full_like.default:
            return self._fill(node, args[1])
        if t is aten.scalar_tensor.default:
            return self._fill(node, args[0])
        if t is aten.index.Tensor:
            return self._load(node, env, gm, constants)
        if t is operator.getitem:
            raise NotImplementedError("flexebt codegen: multi-output ops are not supported")
        raise NotImplementedError(
            f"flexebt codegen: op {t} (in {self.mod_name!r}) is not supported inside a score_mod / mask_mod. "
            f"Supported ops: {', '.join(supported_ops())}.")

    def _is_float(self, x):
        return isinstance(x, float) or (isinstance(x, torch.fx.Node) and "val" in x.meta
                                        and x.meta["val"].is_floating_point())

    def _fill(self, node, value):
        dtype = node.kwargs.get("dtype")
        if dtype is None and "val" in node.meta:
            dtype = node.meta["val"].dtype
        if dtype == torch.bool:
            return "(ZERO == 0)" if value else "(ZERO != 0)"
        if dtype is not None and not dtype.is_floating_point:
            return f"(ZERO + {int(value)})"
        return f"(ZERO.to(tl.float32) + {_lit(float(value))})"

    def _load(self, node, env, gm, constants):
        src, idx = node.args
        if not (isinstance(src, torch.fx.Node) and src.op == "get_attr"):
            raise NotImplementedError("flexebt codegen: only captured tensors can be indexed in a mod")
        k = constants[src.target]
        if any(i is None for i in idx):
            raise NotImplementedError("flexebt codegen: index a captured tensor with one index per dimension "
                                      "(slices are not supported)")
        tensor = getattr(gm, src.target)
        if len(idx) != tensor.dim():
            raise NotImplementedError(f"flexebt codegen: captured tensor of {tensor.dim()} dims indexed with "
                                      f"{len(idx)} indices; give one index per dimension")
        # Offsets keep their natural shape (doc_id[q_idx] is [BLOCK_M, 1]); q_idx / kv_idx are
        # clamped into range by the templates, so every load is in bounds without a mask.
        wide = tensor.numel() >= 2 ** 31  # int32 offsets would overflow: index in int64
        off = " + ".join(f"({self._a(i, env)}){'.to(tl.int64)' if wide else ''} * BUF{k}_S{d}"
                         for d, i in enumerate(idx))
        off_var = f"{self._var(node)}_off"
        self.lines.append(f"{off_var} = {off}")
        self.load_offsets[node.name] = off_var
        load = f"tl.load(BUF{k} + {off_var})"
        if tensor.is_floating_point():
            load += ".to(tl.float32)"
        return load
