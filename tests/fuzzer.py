"""Differential fuzzer for flexebt: random mods, random shapes, three implementations.

A *case* is fully determined by one integer seed:

* a random ``score_mod`` and/or ``mask_mod``: expression trees over ``score``, ``b``, ``h``,
  ``q_idx``, ``kv_idx`` and captured tensors (float32 / float64 biases with ``requires_grad``,
  int32 / int64 tables, bool tables; plain, sliced, strided, transposed and expanded views),
  rendered as real Python source that closes over the tensors;
* a family (``flex_attention``, ``flex_ebt_attention``, ``piecewise_attention``) and random
  shapes (odd lengths, ``Sq != Skv``, GQA, head dims 16 / 32, EBT offsets, thresholds, block
  masks with several blocks at tiny lengths, or none).

Implementations compared (forward outputs, lse, first-order gradients of the inputs and of the
captured floating tensors, and EBT-style second-order gradients):

* ``oracle64``: this file's own float64 math.  It evaluates the expression tree itself over
  explicit index tensors (torch integer semantics: ``//``, ``%``, negative-index wrap), with every
  floating intermediate in float64, then a plain dense softmax.  It does not import flexebt.
* ``exact64``: the same evaluation with torch's own dtype promotion (what the rendered source
  computes per score with float64 inputs); the reference backend in float64 must match it to
  float64 round-off.
* ``eager32``: the same evaluation with float32 inputs -- the "plain eager fp32 math" baseline that
  scales the tolerance to the conditioning of each case.
* ``ref64`` / ``ref32``: flexebt's ``REFERENCE`` backend; ``tri32``: the ``TRITON`` kernels
  (Triton's interpreter on CPU tensors).

Forward mode (``torch.autograd.forward_ad``, skipped with ``--no-jvp``): random tangents (float64,
seeded from the data seed, cast to each implementation's dtype) of the inputs and of the captured
leaves -- made dual where ``build`` creates them, so the mods close over the dual tensors and their
views -- give the tangents of the outputs and lse (``jvp:out``, ``jvp:lse``), judged like first-order
gradients; the oracle's come from forward AD through its own float64 math.  The kernels refuse
tangents of captured tensors (documented): they are then judged on q / k / v tangents alone.

Metric ``||x - ref|| / ||ref||``; an fp32 implementation passes when its error is at most 2x
(outputs, lse) / 3x (gradients, tangents) eager fp32's error, or under an absolute floor.  A captured tensor's
gradient also passes within fp32 rounding of the terms it sums (``_gradient_terms``): where they
cancel exactly (a bias softmax ignores), that residue is all there is.  NaN never passes.
A mod that the library refuses (``NotImplementedError`` / ``TypeError`` / ``ValueError``) while
torch evaluates it is a *refusal* finding; any other exception is a *crash*; a number outside
the tolerance is *wrong*.

CLI (long runs)::

    python tests/fuzzer.py --seconds 3600 --seed 0 --out findings.jsonl
    python tests/fuzzer.py --replay 1234          # one case, printed as a reproduction
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton / flexebt are imported

import dataclasses
import json
import math
import random
import sys
import textwrap
import time
import traceback
from typing import Optional

import torch

INDEX_NAMES = ("b", "h", "q_idx", "kv_idx")
FLOOR = {"out": 2e-6, "grad": 5e-6, "grad2": 1e-5, "jvp": 5e-6}  # floor of the fp32 criterion (relative; fp32 bound 1e-5)
ATOL32 = 1e-6         # ... and per element, absolute (quantities that vanish, e.g. a per-row bias's grad)
REF64_TOL = 1e-7      # reference float64 vs this file's float64 evaluation with torch promotion (a float32
                      # intermediate may differ: torch promotes 0-dim operands differently per score)
ATOL64 = 1e-12
CANCEL_ROUNDING = 8 * 2.0 ** -24  # a captured tensor's gradient: error allowed per unit of its summed |terms|
                                  # (norms; fp32 unit roundoff times 8).  Measured on vanishing gradients
                                  # (seeds 4317, 90168, 90209, 90214): up to 0.17 at first order, 1.4 at
                                  # second order (its terms are not bounded through their operands)
MARGIN = 1e-5         # relative distance to a discontinuity below which inputs are resampled


# ----------------------------------------------------------------------------------------------
# Expression trees
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Node:
    """One expression node.  ``kind``: "f" float, "i" int, "b" bool, "v" float vector (a
    partially indexed captured tensor, only under a reduction).  ``lo``/``hi``: value range
    (ints exact, floats a magnitude bound in ``hi``).  ``data``: depends on the score or on a
    captured float tensor (what a float32 evaluation can perturb)."""

    op: str
    kind: str
    args: tuple = ()
    attr: object = None
    lo: float = 0.0
    hi: float = 0.0
    data: bool = False

    @property
    def is_const(self):
        return self.op == "const"

    def walk(self):
        yield self
        for a in self.args:
            yield from a.walk()


@dataclasses.dataclass
class Table:
    """A captured tensor: how to build it (source lines) and what it holds."""

    name: str
    kind: str            # "f", "i", "b" (values), "s" (one-element float used without index)
    dtype: torch.dtype
    shape: tuple         # the shape the mod sees
    source: list         # lines that build it (use the generator ``g``)
    vlo: int = 0         # int tables: value range
    vhi: int = 0
    grad_leaf: Optional[str] = None  # name of the leaf tensor that receives gradients


def _dtype_src(dt):
    return "torch." + str(dt).split(".")[-1]


class Gen:
    """Random generator of tables and trees for one case."""

    def __init__(self, rng: random.Random, B, H, qmax, kvmax, family):
        self.r = rng
        self.B, self.H, self.qmax, self.kvmax = B, H, qmax, kvmax
        self.family = family
        self.tables: list[Table] = []
        self.used: set = set()

    # -- captured tensors --------------------------------------------------------------------
    def _dim_size(self, role):
        r = self.r
        if role == "b":
            return self.B
        if role == "h":
            return self.H
        if role == "q":
            return self.qmax + 1 + r.choice([0, 0, 1, 3])
        if role == "kv":
            return self.kvmax + 1 + r.choice([0, 0, 2, 5])
        return r.randint(3, 23)

    def make_tables(self):
        r = self.r
        n = r.choice([1, 1, 2, 2, 3, 4])
        for k in range(n):
            kind = r.choices(["f", "i", "b", "s"], [6, 3, 2, 1])[0]
            prefix = {"f": "bias", "i": "ids", "b": "allow", "s": "temp"}[kind]
            self.tables.append(self._make_table(f"{prefix}{k}", kind))

    def _make_table(self, name, kind):
        r = self.r
        if kind == "s":
            dt = r.choice([torch.float32, torch.float64])
            return Table(name, "s", dt, (), [f"{name} = torch.tensor({r.uniform(0.3, 1.5):.3f}, dtype={_dtype_src(dt)})"])
        ndim = r.choices([1, 2, 3], [4, 4, 3])[0]
        roles = [r.choice(["h", "q", "kv", "n", "b"]) for _ in range(ndim)]
        if ndim == 3:
            roles = [r.choice(["h", "b", "n"]), "q", "kv"]
        shape = tuple(self._dim_size(x) for x in roles)
        if kind == "f":
            dt = r.choice([torch.float32, torch.float64])
            grad = r.random() < 0.7
        elif kind == "i":
            dt = r.choice([torch.int32, torch.int64])
            grad = False
        else:
            dt, grad = torch.bool, False
        view = r.choices(["plain", "slice", "strided", "transposed", "expanded"], [4, 2, 2, 2, 2])[0]
        if view == "transposed" and ndim < 2:
            view = "plain"
        base = f"{name}_base"
        full = ", ".join(map(str, shape))

        def values(shp):
            s = ", ".join(map(str, shp)) + ("," if len(shp) == 1 else "")
            if kind == "f":
                return f"0.5 * torch.randn(({s}), generator=g, dtype={_dtype_src(dt)})"
            if kind == "i":
                if r.random() < 0.5:  # document ids: sorted small ints
                    return f"torch.randint(0, 4, ({s}), generator=g).sort(dim=-1).values.to({_dtype_src(dt)})"
                return f"torch.randint({vlo}, {vhi + 1}, ({s}), generator=g).to({_dtype_src(dt)})"
            return f"torch.rand(({s}), generator=g) < 0.7"

        vlo, vhi = (0, 3)
        if kind == "i":
            vlo, vhi = r.choice([(-6, 6), (0, 9), (-20, 3)])
        src = []
        if view == "plain":
            src.append(f"{base} = {values(shape)}")
            expr = base
        elif view == "slice":
            big = tuple(s + r.randint(1, 4) for s in shape)
            src.append(f"{base} = {values(big)}")
            expr = f"{base}[{', '.join(':' + str(s) for s in shape)}]"
        elif view == "strided":
            d = r.randrange(ndim)
            big = tuple(s * 2 if i == d else s for i, s in enumerate(shape))
            src.append(f"{base} = {values(big)}")
            expr = f"{base}[{', '.join('::2' if i == d else ':' for i in range(ndim))}]"
        elif view == "transposed":
            big = tuple(reversed(shape[-2:]))
            big = shape[:-2] + big
            src.append(f"{base} = {values(big)}")
            expr = f"{base}.transpose(-1, -2)"
        else:  # expanded: one dim of size 1 in the base
            d = r.randrange(ndim)
            small = tuple(1 if i == d else s for i, s in enumerate(shape))
            src.append(f"{base} = {values(small)}")
            expr = f"{base}.expand({full})"
        if kind == "i":
            pass
        leaf = None
        if grad:
            src[0] = src[0] + ".requires_grad_()"
            leaf = base
        src.append(f"{name} = {expr}")
        if kind == "i" and "sort" in src[0]:
            vlo, vhi = 0, 3
        return Table(name, kind, dt, shape, src, vlo, vhi, leaf)

    # -- trees ---------------------------------------------------------------------------------
    def const_i(self):
        c = self.r.choice([-7, -5, -3, -2, -1, 1, 2, 3, 4, 5, 7, 9])
        return Node("const", "i", attr=c, lo=c, hi=c)

    def const_f(self, lo=-2.0, hi=2.0):
        c = round(self.r.uniform(lo, hi), 3)
        return Node("const", "f", attr=c, lo=-abs(c), hi=abs(c))

    def idx(self, name=None):
        name = name or self.r.choice(INDEX_NAMES)
        hi = {"b": self.B - 1, "h": self.H - 1, "q_idx": self.qmax, "kv_idx": self.kvmax}[name]
        return Node("idx", "i", attr=name, lo=0, hi=hi)

    def index_for(self, size, role_hint=None):
        """An int index expression for a dim of ``size``: natural, wrapped, or (rarely) raw."""
        r = self.r
        if r.random() < 0.08:  # a constant index (negative ones wrap): ids[b, q_idx, kv_idx, 1]
            c = r.randrange(-size, size)
            return Node("const", "i", attr=c, lo=c, hi=c)
        natural = []
        for nm in INDEX_NAMES:
            n = self.idx(nm)
            if n.hi < size:
                natural.append(n)
        if self.qmax < size and self.kvmax < size:
            natural.append(binop("sub", self.idx("q_idx"), self.idx("kv_idx")))  # negative: wraps
        if natural and r.random() < 0.5:
            e = r.choice(natural)
            if e.lo >= -size and e.hi < size:
                return e
        e = self.int_expr(2)
        if e.is_const:
            e = self.idx()
        if e.lo >= -size and e.hi < size and r.random() < 0.4:
            return e
        if r.random() < 0.03:
            return e  # may be out of range: torch raises, the library must too
        how = r.choice(["mod", "modneg", "negwrap", "remainder", "clamp"])
        n = Node("const", "i", attr=size, lo=size, hi=size)
        if how == "mod":
            return binop("mod", e, n)
        if how == "remainder":
            return binop("remainder", e, n)
        if how == "modneg":   # % -n lies in (-n, 0]: negative indices that wrap
            m = Node("const", "i", attr=-size, lo=-size, hi=-size)
            return binop("mod", e, m)
        if how == "negwrap":
            return binop("sub", binop("mod", e, n), n)
        return Node("clamp", "i", (e,), attr=(0, size - 1), lo=max(e.lo, 0), hi=min(e.hi, size - 1))

    def load(self, kinds, allow_vector=False):
        cands = [t for t in self.tables if t.kind in kinds]
        if not cands:
            return None
        t = self.r.choice(cands)
        self.used.add(t.name)
        if t.kind == "s":
            return Node("scalar", "f", attr=t.name, lo=-1.5, hi=1.5, data=True)
        nidx = len(t.shape)
        vector = allow_vector and t.kind == "f" and nidx >= 2 and self.r.random() < 0.5
        if vector:
            nidx -= 1
        idxs = tuple(self.index_for(t.shape[d]) for d in range(nidx))
        if vector:
            return Node("load", "v", idxs, attr=t.name, lo=-3.0, hi=3.0, data=True)
        if t.kind == "f":
            return Node("load", "f", idxs, attr=t.name, lo=-3.0, hi=3.0, data=True)
        if t.kind == "i":
            return Node("load", "i", idxs, attr=t.name, lo=t.vlo, hi=t.vhi)
        return Node("load", "b", idxs, attr=t.name)

    def int_expr(self, depth):
        r = self.r
        if depth <= 0 or r.random() < 0.3:
            x = r.random()
            if x < 0.6:
                return self.idx()
            if x < 0.75:
                n = self.load("i")
                if n is not None:
                    return n
            return self.idx() if r.random() < 0.5 else self.const_i()
        op = r.choice(["add", "sub", "mul", "floordiv", "mod", "div_floor", "remainder", "div_trunc",
                       "band", "bor", "bxor", "neg", "abs", "clamp", "minimum", "maximum", "where", "pow"])
        a = self.int_expr(depth - 1)
        if a.is_const:
            a = self.idx()
        if op in ("neg", "abs"):
            return unop(op, a)
        if op == "pow":
            return binop("pow", a, Node("const", "i", attr=r.choice([2, 3]), lo=0, hi=0))
        if op == "clamp":
            lo = r.randint(-5, 3)
            return Node("clamp", "i", (a,), attr=(lo, lo + r.randint(1, 12)), lo=lo, hi=0)
        if op == "where":
            c = self.bool_expr(1, allow_float=False)
            return where(c, a, self.int_expr(depth - 1))
        if op in ("minimum", "maximum"):
            bb = self.int_expr(depth - 1)
            if bb.is_const:
                bb = self.idx()
            return binop(op, a, bb)
        if op in ("floordiv", "mod", "div_floor", "remainder", "div_trunc"):
            bb = self.int_expr(depth - 1) if r.random() < 0.3 else self.const_i()
            if bb.lo <= 0 <= bb.hi:
                bb = self.const_i()
            return binop(op, a, bb)
        bb = self.int_expr(depth - 1) if r.random() < 0.6 else self.const_i()
        return binop(op, a, bb)

    def bool_expr(self, depth, allow_float=True, with_score=False):
        r = self.r
        if depth <= 0 or r.random() < 0.35:
            x = r.random()
            if x < 0.15:
                n = self.load("b")
                if n is not None:
                    return n
            if allow_float and x < 0.45:
                a = self.float_expr(1, with_score)
                if a.data:  # compare data, never index-only floats (fp32 vs fp64 rounding would decide)
                    b = self.float_expr(0, with_score)
                    if render(b) == render(a):
                        b = self.const_f()
                    return binop(r.choice(["lt", "le", "gt", "ge"]), a, b)
            return binop(r.choice(["lt", "le", "gt", "ge", "eq", "ne"]), self.int_expr(1), self.int_expr(1))
        op = r.choice(["and", "or", "xor", "not", "land", "lor"])
        a = self.bool_expr(depth - 1, allow_float, with_score)
        if op == "not":
            return unop("not", a)
        return binop(op, a, self.bool_expr(depth - 1, allow_float, with_score))

    def float_expr(self, depth, with_score=True):
        r = self.r
        if depth <= 0 or r.random() < 0.25:
            x = r.random()
            if with_score and x < 0.45:
                return Node("score", "f", lo=-6, hi=6, data=True)
            if x < 0.7:
                n = self.load("fs", allow_vector=r.random() < 0.15)
                if n is not None:
                    if n.kind == "v":
                        return Node(r.choice(["sum", "mean"]), "f", (n,), lo=-6, hi=6 * 23, data=True)
                    return n
            if x < 0.85:  # an int expression in float context
                i = self.int_expr(1)
                if i.is_const:
                    i = self.idx()
                m = max(abs(i.lo), abs(i.hi), 1)
                if r.random() < 0.5:
                    c = round(2.0 / m, 4)
                    return binop("mul", i, Node("const", "f", attr=c, lo=-c, hi=c))
                c = float(max(m // 2, 1)) if r.random() < 0.5 else round(m / 2 + 0.3, 2)
                return binop("truediv", i, Node("const", "f", attr=c, lo=-c, hi=c))
            return self.const_f()
        op = r.choice(["add", "sub", "mul", "truediv", "neg", "abs", "tanh", "sigmoid", "exp", "log", "sqrt",
                       "pow_int", "pow_float", "pow_frac", "rpow", "clamp", "minimum", "maximum", "where",
                       "add", "mul"])
        a = self.float_expr(depth - 1, with_score)
        if a.is_const:
            a = Node("score", "f", lo=-6, hi=6, data=True) if with_score else self.float_expr(0, with_score)
            if a.is_const:
                return a
        if op in ("neg", "abs", "tanh", "sigmoid"):
            return unop(op, a)
        if op == "exp":
            return unop("exp", clampf(a, -3.0, 3.0))
        if op == "log":
            return unop("log", binop("add", unop("abs", a), self.const_f(0.25, 1.5).with_abs()))
        if op == "sqrt":
            return unop("sqrt", binop("add", unop("abs", a), self.const_f(0.1, 1.0).with_abs()))
        if op == "pow_int":    # negative bases: integer exponents, int or float typed
            e = r.choice([2, 3, 2.0, 3.0])
            return bound(binop("pow", a, Node("const", "i" if isinstance(e, int) else "f", attr=e)))
        if op == "pow_float":  # float exponents on positive bases
            base = binop("add", unop("abs", a), self.const_f(0.2, 1.0).with_abs())
            return bound(binop("pow", base, Node("const", "f", attr=r.choice([1.5, 0.5, -0.5, 2.5]))))
        if op == "pow_frac":   # torch.pow spelling, negative exponent on a base >= 1
            base = binop("add", unop("abs", a), Node("const", "f", attr=1.0, lo=-1, hi=1))
            return bound(Node("torch_pow", "f", (base, Node("const", "f", attr=-1.5)), hi=1.0, data=a.data))
        if op == "rpow":
            c = r.choice([2.0, 0.5, 1.5])
            return bound(Node("rpow", "f", (clampf(a, -4.0, 4.0),), attr=c, hi=c ** 4 if c > 1 else c ** -4,
                              data=a.data))
        if op == "clamp":
            lo = round(r.uniform(-2, 0.5), 2)
            return clampf(a, lo, round(lo + r.uniform(0.5, 3), 2))
        if op == "where":
            c = self.bool_expr(1, allow_float=True, with_score=with_score)
            return where(c, a, self.float_expr(depth - 1, with_score))
        if op in ("minimum", "maximum"):
            bb = self.float_expr(depth - 1, with_score)
            if bb.is_const:
                return clampf(a, bb.attr, None) if op == "maximum" else clampf(a, None, bb.attr)
            return binop(op, a, bb)
        if op == "truediv":
            bb = self.float_expr(depth - 1, with_score)
            if bb.is_const or r.random() < 0.4:
                return binop("truediv", a, Node("const", "f", attr=r.choice([2.0, -3.0, 0.7, 7]), hi=0.7))
            return binop("truediv", a, binop("add", unop("abs", bb), Node("const", "f", attr=1.0, lo=-1, hi=1)))
        bb = self.float_expr(depth - 1, with_score) if r.random() < 0.7 else self.int_expr(1)
        return bound(binop(op, a, bb))


def _with_abs(self):
    self.attr = abs(self.attr)
    self.lo, self.hi = -self.attr, self.attr
    return self


Node.with_abs = _with_abs


def _mag(n):
    return max(abs(n.lo), abs(n.hi))


def bound(n: Node, limit=8.0) -> Node:
    """Keep a float expression's magnitude bounded (tanh squashing) so the math stays defined."""
    if n.kind != "f" or _mag(n) <= limit:
        return n
    k = round(2.0 / _mag(n), 6)
    inner = binop("mul", n, Node("const", "f", attr=k, lo=-k, hi=k))
    out = binop("mul", unop("tanh", inner), Node("const", "f", attr=4.0, lo=-4, hi=4))
    return out


