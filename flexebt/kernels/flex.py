"""Launchers of the single-stream kernels: block tables, allocation, grid."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import runtime
from ..codegen.identity import storage_span
from ..codegen.source import ModKernels
from .configs import MIN_TILE, flex_config, interpreting
from .options import KernelOptions
from .signatures import (SIGNATURES, BlockArgs, OwnArgs, OwnFirstArgs, OwnSecondArgs, OwnSecondGradArgs,
                         SecondStreamArgs, StreamArgs)
from .grid import DEFAULT_RESIDENT, GridOrder, device_index, head_group, resident_programs
from .launcher import FastLaunches


def _pow2(n: int) -> int:
    return max(MIN_TILE, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass
class BlockTables:
    """Block-sparse tables in the layout the kernels read (int32, contiguous)."""

    kv_num: Tensor
    kv_idx: Tensor
    full_kv_num: Tensor
    full_kv_idx: Tensor
    q_num: Tensor
    q_idx: Tensor
    full_q_num: Tensor
    full_q_idx: Tensor
    sparse_q: int
    sparse_kv: int
    has_full: bool
    mask_mod: object  # mask_mod of partial blocks, or None when there are none

    @functools.cached_property
    def layout(self) -> tuple:
        """What launches depend on (launch plans): block sizes, full blocks or not, each table's
        shape and alignment -- not the table contents, which the kernels read at run time."""
        tables = (self.kv_num, self.kv_idx, self.full_kv_num, self.full_kv_idx, self.q_num, self.q_idx,
                  self.full_q_num, self.full_q_idx)
        return (self.sparse_q, self.sparse_kv, self.has_full, self.mask_mod is None,
                tuple((t.shape, t.stride(), t.data_ptr() % 16 == 0) for t in tables))

    @functools.cached_property
    def kv_blocks(self) -> BlockArgs:
        """The kernel argument of the kv-side tables (passes over query tiles)."""
        return BlockArgs(self.kv_num, self.kv_idx, self.full_kv_num, self.full_kv_idx, self.MB, self.MH,
                      self.kv_num.shape[-1], self.kv_idx.shape[-1], self.full_kv_idx.shape[-1])

    @functools.cached_property
    def q_blocks(self) -> BlockArgs:
        """The kernel argument of the q-side (transposed) tables (passes over key tiles)."""
        return BlockArgs(self.q_num, self.q_idx, self.full_q_num, self.full_q_idx, self.MB, self.MH,
                      self.q_num.shape[-1], self.q_idx.shape[-1], self.full_q_idx.shape[-1])

    @property
    def MB(self):
        return self.kv_num.shape[0]

    @property
    def MH(self):
        return self.kv_num.shape[1]


def _c(t: Optional[Tensor]) -> Tensor:
    return t.to(torch.int32).contiguous()


def tables_from_block_mask(block_mask, Sq: int, Skv: int, device) -> BlockTables:
    """Tables of a torch BlockMask for inputs of lengths ``(Sq, Skv)``, or all-full tables when
    ``block_mask`` is None.  Only blocks that hold positions are listed (blockmask.tables_in_range):
    a mask made for longer sequences or cropped with ``BlockMask._adjust`` may list blocks past
    the ends, which the kernels would otherwise read past K/V / Q."""
    if block_mask is None:
        sq = skv = 128
        nq, nkv = -(-Sq // sq), -(-Skv // skv)
        zq = torch.zeros(1, 1, nq, dtype=torch.int32, device=device)
        zkv = torch.zeros(1, 1, nkv, dtype=torch.int32, device=device)
        return BlockTables(
            kv_num=zq, kv_idx=torch.zeros(1, 1, nq, 1, dtype=torch.int32, device=device),
            full_kv_num=zq + nkv, full_kv_idx=torch.arange(nkv, dtype=torch.int32, device=device).expand(1, 1, nq, nkv).contiguous(),
            q_num=zkv, q_idx=torch.zeros(1, 1, nkv, 1, dtype=torch.int32, device=device),
            full_q_num=zkv + nq, full_q_idx=torch.arange(nq, dtype=torch.int32, device=device).expand(1, 1, nkv, nq).contiguous(),
            sparse_q=sq, sparse_kv=skv, has_full=True, mask_mod=None)
    bq, bkv = block_mask.BLOCK_SIZE
    if bq % MIN_TILE or bkv % MIN_TILE:
        raise ValueError(
            f"flexebt Triton kernels need block mask BLOCK_SIZE multiples of {MIN_TILE}, got {block_mask.BLOCK_SIZE}; "
            f"rebuild the mask with e.g. BLOCK_SIZE=128, or use kernel_options={{'BACKEND': 'REFERENCE'}}.")
    from ..blockmask import tables_in_range

    kv_num, kv_idx, fkv_num, fkv_idx, q_num, q_idx, fq_num, fq_idx = tables_in_range(block_mask, Sq, Skv)
    has_full = fkv_num is not None
    full = (lambda t, like: _c(t) if has_full else torch.zeros_like(_c(like)))
    return BlockTables(
        kv_num=_c(kv_num), kv_idx=_c(kv_idx), full_kv_num=full(fkv_num, kv_num), full_kv_idx=full(fkv_idx, kv_idx),
        q_num=_c(q_num), q_idx=_c(q_idx), full_q_num=full(fq_num, q_num), full_q_idx=full(fq_idx, q_idx),
        sparse_q=bq, sparse_kv=bkv, has_full=has_full, mask_mod=block_mask.mask_mod)


_MASK_TENSORS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
                 "full_q_num_blocks", "full_q_indices")


def block_mask_state(block_mask) -> tuple:
    """What a block mask's converted tables were made from, besides the lengths: ``(objects, values)``
    -- its mask_mod and table tensors (compared by identity), its block size and the tables'
    version counters (compared by value).  A BlockMask is a mutable object -- ``bm.mask_mod =
    other``, a table replaced or edited in place by a torch op after a call -- so a conversion is
    reused only while all of these are what they were.  Tensors made under torch.inference_mode
    keep no version counter: theirs count by identity only (an in-place edit made inside
    inference_mode is not seen; build a new mask there)."""
    tensors = tuple(getattr(block_mask, name, None) for name in _MASK_TENSORS)
    versions = tuple(None if t is None else ("inference" if t.is_inference() else t._version) for t in tensors)
    return (block_mask.mask_mod, *tensors), (tuple(block_mask.BLOCK_SIZE), versions)


def same_state(a: tuple, b: tuple) -> bool:
    """Whether two ``block_mask_state`` results describe the same mask as it was (objects by
    identity, values by value)."""
    return len(a[0]) == len(b[0]) and all(x is y for x, y in zip(a[0], b[0])) and a[1] == b[1]


def cached_tables(block_mask, Sq: int, Skv: int, device) -> BlockTables:
    """tables_from_block_mask, converted once per block mask and lengths: a training loop calls
    attention with the same mask every step, and the conversion (eight int32 copies, or the
    all-full tables) costs more host time than the launch itself at small sizes.  The conversion
    is made again when the mask has changed since (``block_mask_state``)."""
    state = block_mask_state(block_mask) if block_mask is not None else ((), ())
    key = (id(block_mask), Sq, Skv, str(device))
    hit = runtime.tables.get(key, block_mask)
    if hit is not None and same_state(hit[0], state):
        return hit[1]
    return runtime.tables.put(key, (state, tables_from_block_mask(block_mask, Sq, Skv, device)), block_mask)[1]


_FAST = FastLaunches(store=runtime.launches)  # launches seen before, re-issued without Triton's binding


def _tensor_key(t: Optional[Tensor]):
    """What a launch may depend on of an input tensor: shape, strides, dtype, 16-byte alignment."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0)


