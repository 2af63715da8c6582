"""Which integer values of a traced mod need 64 bits in the kernels.

Mods are traced with int64 positions, as torch's own eager ``flex_attention`` passes them, so the
traced graph carries the dtypes torch gives each value: ``q_idx * 2654435761 % 97`` (a hash) is
int64 arithmetic and exact.  Computing every integer value in int64 in the kernels would slow down
the common mods (``q_idx - kv_idx``, ``doc[q_idx] == doc[kv_idx]``), whose values are small.  So
each integer node gets an interval -- the values it can take, from the positions' range
(``[0, POSITION_LIMIT)``, checked on the host before every launch) and the ops' arithmetic on
exact Python integers -- and a node traced as int64 whose interval fits in int32 is computed in
int32: its values are the same, so nothing changes but the cost.  An op whose result, operands or
constants do not fit works in int64, its narrower operands widened first
(``emit.Emitter._integer_operands``).

The intervals are conservative: an op without a rule here takes the whole range of its dtype.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx

aten = torch.ops.aten

# Positions (b, h, q_idx, kv_idx) a kernel sees are below this; the host refuses larger extents
# (codegen.source.position_extents).  2^30 leaves room for small offsets and differences in int32.
POSITION_LIMIT = 2 ** 30

INT32 = (-2 ** 31, 2 ** 31 - 1)


def dtype_range(dtype: torch.dtype) -> tuple:
    if dtype == torch.bool:
        return (0, 1)
    info = torch.iinfo(dtype)
    return (info.min, info.max)


def fits_int32(iv: tuple) -> bool:
    return INT32[0] <= iv[0] and iv[1] <= INT32[1]


def _val(x):
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else None


def _int_dtype(x) -> Optional[torch.dtype]:
    """The integer (or bool) dtype of a node's value, None for floats and non-tensors."""
    v = _val(x)
    if isinstance(v, torch.Tensor) and not v.is_floating_point() and not v.is_complex():
        return v.dtype
    return None


def _corners(f, a: tuple, b: tuple) -> tuple:
    vals = [f(x, y) for x in a for y in b]
    return (min(vals), max(vals))


def _magnitude(iv: tuple) -> int:
    return max(abs(iv[0]), abs(iv[1]))


def _bits_signed(iv: tuple) -> int:
    """The fewest bits k with iv inside [-2^(k-1), 2^(k-1))."""
    k = 1
    while not (-(2 ** (k - 1)) <= iv[0] and iv[1] < 2 ** (k - 1)):
        k += 1
    return k


def _bitwise(a: tuple, b: tuple) -> tuple:
    """&, |, ^ of two's complement integers stay within the wider operand's width; with both
    operands non-negative, below the next power of two."""
    if a[0] >= 0 and b[0] >= 0:
        return (0, 2 ** max(a[1], b[1]).bit_length() - 1)
    k = max(_bits_signed(a), _bits_signed(b))
    return (-(2 ** (k - 1)), 2 ** (k - 1) - 1)


def _floor_div(a: tuple, b: tuple) -> tuple:
    # |a // b| <= |a| for any integer divisor other than 0 (whose result torch refuses for integers)
    m = _magnitude(a)
    if b[0] > 0 or b[1] < 0:
        return _corners(operator.floordiv, a, tuple(x for x in b if x != 0) or (1,))
    return (-m, m)


def _remainder(a: tuple, b: tuple) -> tuple:
    """torch.remainder takes the divisor's sign; |r| < |b|."""
    m = _magnitude(b)
    if b[0] > 0:
        return (0, m - 1 if a[0] < 0 else min(a[1], m - 1))
    if b[1] < 0:
        return (-(m - 1), 0)
    return (-(m - 1), m - 1)


def _fmod(a: tuple, b: tuple) -> tuple:
    """fmod takes the dividend's sign; |r| < |b| and |r| <= |a|."""
    m = min(_magnitude(b) - 1, _magnitude(a))
    return (-m if a[0] < 0 else 0, m if a[1] > 0 else 0)


def _shift_left(a: tuple, s: tuple) -> Optional[tuple]:
    if s[0] < 0 or s[1] > 62:
        return None
    return _corners(lambda x, k: x * 2 ** k, a, s)


def _shift_right(a: tuple, s: tuple) -> Optional[tuple]:
    if s[0] < 0:
        return None
    return (min(a[0], 0), max(a[1], 0))