def clampf(a, lo, hi):
    m = _mag(a)
    nlo = lo if lo is not None else -m
    nhi = hi if hi is not None else m
    return Node("clamp", "f", (a,), attr=(lo, hi), lo=-max(abs(nlo), abs(nhi)), hi=max(abs(nlo), abs(nhi)),
                data=a.data)


def where(c, a, b):
    kind = "f" if "f" in (a.kind, b.kind) else "i"
    lo, hi = (min(a.lo, b.lo), max(a.hi, b.hi)) if kind == "i" else (-max(_mag(a), _mag(b)), max(_mag(a), _mag(b)))
    return Node("where", kind, (c, a, b), lo=lo, hi=hi, data=a.data or b.data or c.data)


def _corners(f, a, b):
    ys = [y for y in (b.lo, b.hi) if y != 0] or [1]
    vals = [f(x, y) for x in (a.lo, a.hi) for y in ys]
    return min(vals), max(vals)


def _pow2(m):
    k = 1
    while k <= m:
        k *= 2
    return k


def unop(op, a):
    kind = "b" if op == "not" else a.kind
    lo, hi = a.lo, a.hi
    if op == "neg":
        lo, hi = -a.hi, -a.lo
    elif op == "abs":
        lo, hi = (0 if a.lo <= 0 <= a.hi else min(abs(a.lo), abs(a.hi))), max(abs(a.lo), abs(a.hi))
    elif op in ("tanh", "sigmoid"):
        lo, hi = -1, 1
    elif op == "exp":
        lo, hi = 0, math.exp(_mag(a))
    elif op == "log":
        lo, hi = -3, math.log(_mag(a) + 1) + 3
    elif op == "sqrt":
        lo, hi = 0, math.sqrt(_mag(a) + 1)
    if kind == "f":
        lo, hi = -max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
    return Node(op, kind, (a,), lo=lo, hi=hi, data=a.data)