def _plan_key(name: str, tables: BlockTables, options: Optional[dict], flags: tuple, tensors: tuple,
              extra: list = ()) -> tuple:
    """Everything a pass's launch depends on besides the kernel object (launcher.py): the pass,
    its flags (booleans, q_off), the block tables' layout, the kernel options, the fp32 matmul
    precision, the device, and shape / strides / dtype / alignment of each input tensor (None
    for an absent one) and of the tensors in ``extra`` (the captured-tensor arguments; their
    integers, strides, by value).  The launch's integer arguments are shapes and strides of
    these, and every other tensor argument is allocated by the pass."""
    t0 = tensors[0]
    fp32 = torch.get_float32_matmul_precision() if t0.dtype == torch.float32 else None
    return (name, flags, tables.layout, KernelOptions.of(options), fp32, t0.device,
            tuple(map(_tensor_key, tensors)),
            tuple(_tensor_key(x) if isinstance(x, Tensor) else x for x in extra) if extra else None)


def _launch(kernel, plan: tuple, args, spec, options: Optional[dict], device):
    """Launch ``kernel`` for one pass.  ``plan``: the pass's _plan_key; ``args(cfg, use_tma)``:
    the positional arguments for a tile config, with tensor descriptors where the launch loads
    through TMA; ``spec()``: ``(order, constexprs, cfg, shape_key)``,
    worked out only when ``plan`` was not seen before.  Such a launch runs on a 1-d grid of
    ``order.tiles(cfg) x order.n_bh`` programs, its HEAD_GROUP argument chosen by
    ``grid.head_group``; if it does not fit in shared memory (a mod that gathers from captured
    tensors adds pipelined tiles), it is retried with fewer stages, then smaller tiles, and the
    configuration that worked is remembered.  A plan seen before re-issues the remembered launch
    without Triton's binding (launcher.py)."""
    fast = _FAST.enabled and device.type == _FAST.device_type
    if fast:
        hit = _FAST.lookup((id(kernel), plan), kernel)
        if hit is not None:
            runner, tail, (cfg, tma) = hit
            runner(*args(cfg, tma), *tail)
            _check_indices(kernel, device)
            return
    from triton.runtime.errors import OutOfResources

    order, kwargs, cfg, key = spec()
    fn = getattr(kernel, "fn", None)
    if fn is not None:  # (test stand-ins for kernels have no function and declare nothing)
        SIGNATURES[fn.__name__].check_constexprs([*kwargs, "BLOCK_M", "BLOCK_N"])
    want = (id(kernel), key, cfg)
    cfg = runtime.tile_fits.get(want, kernel, default=cfg)
    while True:
        try:
            resident = runtime.residency.get((id(kernel), key, cfg), kernel, default=DEFAULT_RESIDENT)
            group = head_group(order, cfg, options, device, resident)
            # args may depend on the tiles (tensor descriptors carry their block shape)
            tma = kwargs.get("USE_TMA", False)
            a = args(cfg, tma)
            if fn is not None:
                SIGNATURES[fn.__name__].check_groups(a)
            grid = order.tiles(cfg) * order.n_bh
            kw = dict(kwargs, HEAD_GROUP=group, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N)
            compiled = kernel[(grid,)](*a, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **kw)
            if fast and not interpreting():
                _FAST.remember((id(kernel), plan), kernel, compiled, grid, a, kw, (cfg, tma))
            runtime.tile_fits.put(want, cfg, kernel)
            if runtime.residency.get((id(kernel), key, cfg), kernel) is None:
                runtime.residency.put((id(kernel), key, cfg), resident_programs(compiled, cfg.num_warps, device), kernel)
            _check_indices(kernel, device)
            return
        except OutOfResources:
            if cfg.num_stages > 1:
                cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
            elif max(cfg.BLOCK_M, cfg.BLOCK_N) > MIN_TILE:
                big = "BLOCK_N" if cfg.BLOCK_N >= cfg.BLOCK_M else "BLOCK_M"
                cfg = dataclasses.replace(cfg, **{big: getattr(cfg, big) // 2}, num_stages=2)
            else:
                raise


@contextlib.contextmanager
def wrap_launches(wrapper: Callable):
    """Within the block, every pass launches through ``wrapper(launch)`` instead of ``launch``
    (called as ``launch(kernel, plan, args, spec, options, device)``, see ``_launch``): the
    instrumentation point of the benchmark tools -- time each launch, record the passes, or skip
    the launches to measure flexebt's own Python.  Not thread-safe; restores the launch on exit."""
    global _launch
    real = _launch
    _launch = wrapper(real)
    try:
        yield
    finally:
        _launch = real


def index_flag(device) -> Tensor:
    """The int32 [1] flag of ``device``: 1 while every load of a captured tensor was in range."""
    flag = runtime.index_flags.get(device)
    if flag is None:
        flag = runtime.index_flags.put(device, torch.ones(1, dtype=torch.int32, device=device))
    return flag


def _check_indices(kernel, device) -> None:
    """After a launch of ``kernel``: if its mods index captured tensors (the generated module says
    so in FLEXEBT_INDEXED), raise if an index was out of range (the kernels clear the flag and
    clamp the index, so no memory outside the tensor is touched).  On CPU the check is immediate;
    on CUDA it is an asynchronous device-side assert, like torch's own out-of-range indexing
    there, with no host synchronisation."""
    mod_name = getattr(getattr(kernel, "fn", None), "__globals__", {}).get("FLEXEBT_INDEXED")
    if not mod_name:
        return
    flag = index_flag(device)
    msg = (f"flexebt: the mod {mod_name!r} indexes a captured tensor out of range (torch allows -size <= i < size "
           f"for each index); check the index expressions against the tensor's shape.")
    if flag.device.type == "cpu":
        if int(flag.item()) == 0:
            flag.fill_(1)
            raise IndexError(msg)
    else:
        torch._assert_async(flag, msg)


def _strided_zeros(t: Tensor, device=None) -> Tensor:
    """fp32 zeros laid out like ``t`` (same strides, so the kernels' offsets address both)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=torch.float32, device=device or t.device).zero_()


def _buffer_args(buffers: list[Tensor], grads: dict[int, Tensor], cts: Optional[dict] = None) -> list:
    """Kernel arguments of the captured tensors: the index flag, then per tensor its pointer, strides,
    sizes, gradient accumulator (GBUF), the accumulator's batch stride (GBUF_SB: -1 for atomic adds,
    see captured_grad_buffers) and cotangent of the first-order gradient (CBUF); the tensor itself
    stands in for absent ones."""
    if not buffers:
        return []
    args = [index_flag(buffers[0].device)]
    for k, b in enumerate(buffers):
        args.append(b)
        args.extend(b.stride())
        args.extend(b.shape)
        args.append(grads.get(k, b))
        args.append(getattr(grads, "batch_stride", {}).get(k, -1))
        args.append((cts or {}).get(k, b))
    return args


def captured_cotangents(kern: ModKernels, buffers: list[Tensor], cts: list) -> dict[int, Tensor]:
    """fp32 copies (same strides as the tensors) of the cotangents of the captured tensors'
    first-order gradients, for the slots whose gradient the kernels scatter."""
    out = {}
    for slot in kern.grad_slots:
        g = cts[slot] if slot < len(cts) else None
        buf = _strided_zeros(buffers[slot])
        if g is not None:
            buf.copy_(g)
        out[slot] = buf
    return out


def _precision(dtype, options: Optional[dict] = None, second_order: bool = False, head_dim: int = 0) -> dict:
    """How tl.dot multiplies.  bf16/fp16, and fp32 when the matmul precision allows
    tf32: the tensor cores' default.  fp32 under matmul precision "highest": fp32-accurate products,
    either IEEE-exact (DOT=1, FMA units) or as three tf32 products hi*hi + hi*lo + lo*hi on the
    tensor cores (DOT=2, "tf32x3": ~2^-22 relative error per product, as accurate as fp32 eager
    math in our measurements -- docs/design.md D31).  Default: tf32x3, except IEEE for the double
    backward at head dims > 64, where tf32x3's split operands spill at every tile we tried (D40);
    kernel_options["FP32_PRODUCTS"] = "ieee" | "tf32x3" picks one for all passes.
    The kernels' DOT constexpr: 0 default, 1 IEEE, 2 tf32x3, 3 under Triton's CPU interpreter
    (fp32 and bf16): sums in fp64 rounded to fp32, the same for a tile and its transpose
    (templates/common.py, _mm) -- unless FP32_PRODUCTS asks for the GPU's products."""
    dot = _products(dtype, options, second_order, head_dim)
    asked = dtype == torch.float32 and "FP32_PRODUCTS" in (options or {})  # the GPU's products, on purpose
    return dict(DOT=3 if interpreting() and dtype in (torch.float32, torch.bfloat16) and not asked else dot)


def _products(dtype, options: Optional[dict] = None, second_order: bool = False, head_dim: int = 0) -> int:
    """The products a GPU pass takes: 0 the tensor cores' default, 1 IEEE fp32, 2 tf32x3."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        default = "ieee" if second_order and head_dim > 64 else "tf32x3"
        mode = (options or {}).get("FP32_PRODUCTS", default)
        if mode not in ("ieee", "tf32x3"):
            raise ValueError(f"kernel_options['FP32_PRODUCTS'] must be 'ieee' or 'tf32x3', got {mode!r}.")
        return 1 if mode == "ieee" else 2
    return 0


def _tiles_for(dtype, options: Optional[dict] = None, second_order: bool = False, head_dim: int = 0) -> str:
    """Which tile table of kernels/configs.py fits these inputs."""
    if dtype != torch.float32:
        return "bf16"
    dot = _products(dtype, options, second_order, head_dim)
    return "ieee" if dot == 1 else "tf32x3" if dot == 2 and second_order else "tf32"


def _reverse(options: Optional[dict]) -> bool:
    """Heavy-first order of query tiles (kernel_options["REVERSE_Q_ORDER"], default on)."""
    return bool((options or {}).get("REVERSE_Q_ORDER", 1))


def _query_order(which: str, q: Tensor, k: Tensor, v: Tensor, auto: bool = True) -> GridOrder:
    """Grid order of a pass over query tiles: one query head's programs read its K and V."""
    B, H, Sq, _ = q.shape
    return GridOrder(which, B * H, Sq, "BLOCK_M", k.shape[2] * (k.shape[3] + v.shape[3]) * k.element_size(), auto)


def _even(Sq: int, Skv: int, tables: BlockTables) -> bool:
    """No tile of any pass runs past the end: lengths are multiples of the sparse blocks."""
    return Sq % tables.sparse_q == 0 and Skv % tables.sparse_kv == 0


@dataclasses.dataclass
class OwnKeys:
    """The EBT predicted stream's own keys: query i also attends to kp[i], vp[i] when keep[b, h, i]."""

    kp: Tensor    # [B, Hkv, Sq, D]
    vp: Tensor    # [B, Hkv, Sq, DV]
    keep: Tensor  # int8 [B, H, Sq]


def _linear_score(kern: ModKernels, scale: float, options: Optional[dict]) -> bool:
    """No score_mod and a positive scale: the forward takes its row max on the raw products
    (template comment in _fwd_tile), unless kernel_options["LINEAR_SCORE"] is 0."""
    return kern.traced_score is None and scale > 0 and bool((options or {}).get("LINEAR_SCORE", 1))


# A first-order pass smaller than this (B * H * Sq * Skv * D, the work of its products) loads through
# pointers by default: each tensor descriptor costs the host ~15-20 us per launch (Triton's
# launcher encodes it anew every time), which a small pass does not win back.  H100, B2 shapes
# (B * S = 16k, H16; results/h100_2026-11-21/B2_h100_d64_small_71d0160): D64 causal fwd+bwd at S1k
# (2^34) 0.729 ms with descriptors vs 0.558 without (host-bound), at 2k (2^35) 0.863 vs 0.886
# (GPU-bound); design D47.
TMA_MIN_WORK = 2 ** 35


def _tma_pays(q: Tensor, k: Tensor) -> bool:
    B, H, Sq, D = q.shape
    return B * H * Sq * k.shape[2] * D >= TMA_MIN_WORK


def _use_tma(options: Optional[dict], *tensors: Tensor, by_default: bool = True) -> bool:
    """kernel_options["USE_TMA"] (torch's name): load the tiles of the inner loops through tensor
    descriptors (Hopper's TMA copy engine): K and V in the forward and the dq pass, q and dO in
    the dk/dv pass, the key- or query-side tiles in the double backward's passes.  Default: on
    for fp16/bf16 CUDA tensors in the first-order passes of at least ``TMA_MIN_WORK``
    (``by_default=_tma_pays(q, k)``; measured faster on Hopper), off in the double backward
    (``by_default=False``: measured 7 % slower there; design D42) and elsewhere.
    A hint: where the GPU has no TMA (compute capability < 9) or a tensor is not contiguous with
    16-byte aligned rows, the pointer loads run instead."""
    t0 = tensors[0]
    want = (options or {}).get("USE_TMA")
    if want is None:
        want = by_default and t0.device.type == "cuda" and t0.element_size() == 2
    if not want:
        return False
    if t0.device.type == "cuda" and _capability_major(device_index(t0.device)) < 9:
        return False
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 and (t.shape[-1] * t.element_size()) % 16 == 0
               for t in tensors)


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    """The compute capability's major number (cached: asked before every launch)."""
    return torch.cuda.get_device_capability(index)[0]


