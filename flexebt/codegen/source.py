"""Fill the kernel templates with the code of a score_mod / mask_mod, and cache the result.

The template files of a kernel set are joined into one module, each entry kernel's parameter list
is written from its declaration (``kernels/signatures.py``) and each hook statement is replaced by
the mods' code for it (``hooks.py``, ``ModCode``).

Kernels are cached per (template, mod code and constants, captured-tensor metadata, interpreter
or not): a second call with the same mods reuses the compiled module without tracing again.
The generated source is written under ``$FLEXEBT_CACHE_DIR`` (default ``~/.cache/flexebt``) and
imported from there, because Triton reads a kernel's source from its file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import pathlib
import re
import sys
import types
from typing import Callable, Optional

import torch

from .. import runtime
from .emit import Emitter
from .hooks import expand_hooks
from .identity import describe, wide_offsets
from .intervals import POSITION_LIMIT
from .trace import TracedMod, trace_mask_mod, trace_score_mod

TEMPLATES = pathlib.Path(__file__).resolve().parent.parent / "kernels" / "templates"


@dataclasses.dataclass
class ModKernels:
    """A compiled kernel module plus how to feed it the mod's tensors."""

    module: types.ModuleType
    traced_score: Optional[TracedMod]
    traced_mask: Optional[TracedMod]
    n_buffers: int
    grad_slots: list[int]          # buffer slots whose gradient the kernels accumulate
    internal: dict[int, torch.Tensor]  # slots of tensors created inside the mod at trace time
    gathers: bool = False          # the score_mod loads from a captured tensor (tile choice)
    positional: frozenset = frozenset()  # (slot, dim, position name): dims indexed by a bare position
    name: str = "mod"
    # (index among the captured tensors -- score_mod's, then mask_mod's --, shape) of each tensor
    # whose size the mods read: the code holds those sizes (a call with other sizes gets other kernels)
    shape_pins: tuple = ()
    # slot -> whether its load indexes the batch, for each learned captured tensor whose gradient the
    # kernels can add without atomics (unique_per_score): how deterministic algorithms get one
    unique_slots: dict = dataclasses.field(default_factory=dict)

    @property
    def no_derivative(self) -> str:
        """Why the score_mod has no derivative, or "" (codegen.trace.TracedMod.no_derivative)."""
        return self.traced_score.no_derivative if self.traced_score is not None else ""

    def shapes_differ(self, current: list) -> bool:
        """Whether the captured tensors of a call (``Buffer`` entries) have other sizes than these
        kernels were generated for, where the mods read them."""
        return any(tuple(current[i].tensor.shape) != shape for i, shape in self.shape_pins)

    def buffers_of(self, current: list, extents: dict) -> list[torch.Tensor]:
        """The tensors of a call, in kernel-argument order, from the mods' captured tensors
        (``codegen.identity.Buffer`` entries, score_mod's first).  ``extents``: how many values
        each position takes in this call ({"off_b": B, "off_h": H, "q_idx": .., "kv_idx": ..,
        "mq_idx": ..}); a captured tensor indexed by a bare position must be that long along the
        indexed dimension, which is checked here, once per call, instead of per score."""
        out = [b.tensor for b in current]
        for slot, t in sorted(self.internal.items()):
            out.insert(slot, t)
        if len(out) != self.n_buffers:
            raise RuntimeError("flexebt: a mod captured a different number of tensors than when it was compiled")
        return self.prepare(out, extents)

    def prepare(self, tensors: list, extents: dict) -> list[torch.Tensor]:
        """The kernel arguments for the captured ``tensors``: positions checked against the tensors'
        sizes; a tensor whose elements share memory (an expanded view) read through a contiguous
        copy, so its gradient has one slot per element (the copy is differentiable: the gradient
        reaches the expanded tensor and its base); a tensor whose gradient the kernels do not form
        (read by a mask_mod, or through .detach()) passed detached, so autograd does not connect
        it, as torch would not."""
        return prepare_captured(tensors, extents, self.grad_slots, self.positional, self.name)