def binop(op, a, b):
    data = a.data or b.data
    if op in ("lt", "le", "gt", "ge", "eq", "ne", "and", "or", "xor", "land", "lor"):
        return Node(op, "b", (a, b), data=data)
    kind = "f" if ("f" in (a.kind, b.kind) or op == "truediv") else "i"
    if kind == "f":
        ma, mb = _mag(a), _mag(b)
        if op in ("add", "sub"):
            m = ma + mb
        elif op == "mul":
            m = ma * mb
        elif op == "truediv":
            m = ma / max(min(abs(b.attr) if b.is_const else 1.0, 1.0), 1e-3) if b.is_const else ma
            if b.is_const:
                m = ma / abs(b.attr)
        elif op == "pow":
            e = b.attr
            m = (ma ** e) if e > 0 else (max(min(abs(a.lo), abs(a.hi)), 0.2) ** e)
        else:
            m = max(ma, mb)
        return Node(op, "f", (a, b), lo=-m, hi=m, data=data)
    if op == "add":
        lo, hi = a.lo + b.lo, a.hi + b.hi
    elif op == "sub":
        lo, hi = a.lo - b.hi, a.hi - b.lo
    elif op == "mul":
        lo, hi = _corners(lambda x, y: x * y, a, b)
    elif op in ("floordiv", "div_floor"):
        lo, hi = _corners(lambda x, y: math.floor(x / y), a, b)
    elif op == "div_trunc":
        lo, hi = _corners(lambda x, y: int(x / y), a, b)
    elif op in ("mod", "remainder"):
        lo, hi = (0, b.hi - 1) if b.lo > 0 else (b.lo + 1, 0)
    elif op == "pow":
        e = b.attr
        lo, hi = (min(a.lo ** e, a.hi ** e), max(a.lo ** e, a.hi ** e))
        if e % 2 == 0 and a.lo <= 0 <= a.hi:
            lo = 0
    elif op in ("minimum", "maximum"):
        f = min if op == "minimum" else max
        lo, hi = f(a.lo, b.lo), f(a.hi, b.hi)
    elif op in ("band", "bor", "bxor"):
        if min(a.lo, b.lo) >= 0:
            lo, hi = 0, (min(a.hi, b.hi) if op == "band" else _pow2(max(a.hi, b.hi)) - 1)
        else:
            k = _pow2(max(abs(a.lo), abs(a.hi), abs(b.lo), abs(b.hi)))
            lo, hi = -k, k - 1
    else:
        raise ValueError(op)
    n = Node(op, "i", (a, b), lo=lo, hi=hi, data=data)
    if max(abs(lo), abs(hi)) > 10_000:  # keep int32 arithmetic far from overflow
        n = binop("mod", n, Node("const", "i", attr=101, lo=101, hi=101))
    return n


# ----------------------------------------------------------------------------------------------
# Rendering to Python source
# ----------------------------------------------------------------------------------------------

_BIN = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%", "band": "&",
        "bor": "|", "bxor": "^", "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!=",
        "and": "&", "or": "|", "xor": "^", "pow": "**"}


# two-operand ops rendered as torch calls: op -> format string of (left, right)
_BINARY_CALLS = {
    "torch_pow": "torch.pow({}, {})",
    "div_floor": "torch.div({}, {}, rounding_mode='floor')",
    "div_trunc": "torch.div({}, {}, rounding_mode='trunc')",
    "remainder": "torch.remainder({}, {})",
    "minimum": "torch.minimum({}, {})",
    "maximum": "torch.maximum({}, {})",
    "land": "torch.logical_and({}, {})",
    "lor": "torch.logical_or({}, {})",
}


def render(n: Node) -> str:
    op, a = n.op, n.args
    if op == "score":
        return "score"
    if op == "idx":
        return n.attr
    if op == "const":
        return repr(n.attr)
    if op == "scalar":
        return n.attr
    if op == "load":
        return f"{n.attr}[{', '.join(render(x) for x in a)}]"
    if op in ("sum", "mean"):
        return f"{render(a[0])}.{op}()"
    if op in _BIN:
        return f"({render(a[0])} {_BIN[op]} {render(a[1])})"
    if op == "neg":
        return f"(-{render(a[0])})"
    if op == "not":
        return f"(~{render(a[0])})"
    if op in ("abs", "tanh", "sigmoid", "exp", "log", "sqrt"):
        return f"torch.{op}({render(a[0])})"
    if op == "rpow":
        return f"({n.attr!r} ** {render(a[0])})"
    if op in _BINARY_CALLS:
        return _BINARY_CALLS[op].format(render(a[0]), render(a[1]))
    if op == "clamp":
        lo, hi = n.attr
        parts = ([f"min={lo!r}"] if lo is not None else []) + ([f"max={hi!r}"] if hi is not None else [])
        return f"torch.clamp({render(a[0])}, {', '.join(parts)})"
    if op == "where":
        return f"torch.where({render(a[0])}, {render(a[1])}, {render(a[2])})"
    raise ValueError(op)


# ----------------------------------------------------------------------------------------------
# Evaluation (the oracle): the tree over explicit index tensors
# ----------------------------------------------------------------------------------------------