_TensorDescriptor = None  # triton.tools.tensor_descriptor.TensorDescriptor, imported on first use


def _row_descriptors(block: int, *tensors: Tensor) -> tuple:
    """3-d descriptors over [B * heads, S, D] of contiguous [B, heads, S, D] tensors (K and V, or
    Q and dO, ...), tiles of ``block`` rows by the head dim's power of two: a tile never crosses
    into the next head, and rows past S / columns past D read as zeros.  (The launcher reads the
    base's address and dtype only, so the 4-d tensor itself is the base: no view per launch.)"""
    global _TensorDescriptor
    if _TensorDescriptor is None:  # imported once, not per launch
        from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
    out = []
    for t in tensors:
        B, H, S, D = t.shape
        out.append(_TensorDescriptor(t, [B * H, S, D], [S * D, D, 1], [1, block, _pow2(D)]))
    return tuple(out)


def _shape(q: Tensor, k: Tensor) -> dict:
    """The shape arguments every pass takes: query heads, key heads, query and key lengths."""
    return dict(H=q.shape[1], Hkv=k.shape[1], Sq=q.shape[2], Skv=k.shape[2])


def _own_tensors(own: Optional["OwnKeys"]) -> tuple:
    """The EBT own keys' tensors (none without own keys), for launch plan keys."""
    return () if own is None else (own.kp, own.vp, own.keep)


