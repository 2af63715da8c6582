"""Attention as a plan of kernel passes: forward, backward, double backward and JVP, written once.

Every family is a list of passes of the single-stream kernels (``flexebt/kernels/flex.py``), each
pass the queries of one input over the keys and values of two others:

- ``flex_attention``: one pass (q over k, v);
- ``flex_ebt_attention``: the observed queries over the observed keys, and the predicted queries
  over the same keys with a frame offset and each query's own key as one more column;
- ``piecewise_attention``: q1 over k1 (near pairs) and q2 over k2 (far pairs), both with v, writing
  the same rows.

A pass writes one *row group* (an output ``out`` with its ``lse`` and ``msum``: each row's max
``m`` and sum ``l = sum_j e^(t_j - m)``, kept apart so that rows of huge scores stay exact; the
backward passes read them, not the lse).  Passes of one row group each see part of the rows' keys;
their partial softmaxes merge exactly through the maxima and sums

    m = max_a m_a,  l = sum_a l_a e^(m_a - m),   out = sum_a (l_a e^(m_a - m) / l) out_a.

Given the merged ``(out, m, l)``, ``P_ij = e^(t_ij - m_i) / l_i`` is the final probability of every
pair, whichever pass scores it, and the first-order score gradient ``P_ij (dP_ij - D_i)`` with
``D_i = do_i . out_i`` needs nothing else: each pass's backward kernels return exactly their pairs'
share.  The double backward's row statistics (``U, W, Bbar, D0``) are sums over all of a row's
keys: a row group with several passes adds its passes' raw sums before any pass uses them
(``finish_row_parts``).  The gradient of an input read by several passes of one plan (v in
piecewise) adds up in fp32 across launches, rounded once (``_KeySideSums``).

Each pass also names the captured tensors its kernels read: a slice of the call's list.  Passes
with the same slice share one generated kernel module (the two EBT streams) and, within one
autograd node, one set of gradient accumulators; piecewise's two passes have their own
mask_mods, kernels and slices.

Row groups that read different inputs run as separate autograd nodes (``AttentionPlan.row_groups``):
EBT's observed outputs do not depend on the predicted stream, and autograd must know it.  As one
node, a gradient taken with respect to the predicted stream only (the energy's gradient in an EBT
step) would run the whole observed stream's backward through the layers above, to multiply it by
zero here.  Each node's plan is then one row group, and the gradient of an input both nodes read
(EBT's observed keys) is the sum autograd makes of their shares.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Optional

import torch
from torch import Tensor

from ..codegen.source import ModKernels
from .flex import (BlockTables, OwnKeys, _buffer_args, captured_cotangents, captured_grad_buffers,
                   dbwd_dkdv_pass, dbwd_dq_by_atomics, dbwd_dq_pass, dbwd_rows_pass, dkdv_pass, dq_pass,
                   finish_captured_grads, finish_row_parts, flex_forward, flex_jvp)


@dataclasses.dataclass(frozen=True)
class KernelPass:
    """One pass: the queries of input ``q`` over the keys ``k`` and values ``v`` (positions in the
    call's inputs), writing row group ``rows``."""

    q: int
    k: int
    v: int
    rows: int
    kern: ModKernels
    tables: BlockTables
    buffers: tuple  # (start, stop): the captured tensors this pass's kernels read
    q_off: int = 0  # frame position of query 0 (EBT predicted stream: r + 1)
    own: Optional[tuple] = None  # inputs of each query's own key and value (EBT), one more column per row
    own_keep: Optional[Tensor] = None  # int8 [B, H, Sq]: whether a query keeps its own key


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """The passes of one call; its results are ``n_rows`` outputs, their ``n_rows`` lse, then
    their ``n_rows`` msum (no gradient)."""

    passes: tuple
    n_inputs: int
    n_rows: int

    def __post_init__(self):
        kerns = {}
        for p in self.passes:
            if kerns.setdefault(p.buffers, p.kern) is not p.kern:
                raise ValueError("AttentionPlan: passes reading the same captured tensors must share their kernels")

    @functools.cached_property
    def key_inputs(self) -> frozenset:
        """The inputs read as keys or values by some pass (own keys aside): those a key pass
        writes the gradient of."""
        return frozenset(i for p in self.passes for i in (p.k, p.v))

    @functools.cached_property
    def row_groups(self) -> Optional[tuple]:
        """``((plan, inputs), ...)``, one per row group, when the row groups read different inputs:
        the passes of that row group alone, over ``inputs`` (positions in this plan's inputs, in
        order), writing row group 0.  None when one node serves: a single row group, or row groups
        that all read the same inputs."""
        if self.n_rows == 1:
            return None
        reads = [sorted({i for p in self.passes if p.rows == r for i in (p.q, p.k, p.v, *(p.own or ()))})
                 for r in range(self.n_rows)]
        if all(x == reads[0] for x in reads):
            return None
        groups = []
        for r, inputs in enumerate(reads):
            at = {i: j for j, i in enumerate(inputs)}
            passes = tuple(dataclasses.replace(p, q=at[p.q], k=at[p.k], v=at[p.v], rows=0,
                                               own=None if p.own is None else (at[p.own[0]], at[p.own[1]]))
                           for p in self.passes if p.rows == r)
            groups.append((AttentionPlan(passes, len(inputs), 1), tuple(inputs)))
        return tuple(groups)


def _own(p: KernelPass, ins) -> Optional[OwnKeys]:
    return OwnKeys(ins[p.own[0]], ins[p.own[1]], p.own_keep) if p.own is not None else None


def _rows_count(plan: AttentionPlan) -> list:
    n = [0] * plan.n_rows
    for p in plan.passes:
        n[p.rows] += 1
    return n


def _own_key_grads(dkp: Tensor, dvp: Tensor, k_p: Tensor, v_p: Tensor):
    """The own keys' gradients from the per-query-head ones [B, H, S, D]: summed over the query
    heads of a GQA group; without GQA the kernels already wrote them in the keys' dtype."""
    B, H, S, D = dkp.shape
    Hkv = k_p.shape[1]
    if Hkv == H:
        return dkp, dvp
    dk = dkp.view(B, Hkv, H // Hkv, S, D).sum(2, dtype=torch.float32)
    dv = dvp.view(B, Hkv, H // Hkv, S, dvp.shape[3]).sum(2, dtype=torch.float32)
    return dk.to(k_p.dtype), dv.to(v_p.dtype)


class _Captured:
    """Per slice of captured tensors: the tensors, their fp32 gradient accumulators and the
    kernels' buffer arguments (with the cotangents of their first-order gradients, if given)."""

    def __init__(self, plan: AttentionPlan, buffers: list, device, batch: int, cts: Optional[list] = None):
        self.groups = {}
        for p in plan.passes:
            if p.buffers in self.groups:
                continue
            lo, hi = p.buffers
            bufs = list(buffers[lo:hi])
            gbufs = captured_grad_buffers(p.kern, bufs, device, batch)
            c = captured_cotangents(p.kern, bufs, list(cts[lo:hi])) if cts is not None else None
            self.groups[p.buffers] = (bufs, gbufs, _buffer_args(bufs, gbufs, c))
        self.n = len(buffers)

    def args(self, p: KernelPass) -> list:
        return self.groups[p.buffers][2]

    def scatters(self, p: KernelPass) -> bool:
        return bool(self.groups[p.buffers][1])

    def grads(self) -> list:
        """One gradient per captured tensor of the call (None where the kernels scatter none)."""
        out = [None] * self.n
        for (lo, _), (bufs, gbufs, _) in self.groups.items():
            out[lo:lo + len(bufs)] = finish_captured_grads(bufs, gbufs)
        return out


class _Grads:
    """Gradients of the call's inputs, summed where several passes give one."""

    def __init__(self, n: int):
        self.g = [None] * n

    def add(self, i: int, g: Tensor) -> None:
        self.g[i] = g if self.g[i] is None else (self.g[i].float() + g.float()).to(g.dtype)


class _KeySideSums:
    """The key-side gradients (of k and v inputs) of a sequence of launches: an input written by
    one launch gets a tensor of its dtype; one written by several is summed in fp32 -- the first
    launch writes the sum, the next ones add to it (the kernels' ``into`` / ``add``), the last
    writes the input's dtype."""

    def __init__(self, ins: list, targets: list):
        self.ins = ins
        self.left = collections.Counter(i for t in targets for i in t)
        self.acc: dict = {}

    def launch(self, ik: int, iv: int) -> tuple:
        """(into, add) for a launch writing the gradients of inputs ik, iv; add is None when
        neither adds to an earlier sum."""
        into, add, finals = [], [], []
        for i in (ik, iv):
            x = self.ins[i]
            self.left[i] -= 1
            last = self.left[i] == 0
            prev = self.acc.get(i)
            if prev is None:
                t = torch.empty_like(x) if last else torch.empty(x.shape, dtype=torch.float32, device=x.device)
                if not last:
                    self.acc[i] = t
            else:
                t = torch.empty_like(x) if last else prev
            into.append(t)
            add.append(prev)
            finals.append(last)
        if all(a is None for a in add):
            return tuple(into), None, finals
        for j in range(2):  # a slot that adds nothing adds zeros
            if add[j] is None:
                into[j] = into[j].zero_()
                add[j] = into[j]
        return tuple(into), tuple(add), finals


def merge_parts(parts: list) -> tuple:
    """(out, lse, msum) of one row group from its passes' (out, lse, msum)."""
    from .merge import merge_partial_softmax

    out, lse, msum = parts[0]
    for o, _, ms in parts[1:]:
        out, lse, msum = merge_partial_softmax(out, msum, o, ms)
    return out, lse, msum


def plan_forward(plan: AttentionPlan, ins: list, buffers: list, scale: float, options: Optional[dict] = None) -> list:
    """The outputs of every row group, then their lse, then their msum ([..., 2]: each row's
    largest kept modified score -- torch's max_scores -- and softmax sum)."""
    parts = [[] for _ in range(plan.n_rows)]
    for p in plan.passes:
        lo, hi = p.buffers
        parts[p.rows].append(flex_forward(p.kern, ins[p.q], ins[p.k], ins[p.v], scale, p.tables,
                                          list(buffers[lo:hi]), options, q_off=p.q_off, own=_own(p, ins)))
    merged = [merge_parts(pp) for pp in parts]
    return [x[0] for x in merged] + [x[1] for x in merged] + [x[2] for x in merged]


def _refuse_without_derivative(plan: AttentionPlan) -> None:
    """A score_mod torch cannot differentiate runs forward only (codegen.trace.TracedMod.no_derivative):
    every pass that needs its derivative refuses here, before a kernel is compiled or launched."""
    for p in plan.passes:
        if p.kern.no_derivative:
            raise NotImplementedError(p.kern.no_derivative)


def _cotangents(plan: AttentionPlan, outs: list, cts: list) -> tuple:
    n = plan.n_rows
    douts = [(c if c is not None else torch.zeros_like(o)).contiguous() for c, o in zip(cts[:n], outs[:n])]
    dlses = [c.contiguous() if c is not None else None for c in cts[n:]]
    return douts, dlses


def plan_backward(plan: AttentionPlan, ins: list, outs: list, cts: list, buffers: list, scale: float,
                  options: Optional[dict] = None, unwanted: frozenset = frozenset()) -> tuple:
    """First order: (gradients of the inputs, of the captured tensors); None where none flows.
    ``outs`` are the forward's results (plan_forward); ``cts`` the cotangents of the outputs and
    lse (None: zero).  The
    inputs in ``unwanted`` (positions) get no gradient: a key pass whose keys and values are both
    unwanted is not launched (the captured tensors' gradients come from the query passes)."""
    _refuse_without_derivative(plan)
    n = plan.n_rows
    out, msum = outs[:n], outs[2 * n:3 * n]
    douts, dlses = _cotangents(plan, outs, cts)
    captured = _Captured(plan, buffers, ins[0].device, ins[0].shape[0])
    grads = _Grads(plan.n_inputs)
    deltas, refs = [], []
    for p in plan.passes:
        own = _own(p, ins)
        r = p.rows
        dq, delta, ref, own_g = dq_pass(p.kern, ins[p.q], ins[p.k], ins[p.v], out[r], msum[r], douts[r], dlses[r],
                                        scale,
                                   p.tables, captured.args(p), options, q_off=p.q_off, own=own)
        grads.add(p.q, dq)
        deltas.append(delta)
        refs.append(ref)
        if own is not None:
            dkp, dvp = _own_key_grads(*own_g, own.kp, own.vp)
            grads.add(p.own[0], dkp)
            grads.add(p.own[1], dvp)
    key_passes = [i for i, p in enumerate(plan.passes) if not {p.k, p.v} <= unwanted]
    sums = _KeySideSums(ins, [(plan.passes[i].k, plan.passes[i].v) for i in key_passes])
    for i in key_passes:
        p = plan.passes[i]
        into, add, finals = sums.launch(p.k, p.v)
        dk, dv = dkdv_pass(p.kern, ins[p.q], ins[p.k], ins[p.v], refs[i], deltas[i], douts[p.rows], scale,
                           p.tables, captured.args(p), options, q_off=p.q_off, into=into, add=add)
        for j, g, last in ((p.k, dk, finals[0]), (p.v, dv, finals[1])):
            if last:
                grads.add(j, g)
    return grads.g, captured.grads()


def plan_double_backward(plan: AttentionPlan, ins: list, outs: list, cts: list, gcts: list, buffers: list,
                         bcts: list, scale: float, options: Optional[dict] = None) -> tuple:
    """Fused double backward (O(S) memory, no S x S tensor): given the cotangents ``gcts`` of the
    first-order gradients of the inputs (None: zero) and ``bcts`` of the captured tensors', the
    gradients of (the inputs, the first-order cotangents ``cts``, the captured tensors).  The
    forward's ``outs`` enter as constants (total derivatives)."""
    _refuse_without_derivative(plan)
    n = plan.n_rows
    out, msum = outs[:n], outs[2 * n:3 * n]
    douts, dlses = _cotangents(plan, outs, cts)
    gcts = [(g if g is not None else torch.zeros_like(x)).contiguous() for g, x in zip(gcts, ins)]
    captured = _Captured(plan, buffers, ins[0].device, ins[0].shape[0], bcts)
    count = _rows_count(plan)

    def args(p, rows=None):
        """A pass's inputs; ``rows``: what it reads of the rows' softmax (default: the forward's msum;
        the key-tile pass reads the references the rows pass wrote)."""
        r = p.rows
        return (p.kern, ins[p.q], ins[p.k], ins[p.v], out[r], douts[r], msum[r] if rows is None else rows, dlses[r],
                gcts[p.q], gcts[p.k], gcts[p.v])

    def own_kw(p):
        if p.own is None:
            return {}
        return dict(own=_own(p, ins), own_cts=(gcts[p.own[0]], gcts[p.own[1]]))

    # 1. row statistics and g_do per row group (the sums of several passes added first)
    parts, refs = [[] for _ in range(n)], []
    for p in plan.passes:
        g_do, st, ref = dbwd_rows_pass(*args(p), scale, p.tables, captured.args(p), options, q_off=p.q_off,
                                       partial=count[p.rows] > 1, **own_kw(p))
        parts[p.rows].append((g_do, st))
        refs.append(ref)  # the rows' references for this pass's key-tile pass (from the merged msum)
    rows = [pp[0] if len(pp) == 1 else finish_row_parts(pp, out[r], douts[r], dlses[r]) for r, pp in enumerate(parts)]
    g_do = [g for g, _ in rows]
    g_dlse = [st[..., 0] if dl is not None else None for (_, st), dl in zip(rows, dlses)]
    grads = _Grads(plan.n_inputs)
    # 2. g_k, g_v per key tile, summed over the passes that read the keys; with atomic g_q
    #    (dbwd_dq_by_atomics) also each tile's share of g_q, into one fp32 accumulator per pass
    gq_accs = [torch.zeros(ins[p.q].shape, dtype=torch.float32, device=ins[p.q].device)
               if dbwd_dq_by_atomics(options, captured.scatters(p), ins[p.q], ins[p.v]) else None
               for p in plan.passes]
    sums = _KeySideSums(ins, [(p.k, p.v) for p in plan.passes])
    for i, p in enumerate(plan.passes):
        into, add, finals = sums.launch(p.k, p.v)
        g_k, g_v = dbwd_dkdv_pass(*args(p, refs[i]), rows[p.rows][1], scale, p.tables, captured.args(p), options,
                                  q_off=p.q_off, into=into, add=add, gq_acc=gq_accs[i])
        for j, g, last in ((p.k, g_k, finals[0]), (p.v, g_v, finals[1])):
            if last:
                grads.add(j, g)
    # 3. g_q per query tile (and the own keys' g_k, g_v; the captured tensors' gradients)
    for i, p in enumerate(plan.passes):
        g_q, own_g = dbwd_dq_pass(*args(p), rows[p.rows][1], scale, p.tables, captured.args(p), options,
                                  q_off=p.q_off, captured_grads=captured.scatters(p), gq_acc=gq_accs[i], **own_kw(p))
        grads.add(p.q, g_q)
        if p.own is not None:
            gkp, gvp = _own_key_grads(*own_g, ins[p.own[0]], ins[p.own[1]])
            grads.add(p.own[0], gkp)
            grads.add(p.own[1], gvp)
    return grads.g, g_do + g_dlse, captured.grads()


def _merge_tangents(parts: list) -> tuple:
    """Tangents of a merged row group from its passes' (out, lse, d_out, d_lse, msum): with the
    weights w_a = l_a e^(m_a - m) / l of the parts (merge.py; through the maxima and sums, exact
    for rows of huge scores),  d lse = sum_a w_a d lse_a  and
    d out = sum_a w_a (d out_a + (d lse_a - d lse) out_a)."""
    ms = torch.stack([x[4][..., 0] for x in parts])
    ls = torch.stack([x[4][..., 1] for x in parts])
    m = ms.amax(0)
    empty = torch.isneginf(m)
    w = ls * torch.exp(ms - torch.where(empty, 0.0, m))  # 0 for a part with no key
    total = w.sum(0)
    w = torch.where(empty, 0.0, w / torch.where(empty, 1.0, total))
    kept = w > 0
    d_lse = sum(torch.where(kept[a], w[a] * parts[a][3], 0.0) for a in range(len(parts)))
    d_out = sum(torch.where(kept[a].unsqueeze(-1), w[a].unsqueeze(-1) * (parts[a][2].float() + (
        parts[a][3] - d_lse).unsqueeze(-1) * parts[a][0].float()), 0.0) for a in range(len(parts)))
    return d_out.to(parts[0][2].dtype), d_lse


def plan_jvp(plan: AttentionPlan, ins: list, tangents: list, buffers: list, scale: float,
             options: Optional[dict] = None) -> list:
    """Forward mode, fused: tangents of the outputs then of the lse along ``tangents`` of the
    inputs (zeros where None)."""
    _refuse_without_derivative(plan)
    tangents = [t if t is not None else torch.zeros_like(x) for t, x in zip(tangents, ins)]
    parts = [[] for _ in range(plan.n_rows)]
    for p in plan.passes:
        lo, hi = p.buffers
        own_t = (tangents[p.own[0]], tangents[p.own[1]]) if p.own is not None else None
        parts[p.rows].append(flex_jvp(p.kern, ins[p.q], ins[p.k], ins[p.v], tangents[p.q], tangents[p.k],
                                      tangents[p.v], scale, p.tables, list(buffers[lo:hi]), options, q_off=p.q_off,
                                      own=_own(p, ins), own_tangents=own_t))
    res = [pp[0][2:4] if len(pp) == 1 else _merge_tangents(pp) for pp in parts]
    return [d for d, _ in res] + [dl for _, dl in res]


def single_stream_plan(kern: ModKernels, tables: BlockTables, n_buffers: int) -> AttentionPlan:
    """flex_attention: inputs (q, k, v), one pass, one row group."""
    return AttentionPlan((KernelPass(0, 1, 2, 0, kern, tables, (0, n_buffers)),), 3, 1)