def _power(a: tuple, e) -> Optional[tuple]:
    if isinstance(e, bool) or not isinstance(e, int) or e < 0 or e > 64:
        return None
    vals = [a[0] ** e, a[1] ** e] + ([0] if a[0] <= 0 <= a[1] else [])
    return (min(vals), max(vals))


_BINARY = {
    aten.add.Tensor: operator.add, aten.add.Scalar: operator.add,
    aten.sub.Tensor: operator.sub, aten.sub.Scalar: operator.sub,
    aten.mul.Tensor: operator.mul, aten.mul.Scalar: operator.mul,
    aten.minimum.default: min, aten.maximum.default: max,
}
# Values that are the same one-element tensor as their argument: views, copies and reductions of one
# value (a mod is applied to one score at a time, so score.sum() is the score); linalg_vector_norm
# of one value is its absolute value (emit.py).  The code generator aliases them; here an integer
# one keeps its argument's interval (copy takes its source's, below).
ONE_VALUE_OPS = {aten.detach.default, aten.alias.default, aten.clone.default, aten.expand.default, aten.view.default,
                 aten.lift_fresh_copy.default, aten._unsafe_view.default, aten.squeeze.default, aten.squeeze.dim,
                 aten.squeeze.dims, aten.unsqueeze.default, aten.reshape.default, aten.contiguous.default,
                 aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim, aten.amax.default,
                 aten.amin.default, aten.max.default, aten.min.default, aten.prod.default, aten.prod.dim_int,
                 aten.permute.default, aten.t.default, aten.transpose.int, aten.select.int, aten.logsumexp.default,
                 aten.linalg_vector_norm.default, aten.copy.default}


def _rule(node: torch.fx.Node, iv) -> Optional[tuple]:
    """The interval of an integer node from its arguments' (``iv(x)``: None if unknown), or None."""
    t, args, kw = node.target, node.args, node.kwargs
    a = lambda i: iv(args[i]) if i < len(args) else None  # noqa: E731
    if t in _BINARY:
        x, y = a(0), a(1)
        alpha = kw.get("alpha", 1)
        if x is None or y is None or not isinstance(alpha, int):
            return None
        if alpha != 1:
            y = _corners(operator.mul, y, (alpha, alpha))
        if _int_dtype(node) == torch.bool:
            return (0, 1)
        return _corners(_BINARY[t], x, y)
    if t in (aten.rsub.Scalar, aten.rsub.Tensor):
        x, y = a(0), a(1)
        alpha = kw.get("alpha", 1)
        if x is None or y is None or not isinstance(alpha, int):
            return None
        return _corners(operator.sub, y, _corners(operator.mul, x, (alpha, alpha)))
    if t is aten.neg.default:
        x = a(0)
        return None if x is None else (-x[1], -x[0])
    if t is aten.abs.default:
        x = a(0)
        if x is None:
            return None
        return (0 if x[0] <= 0 <= x[1] else min(abs(x[0]), abs(x[1])), _magnitude(x))
    if t is aten.floor_divide.default or (t is aten.div.Tensor_mode and
                                          kw.get("rounding_mode", args[2] if len(args) > 2 else None) == "floor"):
        x, y = a(0), a(1)
        return None if x is None or y is None else _floor_div(x, y)
    if t is aten.div.Tensor_mode:  # trunc: |a / b| <= |a|
        x = a(0)
        return None if x is None else (-_magnitude(x), _magnitude(x))
    if t in (aten.remainder.Tensor, aten.remainder.Scalar, aten.remainder.Scalar_Tensor):
        x, y = a(0), a(1)
        return None if x is None or y is None else _remainder(x, y)
    if t in (aten.fmod.Tensor, aten.fmod.Scalar):
        x, y = a(0), a(1)
        return None if x is None or y is None else _fmod(x, y)
    if t in (aten.bitwise_and.Tensor, aten.bitwise_and.Scalar, aten.bitwise_or.Tensor, aten.bitwise_or.Scalar,
             aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar):
        x, y = a(0), a(1)
        return None if x is None or y is None else _bitwise(x, y)
    if t is aten.bitwise_not.default:
        x = a(0)
        return None if x is None else (-x[1] - 1, -x[0] - 1)
    if t in (aten.__lshift__.Scalar, aten.__lshift__.Tensor, aten.bitwise_left_shift.Tensor_Scalar):
        x, s = a(0), a(1)
        return None if x is None or s is None else _shift_left(x, s)
    if t in (aten.__rshift__.Scalar, aten.__rshift__.Tensor, aten.bitwise_right_shift.Tensor):
        x, s = a(0), a(1)
        return None if x is None or s is None else _shift_right(x, s)
    if t is aten.pow.Tensor_Scalar:
        x = a(0)
        return None if x is None else _power(x, args[1])
    if t in (aten.sign.default, aten.sgn.default):
        return (-1, 1)
    if t is aten.where.self:
        x, y = a(1), a(2)
        return None if x is None or y is None else (min(x[0], y[0]), max(x[1], y[1]))
    if t in (aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_min.Tensor,
             aten.clamp_max.default, aten.clamp_max.Tensor):
        x = a(0)
        if x is None:
            return None
        if t in (aten.clamp_min.default, aten.clamp_min.Tensor):
            lo, hi = args[1], None
        elif t in (aten.clamp_max.default, aten.clamp_max.Tensor):
            lo, hi = None, args[1]
        else:
            lo = args[1] if len(args) > 1 else kw.get("min")
            hi = args[2] if len(args) > 2 else kw.get("max")
        lo_iv, hi_iv = (iv(lo) if lo is not None else None), (iv(hi) if hi is not None else None)
        if (lo is not None and lo_iv is None) or (hi is not None and hi_iv is None):
            return None
        out = x
        if lo_iv is not None:
            out = (max(out[0], lo_iv[0]), max(out[1], lo_iv[1]))
        if hi_iv is not None:
            out = (min(out[0], hi_iv[0]), min(out[1], hi_iv[1]))
        return out
    if t in (aten.scalar_tensor.default, aten.full_like.default, aten.new_full.default, aten.full.default):
        v = args[0] if t is aten.scalar_tensor.default else args[-1] if t is aten.new_full.default else args[1]
        return (int(v), int(v)) if isinstance(v, (int, float, bool)) and float(v).is_integer() else None
    if t in (aten.zeros_like.default, aten.new_zeros.default, aten.zeros.default, aten._efficientzerotensor.default):
        return (0, 0)
    if t in (aten.ones_like.default, aten.new_ones.default, aten.ones.default):
        return (1, 1)
    if t is aten._to_copy.default:
        x, dt = a(0), _int_dtype(node)
        if x is None or dt is None:
            return None
        r = dtype_range(dt)
        return x if r[0] <= x[0] and x[1] <= r[1] else None  # a narrowing cast that may wrap: its dtype's range
    if t in (aten.copy.default, aten.copy_.default):  # the source's values, in the destination's dtype
        return a(1)
    if t in ONE_VALUE_OPS:
        return a(0)
    return None