def _descriptors(tma: bool, block: int, **tensors: Tensor) -> dict:
    """``{NAME_DESC: descriptor}`` of the tensors given by name, where the launch loads through TMA
    (absent otherwise)."""
    if not tma:
        return {}
    return {f"{name}_DESC": d for name, d in zip(tensors, _row_descriptors(block, *tensors.values()))}


_FWD = SIGNATURES["flex_fwd"].bind


def flex_forward(kern: ModKernels, q: Tensor, k: Tensor, v: Tensor, scale: float, tables: BlockTables,
                 buffers: list[Tensor], options: Optional[dict] = None, q_off: int = 0,
                 own: Optional[OwnKeys] = None) -> tuple:
    """(out, lse, msum): msum [B, H, Sq, 2] fp32 holds each row's largest kept modified score m
    (natural units, -inf where nothing is kept: torch's max_scores) and its softmax sum
    l = sum_j exp(t_j - m), which the backward passes read (templates/common.py, _load_msum)."""
    B, H, Sq, D = q.shape
    Skv, DV = k.shape[2], v.shape[3]
    out = torch.empty(B, H, Sq, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    msum = torch.empty(B, H, Sq, 2, dtype=torch.float32, device=q.device)
    bargs = _buffer_args(buffers, {})
    own_in = None if own is None else OwnArgs(own.kp, own.vp, own.keep)

    def args(c, tma):  # (bound at each launch, in one call: a remembered launch re-issues from here)
        return (*_FWD(Q=q, K=k, V=v, O=out, LSE=lse, MSUM=msum, KV_BLOCKS=tables.kv_blocks, H=H, Hkv=k.shape[1],
                      Sq=Sq, Skv=Skv, scale=scale, Q_OFF=q_off, OWN=own_in,
                      **(_descriptors(True, c.BLOCK_N, K=k, V=v) if tma else {})),
                *bargs)

    def spec():
        tma = _use_tma(options, k, v, by_default=_tma_pays(q, k))
        cfg = flex_config("fwd", max(D, DV), tables.sparse_q, tables.sparse_kv, options, kern.gathers,
                          _tiles_for(q.dtype, options), kv_len=Skv)
        return (_query_order("fwd", q, k, v),
                dict(REVERSE=_reverse(options), HAS_SELF=own is not None, USE_TMA=tma,
                     LINEAR_SCORE=_linear_score(kern, scale, options),
                     **_common(q, k, v, tables, options)),
                cfg, (D, DV, q.dtype, tma))

    plan = _plan_key("fwd", tables, options, (q_off, scale > 0, own is not None),
                     (q, k, v, *_own_tensors(own)), bargs)
    _launch(kern.module.flex_fwd, plan, args, spec, options, q.device)
    return out, lse, msum


def _common(q, k, v, tables, options=None, second_order=False):
    D, Sq, Skv, DV = q.shape[3], q.shape[2], k.shape[2], v.shape[3]
    return dict(D=D, DV=DV, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV), SPARSE_Q=tables.sparse_q,
                SPARSE_KV=tables.sparse_kv, HAS_FULL=tables.has_full, EVEN=_even(Sq, Skv, tables),
                **_precision(q.dtype, options, second_order, max(D, DV)))


