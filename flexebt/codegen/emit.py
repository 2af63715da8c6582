"""Emit Triton code for a traced mod graph.

The emitted lines run inside a kernel tile, where these names exist:

    s        fp32 [BLOCK_M, BLOCK_N]   the scaled score (score mods only)
    off_b    int32 scalar              batch index
    off_h    int32 scalar              query head index
    q_idx    int32 [BLOCK_M, 1]        query position, clamped into [0, Sq) (frame position for EBT)
    kv_idx   int32 [1, BLOCK_N]        key position, clamped into [0, Skv)
    VALID    bool  [BLOCK_M, BLOCK_N]  the tile positions inside the tensors
    ZERO     int32 [BLOCK_M, BLOCK_N]  zeros, to broadcast a value to the tile
    IDXERR                             int32 flag, set to 0 when a load's index is out of range
    BUF{k}, BUF{k}_S{d}, BUF{k}_N{d}   pointer, strides and sizes of captured tensor k
    GBUF{k}                            fp32 gradient buffer of captured tensor k (same strides)
    CBUF{k}                            cotangent of its first-order gradient (double backward)

Each graph node becomes one assignment ``{prefix}{tag}{name} = <expr>`` (the tag keeps the nodes of
two graphs emitted into one kernel apart), cast to the dtype torch gives that node, so integer and
boolean arithmetic, type promotion and rounding of 16-bit casts follow torch.  An integer op's
operands are cast to the dtype torch computes it in (``Emitter._integer_operands``), in int32 where
that is int64 and the values fit (codegen/intervals.py).  Floating values are
computed in fp32 (a float64 captured tensor is read in fp32).

``OPS`` is the table of supported aten ops: how each is written in Triton, with torch's semantics
where Triton's operators differ (``//`` and ``%`` truncate in Triton and floor in torch; ``x ** e``
of a negative base; NaN propagation of max / min).  ``supported_ops()`` and the documentation are
generated from it, and tests/test_op_table.py checks every entry against torch.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from typing import Callable, Optional

import torch
import torch.fx

from .intervals import INT32, ONE_VALUE_OPS, integer_intervals, kernel_dtypes

aten = torch.ops.aten
prims = torch.ops.prims

_HALF = (torch.float16, torch.bfloat16)
_TL_DTYPE = {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
             torch.float64: "tl.float32", torch.int32: "tl.int32", torch.int64: "tl.int64", torch.int16: "tl.int16",
             torch.int8: "tl.int8", torch.uint8: "tl.uint8", torch.bool: "tl.int1"}


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
    if isinstance(v, torch.dtype):
        return _TL_DTYPE[v]
    raise NotImplementedError(f"flexebt codegen: constant {v!r} of type {type(v).__name__} is not supported.")


@dataclasses.dataclass
class Op:
    """How one aten op is written: ``emit(em, node, a)`` returns the expression; ``a(i)`` is the
    code of argument i.  ``doc``: the torch spelling shown to users."""

    emit: Callable
    doc: str
    unary_float: bool = False  # a float -> float function the op table test samples densely


OPS: dict = {}


def _op(targets, doc, unary_float=False):
    def register(fn):
        for t in targets:
            OPS[t] = Op(fn, doc, unary_float)
        return fn
    return register


def _fmt(targets, pattern, doc, unary_float=False):
    """An op written as one expression.  ``unary_float``: a float function, which torch applies to
    an integer or bool tensor by promoting it to the default float dtype (``torch.sin(b)``):
    such an operand is cast to fp32 first."""
    n_args = 1 + max(int(i) for i in re.findall(r"\{(\d+)\}", pattern))

    def emit(em, node, a, p=pattern, n=n_args):
        args = [a(i) for i in range(n)]
        if unary_float:
            args = [_f32(x) if _is_integral(node.args[i]) else x for i, x in enumerate(args)]
        return p.format(*args)

    _op(targets, doc, unary_float)(emit)


def _is_integral(x) -> bool:
    """An integer or bool tensor operand (a Python number is not: torch keeps its tensor's dtype)."""
    dt = _dtype(x)
    return dt is not None and not dt.is_floating_point and not dt.is_complex


def _is_float(x) -> bool:
    if isinstance(x, float):
        return True
    return isinstance(x, torch.fx.Node) and isinstance(x.meta.get("val"), torch.Tensor) \
        and x.meta["val"].is_floating_point()


def _dtype(x):
    if isinstance(x, torch.fx.Node) and isinstance(x.meta.get("val"), torch.Tensor):
        return x.meta["val"].dtype
    return None


def _is_bool(x) -> bool:
    return isinstance(x, bool) or _dtype(x) == torch.bool


# --- arithmetic ----------------------------------------------------------------------------------
# torch adds and multiplies bool tensors as logical or / and (True + True is True).
def _alpha(node):
    """The ``alpha`` of add / sub / rsub: a keyword in some schemas, positional in others
    (``rsub.Scalar(x, 1, 2)``, as make_fx records ``torch.rsub(x, 1, alpha=2)``)."""
    return node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)


# A Python number next to a 16-bit tensor: torch casts the number to the tensor's dtype (fp16 /
# bf16) before most ops -- add, sub, %, fmod, **, comparisons: 0.3 is 0.30078125 next to bf16
# values, 1001 is 1000 -- but multiplies and divides with the number as it is on its fast path for a
# number (a value that does not vary per score, such as a captured 0-d tensor, or plain eager code).
# torch applies a mod per score through torch.vmap (so does the reference backend), and under vmap
# a value that varies per score (depends on the score or a position) takes the general path: the
# number is rounded for * and / as well.  In-place * and / keep the number even there.
# add / sub / rsub with an alpha other than 1 on 16-bit values: torch rounds alpha * other to the half
# dtype on some paths (its vectorized CPU kernels, vmap over some operand layouts) and not on others;
# the kernels refuse it
_ALPHA_OPS = {aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.rsub.Tensor}
_ROUNDS_NUMBERS = {*_ALPHA_OPS, aten.remainder.Tensor, aten.remainder.Scalar, aten.remainder.Scalar_Tensor,
                   aten.fmod.Tensor, aten.fmod.Scalar, aten.pow.Tensor_Scalar, aten.pow.Scalar,
                   *(getattr(getattr(aten, c), o) for c in ("eq", "ne", "lt", "le", "gt", "ge")
                     for o in ("Tensor", "Scalar"))}
_ROUNDS_NUMBERS_WHERE_VARYING = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
                                 aten.div.Tensor_mode, aten.floor_divide.default}