def integer_intervals(gm: torch.fx.GraphModule) -> dict:
    """node name -> (lo, hi) for every integer or bool value of the graph: integer placeholders are
    positions in ``[0, POSITION_LIMIT)``; a load from a captured tensor takes its dtype's range."""
    out: dict = {}

    def iv(x):
        if isinstance(x, bool):
            return (int(x), int(x))
        if isinstance(x, int):
            return (x, x)
        if isinstance(x, torch.fx.Node):
            return out.get(x.name)
        return None

    for node in gm.graph.nodes:
        dt = _int_dtype(node)
        if dt is None:
            continue
        if node.op == "placeholder":
            out[node.name] = (0, POSITION_LIMIT - 1)
        elif node.op == "call_function":
            if node.target is aten.index.Tensor:
                r = None  # a load: whatever the captured tensor holds
            else:
                r = _rule(node, iv)
            full = dtype_range(dt)
            if r is None or r[0] < full[0] or r[1] > full[1]:
                r = full  # unknown, or an op of this dtype that wraps as torch's does
            out[node.name] = r
    return out


def kernel_dtypes(gm: torch.fx.GraphModule, intervals: Optional[dict] = None) -> dict:
    """node name -> the dtype the kernels compute its value in, for every integer or bool node: the
    traced dtype, except int32 for a node traced as int64 whose values fit in int32 (the values are
    the same).  ``intervals``: integer_intervals(gm), if already at hand."""
    intervals = integer_intervals(gm) if intervals is None else intervals
    out = {}
    for node in gm.graph.nodes:
        dt = _int_dtype(node)
        if dt is not None:
            r = intervals.get(node.name)
            out[node.name] = torch.int32 if dt == torch.int64 and r is not None and fits_int32(r) else dt
    return out