_DQ = SIGNATURES["flex_bwd_dq"].bind


def dq_pass(kern: ModKernels, q, k, v, out, msum, dout, dlse, scale, tables: BlockTables, bargs: list,
            options=None, q_off: int = 0, own: Optional[OwnKeys] = None):
    """dq, Delta and the rows' references (for the dk/dv pass: templates/common.py, _store_ref)
    and, with own keys, their per-query-head dk, dv."""
    B, H, Sq, D = q.shape
    DV = v.shape[3]
    delta = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)  # written by this pass
    ref = torch.empty(B, H, 2, Sq, dtype=torch.float32, device=q.device)  # written by this pass
    dq = torch.empty_like(q)
    own_grads = _own_key_grad_buffers(own, H) if own is not None else None
    own_in = None if own is None else OwnFirstArgs(own.kp, own.vp, own.keep, *own_grads)

    def args(c, tma):  # (bound at each launch, in one call)
        return (*_DQ(Q=q, K=k, V=v, O=out, DO=dout, MSUM=msum, DLSE=dlse, DELTA=delta, REF=ref, DQ=dq,
                     KV_BLOCKS=tables.kv_blocks,
                     H=H, Hkv=k.shape[1], Sq=Sq, Skv=k.shape[2], scale=scale, Q_OFF=q_off, OWN=own_in,
                     **(_descriptors(True, c.BLOCK_N, K=k, V=v) if tma else {})), *bargs)

    def spec():
        tma = _use_tma(options, k, v, by_default=_tma_pays(q, k))
        cfg = flex_config("dq", max(D, DV), tables.sparse_q, tables.sparse_kv, options,
                          tiles=_tiles_for(q.dtype, options))
        return (_query_order("dq", q, k, v),
                dict(HAS_DLSE=dlse is not None, REVERSE=_reverse(options), HAS_SELF=own is not None, USE_TMA=tma,
                     **_common(q, k, v, tables, options)), cfg, (D, DV, q.dtype, tma))

    plan = _plan_key("dq", tables, options, (q_off, own is not None),
                     (q, k, v, out, msum, dout, dlse, *_own_tensors(own)), bargs)
    _launch(kern.module.flex_bwd_dq, plan, args, spec, options, q.device)
    return dq, delta, ref, own_grads


_DKDV = SIGNATURES["flex_bwd_dkdv"].bind


def dkdv_pass(kern: ModKernels, q, k, v, ref, delta, dout, scale, tables: BlockTables, bargs: list, options=None,
              q_off: int = 0, into: Optional[tuple] = None, add: Optional[tuple] = None):
    """dk, dv of the keys from these queries, plus ``add=(dk0, dv0)`` if given (an earlier pass's
    partial sums, fp32), written to ``into=(dk, dv)`` if given (it may be ``add`` itself), else to
    new tensors of k's / v's dtype."""
    B, H, Sq, D = q.shape
    Hkv, Skv, DV = k.shape[1], k.shape[2], v.shape[3]
    if into is None:
        dk = torch.empty(B, Hkv, Skv, D, dtype=k.dtype, device=k.device)
        dv = torch.empty(B, Hkv, Skv, DV, dtype=v.dtype, device=v.device)
    else:
        dk, dv = into
    named = dict(K=k, V=v, DK=dk, DV_OUT=dv, STREAM=StreamArgs(q, dout, ref, delta, Sq, q_off),
                 Q_BLOCKS=tables.q_blocks, H=H, Hkv=Hkv, Skv=Skv, scale=scale)
    if add is not None:
        named.update(ADD_K=add[0], ADD_V=add[1])

    def args(c, tma):
        return (*_DKDV(**named, **_descriptors(tma, c.BLOCK_M, Q=q, DO=dout)), *bargs)

    def spec():
        tma = _use_tma(options, q, dout, by_default=_tma_pays(q, k))
        cfg = flex_config("dkdv", max(D, DV), tables.sparse_q, tables.sparse_kv, options,
                          tiles=_tiles_for(q.dtype, options), tma=tma)
        # one key head's programs read q and dO of its query heads
        row_bytes = (D + DV) * q.element_size() * (H // Hkv)
        order = GridOrder("dkdv", B * Hkv, Skv, "BLOCK_N", row_bytes * Sq)
        return (order, dict(ACCUMULATE=add is not None, USE_TMA=tma, **_common(q, k, v, tables, options)),
                cfg, (D, DV, q.dtype, tma))

    # (dk, dv allocated here are aligned; into / add are the caller's)
    plan = _plan_key("dkdv", tables, options, (q_off, into is not None, add is not None),
                     (q, k, v, ref, delta, dout, *(into or ()), *(add or ())), bargs)
    _launch(kern.module.flex_bwd_dkdv, plan, args, spec, options, q.device)
    return dk, dv


# Device types where the kernels' atomic adds into a captured tensor's gradient land in an order that
# changes from run to run (Triton's CPU interpreter runs programs one after another).
NONDETERMINISTIC_SCATTER = ("cuda",)


def alert_nondeterministic_scatter(kern: ModKernels, slots: list, device) -> None:
    """Under ``torch.use_deterministic_algorithms(True)``, refuse (or, with ``warn_only=True``,
    warn about) a backward whose kernels scatter captured tensors' gradients (``slots``) with
    atomic adds -- fp32 sums in a run-dependent order -- as torch does for its own
    non-deterministic operations."""
    if device.type not in NONDETERMINISTIC_SCATTER or not slots:
        return
    msg = (f"flexebt: the backward of the mod {kern.name!r} adds the gradients of its captured tensors with atomic "
           f"adds, whose order (and so the last bits of the sum) changes from run to run, but "
           f"torch.use_deterministic_algorithms(True) is set. Deterministic gradients are fused for a tensor read "
           f"at one element per score, indexed by the head, the query and the key position (bias[h, q_idx, kv_idx] "
           f"or bias[b, h, q_idx, kv_idx]); this mod reads a captured tensor otherwise. For a deterministic "
           f"gradient pass kernel_options={{'BACKEND': 'REFERENCE'}} (dense math, O(S^2) memory) or detach the "
           f"captured tensors that need no gradient; or allow it with "
           f"torch.use_deterministic_algorithms(True, warn_only=True).")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        import warnings

        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)