def prepare_captured(tensors: list, extents: dict, grad_slots, positional, name: str) -> list[torch.Tensor]:
    """ModKernels.prepare from its parts (the compiled path passes them as graph constants)."""
    for slot, dim, pos in positional:
        size, need = tensors[slot].shape[dim], extents[pos]
        if size < need:
            what = {"off_b": "b", "off_h": "h", "q_idx": "q_idx", "kv_idx": "kv_idx", "mq_idx": "q_idx"}[pos]
            raise IndexError(
                f"flexebt: the mod {name!r} indexes dimension {dim} of a captured tensor of shape "
                f"{tuple(tensors[slot].shape)} with {what}, which goes up to {need - 1} in this call: index "
                f"{need - 1} is out of range for size {size} (as in torch). Give the tensor at least {need} "
                f"entries along that dimension.")
    if torch.autograd.forward_ad._current_level >= 0 and not torch.compiler.is_compiling():
        _refuse_tangents(tensors, grad_slots, name)
    return [(x.contiguous() if _overlapping(x) else x) if k in grad_slots else x.detach()
            for k, x in enumerate(tensors)]


def _refuse_tangents(tensors: list, grad_slots, name: str) -> None:
    """Inside ``torch.autograd.forward_ad.dual_level``: refuse a captured tensor that carries a
    forward-mode tangent.  A tensor whose gradient the kernels do not form is passed detached, and
    ``detach()`` drops its tangent too, so the output's tangent would silently miss that tensor's
    part; the kernels' forward mode covers tangents of q, k and v only (the tensors with gradients
    reach ``Attention.jvp``, which refuses theirs)."""
    from torch.autograd.forward_ad import unpack_dual

    for k, x in enumerate(tensors):
        if k not in grad_slots and unpack_dual(x).tangent is not None:
            raise NotImplementedError(
                f"flexebt: a tensor captured by the mod {name!r} (shape {tuple(x.shape)}) carries a forward-mode "
                f"tangent (torch.autograd.forward_ad.make_dual); the kernels' forward mode takes tangents of q, k "
                f"and v only. Use kernel_options={{'BACKEND': 'REFERENCE'}} for this call, or give the tangent to "
                f"q, k or v.")


def position_extents(B: int, H: int, n_q: int, n_kv: int, n_mq: Optional[int] = None) -> dict:
    """How many values each position takes: b, h (query heads), q_idx and kv_idx as the mods see
    them, and mq_idx (the stream-local query position of block-mask mask_mods).  The kernels compute
    a mod's integer values in int32 where they fit for positions below ``POSITION_LIMIT``
    (codegen/intervals.py), so longer extents are refused."""
    for n, what in ((B, "batch size"), (H, "number of heads"), (n_q, "query length"), (n_kv, "key length")):
        if isinstance(n, int) and n > POSITION_LIMIT:
            raise ValueError(f"flexebt: a {what} of {n} is more than the kernels support ({POSITION_LIMIT} = 2^30 "
                             f"positions); split the call, or use kernel_options={{'BACKEND': 'REFERENCE'}}.")
    return {"off_b": B, "off_h": H, "q_idx": n_q, "kv_idx": n_kv, "mq_idx": n_q if n_mq is None else n_mq}


def _overlapping(t: torch.Tensor) -> bool:
    """Whether two indices of ``t`` may address one element (conservative: True when unsure).

    The dimensions of more than one element, by stride: each stride must reach past every
    element the smaller strides span.  Ordered with plain comparisons rather than ``sorted``:
    under torch.compile with dynamic shapes the sizes are symbolic, and comparisons trace (as
    guards) where a sort by symbolic keys does not.  Equal strides overlap in either order."""
    dims: list = []
    for stride, size in zip(t.stride(), t.shape):
        if size > 1:
            at = 0
            while at < len(dims) and dims[at][0] <= stride:
                at += 1
            dims.insert(at, (stride, size))
    extent = 1
    for stride, size in dims:
        if stride < extent:
            return True
        extent = stride * size
    return False


def cache_dir() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("FLEXEBT_CACHE_DIR", pathlib.Path.home() / ".cache" / "flexebt")) / "kernels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def get_kernels(template: str, score_mod: Optional[Callable], mask_mod: Optional[Callable],
                frame_mask: bool = False) -> ModKernels:
    """The kernel module of ``template`` for these mods (cached).

    ``frame_mask``: the EBT flavour.  The mask_mod is a *frame* mask_mod and sees frame positions
    like the score_mod (``q_idx`` = stream position + ``Q_OFF``), and where ``Q_OFF > 0`` (the
    predicted stream) the observed key at the query's own frame is dropped as well -- so one
    module serves both query streams, with the streams told apart by ``Q_OFF`` alone."""
    return kernels_and_buffers(template, score_mod, mask_mod, None, frame_mask)[0]