def _half_operands(node) -> Optional[torch.dtype]:
    """The fp16 / bf16 dtype that the tensor operands of ``node`` all have (the dtype torch casts a
    number operand to), else None (an fp32 operand, or integers, promote the number otherwise)."""
    dtypes = {_dtype(a) for a in node.all_input_nodes}
    return dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in _HALF else None


def _as_half(v, dtype):
    """A Python number as torch casts it to ``dtype`` (a bool is kept)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(torch.tensor(v, dtype=torch.float64).to(dtype).item())
    return v


@_op([aten.add.Tensor, aten.add.Scalar], "+ / torch.add")
def _add(em, node, a):
    alpha = _alpha(node)
    if _dtype(node) == torch.bool:
        return f"({a(0)} | {a(1)})"
    return f"({a(0)} + {a(1)})" if alpha == 1 else f"({a(0)} + {_lit(alpha)} * {a(1)})"


@_op([aten.sub.Tensor, aten.sub.Scalar], "- / torch.sub")
def _sub(em, node, a):
    alpha = _alpha(node)
    return f"({a(0)} - {a(1)})" if alpha == 1 else f"({a(0)} - {_lit(alpha)} * {a(1)})"


@_op([aten.rsub.Scalar, aten.rsub.Tensor], "rsub")
def _rsub(em, node, a):
    alpha = _alpha(node)
    square = node.args[0]
    # 1 - y * y of an fp32 tanh y (a 16-bit one is rounded per op, as torch computes it)
    if alpha == 1 and node.args[1] == 1 and isinstance(square, torch.fx.Node) and square.target is aten.mul.Tensor \
            and _dtype(square) == torch.float32 and len(square.args) == 2 \
            and all(isinstance(y, torch.fx.Node) for y in square.args):
        y = {em.arg(square.args[0]), em.arg(square.args[1])}
        if len(y) == 1 and y <= em.tanh_vars:
            return _one_minus_tanh_squared(y.pop())
    return f"({a(1)} - {a(0)})" if alpha == 1 else f"({a(1)} - {_lit(alpha)} * {a(0)})"


@_op([aten.mul.Tensor, aten.mul.Scalar], "* / torch.mul")
def _mul(em, node, a):
    if _dtype(node) == torch.bool:
        return f"({a(0)} & {a(1)})"
    return f"({a(0)} * {a(1)})"


# True division always gives a float (torch promotes integers), so compute it in fp32.
_op([aten.div.Tensor, aten.div.Scalar], "/ / torch.div")(
    lambda em, node, a: f"({_f32(a(0))} / {_f32(a(1))})")


def _floor_div(em, node, x, y, floating: bool) -> str:
    """torch's floor division.  Integers: Triton's // truncates, so step down by one where the
    remainder is non-zero and its sign differs from the divisor's.  Floats: torch's algorithm --
    divide the exact multiple ``x - fmod(x, y)``, correct by one for the sign, round the quotient
    to the nearest integer (it is one up to rounding), keep the sign of zero and y = 0."""
    v = em.tmp(node)
    if not floating:
        em.lines.append(f"{v}_q = {x} // {y}")
        em.lines.append(f"{v}_r = {x} - {v}_q * {y}")
        return f"({v}_q - (({v}_r != 0) & (({v}_r < 0) != ({y} < 0))).to({v}_q.dtype))"
    _f32_var(em, node, "x", x), _f32_var(em, node, "y", y)
    em.lines.append(f"{v}_m = {v}_x % {v}_y")  # fmod on floats, in Triton as in C
    em.lines.append(f"{v}_d = ({v}_x - {v}_m) / {v}_y")
    em.lines.append(f"{v}_d = tl.where(({v}_m != 0) & (({v}_y < 0) != ({v}_m < 0)), {v}_d - 1.0, {v}_d)")
    em.lines.append(f"{v}_f = tl.floor({v}_d)")
    em.lines.append(f"{v}_f = tl.where({v}_d - {v}_f > 0.5, {v}_f + 1.0, {v}_f)")
    em.lines.append(f"{v}_f = tl.where({v}_d == 0, tl.where({v}_x / {v}_y < 0, -0.0, 0.0), {v}_f)")
    return f"tl.where({v}_y == 0, {v}_x / {v}_y, {v}_f)"


def _remainder(em, node, x, y, floating: bool) -> str:
    """torch.remainder / %: the result takes the divisor's sign (Triton's % is C's fmod)."""
    v = em.tmp(node)
    if not floating and _INT_LITERAL.match(y):
        # a constant divisor stays a number (assigned to a variable, Triton would type 2**31..2**32-1
        # as uint32); the sign test is decided here
        em.lines.append(f"{v}_r = {x} % {y}")
        return f"tl.where({v}_r {'<' if int(y) > 0 else '>'} 0, {v}_r + {y}, {v}_r)"
    if floating:
        x, y = _f32(x), _f32(y)
    em.lines.append(f"{v}_y = {y}")
    em.lines.append(f"{v}_r = {x} % {v}_y")
    return f"tl.where(({v}_r != 0) & (({v}_r < 0) != ({v}_y < 0)), {v}_r + {v}_y, {v}_r)"


_INT_LITERAL = re.compile(r"^-?\d+$")
_NUMBER = re.compile(r"^-?\d+(\.\d*)?(e-?\d+)?$|^float\('-?(inf|nan)'\)$|^True$|^False$")


# -0.0 broadcast to the tile: x + (-0.0) is x for every x, signed zeros included (x + 0.0 is not)
_NEG_ZERO = "(ZERO.to(tl.float32) * -0.0)"


def _f32_var(em, node, suffix: str, x: str) -> str:
    """Assign ``x`` as an fp32 tile to a fresh variable (signed zeros kept) and return its name."""
    var = f"{em.tmp(node)}_{suffix}"
    em.lines.append(f"{var} = {_f32(x)} + {_NEG_ZERO}")
    return var


def _f32(x: str) -> str:
    """``x`` as fp32: a literal is written as a float, a tensor cast."""
    if _NUMBER.match(x):
        return _lit(float(eval(x)))  # noqa: S307 -- a literal written by _lit
    return f"({x}).to(tl.float32)"


def _trunc(x: str) -> str:
    return f"tl.where({x} < 0, tl.ceil({x}), tl.floor({x}))"


@_op([aten.floor_divide.default], "// / torch.floor_divide")
def _floordiv(em, node, a):
    return _floor_div(em, node, a(0), a(1), _is_float(node))