class GradAccumulators(dict):
    """slot -> fp32 accumulator of a captured tensor's gradient, laid out like the tensor; with
    ``batch_stride[slot]`` (the kernels' GBUF_SB) where the kernels add without atomics: 0 for one
    accumulator, else the stride between the batch elements' accumulators."""

    def __init__(self):
        super().__init__()
        self.batch_stride: dict[int, int] = {}


def captured_grad_buffers(kern: ModKernels, buffers: list[Tensor], device, batch: int) -> GradAccumulators:
    """fp32 accumulators for the captured tensors whose gradient the kernels scatter.

    A tensor read at one element per score (``ModKernels.unique_slots``) whose load indexes the
    batch, or in a call of batch 1, is added without atomics into one accumulator: deterministic,
    and faster than one atomic add per score.  Where its load does not index a batch larger than
    1, the kernels add with atomics by default; under ``torch.use_deterministic_algorithms(True)``
    they add without, into one accumulator per batch element, summed in order by
    ``finish_captured_grads`` (batch x the tensor's memory, in fp32).  Any other tensor is added
    with atomics, refused under deterministic algorithms where their order changes from run to run."""
    acc = GradAccumulators()
    deterministic = torch.are_deterministic_algorithms_enabled()
    atomic = []
    for slot in kern.grad_slots:
        t = buffers[slot]
        if slot in kern.unique_slots and (kern.unique_slots[slot] or batch == 1):
            acc[slot] = _strided_zeros(t, device)
            acc.batch_stride[slot] = 0
        elif slot in kern.unique_slots and deterministic:
            span = storage_span(t)
            acc[slot] = torch.zeros((batch, span), dtype=torch.float32, device=device)
            acc.batch_stride[slot] = span
        else:
            acc[slot] = _strided_zeros(t, device)
            atomic.append(slot)
    if deterministic:
        alert_nondeterministic_scatter(kern, atomic, torch.device(device))
    return acc


def finish_captured_grads(buffers: list[Tensor], gbufs: GradAccumulators) -> list[Optional[Tensor]]:
    out = []
    for s, t in enumerate(buffers):
        g = gbufs.get(s)
        if g is not None and gbufs.batch_stride.get(s, 0) > 0:  # one accumulator per batch element
            g = g.sum(0).as_strided(t.shape, t.stride())
        out.append(g.to(t.dtype) if g is not None else None)
    return out


def _dbwd_inputs(q, k, v, dout, msum, dlse, gq, gk, gv) -> dict:
    """The inputs every double-backward pass reads, by kernel parameter name."""
    c = lambda t: t.contiguous()  # noqa: E731
    return dict(Q=q, K=k, V=v, DO=c(dout), MSUM=msum, DLSE=c(dlse) if dlse is not None else None, GQ=c(gq), GK=c(gk),
                GV=c(gv))


def _own_key_grad_buffers(own: OwnKeys, H: int):
    """The own keys' gradients per query head, [B, H, Sq, D]: fp32 under GQA (the caller sums a
    group's heads), else in the own keys' dtype (they are the final gradients)."""
    B, Hp, Sq, D = own.kp.shape
    dtypes = (own.kp.dtype, own.vp.dtype) if Hp == H else (torch.float32, torch.float32)
    return (torch.empty(B, H, Sq, D, dtype=dtypes[0], device=own.kp.device),
            torch.empty(B, H, Sq, own.vp.shape[3], dtype=dtypes[1], device=own.kp.device))


def _own_second_inputs(own: Optional[OwnKeys], own_cts) -> tuple:
    """The own keys and the cotangents of their gradients: kp, vp, keep, gkp, gvp (none without
    own keys)."""
    if own is None:
        return ()
    return own.kp, own.vp, own.keep, own_cts[0].contiguous(), own_cts[1].contiguous()