def kernels_and_buffers(template: str, score_mod: Optional[Callable], mask_mod: Optional[Callable], extents: dict,
                        frame_mask: bool = False) -> tuple:
    """``get_kernels`` and the call's ``buffers`` from one walk over each mod (the eager path's
    per-call work; ``extents=None``: the kernels only, buffers None)."""
    score_key, score_bufs = describe(score_mod) if score_mod is not None else (None, [])
    mask_key, mask_bufs = describe(mask_mod) if mask_mod is not None else (None, [])
    current = score_bufs + mask_bufs
    kern = _kernels(template, score_key, mask_key, score_mod, mask_mod, frame_mask, current)
    return kern, (kern.buffers_of(current, extents) if extents is not None else None)


def _kernels(template: str, score_key, mask_key, score_mod, mask_mod, frame_mask: bool, current: list) -> ModKernels:
    """The cached kernels of these mods, built on a miss.  Kernels of mods that read a captured
    tensor's size hold that size: where the call's tensors have other sizes, the key grows by
    them (again while the kernels found read sizes the key does not hold yet: a mod may read one
    size only for some values of another)."""
    key = (template, score_key, mask_key, _interpret(), frame_mask)
    for _ in range(len(current) + 2):
        hit = runtime.kernels.get(key)
        if hit is None:
            # Building traces the mods with make_fx and autograd. That is code generation, not part of
            # the caller's math, so it runs on a worker thread: torch.func transforms, no_grad,
            # inference_mode and autocast are thread-local and do not follow it there.
            hit = runtime.kernels.put(key, run_on_builder(_build, template, score_mod, mask_mod, frame_mask))
        if not hit.shapes_differ(current):
            return hit
        key = key + (tuple((i, tuple(current[i].tensor.shape)) for i, _ in hit.shape_pins),)
    raise RuntimeError("flexebt: the kernels of these mods could not be matched to the sizes of their captured "
                       "tensors (the mods read different sizes on each build)")


_POOL = None


def _builder():
    global _POOL
    if _POOL is None:
        import concurrent.futures

        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="flexebt-codegen")
    return _POOL


def run_on_builder(fn, *args, **kwargs):
    """``fn(*args)`` on the code-generation thread (outside the caller's torch.func state), or
    directly when already there (a task that waits on its own single worker would never end)."""
    import threading

    if threading.current_thread().name.startswith("flexebt-codegen"):
        return fn(*args, **kwargs)
    return _builder().submit(fn, *args, **kwargs).result()


def _merge_buffers(score: Optional[TracedMod], mask: Optional[TracedMod]):
    """One slot list for both mods: score buffers first, then the mask's (shifted)."""
    n_score = len(score.buffers) if score else 0
    shift = {}
    if mask:
        shift = {name: slot + n_score for name, slot in mask.constants.items()}
    return n_score, shift


def _not_own_frame(q_idx: str, mq_idx: str, kv_idx: str) -> str:
    """EBT frame masks: keep a key unless it is the observed key at a predicted query's own frame
    (q_idx == mq_idx exactly when Q_OFF = 0, i.e. in the observed stream)."""
    return f"(({kv_idx} != {q_idx}) | ({q_idx} == {mq_idx}))"


def _bool_tile(x: str) -> str:
    """The mask_mod's value as a boolean [BLOCK_M, BLOCK_N] tile.  A mask of ``b`` / ``h`` only is
    one value per program; combined with a tile, Triton's interpreter broadcasts it to int32
    data under an int1 type, which ``tl.atomic_add(..., mask=keep)`` (a captured tensor's
    gradient) then refuses.  Going through ZERO and a comparison gives a bool tile everywhere
    (free once compiled)."""
    return f"((({x}).to(tl.int32) + ZERO) != 0)"