class Evaluator:
    """Evaluates a tree over broadcastable index tensors.

    ``promote=True``: every floating intermediate in ``fdt`` (float64 math);
    ``promote=False``: torch's own dtype promotion on the actual tensors (what the rendered
    source computes).  ``margins`` collects, for data-dependent branches (comparisons, clamp,
    abs, minimum / maximum), the smallest relative distance to the branch point."""

    def __init__(self, env: dict, tables: dict, fdt, promote: bool, load_hook=None):
        self.env, self.tables, self.fdt, self.promote = env, tables, fdt, promote
        self.load_hook = load_hook  # registered on every floating load that requires grad
        self.margin = float("inf")

    def _note(self, x, y, on_score):
        with torch.no_grad():
            x = torch.as_tensor(x, dtype=torch.float64)
            y = torch.as_tensor(y, dtype=torch.float64)
            d = ((x - y).abs() / (1 + x.abs() + y.abs()))
            d = d[d > 0]  # exact ties: identical values in every precision (e.g. one captured element twice)
            if not on_score:
                d = d[d > 1e-6]  # captured values alone: only a float32 rounding of them could flip it
            if d.numel():
                self.margin = min(self.margin, d.min().item())

    def _f(self, v):
        """In promote mode, a float-context operand as an fdt tensor."""
        if not self.promote:
            return v
        if isinstance(v, torch.Tensor):
            return v.to(self.fdt)
        return torch.tensor(float(v), dtype=self.fdt)

    def ev(self, n: Node):
        op, a = n.op, n.args
        if op == "score":
            return self.env["score"]
        if op == "idx":
            return self.env[n.attr]
        if op == "const":
            return n.attr
        if op == "scalar":
            return self.tables[n.attr]
        if op == "load":
            t = self.tables[n.attr]
            idx = tuple(self.ev(x) for x in a)
            idx = tuple(i.long() if isinstance(i, torch.Tensor) else i for i in idx)
            out = t[idx]
            if self.load_hook is not None and out.requires_grad:
                # one value per score (and per vector element), so that the hook sees each score's
                # own gradient before a broadcast sums them (in float64, as the oracle's sums are)
                per_score = torch.broadcast_shapes(*(self.env[k].shape for k in INDEX_NAMES))
                trailing = t.dim() - len(idx)
                out = out.to(self.fdt).expand(per_score + (tuple(out.shape[-trailing:]) if trailing else ()))
                out.register_hook(self.load_hook)
            return out
        if op in ("sum", "mean"):
            v = self.ev(a[0])
            # a vector load: trailing dim of the captured tensor (the per-score vector)
            return v.sum(-1) if op == "sum" else v.mean(-1)
        vals = [self.ev(x) for x in a]
        if n.kind == "f" or (n.kind == "b" and any(x.kind == "f" for x in a)):
            if op != "where":
                vals = [self._f(v) for v in vals]
            else:
                vals = [vals[0], self._f(vals[1]), self._f(vals[2])]
        if n.data:
            sc = any(x.op == "score" for x in n.walk())
            if op in ("lt", "le", "gt", "ge") and any(x.kind == "f" for x in a):
                self._note(vals[0], vals[1], sc)
            if op in ("minimum", "maximum") and n.kind == "f":
                self._note(vals[0], vals[1], sc)
            if op == "abs" and n.kind == "f":
                self._note(vals[0], 0.0, sc)
            if op == "clamp" and n.kind == "f":
                for c in n.attr:
                    if c is not None:
                        self._note(vals[0], c, sc)
        x = vals[0]
        y = vals[1] if len(vals) > 1 else None
        T = torch
        if op == "add":
            return x + y
        if op == "sub":
            return x - y
        if op == "mul":
            return x * y
        if op == "truediv":
            if self.promote:
                return x / y
            return (x / y) if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) else x / y
        if op == "floordiv":
            return x // y
        if op == "mod":
            return x % y
        if op == "div_floor":
            return T.div(x, y, rounding_mode="floor")
        if op == "div_trunc":
            return T.div(x, y, rounding_mode="trunc")
        if op == "remainder":
            return T.remainder(x, y)
        if op in ("band", "and"):
            return x & y
        if op in ("bor", "or"):
            return x | y
        if op in ("bxor", "xor"):
            return x ^ y
        if op == "land":
            return T.logical_and(x, y)
        if op == "lor":
            return T.logical_or(x, y)
        if op == "lt":
            return x < y
        if op == "le":
            return x <= y
        if op == "gt":
            return x > y
        if op == "ge":
            return x >= y
        if op == "eq":
            return x == y
        if op == "ne":
            return x != y
        if op == "pow":
            return x ** y
        if op == "torch_pow":
            return T.pow(x, y)
        if op == "rpow":
            return self._f(n.attr) ** x if self.promote else n.attr ** x
        if op == "neg":
            return -x
        if op == "not":
            return ~x
        if op in ("abs", "tanh", "sigmoid", "exp", "log", "sqrt"):
            return getattr(T, op)(x)
        if op in ("minimum", "maximum"):
            return getattr(T, op)(x, y)
        if op == "clamp":
            lo, hi = n.attr
            return T.clamp(x, min=lo, max=hi)
        if op == "where":
            return T.where(x, y, vals[2])
        raise ValueError(op)


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
    seed: int
    family: str                    # "flex", "ebt", "piecewise"
    B: int
    Hq: int
    Hkv: int
    D: int
    Dv: int
    Sq: int                        # flex: Sq; ebt: S_o; piecewise: M
    Skv: int                       # flex: Skv; ebt: S_p; piecewise: N
    scale: Optional[float]
    score_tree: Optional[Node]
    mask_tree: Optional[Node]
    mask_mode: str                 # "none", "mask" (block mask from mask_tree), "causal" (EBT default)
    block: int
    bm_bh: bool                    # block mask built for (B, H) rather than broadcast
    tables: list
    threshold: float = 0.0
    causal: bool = False
    data_seed: int = 0
    rebind: bool = False           # also check a second instance of the same code with new values

    # -- source ----------------------------------------------------------------------------------
    def build_source(self, dual_hook: bool = False) -> str:
        """``dual_hook``: ``build(seed, dual)`` passes each captured leaf that requires grad through
        ``dual`` right where it is made, before any view of it is taken and before the mods close
        over it (forward mode: ``dual`` returns it as a dual tensor)."""
        lines = ["def build(seed, dual=lambda x: x):" if dual_hook else "def build(seed):",
                 "    g = torch.Generator().manual_seed(seed)"]
        used = self.used_tables()
        for t in self.tables:
            if t.name in used:
                for k, s in enumerate(t.source):
                    lines.append("    " + s)
                    if dual_hook and k == 0 and t.grad_leaf:
                        lines.append(f"    {t.grad_leaf} = dual({t.grad_leaf})")
        names = [t.name for t in self.tables if t.name in used]
        if self.score_tree is not None:
            lines += ["    def score_mod(score, b, h, q_idx, kv_idx):",
                      "        return " + render(self.score_tree)]
        else:
            lines += ["    score_mod = None"]
        if self.mask_tree is not None:
            lines += ["    def mask_mod(b, h, q_idx, kv_idx):", "        return " + render(self.mask_tree)]
        else:
            lines += ["    mask_mod = None"]
        leaves = [t.grad_leaf for t in self.tables if t.name in used and t.grad_leaf]
        lines += [f"    tables = {{{', '.join(repr(n) + ': ' + n for n in names)}}}",
                  f"    leaves = [{', '.join(leaves)}]",
                  "    return score_mod, mask_mod, tables, leaves"]
        return "\n".join(lines)

    def used_tables(self) -> set:
        used = set()
        for tree in (self.score_tree, self.mask_tree):
            if tree is not None:
                for n in tree.walk():
                    if n.op in ("load", "scalar"):
                        used.add(n.attr)
        return used

    def build(self, seed=None, dual=None):
        """``(score_mod, mask_mod, tables, leaves)``; ``dual``: see :meth:`build_source`."""
        ns = {"torch": torch}
        exec(compile(self.build_source(dual_hook=dual is not None), f"<fuzz case {self.seed}>", "exec"), ns)
        seed = self.data_seed if seed is None else seed
        return ns["build"](seed) if dual is None else ns["build"](seed, dual)

    def describe(self) -> str:
        if self.family == "flex":
            sh = f"B={self.B} Hq={self.Hq} Hkv={self.Hkv} Sq={self.Sq} Skv={self.Skv} D={self.D} Dv={self.Dv}"
        elif self.family == "ebt":
            sh = f"B={self.B} Hq={self.Hq} Hkv={self.Hkv} S_o={self.Sq} S_p={self.Skv} (r={self.Sq - self.Skv}) D={self.D}"
        else:
            sh = (f"B={self.B} H={self.Hq} M={self.Sq} N={self.Skv} D={self.D} Dv={self.Dv} "
                  f"threshold={self.threshold} causal={self.causal}")
        bm = {"none": "no block mask", "mask": f"block mask from mask_mod, BLOCK_SIZE={self.block}",
              "causal": f"create_ebt_block_mask(None) (causal), BLOCK_SIZE={self.block}"}[self.mask_mode]
        return f"{self.family}: {sh}, scale={self.scale}, {bm}"

    def repro(self, note="", jvp=False) -> str:
        """A self-contained script that runs the case on the kernels and the reference (``jvp``:
        and their forward mode, ``torch.autograd.forward_ad``, in the fuzzer's tangent directions)."""
        call = {
            "flex": ("q = torch.randn(B, Hq, Sq, D, generator=g); k = torch.randn(B, Hkv, Skv, D, generator=g)\n"
                     "v = torch.randn(B, Hkv, Skv, Dv, generator=g)\n"
                     "bm = None if mask_mod is None else create_block_mask(mask_mod, BB, HH, Sq, Skv, device='cpu', "
                     "BLOCK_SIZE=BLOCK)\n"
                     "run = lambda o: flexebt.flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, scale=SCALE, "
                     "enable_gqa=Hq != Hkv, return_lse=True, kernel_options={'BACKEND': o})"),
            "ebt": ("x = lambda H, S, d: torch.randn(B, H, S, d, generator=g)\n"
                    "q_o, k_o, v_o = x(Hq, Sq, D), x(Hkv, Sq, D), x(Hkv, Sq, Dv)\n"
                    "q_p, k_p, v_p = x(Hq, Skv, D), x(Hkv, Skv, D), x(Hkv, Skv, Dv)\n"
                    "bm = None if MASK_MODE == 'none' else flexebt.create_ebt_block_mask(mask_mod, BB, HH, Sq, Skv, "
                    "device='cpu', BLOCK_SIZE=BLOCK)\n"
                    "run = lambda o: flexebt.flex_ebt_attention(q_o, k_o, v_o, q_p, k_p, v_p, score_mod=score_mod, "
                    "block_mask=bm, scale=SCALE, enable_gqa=Hq != Hkv, return_lse=True, kernel_options={'BACKEND': o})"),
            "piecewise": ("x = lambda S, d: torch.randn(B, Hq, S, d, generator=g)\n"
                          "q1, k1, q2, k2, v = x(Sq, D), x(Skv, D), x(Sq, D), x(Skv, D), x(Skv, Dv)\n"
                          "bm = None if mask_mod is None else create_block_mask(mask_mod, BB, HH, Sq, Skv, "
                          "device='cpu', BLOCK_SIZE=BLOCK)\n"
                          "run = lambda o: flexebt.piecewise_attention(q1, k1, q2, k2, v, THRESHOLD, causal=CAUSAL, "
                          "scale=SCALE, score_mod=score_mod, block_mask=bm, kernel_options={'BACKEND': o})"),
        }[self.family]
        head = (f"# flexebt fuzz case seed={self.seed} data_seed={self.data_seed}\n# {self.describe()}\n"
                + "".join(f"# {ln}\n" for ln in note.strip().splitlines() if ln))
        return (head + "import os\nos.environ.setdefault('TRITON_INTERPRET', '1')\nimport torch, flexebt\n"
                "from torch.nn.attention.flex_attention import create_block_mask\n\n"
                + self.build_source(dual_hook=jvp) + "\n\n"
                f"B, Hq, Hkv, Sq, Skv, D, Dv = {self.B}, {self.Hq}, {self.Hkv}, {self.Sq}, {self.Skv}, {self.D}, {self.Dv}\n"
                f"SCALE, BLOCK, MASK_MODE = {self.scale!r}, {self.block}, {self.mask_mode!r}\n"
                f"BB, HH = {(self.B, self.Hq) if self.bm_bh else (None, None)}\n"
                f"THRESHOLD, CAUSAL = {self.threshold!r}, {self.causal!r}\n"
                f"score_mod, mask_mod, tables, leaves = build({self.data_seed})\n"
                f"g = torch.Generator().manual_seed({self.data_seed} + 1)\n"
                + call + "\n"
                "tri, ref = run('TRITON'), run('REFERENCE')\n"
                "tri, ref = (tri if isinstance(tri, tuple) else (tri,)), (ref if isinstance(ref, tuple) else (ref,))\n"
                "for a, r in zip(tri, ref):\n"
                "    print(((a - r).norm() / r.norm()).item() if r.isfinite().all() else (a, r))\n"
                + (self._repro_jvp() if jvp else ""))

    def _repro_jvp(self) -> str:
        names = {"flex": ["q", "k", "v"], "ebt": ["q_o", "k_o", "v_o", "q_p", "k_p", "v_p"],
                 "piecewise": ["q1", "k1", "q2", "k2", "v"]}[self.family]
        return textwrap.dedent(f"""
            # forward mode (torch.autograd.forward_ad): tangents of the inputs and, with leaf_tangents, of the
            # captured leaves (made dual where build() creates them); the block mask stays the plain one
            import torch.autograd.forward_ad as fwAD
            INS = {names!r}
            gt = torch.Generator().manual_seed({self.data_seed} + 11)
            TANS = [torch.randn(globals()[n].shape, generator=gt, dtype=torch.float64).float() for n in INS]

            def jvp(backend, leaf_tangents):
                global score_mod
                primal, sm = {{n: globals()[n] for n in INS}}, score_mod
                gl = torch.Generator().manual_seed({self.data_seed} + 13)

                def dual(x):
                    x, t = x.detach(), torch.randn(x.shape, generator=gl, dtype=torch.float64).to(x.dtype)
                    return fwAD.make_dual(x, t) if leaf_tangents else x

                with torch.no_grad(), fwAD.dual_level():
                    score_mod = build({self.data_seed}, dual)[0]
                    globals().update({{n: fwAD.make_dual(primal[n], t) for n, t in zip(INS, TANS)}})
                    try:
                        res = run(backend)
                        return [fwAD.unpack_dual(r).tangent for r in (res if isinstance(res, tuple) else (res,))]
                    finally:
                        globals().update(primal)
                        score_mod = sm

            for leaf_tangents in (False, True):
                ref = jvp('REFERENCE', leaf_tangents)
                try:
                    tri = jvp('TRITON', leaf_tangents)
                except NotImplementedError as e:
                    print('TRITON jvp, leaf_tangents=%s: %s' % (leaf_tangents, str(e)[:120]))
                    continue
                for a, r in zip(tri, ref):
                    print('jvp leaf_tangents=%s' % leaf_tangents,
                          ((a - r).norm() / r.norm()).item() if r.isfinite().all() else (a, r))
            """)