def _dbwd_query_pass(kern: ModKernels, which: str, named: dict, outputs: dict, constexprs: dict, q, k, v, dlse,
                     scale, tables: BlockTables, bargs: list, options, q_off: int, own_in: tuple = (),
                     own_out: tuple = ()) -> None:
    """Launch one of the double backward's passes over query tiles (``which``: dbwd_rows or
    dbwd_dq).  ``named``: the pass's input tensors by kernel parameter name (the key-side tiles K, V,
    GK, GV among them: they load through descriptors with TMA); ``outputs``: the tensors it writes
    (allocated by the pass, so not part of the launch plan's key); ``constexprs``: the pass's own.
    ``own_in``: the EBT own keys' inputs (kp, vp, keep, gkp, gvp; empty without own keys);
    ``own_out``: the own-key gradients the pass writes (the dq pass's g_kp, g_vp)."""
    D, DV = q.shape[3], v.shape[3]
    has_own = bool(own_in)
    kv_side = {n: named[n] for n in ("K", "V", "GK", "GV")}
    bind = SIGNATURES[f"flex_{which}"].bind

    def spec():
        tma = _use_tma(options, *kv_side.values(), by_default=False)
        cfg = flex_config(which, max(D, DV), tables.sparse_q, tables.sparse_kv, options,
                          tiles=_tiles_for(q.dtype, options, True, max(D, DV)))
        return (_query_order(which, q, k, v, auto=False),
                dict(HAS_DLSE=dlse is not None, HAS_SELF=has_own, USE_TMA=tma, **constexprs,
                     **_common(q, k, v, tables, options, True)), cfg, (D, DV, q.dtype, which, tma))

    def launch_args(c, tma):
        return (*bind(**named, **_descriptors(tma, c.BLOCK_N, **kv_side)), *bargs)

    plan = _plan_key(which, tables, options, (q_off, dlse is None, has_own, *constexprs.values()),
                     (*named.values(), *own_in), bargs)
    own = (OwnSecondGradArgs(*own_in, *own_out) if own_out else OwnSecondArgs(*own_in)) if has_own else None
    named = dict(named, **outputs, OWN=own, KV_BLOCKS=tables.kv_blocks, **_shape(q, k), scale=scale, Q_OFF=q_off)
    _launch(getattr(kern.module, f"flex_{which}"), plan, launch_args, spec, options, q.device)


def dbwd_rows_pass(kern: ModKernels, q, k, v, out, dout, msum, dlse, gq, gk, gv, scale, tables: BlockTables,
                   bargs: list, options=None, q_off: int = 0, own: Optional[OwnKeys] = None, own_cts=None,
                   partial: bool = False):
    """g_do, the row statistics (U, Wc, Bbar, D) and the rows' references (for the key-tile pass)
    of the double backward.  ``partial``: these keys are one part of the rows' keys (``out``,
    ``msum`` are the merged ones); returns the raw sums (U, W, Bbar, D0) and the fp32 part
    P u v + P Gv of g_do instead, for ``finish_row_parts``."""
    B, H, Sq, _ = q.shape
    named = _dbwd_inputs(q, k, v, dout, msum, dlse, gq, gk, gv)
    stats = torch.empty(B, H, Sq, 4, dtype=torch.float32, device=q.device)
    ref = torch.empty(B, H, 2, Sq, dtype=torch.float32, device=q.device)
    g_do = torch.empty(named["DO"].shape, dtype=torch.float32 if partial else dout.dtype, device=q.device)
    named.update(O=out)
    _dbwd_query_pass(kern, "dbwd_rows", named, dict(G_DO=g_do, STATS=stats, REF=ref), dict(PARTIAL_ROWS=partial), q,
                     k, v, dlse, scale, tables, bargs, options, q_off, _own_second_inputs(own, own_cts))
    return g_do, stats, ref


def finish_row_parts(parts: list, out: Tensor, dout: Tensor, dlse: Optional[Tensor]):
    """(g_do, stats) of rows whose keys several passes share, from each pass's
    ``dbwd_rows_pass(..., partial=True)``: the sums add up; then Wc = W - D0 U (centred once the
    whole row is summed, as a single pass forms it), D = D0 - dlse and g_do = sum(P u v + P Gv) - U o."""
    g_do = parts[0][0]
    stats = parts[0][1]
    for g, st in parts[1:]:
        g_do = g_do + g
        stats = stats + st
    U, W, Bbar, D0 = stats.unbind(-1)
    D = D0 - dlse.float() if dlse is not None else D0
    stats = torch.stack((U, W - D0 * U, Bbar, D), -1).contiguous()
    return (g_do - U.unsqueeze(-1) * out.float()).to(dout.dtype), stats


def dbwd_dq_pass(kern: ModKernels, q, k, v, out, dout, msum, dlse, gq, gk, gv, stats, scale, tables: BlockTables,
                 bargs: list, options=None, q_off: int = 0, own: Optional[OwnKeys] = None, own_cts=None,
                 captured_grads: bool = False, gq_acc: Optional[Tensor] = None):
    """g_q of the double backward; with own keys also their g_kp, g_vp per query head (fp32);
    with ``captured_grads`` also the captured tensors' gradients (into the GBUFs of ``bargs``).
    ``gq_acc``: the key tiles' sums of g_q / scale, already added by the dk/dv pass (fp32,
    ``dbwd_dq_by_atomics``): the pass adds the own key's column and writes g_q, with no key loop."""
    named = _dbwd_inputs(q, k, v, dout, msum, dlse, gq, gk, gv)
    g_q = torch.empty_like(q)
    own_grads = _own_key_grad_buffers(own, q.shape[1]) if own is not None else None
    named.update(STATS=stats, GQ_ACC=gq_acc)
    _dbwd_query_pass(kern, "dbwd_dq", named, dict(G_Q=g_q), dict(CAPTURED_GRADS=captured_grads,
                                                                   FROM_ACC=gq_acc is not None),
                     q, k, v, dlse, scale, tables, bargs, options, q_off, _own_second_inputs(own, own_cts),
                     own_grads or ())
    return g_q, own_grads


def dbwd_dq_by_atomics(options, captured_grads: bool, q: Tensor, v: Tensor) -> bool:
    """kernel_options["DBWD_DQ_ATOMIC"]: the double backward's dk/dv pass also adds each tile's
    share of g_q into fp32 rows with atomic adds, and the dq pass skips its key loop (one
    recomputation of the tile's five products fewer).  Default: on for 16-bit CUDA inputs of head
    dim <= 64, where it is measured faster (design D77); the two more products per tile in the
    key-tile pass cost more than they save at D128.  Never where the dq pass scatters captured
    tensors' gradients, nor under deterministic algorithms (the atomic adds' order varies)."""
    want = (options or {}).get("DBWD_DQ_ATOMIC")
    if want is None:
        want = q.is_cuda and q.element_size() == 2 and max(q.shape[-1], v.shape[-1]) <= 64
    return bool(want) and not captured_grads and not torch.are_deterministic_algorithms_enabled()