@_op([aten.div.Tensor_mode], "torch.div(rounding_mode='floor' | 'trunc')")
def _div_mode(em, node, a):
    mode = node.kwargs.get("rounding_mode", node.args[2] if len(node.args) > 2 else None)
    floating = _is_float(node)
    if mode == "floor":
        return _floor_div(em, node, a(0), a(1), floating)
    if mode == "trunc":
        if not floating:
            return f"({a(0)} // {a(1)})"  # Triton's integer division truncates, like C
        return _trunc(f"({_f32(a(0))} / {_f32(a(1))})")
    return f"({_f32(a(0))} / {_f32(a(1))})"


_op([aten.remainder.Tensor, aten.remainder.Scalar], "% / torch.remainder")(
    lambda em, node, a: _remainder(em, node, a(0), a(1), _is_float(node)))
_op([aten.remainder.Scalar_Tensor], "torch.remainder(number, tensor)")(
    lambda em, node, a: _remainder(em, node, a(0), a(1), _is_float(node)))
_fmt([aten.fmod.Tensor, aten.fmod.Scalar], "({0} % {1})", "torch.fmod")


# --- powers --------------------------------------------------------------------------------------
def _int_power(x: str, e: int) -> str:
    """x ** e for an integer e by repeated squaring (exact for negative bases)."""
    if e == 0:
        return f"({x} * 0 + 1)"
    result, base, n = None, x, abs(e)
    while n:
        if n & 1:
            result = base if result is None else f"({result} * {base})"
        n >>= 1
        if n:
            base = f"({base} * {base})"
    return result if e > 0 else f"(1.0 / {result})"


def _general_power(em, node, x: str, y: str) -> str:
    """x ** y for float x and y: |x|^y = exp2(y log2|x|); a negative base gives a real result only
    for an integral y (its sign from y's parity), else NaN; x ** 0 = 1 and 1 ** y = 1, also NaN."""
    v = em.tmp(node)
    _f32_var(em, node, "x", x), _f32_var(em, node, "y", y)
    em.lines.append(f"{v}_m = tl.exp2(tl.log2(tl.abs({v}_x)) * {v}_y)")
    em.lines.append(f"{v}_int = tl.floor({v}_y) == {v}_y")
    em.lines.append(f"{v}_odd = {v}_int & (({v}_y - 2.0 * tl.floor({v}_y * 0.5)) == 1.0)")
    # the sign of an odd power follows the base's sign bit, -0.0 included
    em.lines.append(f"{v}_neg = ({v}_x < 0) | (({v}_x == 0) & (1.0 / {v}_x < 0))")
    em.lines.append(f"{v}_m = tl.where({v}_neg & {v}_odd, -{v}_m, {v}_m)")
    em.lines.append(f"{v}_m = tl.where(({v}_x < 0) & ~{v}_int, float('nan'), {v}_m)")
    return f"tl.where(({v}_y == 0) | ({v}_x == 1.0), 1.0, {v}_m)"


@_op([aten.pow.Tensor_Scalar], "** / torch.pow (tensor ** number)")
def _pow_scalar(em, node, a):
    e = node.args[1] if em._numbers_to is None else _as_half(node.args[1], em._numbers_to)
    if isinstance(e, float) and e.is_integer() and abs(e) <= 64:
        e = int(e)
    # an integer base with a float result (int ** 2.0) is computed in fp32, as torch does
    base = _f32(a(0)) if _is_float(node) and not _is_float(node.args[0]) else a(0)
    if isinstance(e, int) and not isinstance(e, bool) and abs(e) <= 64:
        if e < 0 and not _is_float(node):
            raise NotImplementedError("flexebt codegen: integers to negative integer powers are not allowed")
        x = base if _is_float(node) or e >= 0 else _f32(a(0))
        return _int_power(x, e)
    if e == 0.5:  # sqrt, except pow(-inf, 0.5) = inf
        return f"tl.where({base} == float('-inf'), float('inf'), tl.sqrt({base}))"
    if e == -0.5:  # torch takes rsqrt here (so (-0.0) ** -0.5 is -inf)
        return f"(1.0 / tl.sqrt({base}))"
    return _general_power(em, node, base, _lit(float(e)))


@_op([aten.pow.Tensor_Tensor], "** / torch.pow (tensor ** tensor)")
def _pow_tensor(em, node, a):
    if not _is_float(node):
        raise NotImplementedError("flexebt codegen: integer tensor ** integer tensor is not supported; cast to float "
                                  "or use a constant exponent")
    return _general_power(em, node, a(0), a(1))


@_op([aten.pow.Scalar], "** / torch.pow (number ** tensor)")
def _pow_base(em, node, a):
    if not _is_float(node):
        raise NotImplementedError("flexebt codegen: an integer number ** integer tensor is not supported; use a float "
                                  "base (2.0 ** x)")
    return _general_power(em, node, a(0), a(1))