def make_case(seed: int, family: Optional[str] = None, max_len: int = 40) -> Case:
    """The case of ``seed``; ``max_len`` caps every sequence length (CI uses short ones: the
    interpreter's cost grows with ``B * H * Sq * Skv``)."""
    r = random.Random(seed)
    L = max(int(max_len), 2)
    family = family or r.choices(["flex", "ebt", "piecewise"], [5, 3, 2])[0]
    B = r.choice([1, 1, 2])
    D = r.choice([16, 16, 32])
    Dv = D if r.random() < 0.85 else (32 if D == 16 else 16)
    scale = None if r.random() < 0.6 else round(r.uniform(0.1, 0.5), 3)
    block = r.choice([16, 16, 32])
    if family == "flex":
        Hq = r.choice([1, 2, 4])
        Hkv = r.choice([h for h in (1, 2, 4) if Hq % h == 0 and h <= Hq])
        Sq = r.choice([r.randint(1, L), r.randint(L * 3 // 8, L)])
        Skv = Sq if r.random() < 0.4 else r.randint(1, L)
        qmax, kvmax = Sq - 1, Skv - 1
    elif family == "ebt":
        Hq = r.choice([1, 2, 4])
        Hkv = r.choice([h for h in (1, 2, 4) if Hq % h == 0 and h <= Hq])
        Dv = D
        Skv = r.randint(1, max(L * 3 // 5, 1))
        Sq = min(Skv + r.choice([0, 0, 1, r.randint(0, 9)]), max(L, Skv))
        qmax = kvmax = Sq
    else:
        Hq = Hkv = r.choice([1, 2])
        Sq = r.randint(1, max(L * 33 // 40, 1))
        Skv = min(Sq + r.choice([0, 0, r.randint(0, 9)]), max(L, Sq))
        qmax, kvmax = Sq - 1, Skv - 1
    gen = Gen(r, B, Hq, qmax, kvmax, family)
    gen.make_tables()
    x = r.random()
    score_tree = None
    if x >= 0.12:
        if r.random() < 0.08:  # constant / int score_mods
            score_tree = r.choice([gen.const_f(), gen.int_expr(2), binop("mul", gen.idx(), gen.const_i())])
            if score_tree.kind == "i" and score_tree.hi > 50:
                score_tree = binop("mod", score_tree, Node("const", "i", attr=7, lo=7, hi=7))
        else:
            score_tree = bound(gen.float_expr(r.randint(1, 4)), 10.0)
            if not any(n.op == "score" for n in score_tree.walk()) and r.random() < 0.8:
                score_tree = bound(binop("add", Node("score", "f", lo=-6, hi=6, data=True), score_tree), 10.0)
    mask_tree, mask_mode = None, "none"
    if r.random() < 0.6:
        mask_mode = "mask"
        if r.random() < 0.25:
            mask_tree = binop("ge", gen.idx("q_idx"), gen.idx("kv_idx"))
        else:
            mask_tree = gen.bool_expr(r.randint(1, 3), allow_float=True, with_score=False)
            if r.random() < 0.5:  # usually keep the diagonal-ish structure somewhat dense
                mask_tree = binop("lor", mask_tree, binop("ge", gen.idx("q_idx"), gen.idx("kv_idx")))
    elif family == "ebt" and r.random() < 0.5:
        mask_mode = "causal"
    uses_bh = mask_tree is not None and any(n.op == "idx" and n.attr in ("b", "h") for n in mask_tree.walk())
    uses_bh = uses_bh or (mask_tree is not None and any(n.op == "load" for n in mask_tree.walk()))
    bm_bh = uses_bh or r.random() < 0.3
    threshold = r.choice([0, 1, 2, 3, 5, 2.5, 7, 40]) if family == "piecewise" else 0.0
    causal = r.random() < 0.5 if family == "piecewise" else False
    return Case(seed, family, B, Hq, Hkv, D, Dv, Sq, Skv, scale, score_tree, mask_tree, mask_mode, block, bm_bh,
                gen.tables, threshold, causal, data_seed=seed % 100_000, rebind=r.random() < 0.3)


# ----------------------------------------------------------------------------------------------
# Running one implementation
# ----------------------------------------------------------------------------------------------

def _inputs(case: Case, seed: int):
    """float64 inputs of the case (q, k, v or the EBT / piecewise set), from ``seed``."""
    g = torch.Generator().manual_seed(seed + 1)
    c = case
    if c.family == "flex":
        shapes = [(c.B, c.Hq, c.Sq, c.D), (c.B, c.Hkv, c.Skv, c.D), (c.B, c.Hkv, c.Skv, c.Dv)]
    elif c.family == "ebt":
        shapes = [(c.B, c.Hq, c.Sq, c.D), (c.B, c.Hkv, c.Sq, c.D), (c.B, c.Hkv, c.Sq, c.Dv),
                  (c.B, c.Hq, c.Skv, c.D), (c.B, c.Hkv, c.Skv, c.D), (c.B, c.Hkv, c.Skv, c.Dv)]
    else:
        shapes = [(c.B, c.Hq, c.Sq, c.D), (c.B, c.Hq, c.Skv, c.D), (c.B, c.Hq, c.Sq, c.D), (c.B, c.Hq, c.Skv, c.D),
                  (c.B, c.Hq, c.Skv, c.Dv)]
    return [torch.randn(*s, generator=g, dtype=torch.float32).double() for s in shapes]


def _grid(c: Case):
    """Oracle geometry: per family, the query/key frame positions, which input tensors form the
    rows / columns, and the structural keep mask (before the mask_mod)."""
    if c.family == "flex":
        return torch.arange(c.Sq), torch.arange(c.Skv), None
    if c.family == "piecewise":
        qi, ki = torch.arange(c.Sq), torch.arange(c.Skv)
        keep = torch.ones(c.Sq, c.Skv, dtype=torch.bool)
        if c.causal:
            keep = ki[None, :] <= (c.Skv - c.Sq) + qi[:, None]
        return qi, ki, keep
    So, Sp = c.Sq, c.Skv
    r = So - Sp
    f = torch.cat([torch.arange(So), torch.arange(Sp) + r + 1])
    n = So + Sp
    keep = torch.zeros(n, n, dtype=torch.bool)
    keep[:So, :So] = True
    keep[So:, :So] = f[So:, None] != f[None, :So]
    keep[So:, So:] = torch.eye(Sp, dtype=torch.bool)
    return f, f, keep


def oracle_forward(c: Case, xs, mods_tables, fdt, promote, aux=None):
    """This file's dense attention: ``(outs, lses, margin)`` with the tree evaluated by
    :class:`Evaluator` (never flexebt).  ``aux`` (a dict): takes ``load_hook`` for the score_mod's
    loads and receives the modded scores ``t`` and the probabilities ``p``."""
    tables = mods_tables
    qpos, kpos, struct = _grid(c)
    if c.family == "flex":
        q, k, v = xs
    elif c.family == "ebt":
        q = torch.cat([xs[0], xs[3]], 2)
        k = torch.cat([xs[1], xs[4]], 2)
        v = torch.cat([xs[2], xs[5]], 2)
    else:
        q1, k1, q2, k2, v = xs
    H = c.Hq
    scale = c.D ** -0.5 if c.scale is None else c.scale
    if c.family == "piecewise":
        s1 = (q1 @ k1.transpose(-1, -2)) * scale
        s2 = (q2 @ k2.transpose(-1, -2)) * scale
        dist = (c.Skv - c.Sq) + qpos[:, None] - kpos[None, :]
        s = torch.where(dist >= c.threshold, s2, s1)
    else:
        rep = H // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        s = (q @ k.transpose(-1, -2)) * scale
    B, _, Lq, Lk = s.shape
    env = {"b": torch.arange(B, dtype=torch.int32).view(B, 1, 1, 1),
           "h": torch.arange(H, dtype=torch.int32).view(1, H, 1, 1),
           "q_idx": qpos.to(torch.int32).view(1, 1, Lq, 1),
           "kv_idx": kpos.to(torch.int32).view(1, 1, 1, Lk)}
    margin = float("inf")
    t = s
    if c.score_tree is not None:
        ev = Evaluator(dict(env, score=s), tables, fdt, promote, None if aux is None else aux.get("load_hook"))
        t = ev.ev(c.score_tree)
        margin = min(margin, ev.margin)
        t = torch.tensor(t, dtype=s.dtype) if not isinstance(t, torch.Tensor) else t
        t = t.to(s.dtype).expand(s.shape)
    keep = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    if struct is not None:
        keep = keep & struct
    mask_tree = c.mask_tree
    if c.mask_mode == "causal":
        mask_tree = binop("ge", Node("idx", "i", attr="q_idx"), Node("idx", "i", attr="kv_idx"))
    if c.mask_mode != "none" and mask_tree is not None:
        ev = Evaluator(env, tables, fdt, promote)
        m = ev.ev(mask_tree)
        margin = min(margin, ev.margin)
        keep = keep & torch.as_tensor(m).to(torch.bool).expand(keep.shape)
    # softmax over kept entries; rows with none kept: output 0, lse -inf, zero gradients
    neg = torch.tensor(float("-inf"), dtype=t.dtype)
    m = torch.where(keep, t, neg).amax(-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.where(keep, torch.exp(torch.where(keep, t, m) - m), torch.zeros_like(t))
    z = e.sum(-1, keepdim=True)
    ok = z > 0
    zs = torch.where(ok, z, torch.ones_like(z))
    p = e / zs
    out = p @ v
    lse = torch.where(ok, torch.log(zs) + m, neg).squeeze(-1)
    if aux is not None:
        aux.update(t=t, p=p)
    if c.family == "flex":
        return [out], [lse], margin
    if c.family == "ebt":
        return [out[:, :, :c.Sq], out[:, :, c.Sq:]], [lse[:, :, :c.Sq], lse[:, :, c.Sq:]], margin
    return [out], None, margin


def library_forward(c: Case, xs, score_mod, mask_mod, backend):
    import flexebt
    from torch.nn.attention.flex_attention import create_block_mask

    opts = {"BACKEND": backend}
    BB, HH = (c.B, c.Hq) if c.bm_bh else (None, None)
    if c.family == "flex":
        bm = None
        if c.mask_mode == "mask":
            bm = create_block_mask(mask_mod, BB, HH, c.Sq, c.Skv, device="cpu", BLOCK_SIZE=c.block)
        out, lse = flexebt.flex_attention(*xs, score_mod=score_mod, block_mask=bm, scale=c.scale,
                                          enable_gqa=c.Hq != c.Hkv, return_lse=True, kernel_options=opts)
        return [out], [lse]
    if c.family == "ebt":
        bm = None
        if c.mask_mode != "none":
            bm = flexebt.create_ebt_block_mask(mask_mod if c.mask_mode == "mask" else None, BB, HH, c.Sq, c.Skv,
                                               device="cpu", BLOCK_SIZE=c.block)
        oo, op_, lo, lp = flexebt.flex_ebt_attention(*xs, score_mod=score_mod, block_mask=bm, scale=c.scale,
                                                     enable_gqa=c.Hq != c.Hkv, return_lse=True, kernel_options=opts)
        return [oo, op_], [lo, lp]
    bm = None
    if c.mask_mode == "mask":
        bm = create_block_mask(mask_mod, BB, HH, c.Sq, c.Skv, device="cpu", BLOCK_SIZE=c.block)
    out = flexebt.piecewise_attention(*xs, c.threshold, causal=c.causal, scale=c.scale, score_mod=score_mod,
                                      block_mask=bm, kernel_options=opts)
    return [out], None


@dataclasses.dataclass
class Result:
    outs: list = None
    lses: list = None
    g1: list = None
    g2: list = None
    g1_terms: list = None  # oracle: per captured-tensor element, the size of the terms its gradient sums
    g2_terms: list = None  # ... and of its second-order gradient's terms
    error: Optional[BaseException] = None
    tb: str = ""
    stage: str = ""
    margin: float = float("inf")


def run_impl(c: Case, impl: str, dtype, data_seed=None, order=2) -> Result:
    """Forward, first- and second-order gradients of one implementation.

    impl: "oracle" (promote=True), "exact" (torch promotion), "REFERENCE", "TRITON"."""
    data_seed = c.data_seed if data_seed is None else data_seed
    res = Result()
    stage = "build"
    try:
        score_mod, mask_mod, tables, leaves = c.build(data_seed)
        xs = [x.to(dtype).requires_grad_() for x in _inputs(c, data_seed)]
        stage = "forward"
        aux = None
        if impl == "oracle" and order >= 1 and leaves:
            magnitudes = [False]
            aux = {"load_hook": lambda g: g.abs() if magnitudes[0] else None}
        if impl in ("oracle", "exact"):
            outs, lses, res.margin = oracle_forward(c, xs, tables, torch.float64 if dtype == torch.float64 else dtype,
                                                    promote=impl == "oracle", aux=aux)
        else:
            outs, lses = library_forward(c, xs, score_mod, mask_mod, impl)
        res.outs = [o.detach() for o in outs]
        res.lses = None if lses is None else [x.detach() for x in lses]
        if order == 0:
            return res
        stage = "backward"
        g = torch.Generator().manual_seed(data_seed + 7)
        inputs = xs + list(leaves)
        cts = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
        total = sum((o * ct).sum() for o, ct in zip(outs, cts))
        if aux is not None and aux["t"].requires_grad and aux["p"].requires_grad:
            res.g1_terms = _gradient_terms(total, aux, list(leaves), magnitudes, len(xs))
        first = torch.autograd.grad(total, inputs, create_graph=order >= 2, allow_unused=True)
        first = [torch.zeros_like(i) if f is None else f for f, i in zip(first, inputs)]
        res.g1 = [f.detach() for f in first]
        if order == 1:
            return res
        stage = "double backward"
        w = [torch.randn(f.shape, generator=g, dtype=torch.float64).to(f.dtype) for f in first]
        loss = sum((f * wi).sum() + 0.5 * (f * f).sum() for f, wi in zip(first, w) if f.requires_grad)
        if isinstance(loss, int):  # nothing depends on the inputs at first order
            res.g2 = [torch.zeros_like(i) for i in inputs]
            return res
        if res.g1_terms is not None:
            # second order: the same sizes, of the per-score terms of the second-order loss's
            # gradient (each load's per-score gradient, absolute)
            magnitudes[0] = True
            try:
                terms = torch.autograd.grad(loss, list(leaves), retain_graph=True, allow_unused=True)
            finally:
                magnitudes[0] = False
            res.g2_terms = [None] * len(xs) + [torch.zeros_like(x) if t is None else t.detach()
                                               for t, x in zip(terms, leaves)]
        second = torch.autograd.grad(loss, inputs, allow_unused=True)
        res.g2 = [torch.zeros_like(i) if s is None else s.detach() for s, i in zip(second, inputs)]
    except Exception as e:  # noqa: BLE001 - every failure is classified by the caller
        res.error, res.tb, res.stage = e, traceback.format_exc(), stage
    return res


def _gradient_terms(total, aux, leaves, magnitudes, n_inputs):
    """For each captured tensor that requires grad, per element: the sum of the absolute values
    of the terms its gradient adds up.

    A captured value c read by the score_mod gets ``sum_ij dS_ij dt_ij/dc`` over every score that
    reads it, with ``dS_ij = P_ij (dP_ij - delta_i)``, ``delta_i = sum_j P_ij dP_ij``.  That sum
    can vanish exactly (a bias indexed by ``b`` alone: softmax ignores it, so ``sum_j dS_ij = 0``
    for every row) while each term is of order ``P |dP|``; an fp32 implementation then leaves
    a residue of fp32 rounding times the size of the terms, however it sums them.  Backpropagating
    ``P (|dP| + |delta|)`` (a bound on each ``|dS_ij|`` together with the operands it is computed
    from) in place of ``dS``, with every load's per-score gradient replaced by its absolute value
    (``aux["load_hook"]``), gives that size exactly, with no cancellation left."""
    t, p = aux["t"], aux["p"]
    dp = torch.autograd.grad(total, p, retain_graph=True)[0].detach()
    pd = p.detach()
    w = pd * (dp.abs() + (pd * dp).sum(-1, keepdim=True).abs())
    magnitudes[0] = True
    try:
        terms = torch.autograd.grad(t, leaves, grad_outputs=w.to(t.dtype).expand(t.shape), retain_graph=True,
                                    allow_unused=True)
    finally:
        magnitudes[0] = False
    return [None] * n_inputs + [torch.zeros_like(x) if g is None else g.detach() for g, x in zip(terms, leaves)]


@dataclasses.dataclass
class JvpResult:
    touts: list = None     # tangents of the outputs
    tlses: list = None     # ... and of the lse (None: the family returns none)
    error: Optional[BaseException] = None
    tb: str = ""
    stage: str = ""


def jvp_tangents(c: Case, data_seed: int):
    """The tangent directions of a case (float64; each implementation casts them to its dtype):
    ``(input_tangents, leaf_tangent)``, where ``leaf_tangent(x)`` draws the next captured leaf's
    tangent, in build order (the same in every implementation: the leaves' shapes and dtypes do
    not depend on it)."""
    g = torch.Generator().manual_seed(data_seed + 11)
    tx = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in _inputs(c, data_seed)]
    gl = torch.Generator().manual_seed(data_seed + 13)
    return tx, (lambda x: torch.randn(x.shape, generator=gl, dtype=torch.float64).to(x.dtype))


def run_jvp(c: Case, impl: str, dtype, data_seed=None, leaf_tangents=True) -> JvpResult:
    """Forward-mode AD (``torch.autograd.forward_ad``) of one implementation: the tangents of the
    outputs (and lse) for tangents of every input and, with ``leaf_tangents``, of every captured
    floating tensor that requires grad (made dual where the case's ``build`` creates it, so the
    mods close over the dual tensor and its views).  Runs under ``no_grad``: pure forward mode, no
    autograd graph (the leaves are detached).

    The block mask is made from a second ``build`` without tangents: torch's ``create_block_mask``
    (a vmap of the mask_mod) fails on a dual tensor the mask_mod captures, and a mask has no
    tangent anyway (the oracle evaluates the mask over the dual tables)."""
    data_seed = c.data_seed if data_seed is None else data_seed
    res = JvpResult()
    stage = "build"
    try:
        import torch.autograd.forward_ad as fwAD

        tx, leaf_tangent = jvp_tangents(c, data_seed)
        xs = _inputs(c, data_seed)

        def dual(x):
            x = x.detach()
            t = leaf_tangent(x)  # drawn either way: the order of the draws stays the same
            return fwAD.make_dual(x, t) if leaf_tangents else x

        with torch.no_grad(), fwAD.dual_level():
            score_mod, mask_mod, tables, _ = c.build(data_seed, dual=dual)
            duals = [fwAD.make_dual(x.to(dtype), t.to(dtype)) for x, t in zip(xs, tx)]
            stage = "jvp"
            if impl in ("oracle", "exact"):
                outs, lses, _ = oracle_forward(c, duals, tables, torch.float64 if dtype == torch.float64 else dtype,
                                               promote=impl == "oracle")
            else:
                plain_mask_mod = c.build(data_seed)[1] if c.mask_mode == "mask" else mask_mod
                outs, lses = library_forward(c, duals, score_mod, plain_mask_mod, impl)

            def tangent(o):
                p, t = fwAD.unpack_dual(o)
                return torch.zeros_like(p) if t is None else t.clone()

            res.touts = [tangent(o) for o in outs]
            res.tlses = None if lses is None else [tangent(x) for x in lses]
    except Exception as e:  # noqa: BLE001 - classified by the caller
        res.error, res.tb, res.stage = e, traceback.format_exc(), stage
    return res


# The kernels' forward mode takes tangents of q, k, v only; a tangent on a captured tensor is
# refused with this documented message (flexebt/codegen/source.py, autograd.py): not a finding,
# the kernels are then checked on the q / k / v tangents alone.
DOCUMENTED_JVP_REFUSAL = ("carries a forward-mode tangent", "tangents on tensors captured by a score_mod")


def _documented_jvp_refusal(e) -> bool:
    return isinstance(e, NotImplementedError) and any(m in str(e) for m in DOCUMENTED_JVP_REFUSAL)


def _jvp_quantities(c: Case, res: JvpResult):
    """Named tangents: jvp:out*, jvp:lse* (class "jvp", judged like first-order gradients)."""
    out = {}
    onames = ["out"] if c.family != "ebt" else ["out_o", "out_p"]
    for n, o in zip(onames, res.touts or []):
        out["jvp:" + n] = ("jvp", o)
    for n, o in zip(["lse"] if c.family != "ebt" else ["lse_o", "lse_p"], res.tlses or []):
        out["jvp:" + n] = ("jvp", o)
    return out


# ----------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------

def rel_err(x, ref) -> float:
    """The tests' metric (helpers.rel_err: float64, inf on NaN or on a different pattern of
    infinities), and inf on a shape mismatch."""
    from helpers import rel_err as metric

    return float("inf") if x.shape != ref.shape else metric(x, ref)


def abs_err(x, ref) -> float:
    """``||x - ref||`` over the finite entries (inf where :func:`rel_err` is inf)."""
    if not math.isfinite(rel_err(x, ref)):
        return float("inf")
    fin = torch.isfinite(ref)
    return (x.double()[fin] - ref.double()[fin]).norm().item()


def close(x, ref, rtol, atol) -> bool:
    """``rel_err <= rtol`` or ``||x - ref|| <= atol * sqrt(numel)`` (NaN never passes)."""
    return rel_err(x, ref) <= rtol or abs_err(x, ref) <= atol * math.sqrt(max(ref.numel(), 1))


def _grad_names(c: Case):
    names = {"flex": ["q", "k", "v"], "ebt": ["q_o", "k_o", "v_o", "q_p", "k_p", "v_p"],
             "piecewise": ["q1", "k1", "q2", "k2", "v"]}[c.family]
    used = c.used_tables()
    return names + [t.grad_leaf for t in c.tables if t.name in used and t.grad_leaf]


def _quantities(c: Case, res: Result):
    """Named tensors of a result: out*, lse*, d<input>, dd<input> (second order)."""
    names = _grad_names(c)
    out = {}
    onames = ["out"] if c.family != "ebt" else ["out_o", "out_p"]
    for n, o in zip(onames, res.outs or []):
        out[n] = ("out", o)
    for n, o in zip(["lse"] if c.family != "ebt" else ["lse_o", "lse_p"], res.lses or []):
        out[n] = ("out", o)
    for n, o in zip(names, res.g1 or []):
        out["d" + n] = ("grad", o)
    for n, o in zip(names, res.g2 or []):
        out["dd" + n] = ("grad2", o)
    return out


@dataclasses.dataclass
class Finding:
    kind: str          # "wrong", "nan", "crash", "refusal", "accepted" (torch raises, library doesn't)
    impl: str          # "TRITON fp32", "REFERENCE fp32", "REFERENCE float64"
    what: str          # quantity or stage
    detail: str
    case: Case

    @property
    def order(self):
        return {"out": "forward", "grad": "first order", "grad2": "second order",
                "jvp": "forward mode"}.get(self.what.split(":")[0], self.what)

    def signature(self):
        """Dedup key: one finding per (implementation, kind, quantity class, message shape)."""
        import re
        msg = re.sub(r"[0-9.e+-]+", "#", self.detail.splitlines()[0] if self.detail else "")[:80]
        q = self.what.split(":")[0]
        return f"{self.case.family}|{self.impl}|{self.kind}|{q}|{msg if self.kind not in ('wrong', 'nan') else ''}"

    def report(self) -> str:
        return (f"[{self.kind}] {self.impl} on {self.case.family} ({self.what}): {self.detail}\n"
                f"{self.case.describe()}\nseed={self.case.seed}")


REFUSALS = (NotImplementedError, TypeError, ValueError)


def compare_case(c: Case, impls=("TRITON", "REFERENCE"), check_ref64=True, jvp=True) -> tuple[list, dict]:
    """Run every implementation on ``c`` and return ``(findings, info)``.

    ``info["skipped"]`` says why a case could not be judged (torch itself raises, or the inputs
    sit on a discontinuity in every resampling).  ``jvp``: also check forward mode
    (:func:`_compare_jvp`; ``info["jvp"]`` says how far)."""
    info = {"skipped": None, "errors": {}, "jvp": None}
    # pick a data seed whose inputs stay away from the mod's branch points
    for attempt in range(4):
        oracle = run_impl(c, "oracle", torch.float64)
        if oracle.error is not None or oracle.margin >= MARGIN:
            break
        c.data_seed += 7919
    else:
        info["skipped"] = f"inputs within {MARGIN} of a branch point of the mod"
        return [], info
    torch_raises = oracle.error
    if torch_raises is None and not all(torch.isfinite(o).all() for o in oracle.outs):
        info["skipped"] = "the float64 oracle is not finite (the mod leaves its domain)"
        return [], info
    if torch_raises is None:
        # torch itself (the rendered source per score) must agree that the case is defined
        try:
            score_mod, mask_mod, tables, _ = c.build()
            check_vmap(c, score_mod, mask_mod, tables)
        except Exception as e:  # noqa: BLE001
            torch_raises = e
    findings = []
    if torch_raises is not None:
        info["skipped"] = f"torch raises: {type(torch_raises).__name__}: {str(torch_raises).splitlines()[0][:120]}"
        for impl in impls:
            res = run_impl(c, impl, torch.float32, order=0)
            if res.error is None:
                findings.append(Finding("accepted", f"{impl} fp32", "forward",
                                        f"returned numbers where torch raises {type(torch_raises).__name__}: "
                                        f"{str(torch_raises).splitlines()[0][:200]}", c))
        return findings, info
    eager = run_impl(c, "exact", torch.float32)
    if eager.error is not None:
        info["skipped"] = f"eager fp32 raises {eager.error!r}"
        return [], info
    qo, qe = _quantities(c, oracle), _quantities(c, eager)
    # first-order gradients of captured tensors: the fp32 rounding floor of the sums they are
    # (see _gradient_terms); an error above it is a wrong number even where the sum vanishes
    cancel = {prefix + n: CANCEL_ROUNDING * t.double().norm().item()
              for prefix, terms in (("d", oracle.g1_terms), ("dd", oracle.g2_terms))
              for n, t in zip(_grad_names(c), terms or []) if t is not None}
    runs = [(impl, torch.float32) for impl in impls]
    if check_ref64 and "REFERENCE" in impls:
        runs.append(("REFERENCE", torch.float64))
    exact64 = None
    for impl, dt in runs:
        label = f"{impl} {'fp32' if dt == torch.float32 else 'float64'}"
        res = run_impl(c, impl, dt)
        if res.error is not None:
            e = res.error
            kind = "refusal" if isinstance(e, REFUSALS) else "crash"
            tail = "".join(res.tb.strip().splitlines(True)[-6:])
            findings.append(Finding(kind, label, res.stage, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                                    f"\n{tail}", c))
            info["errors"][label] = e
            continue
        got = _quantities(c, res)
        if dt == torch.float64:
            if exact64 is None:
                exact64 = _quantities(c, run_impl(c, "exact", torch.float64))
            # a float32 captured tensor's gradient is accumulated in float32 in any implementation (in
            # its own order); the second-order loss holds that gradient (0.5 |d leaf|^2), so every
            # second-order quantity carries its fp32 rounding too (seed 7044: ddv 1.2e-7)
            fp32_leaf_grad = any(cls == "grad" and ref.dtype == torch.float32 for cls, ref in exact64.values())
            for name, (cls, ref) in exact64.items():
                if name not in got:
                    continue
                err = rel_err(got[name][1], ref)
                loose = ref.dtype != torch.float64 or (cls == "grad2" and fp32_leaf_grad)
                tol = (1e-5, 1e-6) if loose else (REF64_TOL, ATOL64)
                if not close(got[name][1], ref, *tol):
                    findings.append(Finding("nan" if err != err or math.isinf(err) else "wrong", label,
                                            f"{cls}:{name}", f"{name}: error {err:.3e} vs float64 torch semantics "
                                            f"(tolerance {tol[0]:.0e})", c))
            continue
        _judge_fp32(c, label, qo, qe, got, cancel, findings)
    if jvp:
        _compare_jvp(c, runs, info, findings)
    if c.rebind and "TRITON" in impls and "TRITON fp32" not in info["errors"]:
        # a second instance of the same mod code with other tensor values: the kernels must read
        # the new values (the compiled kernels are reused)
        s2 = c.data_seed + 104729
        o2 = run_impl(c, "oracle", torch.float64, data_seed=s2, order=0)
        e2 = run_impl(c, "exact", torch.float32, data_seed=s2, order=0)
        t2 = run_impl(c, "TRITON", torch.float32, data_seed=s2, order=0)
        if o2.error is None and e2.error is None and o2.margin >= MARGIN:
            if t2.error is not None:
                findings.append(Finding("crash", "TRITON fp32", "rebind", f"{type(t2.error).__name__}: {t2.error}", c))
            else:
                for a, b_, r_ in zip(t2.outs, e2.outs, o2.outs):
                    err, base = rel_err(a, r_), rel_err(b_, r_)
                    if not close(a, r_, max(2 * base, FLOOR["out"]), ATOL32):
                        findings.append(Finding("wrong", "TRITON fp32", "out:rebind",
                                                f"second mod instance (same code, new captured values, data seed "
                                                f"{s2}): out error {err:.2e} (eager fp32 {base:.2e})", c))
                        break
    return findings, info


def _judge_fp32(c: Case, label, qo, qe, got, cancel, findings):
    """An fp32 implementation's quantities ``got`` against the oracle's ``qo``: within 2x (outputs)
    / 3x (gradients, tangents) eager fp32's error ``qe``, or under the floor; one finding listing
    every quantity outside."""
    bad = []
    for name, (cls, ref) in qo.items():
        if name not in got or name not in qe:
            continue
        x = got[name][1]
        err = rel_err(x, ref)
        base = rel_err(qe[name][1], ref)
        factor = 2.0 if cls == "out" else 3.0
        tol = max(factor * base, FLOOR[cls]) if math.isfinite(base) else FLOOR[cls]
        base_abs = abs_err(qe[name][1], ref)
        atol = max(factor * base_abs / math.sqrt(max(ref.numel(), 1)), ATOL32) if math.isfinite(base_abs) \
            else ATOL32
        if not close(x, ref, tol, atol) and not abs_err(x, ref) <= cancel.get(name, -1.0):
            bad.append((cls, name, err, base, tol))
    if bad:
        cls, name, err, base, tol = bad[0]
        listing = "; ".join(f"{n}: {e:.2e} (eager fp32 {b:.2e}, tolerance {t:.1e})" for _, n, e, b, t in bad)
        kind = "nan" if any(math.isinf(e) for _, _, e, _, _ in bad) else "wrong"
        findings.append(Finding(kind, label, name if name.startswith(cls + ":") else f"{cls}:{name}", listing, c))


def _compare_jvp(c: Case, runs, info, findings):
    """Forward mode (``torch.autograd.forward_ad``): the tangents of the outputs and lse of each
    implementation in ``runs`` against the float64 oracle's (forward AD through its plain torch
    math), judged like first-order gradients; REFERENCE float64 against float64 torch semantics.
    Tangents on q / k / v (every family's inputs) and on every captured leaf.  The kernels'
    documented refusal of captured-tensor tangents (``DOCUMENTED_JVP_REFUSAL``) is noted in
    ``info["jvp"]`` and the kernels are then judged on the q / k / v tangents alone; any other
    refusal where torch's math differentiates is a *refusal* finding, another exception a *crash*."""
    oracle = {True: run_jvp(c, "oracle", torch.float64)}
    if oracle[True].error is not None:
        # forward AD through this file's torch math failed: a fuzzer limitation, not the library's
        info["jvp"] = f"skipped: the oracle's forward AD raises {oracle[True].error!r}"
        return
    eager = {True: run_jvp(c, "exact", torch.float32)}
    if eager[True].error is not None:
        info["jvp"] = f"skipped: eager fp32 forward AD raises {eager[True].error!r}"
        return
    exact64 = {}
    has_leaves = len(_grad_names(c)) > len(_inputs(c, c.data_seed))
    notes = []
    for impl, dt in runs:
        label = f"{impl} {'fp32' if dt == torch.float32 else 'float64'}"
        if label in info["errors"]:  # already reported (forward or backward raised)
            continue
        leafs = True
        res = run_jvp(c, impl, dt)
        if res.error is not None and has_leaves and _documented_jvp_refusal(res.error):
            notes.append(f"{label}: documented refusal of captured-tensor tangents; judged on q/k/v tangents")
            info.setdefault("jvp_documented_refusals", []).append(label)
            leafs = False
            res = run_jvp(c, impl, dt, leaf_tangents=False)
        if res.error is not None:
            e = res.error
            kind = "refusal" if isinstance(e, REFUSALS) else "crash"
            tail = "".join(res.tb.strip().splitlines(True)[-6:])
            findings.append(Finding(kind, label, "jvp", f"forward-mode AD ({'all tangents' if leafs else 'q/k/v tangents'}) "
                                    f"{type(e).__name__}: {str(e).splitlines()[0][:300]}\n{tail}", c))
            info["errors"][label + " jvp"] = e
            continue
        if leafs not in oracle:
            oracle[leafs] = run_jvp(c, "oracle", torch.float64, leaf_tangents=leafs)
            eager[leafs] = run_jvp(c, "exact", torch.float32, leaf_tangents=leafs)
            if oracle[leafs].error is not None or eager[leafs].error is not None:
                notes.append(f"{label}: not judged (the q/k/v-only oracle raises)")
                continue
        got = _jvp_quantities(c, res)
        if dt == torch.float64:
            if leafs not in exact64:
                exact64[leafs] = _jvp_quantities(c, run_jvp(c, "exact", torch.float64, leaf_tangents=leafs))
            for name, (cls, ref) in exact64[leafs].items():
                if name not in got:
                    continue
                err = rel_err(got[name][1], ref)
                tol = (REF64_TOL, ATOL64) if ref.dtype == torch.float64 else (1e-5, 1e-6)
                if not close(got[name][1], ref, *tol):
                    findings.append(Finding("nan" if err != err or math.isinf(err) else "wrong", label, name,
                                            f"{name}: error {err:.3e} vs float64 torch semantics "
                                            f"(tolerance {tol[0]:.0e})", c))
            continue
        _judge_fp32(c, label + ("" if leafs else " (q/k/v tangents)"), _jvp_quantities(c, oracle[leafs]),
                    _jvp_quantities(c, eager[leafs]), got, {}, findings)
    info["jvp"] = "judged" + (f" ({'; '.join(notes)})" if notes else "")


def check_vmap(c: Case, score_mod, mask_mod, tables, max_elems=4000):
    """torch's own per-score semantics (nested vmap over b, h, q, kv, as FlexAttention applies a
    mod) must agree with this file's dense evaluation of the tree (checks the fuzzer itself) --
    and raise where torch raises (out-of-range indices)."""
    qpos, kpos, _ = _grid(c)
    B, H = c.B, c.Hq
    args = [torch.arange(B, dtype=torch.int32), torch.arange(H, dtype=torch.int32), qpos.to(torch.int32),
            kpos.to(torch.int32)]
    env = {"b": args[0].view(B, 1, 1, 1), "h": args[1].view(1, H, 1, 1),
           "q_idx": args[2].view(1, 1, -1, 1), "kv_idx": args[3].view(1, 1, 1, -1)}
    shape = (B, H, len(qpos), len(kpos))
    g = torch.Generator().manual_seed(c.data_seed + 3)
    score = torch.randn(shape, generator=g, dtype=torch.float64)
    for fn, tree, with_score in ((score_mod, c.score_tree, True), (mask_mod, c.mask_tree, False)):
        if fn is None or tree is None:
            continue
        f = fn if with_score else (lambda s, b, h, q, kv, fn=fn: fn(b, h, q, kv))
        if with_score:
            f = (lambda s, b, h, q, kv, fn=fn: torch.as_tensor(fn(s, b, h, q, kv)).to(s.dtype))
        # innermost vmap over kv, then q, h, b (as torch FlexAttention does)
        v = torch.vmap(f, in_dims=(0, None, None, None, 0))
        v = torch.vmap(v, in_dims=(0, None, None, 0, None))
        v = torch.vmap(v, in_dims=(0, None, 0, None, None))
        v = torch.vmap(v, in_dims=(0, 0, None, None, None))
        with torch.no_grad():
            got = v(score, *args)
            ev = Evaluator(dict(env, score=score), tables, torch.float64, promote=False)
            want = ev.ev(tree)
            want = torch.tensor(want, dtype=score.dtype) if not isinstance(want, torch.Tensor) else want
            if with_score:
                want = want.to(score.dtype)
            else:
                want = want.to(torch.bool)
            want = want.expand(shape)
        if got.shape != want.shape or not torch.allclose(got.double(), want.double(), rtol=1e-6, atol=1e-6,
                                                         equal_nan=True):
            raise AssertionError(f"fuzzer self-check: vmap of the rendered {'score' if with_score else 'mask'}_mod "
                                 f"disagrees with the tree evaluation\n{render(tree)}")


# ----------------------------------------------------------------------------------------------
# Shrinking (minimal reproductions)
# ----------------------------------------------------------------------------------------------

def _replacements(n: Node, gen_leafs):
    """Simpler nodes of the same kind to try in place of ``n``."""
    out = [a for a in n.args if a.kind == n.kind]
    out += [x for x in gen_leafs.get(n.kind, []) if x is not n]
    return out


def _replace(root: Node, target: Node, new: Node) -> Node:
    if root is target:
        return new
    if not root.args:
        return root
    args = tuple(_replace(a, target, new) for a in root.args)
    if all(x is y for x, y in zip(args, root.args)):
        return root
    return dataclasses.replace(root, args=args)


def shrink(c: Case, still_fails, budget=40) -> Case:
    """Greedy tree reduction: replace subtrees with their children or with leaves while
    ``still_fails(case)`` holds."""
    leafs = {"f": [Node("score", "f", lo=-6, hi=6, data=True), Node("const", "f", attr=0.5)],
             "i": [Node("idx", "i", attr="q_idx"), Node("idx", "i", attr="kv_idx"), Node("const", "i", attr=1)],
             "b": [binop("ge", Node("idx", "i", attr="q_idx"), Node("idx", "i", attr="kv_idx"))]}
    tries = 0
    for field in ("mask_tree", "score_tree"):
        if getattr(c, field) is None:
            continue
        if tries < budget:  # drop the mod entirely
            tries += 1
            trial = dataclasses.replace(c, **{field: None}, **({"mask_mode": "none"} if field == "mask_tree"
                                                                and c.mask_mode == "mask" else {}))
            if still_fails(trial):
                c = trial
                continue
        changed = True
        while changed and tries < budget:
            changed = False
            root = getattr(c, field)
            for node in list(root.walk()):
                if node.op == "const" or node.op == "idx" or node.kind == "v":
                    continue
                for rep in _replacements(node, leafs):
                    if tries >= budget:
                        break
                    new_root = _replace(root, node, rep)
                    if render(new_root) == render(root):
                        continue
                    tries += 1
                    trial = dataclasses.replace(c, **{field: new_root})
                    try:
                        ok = still_fails(trial)
                    except Exception:  # noqa: BLE001
                        ok = False
                    if ok:
                        c, changed = trial, True
                        break
                if changed:
                    break
    return c


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def fuzz_one(seed: int, impls=("TRITON", "REFERENCE"), minimize=False, family=None, max_len=40, jvp=True):
    c = make_case(seed, family, max_len)
    findings, info = compare_case(c, impls, jvp=jvp)
    if minimize and findings:
        f0 = findings[0]
        sig = f0.signature()

        only = (f0.impl.split()[0],)
        f0_jvp = f0.what.split(":")[0] == "jvp"

        def still(trial):
            fs, _ = compare_case(dataclasses.replace(trial), only, check_ref64=f0.impl.endswith("float64"),
                                 jvp=f0_jvp)
            return any(f.signature() == sig for f in fs)

        small = shrink(dataclasses.replace(c), still)
        if small is not c:
            fs, _ = compare_case(dataclasses.replace(small), only, check_ref64=f0.impl.endswith("float64"),
                                 jvp=f0_jvp)
            same = [f for f in fs if f.signature() == sig]
            if same:
                findings = [same[0]] + [f for f in findings[1:]]
                c = small
    return c, findings, info


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="flexebt differential fuzzer (kernels vs reference vs float64 oracle)")
    p.add_argument("--seconds", type=float, default=60.0, help="stop after this long")
    p.add_argument("--seed", type=int, default=0, help="first case seed; cases use seed, seed+1, ...")
    p.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    p.add_argument("--out", default="fuzz_findings.jsonl", help="append findings here (JSON lines)")
    p.add_argument("--family", choices=["flex", "ebt", "piecewise"], default=None)
    p.add_argument("--no-triton", action="store_true", help="reference backend only (fast)")
    p.add_argument("--no-minimize", action="store_true", help="do not shrink failing cases")
    p.add_argument("--replay", type=int, default=None, help="run one seed and print its reproduction")
    p.add_argument("--max-len", type=int, default=40, help="longest sequence (interpreter cost grows as S^2)")
    p.add_argument("--no-jvp", action="store_true", help="skip the forward-mode AD (torch.autograd.forward_ad) stage")
    a = p.parse_args(argv)
    impls = ("REFERENCE",) if a.no_triton else ("TRITON", "REFERENCE")
    if a.replay is not None:
        c, findings, info = fuzz_one(a.replay, impls, minimize=not a.no_minimize, family=a.family,
                                     max_len=a.max_len, jvp=not a.no_jvp)
        print(c.repro(jvp=any(f.what.split(":")[0] == "jvp" for f in findings)))
        print("info:", info["skipped"] or "judged", "| forward mode:", info["jvp"])
        for f in findings:
            print(f.report())
        return 1 if findings else 0
    t0, seed, n, seen = time.time(), a.seed, 0, set()
    stats = {"cases": 0, "skipped": 0, "findings": 0, "jvp_judged": 0, "jvp_documented_refusals": 0}
    while time.time() - t0 < a.seconds and (a.cases is None or n < a.cases):
        try:
            c, findings, info = fuzz_one(seed, impls, minimize=not a.no_minimize, family=a.family,
                                         max_len=a.max_len, jvp=not a.no_jvp)
        except Exception as e:  # noqa: BLE001 - a fuzzer bug must not end a long run
            print(f"seed {seed}: fuzzer error {e!r}", file=sys.stderr)
            seed += 1
            continue
        stats["cases"] += 1
        stats["skipped"] += info["skipped"] is not None
        stats["jvp_judged"] += bool(info["jvp"]) and info["jvp"].startswith("judged")
        stats["jvp_documented_refusals"] += bool(info.get("jvp_documented_refusals"))
        for f in findings:
            sig = f.signature()
            new = sig not in seen
            seen.add(sig)
            stats["findings"] += 1
            rec = {"seed": seed, "signature": sig, "new": new, "kind": f.kind, "impl": f.impl, "what": f.what,
                   "detail": f.detail, "case": f.case.describe(),
                   "repro": f.case.repro(f.report(), jvp=f.what.split(":")[0] == "jvp")}
            with open(a.out, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            if new:
                print("=" * 80 + "\n" + f.report() + "\n"
                      + textwrap.indent(f.case.repro(jvp=f.what.split(":")[0] == "jvp"), "    "), flush=True)
        seed += 1
        n += 1
        if n % 10 == 0:
            print(f"[{time.time() - t0:7.0f}s] {stats} distinct={len(seen)} next seed {seed}", file=sys.stderr,
                  flush=True)
    print(f"done: {stats}, {len(seen)} distinct findings, seeds {a.seed}..{seed - 1}", file=sys.stderr)
    return 1 if seen else 0


if __name__ == "__main__":
    sys.exit(main())