def _scatter_add(ld, score: TracedMod, off: str, value: str, keep: str) -> list:
    """The lines adding a tile's ``value`` (where kept) to a captured tensor's gradient at the load's
    offset.  A load whose index does not depend on the query or key position (a temperature, a
    per-head scale) has one address per tile: the tile is summed first (a tree sum) and added once,
    instead of one fp32 atomic per score -- fewer atomics, and a sum as accurate as eager math's.

    A load with one element per score (``unique_per_score``) has a second way, taken where the
    launcher passes ``GBUF{k}_SB >= 0`` (kernels/flex.py: captured_grad_buffers): no other program
    of the launch touches the element, so a plain read-add-write replaces the atomic (faster, and
    the sum no longer depends on the programs' order).  A load that does not index the batch gets
    one accumulator per batch element there (``off_b * GBUF{k}_SB``; deterministic algorithms
    only), which the launcher sums in order afterwards."""
    k = ld.buffer
    if not _depends_on_position(score.graph, ld.node_name):
        return [f"tl.atomic_add(GBUF{k} + tl.max(tl.max({off} + ZERO, 1), 0), "
                f"tl.sum(tl.sum(tl.where({keep}, {value}, 0.0), 1), 0))"]
    atomic = f"tl.atomic_add(GBUF{k} + ({off} + ZERO), tl.where({keep}, {value}, 0.0), mask={keep})"
    if not unique_per_score(score, ld):
        return [atomic]
    at = f"g{k}_{ld.node_name}"
    return [f"if GBUF{k}_SB >= 0:",
            f"    {at} = GBUF{k} + off_b.to(tl.int64) * GBUF{k}_SB + ({off} + ZERO)",
            f"    tl.store({at}, tl.load({at}, mask={keep}, other=0.0) + tl.where({keep}, {value}, 0.0), mask={keep})",
            "else:",
            f"    {atomic}"]


def unique_per_score(score: TracedMod, ld) -> bool:
    """Whether load ``ld`` of the score_mod reads one element per score of a query row and head:
    its indices are bare positions, each at most once, among them the query head, the query and the
    key position, and no other learned load reads the same captured tensor.  Then one launch of a
    query-tile pass adds each score's gradient to its own element for one batch element (every
    (head, query, key) is one program's, once; the key-tile passes scatter nothing), so it needs no
    atomic add -- unless the tensor has elements in common (an expanded view, which
    ``prepare_captured`` reads through a contiguous copy) or the batch is not indexed (the
    launcher's batch accumulators)."""
    if sum(other.learned and other.buffer == ld.buffer for other in score.loads) != 1:
        return False
    used = _index_positions(score, ld)
    return None not in used and len(set(used)) == len(used) and {"h", "q", "kv"} <= set(used)


def indexes_batch(score: TracedMod, ld) -> bool:
    """Whether load ``ld``'s indices include the batch position (for a unique_per_score load)."""
    return "b" in _index_positions(score, ld)


def _index_positions(score: TracedMod, ld) -> list:
    """Per index of load ``ld``: the bare position it is ("b", "h", "q", "kv"), else None."""
    nodes = list(score.graph.graph.nodes)
    positions = dict(zip([n for n in nodes if n.op == "placeholder"][1:5], ("b", "h", "q", "kv")))
    node = next(n for n in nodes if n.name == ld.node_name)
    return [positions.get(i) if isinstance(i, torch.fx.Node) else None for i in node.args[1]]