# --- comparisons and logic -----------------------------------------------------------------------
for _t, _sym in (("eq", "=="), ("ne", "!="), ("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">=")):
    _fmt([getattr(aten, _t).Tensor, getattr(aten, _t).Scalar], f"({{0}} {_sym} {{1}})", f"{_sym} / torch.{_t}")
def _bitwise(sym: str):
    # on bools, each operand as (x != 0): Triton's interpreter cannot combine a bool from a scalar
    # load (a captured 0-d tensor) with a bool tile directly; the value is the same
    def emit(em, node, a):
        if _is_bool(node):
            return f"(({a(0)} != 0) {sym} ({a(1)} != 0))"
        return f"({a(0)} {sym} {a(1)})"
    return emit


for _t, _sym in (("bitwise_and", "&"), ("bitwise_or", "|"), ("bitwise_xor", "^")):
    _op([getattr(aten, _t).Tensor, getattr(aten, _t).Scalar], f"{_sym} / torch.{_t}")(_bitwise(_sym))
_fmt([aten.logical_and.default], "(({0} != 0) & ({1} != 0))", "torch.logical_and")
_fmt([aten.logical_or.default], "(({0} != 0) | ({1} != 0))", "torch.logical_or")
_fmt([aten.logical_xor.default], "(({0} != 0) ^ ({1} != 0))", "torch.logical_xor")
_fmt([aten.logical_not.default], "({0} == 0)", "torch.logical_not / ~ on bool")
_op([aten.bitwise_not.default], "~ / torch.bitwise_not")(
    lambda em, node, a: f"({a(0)} == 0)" if _is_bool(node) else f"(~{a(0)})")
_fmt([aten.__rshift__.Scalar, aten.__rshift__.Tensor, aten.bitwise_right_shift.Tensor], "({0} >> {1})", ">> / torch.bitwise_right_shift")
_fmt([aten.__lshift__.Scalar, aten.__lshift__.Tensor, aten.bitwise_left_shift.Tensor_Scalar], "({0} << {1})", "<< / torch.bitwise_left_shift")
_fmt([aten.isnan.default], "({0} != {0})", "torch.isnan")
_fmt([aten.isinf.default], "(tl.abs({0}) == float('inf'))", "torch.isinf")


@_op([aten.where.self], "torch.where")
def _where(em, node, a):
    return f"tl.where({a(0)}, {a(1)}, {a(2)})"


# --- min / max / clamp: NaN propagates as in torch ------------------------------------------------
def _max(x, y, floating):
    return f"tl.maximum({x}, {y}, propagate_nan=tl.PropagateNan.ALL)" if floating else f"tl.maximum({x}, {y})"


def _min(x, y, floating):
    return f"tl.minimum({x}, {y}, propagate_nan=tl.PropagateNan.ALL)" if floating else f"tl.minimum({x}, {y})"


_op([aten.maximum.default], "torch.maximum")(lambda em, node, a: _max(a(0), a(1), _is_float(node)))
_op([aten.minimum.default], "torch.minimum")(lambda em, node, a: _min(a(0), a(1), _is_float(node)))


CLAMP_MIN = (aten.clamp_min.default, aten.clamp_min.Tensor)
CLAMP_MAX = (aten.clamp_max.default, aten.clamp_max.Tensor)


@_op([aten.clamp.default, aten.clamp.Tensor, *CLAMP_MIN, *CLAMP_MAX], "torch.clamp / clamp_min / clamp_max")
def _clamp(em, node, a):
    t, args = node.target, node.args
    if t in CLAMP_MIN:
        lo, hi = args[1], None
    elif t in CLAMP_MAX:
        lo, hi = None, args[1]
    else:
        lo = args[1] if len(args) > 1 else node.kwargs.get("min")
        hi = args[2] if len(args) > 2 else node.kwargs.get("max")
    x, floating = a(0), _is_float(node)
    if lo is not None:
        x = _max(x, em.arg(lo), floating)
    if hi is not None:
        x = _min(x, em.arg(hi), floating)
    return x


# --- elementwise functions -----------------------------------------------------------------------
_fmt([aten.neg.default], "(-{0})", "- (negation)")
_op([aten.abs.default], "torch.abs")(lambda em, node, a: f"tl.abs({a(0)})")
_fmt([aten.exp.default], "tl.exp({0})", "torch.exp", True)
_fmt([aten.exp2.default], "tl.exp2({0})", "torch.exp2", True)
_fmt([aten.log.default], "tl.log({0})", "torch.log", True)
_fmt([aten.log2.default], "tl.log2({0})", "torch.log2", True)
_fmt([aten.log10.default], "(tl.log({0}) * 0.4342944819032518)", "torch.log10", True)
_fmt([aten.sqrt.default], "tl.sqrt({0})", "torch.sqrt", True)
_fmt([aten.rsqrt.default], "(1.0 / tl.sqrt({0}))", "torch.rsqrt", True)
_fmt([aten.reciprocal.default], "(1.0 / {0})", "torch.reciprocal", True)
_fmt([aten.sigmoid.default], "(1.0 / (1.0 + tl.exp(-{0})))", "torch.sigmoid", True)
_fmt([aten.sin.default], "tl.sin({0})", "torch.sin", True)
_fmt([aten.cos.default], "tl.cos({0})", "torch.cos", True)
_fmt([aten.tan.default], "(tl.sin({0}) / tl.cos({0}))", "torch.tan", True)
_fmt([aten.erf.default], "tl.erf({0})", "torch.erf", True)
# floor / ceil of an integer tensor is the tensor itself (torch keeps its dtype)
_op([aten.floor.default], "torch.floor", True)(
    lambda em, node, a: a(0) if _is_integral(node.args[0]) else f"tl.floor({a(0)})")
_op([aten.ceil.default], "torch.ceil", True)(
    lambda em, node, a: a(0) if _is_integral(node.args[0]) else f"tl.ceil({a(0)})")
_op([aten.trunc.default], "torch.trunc", True)(
    lambda em, node, a: a(0) if _is_integral(node.args[0]) else _trunc(a(0)))
_op([aten.frac.default], "torch.frac", True)(lambda em, node, a: f"({a(0)} - {_trunc(a(0))})")
# tanh's odd Taylor coefficients x^3 .. x^11 (enough below |x| = 0.3: the x^13 term is < 2e-9 relative)
_TANH_TAYLOR = (-1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925)


@_op([aten.tanh.default], "torch.tanh", True)
def _tanh(em, node, a):
    """tanh to a few fp32 ulps.  For |x| >= 0.3, sign(x) (1 - e) / (1 + e) with e = 2^(-2 log2(e) |x|)
    (1 - e >= 0.45 there, so its cancellation costs at most a few ulps; +-inf give +-1, NaN stays
    NaN).  Below, where 1 - e would lose most digits (a soft-cap's tanh(score / cap) with a large
    cap), the Taylor polynomial x (1 + x^2 (c3 + x^2 (c5 + ...))), which also keeps
    tanh(-0.0) = -0.0.  Both branches are evaluated per score, so the operation count is kept low:
    four fused multiply-adds for the polynomial, one exp2 and one division for the other."""
    v = em.tmp(node)
    x = _f32_var(em, node, "x", a(0))
    em.lines.append(f"{v}_s = {x} * {x}")
    poly = _lit(_TANH_TAYLOR[-1])
    for c in reversed(_TANH_TAYLOR[:-1]):
        poly = f"({_lit(c)} + {v}_s * {poly})"
    em.lines.append(f"{v}_p = {x} * (1.0 + {v}_s * {poly})")
    em.lines.append(f"{v}_e = tl.exp2(tl.abs({x}) * {_lit(-2 * math.log2(math.e))})")
    em.lines.append(f"{v}_b = (1.0 - {v}_e) / (1.0 + {v}_e)")
    em.tanh_vars.add(v)  # the variable the caller assigns the result to (Emitter.emit)
    return f"tl.where(tl.abs({x}) < 0.3, {v}_p, tl.where({x} < 0, -{v}_b, {v}_b))"


def _one_minus_tanh_squared(v: str) -> str:
    """``1 - y * y`` for ``y = tanh(x)`` emitted as ``v`` (autograd's derivative of tanh).  Near
    saturation y rounds next to 1, so ``1 - y * y`` keeps only the digits y's rounding left (a few
    ulps of 1, against a value as small as 4 e^(-2|x|)); from the parts of y it is
    (1 - y)(1 + y) = 4 e / (1 + e)^2 with e = e^(-2|x|), accurate to a few ulps of itself (one
    more division, which only the derivative passes pay for).  Below |x| = 0.3, y^2 < 0.09 and the
    plain form loses nothing."""
    return f"tl.where(tl.abs({v}_x) < 0.3, 1.0 - {v}_p * {v}_p, 4.0 * {v}_e / ((1.0 + {v}_e) * (1.0 + {v}_e)))"


@_op([aten.expm1.default], "torch.expm1", True)
def _expm1(em, node, a):
    """exp(x) - 1 without cancellation near 0: with u = exp(x), (u - 1) x / log(u) (Kahan)."""
    v = em.tmp(node)
    _f32_var(em, node, "x", a(0))
    em.lines.append(f"{v}_u = tl.exp({v}_x)")
    em.lines.append(f"{v}_l = tl.log({v}_u)")
    return (f"tl.where({v}_u == 1.0, {v}_x, tl.where(({v}_u - 1.0 == -1.0) | ({v}_u == float('inf')), {v}_u - 1.0, "
            f"({v}_u - 1.0) * {v}_x / tl.where({v}_l == 0, 1.0, {v}_l)))")


@_op([aten.log1p.default], "torch.log1p", True)
def _log1p(em, node, a):
    """log(1 + x) without cancellation near 0: with u = 1 + x, log(u) x / (u - 1) (Kahan)."""
    v = em.tmp(node)
    _f32_var(em, node, "x", a(0))
    em.lines.append(f"{v}_u = 1.0 + {v}_x")
    return (f"tl.where({v}_u == 1.0, {v}_x, tl.where({v}_u == float('inf'), tl.log({v}_u), "
            f"tl.log({v}_u) * {v}_x / tl.where({v}_u == 1.0, 1.0, {v}_u - 1.0)))")


@_op([aten.sinh.default], "torch.sinh", True)
def _sinh(em, node, a):
    """sinh x = (e + e / (e + 1)) / 2 with e = expm1(x): accurate near 0."""
    e = _expm1(em, node, a)
    v = em.tmp(node)
    em.lines.append(f"{v}_e = {e}")
    # |x| >= 1: (exp(x) - exp(-x)) / 2 has no cancellation (and no overflow of e / (e + 1))
    return f"tl.where(tl.abs({v}_x) >= 1.0, 0.5 * (tl.exp({v}_x) - tl.exp(-{v}_x)), " \
           f"0.5 * ({v}_e + {v}_e / ({v}_e + 1.0)))"


_fmt([aten.cosh.default], "(0.5 * (tl.exp({0}) + tl.exp(-{0})))", "torch.cosh", True)


@_op([aten.sign.default, aten.sgn.default], "torch.sign / torch.sgn", True)
def _sign(em, node, a):
    x = a(0)
    if not _is_float(node):
        return f"(({x} > 0).to(tl.int32) - ({x} < 0).to(tl.int32))"
    return f"tl.where({x} != {x}, {x}, tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0)))"


@_op([aten.round.default], "torch.round", True)
def _round(em, node, a):
    """Half to even, like torch: floor, then up where the fraction is above one half, or exactly one
    half and the floor is odd (|x| >= 2**23 is already an integer in fp32).  An integer is itself."""
    if _is_integral(node.args[0]):
        return a(0)
    v = em.tmp(node)
    em.lines.append(f"{v}_x = {a(0)}")
    em.lines.append(f"{v}_f = tl.floor({v}_x)")
    em.lines.append(f"{v}_d = {v}_x - {v}_f")
    em.lines.append(f"{v}_odd = ({v}_f - 2.0 * tl.floor({v}_f * 0.5)) != 0")
    return f"tl.where(({v}_d > 0.5) | (({v}_d == 0.5) & {v}_odd), {v}_f + 1.0, {v}_f)"


# --- activations with a kink (kept whole in a mod's graph, so their derivatives are torch's) ------
_op([aten.relu.default], "torch.relu / F.relu")(
    lambda em, node, a: f"tl.where({a(0)} > 0, {a(0)}, tl.where({a(0)} != {a(0)}, {a(0)}, 0.0))")


@_op([aten.hardtanh.default], "F.hardtanh")
def _hardtanh(em, node, a):
    lo = node.args[1] if len(node.args) > 1 else -1.0
    hi = node.args[2] if len(node.args) > 2 else 1.0
    return _min(_max(a(0), _lit(float(lo)), True), _lit(float(hi)), True)


_op([aten.leaky_relu.default], "F.leaky_relu")(
    lambda em, node, a: f"tl.where({a(0)} > 0, {a(0)}, {a(0)} * {_lit(float(node.args[1] if len(node.args) > 1 else 0.01))})")


# --- values and casts ----------------------------------------------------------------------------
@_op([aten._to_copy.default], "Tensor.to(dtype) / .float() / .long()")
def _to(em, node, a):
    return a(0)  # the cast to the node's dtype is added by the emitter


for _value, _targets in ((1, [aten.ones_like.default, aten.new_ones.default]),
                         (0, [aten.zeros_like.default, aten.new_zeros.default, aten._efficientzerotensor.default])):
    _op(_targets, "torch.ones_like / zeros_like / new_ones / new_zeros")(
        lambda em, node, a, v=_value: em.fill(node, v))
_op([aten.full_like.default], "torch.full_like")(lambda em, node, a: em.fill(node, node.args[1]))
_op([aten.new_full.default], "Tensor.new_full")(
    lambda em, node, a: em.fill(node, node.args[-1]))
_op([aten.scalar_tensor.default], "torch.tensor(number) / torch.scalar_tensor")(
    lambda em, node, a: em.fill(node, node.args[0]))


# torch.zeros(()) / ones / full of one value (autograd's own derivative graphs create them: the
# gradient of torch.where where one branch is a 0-d tensor)
@_op([aten.zeros.default, aten.ones.default, aten.full.default], "torch.zeros / ones / full of one value")
def _factory(em, node, a):
    shape = node.args[0]
    if math.prod(shape) != 1:
        raise NotImplementedError(
            f"flexebt codegen: {node.target} of shape {tuple(shape)} in {em.mod_name!r}: a mod works on one score "
            f"at a time, so a tensor it creates must hold one value.")
    value = {aten.zeros.default: 0, aten.ones.default: 1}.get(node.target)
    return em.fill(node, node.args[1] if value is None else value)

# Values that are the same one-element tensor: views, copies and reductions of one value (a mod is
# applied to one score at a time, so score.sum() is the score).
IDENTITY = ONE_VALUE_OPS
# Ops whose result shares memory with their first argument (an in-place op on one writes both).
_ALIASING = {aten.detach.default, aten.alias.default, aten.expand.default, aten.view.default, aten._unsafe_view.default,
             aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, aten.reshape.default,
             aten.contiguous.default, aten.permute.default, aten.t.default, aten.transpose.int, aten.select.int}
# linalg_vector_norm of one value is its absolute value; select.int of a one-element tensor its value.
_ABS_OF_ONE = {aten.linalg_vector_norm.default}


# Ops whose integer operands are not cast to a common dtype (emit.Emitter._integer_operands): casts,
# true division and float functions (computed in fp32), logic on (x != 0), fills and factories.
_NOT_INTEGER_OPS = {t for t, op in OPS.items() if op.unary_float} | {
    aten._to_copy.default, aten.div.Tensor, aten.div.Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar,
    aten.logical_and.default, aten.logical_or.default, aten.logical_xor.default, aten.logical_not.default,
    aten.isnan.default, aten.isinf.default, aten.ones_like.default, aten.new_ones.default, aten.zeros_like.default,
    aten.new_zeros.default, aten._efficientzerotensor.default, aten.full_like.default, aten.new_full.default,
    aten.scalar_tensor.default, aten.zeros.default, aten.ones.default, aten.full.default, aten.relu.default,
    aten.hardtanh.default, aten.leaky_relu.default}
_SHIFTS = {aten.__rshift__.Scalar, aten.__rshift__.Tensor, aten.bitwise_right_shift.Tensor, aten.__lshift__.Scalar,
           aten.__lshift__.Tensor, aten.bitwise_left_shift.Tensor_Scalar}
# Arguments that are not operands: where's condition, the exponent of x ** n.
_NON_OPERAND_ARGS = {aten.where.self: (0,), aten.pow.Tensor_Scalar: (1,)}


def _wrap(v: int, dtype: torch.dtype) -> int:
    """``v`` cast to an integer dtype as torch casts a number next to a tensor of it: modulo 2^bits."""
    info = torch.iinfo(dtype)
    span = info.max - info.min + 1
    return (v - info.min) % span + info.min


def supported_ops() -> list[str]:
    """The torch spellings of the supported operations (the error message and docs show these)."""
    return sorted({op.doc for op in OPS.values() if not op.doc.startswith("(")} |
                  {"indexing a captured tensor: bias[h, q_idx, kv_idx]", "sum / mean / amax of one value"})


def _numel(node) -> Optional[int]:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.numel() if isinstance(val, torch.Tensor) else None


class Emitter:
    """Turns graphs into Triton lines; one instance per generated kernel body."""

    def __init__(self, prefix: str, wide: list[bool], mod_name: str):
        """``wide[k]``: offsets into captured tensor k need int64 (identity.wide_offsets)."""
        self.prefix = prefix
        self.wide = wide
        self.mod_name = mod_name
        self.lines: list[str] = []
        self.load_offsets: dict[str, str] = {}  # tag + node name -> offset expression (captured loads)
        self.positional: set = set()  # (buffer, dim, position name): dims indexed by a bare position
        self.checked = False  # some index is checked in the kernel (not a bare position)
        self._env: dict[str, str] = {}
        self._kdt: dict = {}  # node name -> the integer dtype the kernel computes it in (intervals.py)
        self._iv: dict = {}  # node name -> the interval of an integer value (intervals.py)
        self._operands = None  # while emitting an integer op: the dtype arg() casts its operands to
        self._operand_torch_dtype = None  # (and the dtype torch casts its numbers to)
        self._not_operands: set = set()  # ids of arguments that are not operands (where's condition)
        self._numbers_to = None  # while emitting an op that casts its numbers: their dtype (see _ROUNDS_NUMBERS)
        self._varying: set = set()  # names of the nodes whose value varies per score
        self._tag = ""
        self.tanh_vars: set[str] = set()  # variables holding a tanh, whose parts _tanh named after them

    def tmp(self, node) -> str:
        return f"{self.prefix}{self._tag}{node.name}"

    def arg(self, x) -> str:
        if isinstance(x, torch.fx.Node):
            val = self._env[x.name]
            want = self._operands
            have = self._kdt.get(x.name)
            if want is not None and have is not None and have != want and id(x) not in self._not_operands:
                return f"({val}).to({_TL_DTYPE[want]})"
            if _dtype(x) in _HALF:
                # torch computes an op on fp16 / bf16 values in fp32 and rounds its result (the
                # node's own cast, emit()); Triton's interpreter has no bf16 arithmetic at all
                return f"({val}).to(tl.float32)"
            return val
        if self._operands is not None and isinstance(x, int) and not isinstance(x, bool):
            return repr(_wrap(x, self._operand_torch_dtype))  # torch casts a number to the op's dtype
        if self._numbers_to is not None:
            return _lit(_as_half(x, self._numbers_to))
        return _lit(x)

    def fill(self, node, value) -> str:
        dtype = node.kwargs.get("dtype") or _dtype(node)
        if dtype == torch.bool:
            return "(ZERO == 0)" if value else "(ZERO != 0)"
        if dtype is not None and not dtype.is_floating_point:
            v = int(value)
            return f"(ZERO + {v})" if INT32[0] <= v <= INT32[1] else f"(ZERO.to(tl.int64) + {v})"
        return f"(ZERO.to(tl.float32) + {_lit(float(value))})"

    def _integer_operands(self, node) -> Optional[tuple]:
        """For an op on integer (or bool) operands: (the dtype torch computes it in, the dtype the
        kernel computes it in), else None.  torch's dtype is its type promotion over the operands (a
        Python number counts less than a tensor; bool with a number is int64).  The kernel computes
        in int32 what torch computes in int64 where the result, every operand and every number fit in
        int32 (codegen/intervals.py), else in torch's dtype; each operand is cast to it first (Triton
        would otherwise pick its own: uint8 with int8 is uint8 there, int16 in torch), and each number
        is cast to torch's dtype as torch casts it (2**40 is 0 next to an int32 tensor)."""
        t = node.target
        if t not in OPS:  # an in-place op is emitted as its functional form
            t = _functional(t)
        if t in _NOT_INTEGER_OPS or t in IDENTITY or t not in OPS:
            return None
        args = list(node.args) + list(node.kwargs.values())
        skip = _NON_OPERAND_ARGS.get(t, ())
        operands = [a for i, a in enumerate(args) if i not in skip and not isinstance(a, (str, torch.dtype))]
        tensors = [a for a in operands if isinstance(a, torch.fx.Node)]
        dts = [_dtype(a) for a in tensors]
        if not dts or any(d is None or d.is_floating_point for d in dts):
            return None
        if all(d == torch.bool for d in dts) and not any(isinstance(a, int) and not isinstance(a, bool)
                                                       for a in operands):
            return None  # logic on bools
        out = _dtype(node)
        if out is not None and out != torch.bool:
            comp = out  # an op with an integer result computes in its result's dtype (as traced: torch's)
        else:  # a comparison: in the operands' promoted dtype
            comp = dts[0]
            for d in dts[1:]:
                comp = torch.promote_types(comp, d)
            for a in operands:
                if isinstance(a, (int, float)) and not isinstance(a, bool):
                    comp = torch.result_type(torch.empty((1,), dtype=comp), a)
        if comp.is_floating_point or comp == torch.bool:
            return None
        kernel = comp
        if comp == torch.int64:
            fits = self._kdt.get(node.name, torch.int32) != torch.int64 and all(
                self._kdt.get(a.name) != torch.int64 for a in tensors) and all(
                INT32[0] <= a <= INT32[1] for a in operands if isinstance(a, int) and not isinstance(a, bool))
            if fits and t in _SHIFTS:  # a shift by 32 or more of an int32 is undefined on the GPU
                amount = args[1] if len(args) > 1 else 0
                hi = amount if isinstance(amount, int) else self._iv.get(amount.name, (0, 63))[1]
                fits = hi < 31
            kernel = torch.int32 if fits else torch.int64
        return comp, kernel
    def emit(self, gm: torch.fx.GraphModule, placeholders: list[str], constants: dict[str, int],
             tag: str = "") -> list[str]:
        """Emit ``gm``; ``placeholders`` names its inputs in order.  Returns the output exprs.
        ``tag`` prefixes this graph's variable names (one tag per graph in a kernel body)."""
        self._tag = tag
        self._env = env = {}
        self._iv = integer_intervals(gm)
        self._kdt = kernel_dtypes(gm, self._iv)
        ph = iter(placeholders)
        self._varying = set()  # nodes whose value varies per score (depends on a placeholder)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                env[node.name] = next(ph)
                self._varying.add(node.name)
            elif node.op == "get_attr":
                env[node.name] = f"@buf{constants[node.target]}"  # only read through loads (trace.py)
            elif node.op == "call_function":
                ints = self._integer_operands(node)
                if ints is not None:
                    self._operand_torch_dtype, self._operands = ints
                    base = node.target if node.target in OPS else _functional(node.target)
                    self._not_operands = {id(node.args[i]) for i in _NON_OPERAND_ARGS.get(base, ())
                                          if i < len(node.args) and isinstance(node.args[i], torch.fx.Node)}
                varies = any(a.name in self._varying for a in node.all_input_nodes)
                base = _functional(node.target) or node.target
                if varies:
                    self._varying.add(node.name)
                    self._refuse_half_alpha(node, base)
                if base in _ROUNDS_NUMBERS or (varies and node.target in _ROUNDS_NUMBERS_WHERE_VARYING):
                    self._numbers_to = _half_operands(node)
                try:
                    expr = self._expr(node, gm, constants)
                finally:
                    self._operands = self._operand_torch_dtype = None
                    self._not_operands = set()
                    self._numbers_to = None
                if expr is None:
                    continue
                var = self.tmp(node)
                dtype = self._kdt.get(node.name, _dtype(node))
                if dtype == torch.bfloat16:
                    self._round_to_bf16(var, expr)
                else:
                    cast = f".to({_TL_DTYPE[dtype]})" if dtype in _TL_DTYPE else ""
                    self.lines.append(f"{var} = ({expr}){cast}")
                env[node.name] = var
                if _is_inplace(node):  # later reads of the mutated tensor see the new value
                    self._write(gm, node.args[0], var)
            elif node.op == "output":
                outs = node.args[0]
                outs = outs if isinstance(outs, (tuple, list)) else (outs,)
                return [env[o.name] if isinstance(o, torch.fx.Node) else _lit(o) for o in outs]
        raise RuntimeError("graph without output")

    def _refuse_half_alpha(self, node, base) -> None:
        """add / sub / rsub (or add_, sub_: ``base`` is the functional op) with ``alpha != 1`` on fp16 /
        bf16 values that vary per score: see _ALPHA_OPS."""
        if base in _ALPHA_OPS and _dtype(node) in _HALF and _alpha(node) != 1:
            raise NotImplementedError(
                f"flexebt codegen: torch.add / torch.sub with alpha={_alpha(node)!r} on {_dtype(node)} values in "
                f"{self.mod_name!r}: torch rounds alpha * other to {_dtype(node)} before the sum on some of its paths "
                f"and not on others, so the kernels cannot promise torch's numbers. Write the product as an op of its "
                f"own (`x + alpha * y`), or compute in float32 (`x.float() + alpha * y.float()`), or run on the "
                f"reference backend (kernel_options={{'BACKEND': 'REFERENCE'}}).")

    def _round_to_bf16(self, var: str, expr: str) -> None:
        """``var = expr`` rounded to bf16, to nearest even as torch rounds, written with integer
        operations on the fp32 bits: Triton's interpreter truncates in ``.to(tl.bfloat16)``.  The
        bits of ``x`` plus 0x7FFF plus the last kept bit, with the low 16 bits cleared, are
        the nearest bf16 (ties to even; the carry runs into the exponent, up to inf); a NaN is
        kept as it is."""
        self.lines += [f"{var}_f = ({expr}).to(tl.float32)",
                       f"{var}_u = {var}_f.to(tl.uint32, bitcast=True)",
                       f"{var}_u = (({var}_u + 0x7FFF + (({var}_u >> 16) & 1)) >> 16) << 16",
                       f"{var} = tl.where({var}_f != {var}_f, {var}_f, {var}_u.to(tl.float32, bitcast=True))"
                       f".to(tl.bfloat16)"]

    def _write(self, gm, target, value: str) -> None:
        """An in-place op wrote ``value`` into ``target``: every tensor sharing its memory (the
        views it was made from, and the other views of those: one value per score, so any view
        is the same element) reads ``value`` from here on, as in torch."""
        def root(n):
            while isinstance(n, torch.fx.Node) and n.target in _ALIASING and n.args:
                n = n.args[0]
            return n

        base = root(target)
        for n in gm.graph.nodes:
            if n.name in self._env and root(n) is base:
                self._env[n.name] = value
        self._env[target.name] = value

    def _expr(self, node, gm, constants):
        t, args = node.target, node.args
        env = self._env
        if t is aten.index.Tensor:
            return self._load(node, gm, constants)
        if t in IDENTITY or (t is aten.copy_.default):
            src = args[1] if t in (aten.copy_.default, aten.copy.default) else args[0]
            if t is not aten.copy_.default and t is not aten.copy.default and _numel(node) not in (None, 1):
                raise NotImplementedError(
                    f"flexebt codegen: {t} of a tensor with {_numel(node)} elements in {self.mod_name!r}: a mod works "
                    f"on one score at a time; index captured tensors down to one value (bias[h, q_idx, kv_idx]).")
            val = env[src.name] if isinstance(src, torch.fx.Node) else _lit(src)
            if t in _ABS_OF_ONE:
                val = f"tl.abs({val})"
            have = self._kdt.get(src.name) if isinstance(src, torch.fx.Node) else None
            if have is not None and self._kdt.get(node.name, have) != have:
                # a dtype change (torch sums an int8 value as int64; copy_ casts to the destination's
                # dtype): an assignment, which the caller casts
                return val
            env[node.name] = val
            if t is aten.copy_.default:
                self._write(gm, args[0], val)
            return None
        op = OPS.get(t) or OPS.get(_functional(t))
        if op is None:
            if t is operator.getitem:
                raise NotImplementedError(f"flexebt codegen: multi-output ops are not supported (in {self.mod_name!r})")
            raise NotImplementedError(
                f"flexebt codegen: {_describe(t)} (in {self.mod_name!r}) is not supported inside a score_mod / "
                f"mask_mod. Supported: {', '.join(supported_ops())}. Rewrite the mod with these, or run it on the "
                f"reference backend (kernel_options={{'BACKEND': 'REFERENCE'}}).")
        return op.emit(self, node, lambda i: self.arg(args[i]))

    def _load(self, node, gm, constants):
        """``buffer[i_0, ..., i_n]``: negative indices wrap as in torch; an index still outside
        [0, size) clears IDXERR (the launcher raises) and is clamped so the load stays inside."""
        src, idx = node.args
        while src.op == "call_function" and src.target in IDENTITY:  # (trace.py's view of a 0-d tensor)
            src = src.args[0]
        k = constants[src.target]
        var = self.tmp(node)
        tensor = getattr(gm, src.target)
        if tensor.dim() == 0:
            idx = []  # a 0-d tensor read as a value (trace.py reads it through a one-element view)
        offs, bad = [], []
        for d, i in enumerate(idx):
            iv = f"{var}_i{d}"
            # int64 offsets into a large tensor, or for an index that may not fit in int32 (so an index
            # out of range is caught, not wrapped into range)
            wide = self.wide[k] or (isinstance(i, torch.fx.Node) and self._kdt.get(i.name) == torch.int64)
            self.lines.append(f"{iv} = ({self.arg(i)}).to({'tl.int64' if wide else 'tl.int32'})")
            if self.arg(i) in POSITIONS:
                # a bare position lies in [0, extent): the launcher checks size >= extent on the host
                # before the launch (ModKernels.buffers), so no check is needed per score
                self.positional.add((k, d, self.arg(i)))
                offs.append(f"{iv} * BUF{k}_S{d}")
                continue
            self.checked = True
            self.lines.append(f"{iv} = tl.where({iv} < 0, {iv} + BUF{k}_N{d}, {iv})")
            self.lines.append(f"{iv}_bad = ({iv} < 0) | ({iv} >= BUF{k}_N{d})")
            bad.append(f"{iv}_bad")
            self.lines.append(f"{iv} = tl.minimum(tl.maximum({iv}, 0), BUF{k}_N{d} - 1)")
            offs.append(f"{iv} * BUF{k}_S{d}")
        if bad:
            # (bad may be a scalar, for an index like h: widen it to the tile before masking the store)
            self.lines.append(f"tl.store(IDXERR + ZERO, ZERO, mask=VALID & (({' | '.join(bad)}).to(tl.int32) + ZERO != 0))")
        off_var = f"{var}_off"
        self.lines.append(f"{off_var} = {' + '.join(offs) or '0'}")
        self.load_offsets[self._tag + node.name] = off_var
        load = f"tl.load(BUF{k} + {off_var})"
        if tensor.dtype == torch.bool:
            load = f"({load} != 0)"
        return load


# The position names of the tile (their ranges are known on the host: see ModKernels.buffers)
POSITIONS = ("off_b", "off_h", "q_idx", "kv_idx", "mq_idx")


def _is_inplace(node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(schema is not None and schema.is_mutable and node.args and isinstance(node.args[0], torch.fx.Node))


def _functional(t):
    """The functional op of an in-place one (``masked_fill_`` -> ``masked_fill``), or None."""
    packet = getattr(t, "overloadpacket", None)
    name = getattr(packet, "__name__", "")
    if not name.endswith("_") or name.startswith("_"):
        return None
    fn = getattr(aten, name[:-1], None)
    return getattr(fn, t._overloadname, None) if fn is not None else None


def _describe(t) -> str:
    name = str(t)
    return f"op {name}"


def supported_ops_markdown() -> str:
    """The user-facing list of supported operations (docs/supported-ops.md is this text)."""
    lines = ["# Operations the kernels support in mods", "",
             "A `score_mod` / `mask_mod` runs inside flexebt's kernels when it is written with these operations "
             "(generated from the code generator's op table, each entry checked against torch on negative, zero and "
             "boundary operands, with its first and second derivative). Anything else raises `NotImplementedError` "
             "naming the operation; such a mod still runs on the reference backend "
             "(`kernel_options={\"BACKEND\": \"REFERENCE\"}`).", "",
             "Integer `//`, `%`, `torch.div(rounding_mode=\"floor\")` and `torch.remainder` floor like torch; "
             "`x ** n` is exact for negative bases; indexing a captured tensor out of range raises an error "
             "and negative indices wrap, as in torch. Positions are int64 as in torch's eager flex_attention, so "
             "integer arithmetic is exact past 2^31 (a hash such as `(q_idx * 2654435761) % 97`); the kernels "
             "compute in int32 the values that provably fit for positions below 2^30, and the rest in int64. "
             "Floating-point values inside a mod are computed in fp32.", ""]
    lines += [f"- {name}" for name in supported_ops()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(supported_ops_markdown(), end="")