_DBWD_DKDV = SIGNATURES["flex_dbwd_dkdv"].bind


def dbwd_dkdv_pass(kern: ModKernels, q, k, v, out, dout, ref, dlse, gq, gk, gv, stats, scale, tables: BlockTables,
                   bargs: list, options=None, q_off: int = 0, into: Optional[tuple] = None,
                   add: Optional[tuple] = None, gq_acc: Optional[Tensor] = None):
    """g_k, g_v of the double backward from these queries (into / add as in dkdv_pass); ``ref``: the
    rows' references the rows pass wrote.  ``gq_acc``: fp32 zeros shaped as q, into which the pass
    also adds g_q / scale (atomic adds; ``dbwd_dq_by_atomics``)."""
    B, H, Sq, D = q.shape
    Hkv, Skv, DV = k.shape[1], k.shape[2], v.shape[3]
    named = _dbwd_inputs(q, k, v, dout, ref, dlse, gq, gk, gv)
    g_k, g_v = into if into is not None else (torch.empty_like(k), torch.empty_like(v))
    q_side = {n: named[n] for n in ("Q", "DO", "GQ")}
    inputs = (q, k, v, out, named["DO"], ref, named["DLSE"], named["GQ"], named["GK"], named["GV"], stats,
              *(into or ()), *(add or ()), *(() if gq_acc is None else (gq_acc,)))
    # how the tiles' shares of g_q reach gq_acc: 2 one bulk reduce-add per tile through a descriptor
    # (TMA: measured 2 % faster than element-wise at D64, 4 % at D128; design D79), 1 element-wise
    # atomic adds (GPUs without TMA, and Triton's interpreter, which has no bulk reduce)
    # (an explicit USE_TMA=0 turns the descriptor off too)
    bulk = gq_acc is not None and gq_acc.is_cuda and (options or {}).get("USE_TMA", 1) \
        and _use_tma({"USE_TMA": 1}, gq_acc)
    dq_atomic = 0 if gq_acc is None else 2 if bulk else 1
    launch = dict(K=k, V=v, GK=named["GK"], GV=named["GV"], G_K=g_k, G_V=g_v, DLSE=named["DLSE"], GQ_ACC=gq_acc,
                  STREAM=SecondStreamArgs(named["Q"], named["DO"], named["GQ"], ref, stats, Sq, q_off),
                  Q_BLOCKS=tables.q_blocks, H=H, Hkv=Hkv, Skv=Skv, scale=scale)
    if add is not None:
        launch.update(ADD_K=add[0], ADD_V=add[1])

    def spec():
        tma = _use_tma(options, *q_side.values(), by_default=False)
        cfg = flex_config("dbwd_dkdv", max(D, DV), tables.sparse_q, tables.sparse_kv, options,
                          tiles=_tiles_for(q.dtype, options, True, max(D, DV)))
        return (GridOrder("dbwd_dkdv", B * Hkv, Skv, "BLOCK_N", 0, auto=False),
                dict(HAS_DLSE=dlse is not None, ACCUMULATE=add is not None, USE_TMA=tma, DQ_ATOMIC=dq_atomic,
                     **_common(q, k, v, tables, options, True)), cfg, (D, DV, q.dtype, "dbwd_dkdv", tma))

    plan = _plan_key("dbwd_dkdv", tables, options, (q_off, dlse is None, into is not None, add is not None,
                                                    gq_acc is not None), inputs, bargs)

    def launch_args(c, tma):
        acc = _descriptors(dq_atomic == 2, c.BLOCK_M, GQ_ACC=gq_acc)
        return (*_DBWD_DKDV(**launch, **_descriptors(tma, c.BLOCK_M, **q_side), **acc), *bargs)

    _launch(kern.module.flex_dbwd_dkdv, plan, launch_args, spec, options, q.device)
    return g_k, g_v


_JVP = SIGNATURES["flex_jvp"].bind


def flex_jvp(kern: ModKernels, q, k, v, dq, dk, dv, scale: float, tables: BlockTables, buffers: list[Tensor],
             options: Optional[dict] = None, q_off: int = 0, own: Optional[OwnKeys] = None, own_tangents=None):
    """Forward and forward-mode tangents in one pass: (out, lse, d_out, d_lse, msum)."""
    B, H, Sq, D = q.shape
    DV = v.shape[3]
    c = lambda t: t.contiguous()  # noqa: E731
    dq, dk, dv = c(dq), c(dk), c(dv)
    out = torch.empty(B, H, Sq, DV, dtype=q.dtype, device=q.device)
    d_out = torch.empty_like(out)
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device)
    d_lse = torch.empty_like(lse)
    msum = torch.empty(B, H, Sq, 2, dtype=torch.float32, device=q.device)
    own_in = (None if own is None else
              OwnFirstArgs(own.kp, own.vp, own.keep, c(own_tangents[0]), c(own_tangents[1])))
    bargs = _buffer_args(buffers, {})
    a = (*_JVP(Q=q, K=k, V=v, DQ=dq, DK=dk, DVT=dv, O=out, LSE=lse, MSUM=msum, DO=d_out, DLSE=d_lse,
               KV_BLOCKS=tables.kv_blocks, **_shape(q, k), scale=scale, Q_OFF=q_off, OWN=own_in), *bargs)

    def spec():
        cfg = flex_config("jvp", max(D, DV), tables.sparse_q, tables.sparse_kv, options, kern.gathers,
                          _tiles_for(q.dtype, options))
        return (_query_order("jvp", q, k, v, auto=False),
                dict(HAS_SELF=own is not None, **_common(q, k, v, tables, options)), cfg, (D, DV, q.dtype, "jvp"))

    plan = _plan_key("jvp", tables, options, (q_off, own is not None), (q, k, v, dq, dk, dv, *(own_in or ())), bargs)
    _launch(kern.module.flex_jvp, plan, lambda c_, tma: a, spec, options, q.device)
    return out, lse, d_out, d_lse, msum