def _depends_on_position(gm, node_name: str) -> bool:
    """Whether the indices of load ``node_name`` depend on the score, q_idx or kv_idx (the graph's
    placeholders 0, 3 and 4), directly or through other loads."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    varying = {placeholders[i] for i in (0, 3, 4)}
    node = next(n for n in gm.graph.nodes if n.name == node_name)
    stack, seen = list(node.args[1]), set()
    while stack:
        n = stack.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        if n in varying:
            return True
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes)
    return False


class ModCode:
    """The code a pair of mods gives each hook (codegen/hooks.py), bound to the names a template's
    hook statement passes.  Every statement is emitted afresh from the traced graphs; the emitters
    say whether any index is checked in the kernel and which dimensions are indexed by a bare
    position (the launcher's host-side checks)."""

    def __init__(self, score: Optional[TracedMod], mask: Optional[TracedMod], mask_consts: dict, wide: list,
                 frame_mask: bool):
        self.traced_score, self.traced_mask, self.mask_consts, self.wide, self.frame_mask = score, mask, mask_consts, wide, frame_mask
        self.emitters: list[Emitter] = []
        self._last = {}  # hook name -> (emitter, derivative outputs) of the latest one in this function

    def begin_function(self) -> None:
        self._last = {}

    def _emitter(self, prefix: str) -> Emitter:
        em = Emitter(prefix, self.wide, self.traced_score.name if prefix != "mm_" else self.traced_mask.name)
        self.emitters.append(em)
        return em

    def _primal(self, em: Emitter, call) -> tuple:
        """Emit the score_mod at the call's inputs: (t expression, the mod's inputs as named there)."""
        i = call.inputs
        em.lines.append(f"{em.prefix}s = {i['s_raw']} * {i['scale']}")
        inputs = [f"{em.prefix}s", i["b"], i["h"], i["q_idx"], i["kv_idx"]]
        (t,) = em.emit(self.traced_score.graph, inputs, self.traced_score.constants)
        return t, inputs

    def _plain_t2(self, call) -> str:
        # no score_mod: scale and log2(e) fold into one multiply
        return f"{call.outputs[0]} = {call.inputs['s_raw']} * ({call.inputs['scale']} * LOG2E)"

    def score(self, call) -> list:
        if self.traced_score is None:
            return [self._plain_t2(call)]
        em = self._emitter("sm_")
        t, _ = self._primal(em, call)
        return em.lines + [f"{call.outputs[0]} = {t}"]

    def _underivable(self, call) -> Optional[list]:
        """For a score_mod without a derivative (TracedMod.no_derivative): the hook's outputs as
        placeholders behind a compile-time assertion.  The launchers refuse every pass that would
        need them (kernels/plan.py) before it is compiled; the assertion keeps it that way."""
        if self.traced_score is None or not self.traced_score.no_derivative:
            return None
        return ['tl.static_assert(False, "flexebt: this score_mod has no derivative")',
                *(f"{o} = ZERO.to(tl.float32)" for o in call.outputs)]

    def score_grad(self, call) -> list:
        if self.traced_score is None:
            return [self._plain_t2(call), f"{call.outputs[1]} = 1.0"]
        if self._underivable(call):
            return self._underivable(call)
        em = self._emitter("sb_")
        t, inputs = self._primal(em, call)
        loads = [f"sb_{ld.node_name}" for ld in self.traced_score.loads]
        outs = em.emit(self.traced_score.derivative["bwd"], inputs + loads, self.traced_score.deriv_constants["bwd"], tag="d_")
        self._last["score_grad"] = (em, outs)
        return em.lines + [f"{call.outputs[0]} = {t}", f"{call.outputs[1]} = {outs[1]}"]

    def captured_grad(self, call) -> list:
        """dt df/dc_k into GBUF of each learned captured tensor c_k (outputs 2.. of the bwd graph)."""
        if self.traced_score is None or self.traced_score.no_derivative or not any(
                ld.learned for ld in self.traced_score.loads):
            return ["pass"]
        em, outs = self._paired(call)
        dt, keep = call.inputs["dt"], call.inputs["keep"]
        return [line for k, ld in enumerate(self.traced_score.loads) if ld.learned
                for line in _scatter_add(ld, self.traced_score, em.load_offsets[ld.node_name], f"{dt} * ({outs[2 + k]})",
                                         keep)]

    def score_second(self, call) -> list:
        t2, dtds, d2, ew, ewds = call.outputs
        zero = "ZERO.to(tl.float32)"
        if self.traced_score is None:
            return [self._plain_t2(call), f"{dtds} = {zero} + 1.0", f"{d2} = {zero}", f"{ew} = {zero}",
                    f"{ewds} = {zero}"]
        if self._underivable(call):
            return self._underivable(call)
        em = self._emitter("sd_")
        t, inputs = self._primal(em, call)
        score = self.traced_score
        outs = em.emit(score.derivative["dbwd"], inputs + [f"sd_{ld.node_name}" for ld in score.loads],
                       score.deriv_constants["dbwd"], tag="d_")
        self._last["score_second"] = (em, outs)
        L, f32 = len(score.loads), f" + {zero}"
        lines = em.lines + [f"{t2} = ({t}){f32}", f"{dtds} = ({outs[1]}){f32}", f"{d2} = ({outs[2 + L]}){f32}"]
        learned = [k for k, ld in enumerate(score.loads) if ld.learned]
        for k in learned:  # Gc_k: the cotangent of dc_k, read where c_k was read
            ld = score.loads[k]
            lines.append(f"sd_gc{k} = tl.load(CBUF{ld.buffer} + ({em.load_offsets[ld.node_name]} + ZERO))"
                         f".to(tl.float32)")
            lines.append(f"sd_fc{k} = ({outs[2 + k]}){f32}")
            lines.append(f"sd_fsc{k} = ({outs[3 + L + k]}){f32}")
        # u gains sum_k Gc_k f_c_k, du/ds gains sum_k Gc_k f_sc_k (templates/double_backward.py)
        lines.append(f"{ew} = " + " + ".join([f"sd_gc{k} * sd_fc{k}" for k in learned] + [zero]))
        lines.append(f"{ewds} = " + " + ".join([f"sd_gc{k} * sd_fsc{k}" for k in learned] + [zero]))
        return lines

    def captured_second_grad(self, call) -> list:
        """g_c_k += gt f_c_k + dt (f_sc_k A + sum_l f_c_k c_l Gc_l) for each learned captured tensor."""
        if self.traced_score is None or self.traced_score.no_derivative or not any(
                ld.learned for ld in self.traced_score.loads):
            return ["pass"]
        em, outs = self._paired(call)
        gt, dt, a, keep = (call.inputs[n] for n in ("gt", "dt", "a", "keep"))
        L = len(self.traced_score.loads)
        learned = [k for k, ld in enumerate(self.traced_score.loads) if ld.learned]
        lines = []
        for k in learned:
            ld = self.traced_score.loads[k]
            cross = "".join(f" + ({outs[3 + 2 * L + k * L + l]}) * sd_gc{l}" for l in learned)
            lines += _scatter_add(ld, self.traced_score, em.load_offsets[ld.node_name],
                                  f"{gt} * sd_fc{k} + {dt} * (sd_fsc{k} * {a}{cross})", keep)
        return lines

    def _paired(self, call):
        from .hooks import PAIRED

        hit = self._last.get(PAIRED[call.name])
        if hit is None:
            raise ValueError(f"flexebt templates: hook {call.name} needs a {PAIRED[call.name]} before it in the same "
                             f"function")
        return hit

    def _mask(self, i: dict) -> tuple:
        """(lines, boolean tile expression) of the mask_mod at the call's inputs ``i``."""
        own = f" & {_not_own_frame(i['q_idx'], i['mq_idx'], i['kv_idx'])}" if self.frame_mask else ""
        if self.traced_mask is None:
            return [], f"{i['valid']}{own}"
        em = self._emitter("mm_")
        # EBT frame masks see frame positions and never the observed key at a predicted query's own
        # frame (the token it replaces); block-mask mods see stream-local query positions (mq_idx)
        q = i["q_idx"] if self.frame_mask else i["mq_idx"]
        (out,) = em.emit(self.traced_mask.graph, [i["b"], i["h"], q, i["kv_idx"]], self.mask_consts)
        return em.lines, f"{_bool_tile(out)}{own}"

    def mask(self, call) -> list:
        lines, keep = self._mask(call.inputs)
        return lines + [f"{call.outputs[0]} = {keep}"]

    def keep(self, call) -> list:
        i, out = call.inputs, call.outputs[0]
        lines, keep = self._mask(i)
        return [f"if {i['full']}:", f"    {out} = {i['valid']}", "else:"] + [
            f"    {line}" for line in lines + [f"{out} = {i['valid']} & ({keep})"]]


# The template files of a kernel set, in the order they are joined into one generated module.
TEMPLATE_FILES = {"flex_attention": ("common", "own_key", "forward", "backward", "double_backward", "jvp")}


def template_text(template: str) -> str:
    """The kernel set's template files joined, each entry's ``__SIGNATURE__`` written from its
    declaration (kernels/signatures.py).  The files' own imports of each other are dropped: joined,
    they are one module."""
    from ..kernels.signatures import SIGNATURES

    parts = []
    for name in TEMPLATE_FILES[template]:
        text = (TEMPLATES / f"{name}.py").read_text()
        text = re.sub(r"^from (?:common|own_key) import [^\n]*\n", "", text, flags=re.M)
        parts.append(f"# ---- {name}.py ----\n{text}")
    text = "\n\n".join(parts)
    names = re.findall(r"^(?:def (\w+)\(|(\w+) = )", text, flags=re.M)
    seen = [a or b for a, b in names]
    repeated = sorted({n for n in seen if seen.count(n) > 1})
    if repeated:  # joined into one module, a later definition would silently replace an earlier one
        raise ValueError(f"flexebt templates: {', '.join(repeated)} defined in more than one template file")

    def signature(m):
        return f"def {m[1]}({SIGNATURES[m[1]].source()}):"

    return re.sub(r"^def (\w+)\(__SIGNATURE__\):", signature, text, flags=re.M)


def _build(template: str, score_mod, mask_mod, frame_mask: bool = False) -> ModKernels:
    score = trace_score_mod(score_mod, want_second_order=True) if score_mod is not None else None
    mask = trace_mask_mod(mask_mod) if mask_mod is not None else None
    n_score, mask_consts = _merge_buffers(score, mask)
    buffers = (score.buffers if score else []) + (mask.buffers if mask else [])
    name = "_".join(x.name for x in (score, mask) if x) or "plain"
    if frame_mask:
        name += " (EBT frame mask)"
    grad_slots = []
    for ld in (score.loads if score else []):
        if ld.learned and ld.buffer not in grad_slots:
            grad_slots.append(ld.buffer)
    unique = {ld.buffer: indexes_batch(score, ld) for ld in (score.loads if score else [])
              if ld.learned and unique_per_score(score, ld)}

    code = ModCode(score, mask, mask_consts, [wide_offsets(b.tensor) for b in buffers], frame_mask)
    # Per captured tensor: its pointer and strides, GBUF (fp32 gradient accumulator) and CBUF (the
    # cotangent of its first-order gradient, read by the double backward).
    text = expand_hooks(template_text(template), code).replace("__BUFFERS__", buffer_params([b.tensor for b in buffers]))
    header = f"# Generated by flexebt from template {template!r} for mods: {name}\n"
    indexed = any(em_.checked for em_ in code.emitters)
    positional = frozenset().union(*(em_.positional for em_ in code.emitters))
    # read by the launcher: a mod that indexes captured tensors has its index flag checked
    header += f"FLEXEBT_INDEXED = {name if indexed else ''!r}\n"
    # the units of the scores the hooks give (templates/common.py): log2 units without a score_mod
    source = header + text + f"\n\nSCORE_LOG2 = tl.constexpr({score is None})\n"
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    path = cache_dir() / f"{template}_{digest}.py"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    mod_name = f"flexebt_generated_{template}_{digest}"
    module = sys.modules.get(mod_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[mod_name] = module
    internal = {i: b.tensor for i, b in enumerate(buffers) if b.path.startswith("internal:")}
    return ModKernels(module, score, mask, len(buffers), grad_slots, internal, gathers=bool(score and score.loads),
                      positional=positional, name=name, shape_pins=_shape_pins(score, mask), unique_slots=unique)


def buffer_params(tensors: list) -> str:
    """The kernel parameters of the captured tensors (``__BUFFERS__``), in kernels/flex.py's
    ``_buffer_args`` order: the index flag, then per tensor its pointer, strides and sizes, its
    gradient accumulator GBUF, the accumulator's batch stride GBUF_SB (-1: atomic adds) and the
    cotangent of its first-order gradient CBUF."""
    params = "".join(f"BUF{k}, " + "".join(f"BUF{k}_S{d}, " for d in range(t.dim())) +
                     "".join(f"BUF{k}_N{d}, " for d in range(t.dim())) + f"GBUF{k}, GBUF{k}_SB, CBUF{k}, "
                     for k, t in enumerate(tensors))
    return ("IDXERR, " + params) if tensors else params


def _shape_pins(score: Optional[TracedMod], mask: Optional[TracedMod]) -> tuple:
    """ModKernels.shape_pins of the traced mods: indices among the captured tensors (score_mod's,
    then mask_mod's; tensors created inside a mod are not captured), with the sizes traced."""
    pins, at = [], 0
    for traced in (score, mask):
        if traced is None:
            continue
        captured = [b for b in traced.buffers if not b.path.startswith("internal:")]
        pins += [(at + i, tuple(captured[i].tensor.shape)) for i in sorted(traced.shape_reads)]
        at += len(captured)
    return tuple(pins)
