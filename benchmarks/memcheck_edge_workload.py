"""Edge cases of the kernels' index arithmetic, for ``compute-sanitizer --tool memcheck`` (GPU).

    python benchmarks/memcheck_edge_workload.py                # every case on CUDA (bf16 and fp32)
    python benchmarks/memcheck_edge_workload.py --small        # smaller B / H / S, same head dims and
                                                               # alignments (a warm Triton cache is reused)
    python benchmarks/memcheck_edge_workload.py --cpu          # tiny sizes, fp32, Triton's interpreter
    python benchmarks/memcheck_edge_workload.py --only ebt     # the cases whose name contains "ebt"
    python benchmarks/memcheck_edge_workload.py --list
    python benchmarks/memcheck_edge_workload.py --jvp          # also the forward-mode cases
    compute-sanitizer --tool memcheck python benchmarks/memcheck_edge_workload.py --small

Where benchmarks/memcheck_workload.py covers the common shapes, this one aims at the edges of every
offset the kernels compute: partial tiles and sparse blocks past the sequence ends, head dims from 1
to 256 with DV != D, Sq = 1 or Skv = 1, GQA, hand-made block tables (counts past the width, negative
and duplicate indices, broadcast batch), captured tensors as views with storage offsets, stride-0
expansions and 0-d tensors, per-batch gradient accumulators, EBT streams of one token, piecewise
attention with M > N.  Each case runs forward, first order (torch.autograd.grad, create_graph=True)
and second order (the gradient of a random linear function of the first-order gradients) on
{"BACKEND": "TRITON"}, then the same on {"BACKEND": "REFERENCE"} in float64 (q, k, v cast; captured
tensors as they are), and prints the largest norm-wise relative error of the outputs and of both
orders with PASS / MISMATCH / ERR.  Each case's docstring says which path it aims at.  The exit
status is 1 if any case is not PASS.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings

CPU = "--cpu" in sys.argv
if CPU:  # Triton fixes interpreter mode when first imported
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic case (cuBLAS under determinism)

import torch  # noqa: E402
from torch.nn.attention.flex_attention import BlockMask, create_block_mask  # noqa: E402

import flexebt  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)

DEV = "cpu" if CPU else "cuda"
SMALL = "--small" in sys.argv
LOW = torch.float32 if CPU else torch.bfloat16  # the 16-bit cases run fp32 in the interpreter
TOL = {  # relative error (norm-wise) vs float64: out, first order, second order
    torch.bfloat16: (3e-2, 6e-2, 1.5e-1),
    torch.float16: (1e-2, 3e-2, 8e-2),
    torch.float32: (1e-3, 3e-3, 2e-2),
}


def pick(gpu, small, cpu):
    return cpu if CPU else small if SMALL else gpu


def rn(*shape, dtype=torch.float32, scale=1.0, grad=True):
    return (torch.randn(*shape, device=DEV, dtype=torch.float32) * scale).to(dtype).requires_grad_(grad)


# ------------------------------------------------------------------------------------------------
# the runner


class Case:
    """``make(backend)`` returns ``f(*inputs) -> tuple of outputs``; ``inputs()`` returns
    (list of inputs, n_attn): the first n_attn are attention inputs (cast to float64 for the
    reference), the rest learned captured tensors (shared by both backends)."""

    def __init__(self, name, make, inputs, dtype, deterministic=False, second=True, jvp=False, doc=""):
        self.name, self.make, self.inputs, self.dtype = name, make, inputs, dtype
        self.deterministic, self.second, self.jvp, self.doc = deterministic, second, jvp, doc


def _finite(o):
    return torch.where(torch.isfinite(o), o, torch.zeros_like(o))


def _rel(a, b):
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        z = b if a is None else a
        return 0.0 if float(z.detach().abs().max()) == 0 else float("inf")
    a, b = a.detach().double(), b.detach().double()
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb) or not torch.equal(a[~fa], b[~fb]):
        return float("inf")  # a non-finite value where the other has none (or of another kind)
    a, b = torch.where(fa, a, 0.0), torch.where(fb, b, 0.0)
    n = b.norm().item()
    d = (a - b).norm().item()
    return d / n if n > 1e-30 else d


def _orders(fn, ins, second, seed=1):
    """outputs, first-order gradients, second-order gradients (cotangents from ``seed``)."""
    outs = fn(*ins)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    g = torch.Generator(device="cpu").manual_seed(seed)
    cts = [torch.randn(o.shape, generator=g).to(DEV) for o in outs]
    loss = sum((_finite(o).double() * c.double()).sum() for o, c in zip(outs, cts))
    first = torch.autograd.grad(loss, ins, create_graph=second, allow_unused=True)
    sec = [None] * len(ins)
    if second:
        ws = [torch.randn(x.shape, generator=g).to(DEV) for x in ins]
        terms = [(f.double() * w.double()).sum() for f, w in zip(first, ws) if f is not None and f.requires_grad]
        if terms:
            sec = torch.autograd.grad(sum(terms), ins, allow_unused=True)
    return [o.detach() for o in outs], [None if f is None else f.detach() for f in first], list(sec)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def run_case(case: Case) -> str:
    t0 = time.time()
    torch.manual_seed(0)
    ins, n_attn = case.inputs()
    f_t, f_r = case.make("TRITON"), case.make("REFERENCE")
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        if case.deterministic:
            with torch.no_grad():  # convert the block mask's tables (cached) outside deterministic mode
                f_t(*[x.detach() for x in ins])
            torch.use_deterministic_algorithms(True)
        out_t, g1_t, g2_t = _orders(f_t, ins, case.second)
        _sync()
    finally:
        torch.use_deterministic_algorithms(prev)
    ref_ins = [x.detach().double().requires_grad_(True) for x in ins[:n_attn]] + list(ins[n_attn:])
    out_r, g1_r, g2_r = _orders(f_r, ref_ins, case.second)
    e_out = [_rel(a, b) for a, b in zip(out_t, out_r)]
    e_1 = [_rel(a, b) for a, b in zip(g1_t, g1_r)]
    e_2 = [_rel(a, b) for a, b in zip(g2_t, g2_r)] if case.second else []
    tol = TOL[case.dtype]
    bad = max(e_out) > tol[0] or max(e_1) > tol[1] or (e_2 and max(e_2) > tol[2])
    fmt = lambda xs: "[" + " ".join(f"{x:.1e}" for x in xs) + "]"  # noqa: E731
    status = "MISMATCH" if bad else "PASS"
    print(f"{status:8s} {case.name:34s} {time.time() - t0:6.1f}s  out {fmt(e_out)}  first {fmt(e_1)}  "
          f"second {fmt(e_2)}", flush=True)
    return status


def run_jvp_case(case: Case) -> str:
    t0 = time.time()
    torch.manual_seed(0)
    ins, n_attn = case.inputs()
    x = [i.detach() for i in ins[:n_attn]]
    t = [torch.randn_like(i) for i in x]
    f_t, f_r = case.make("TRITON"), case.make("REFERENCE")
    o_t, d_t = torch.func.jvp(f_t, tuple(x), tuple(t))
    _sync()
    o_r, d_r = torch.func.jvp(f_r, tuple(i.double() for i in x), tuple(i.double() for i in t))
    o_t, d_t = (o_t, d_t) if isinstance(o_t, tuple) else ((o_t,), (d_t,))
    o_r, d_r = (o_r, d_r) if isinstance(o_r, tuple) else ((o_r,), (d_r,))
    e_o = [_rel(a, b) for a, b in zip(o_t, o_r)]
    e_d = [_rel(a, b) for a, b in zip(d_t, d_r)]
    tol = TOL[case.dtype]
    status = "MISMATCH" if max(e_o) > tol[0] or max(e_d) > tol[1] else "PASS"
    print(f"{status:8s} {case.name:34s} {time.time() - t0:6.1f}s  out {[f'{e:.1e}' for e in e_o]}  "
          f"tangent {[f'{e:.1e}' for e in e_d]}", flush=True)
    return status


# ------------------------------------------------------------------------------------------------
# cases


def opts(backend, extra=None):
    o = {"BACKEND": backend}
    if backend == "TRITON" and extra:
        o.update(extra)
    return o


def case_flex_odd(variant):
    """Odd lengths Sq != Skv, GQA, D=24 (not a power of two) != DV=40, block mask BLOCK_SIZE
    (48, 80) -- tiles of 16 subdivide each sparse block 3 / 5 times, the last blocks past the ends
    (EVEN false) -- per-head mask (MH = H), return_lse with a cotangent (HAS_DLSE).
    variant "tma": USE_TMA=1 (descriptors over K/V, q/dO and the double backward's tiles with
    partial tiles, D/DV not powers of two) and, bf16 D<=64 on CUDA, g_q by one bulk TMA reduce-add
    per tile into GQ_ACC (DQ_ATOMIC=2, descriptor [B*H, Sq, 24] with 32-wide boxes).
    variant "atomic": pointer loads, element-wise atomic g_q (DQ_ATOMIC=1).
    variant "threepass": USE_TMA=1 with DBWD_DQ_ATOMIC=0 (the g_q pass's key loop through descriptors)."""
    B, H, Hkv = pick((2, 4, 2), (1, 4, 2), (1, 2, 1))
    Sq, Skv = pick((150, 203), (54, 107), (22, 43))
    D, DV = 24, 40
    extra = {"tma": {"USE_TMA": 1}, "atomic": {"USE_TMA": 0, "DBWD_DQ_ATOMIC": 1},
             "threepass": {"USE_TMA": 1, "DBWD_DQ_ATOMIC": 0}}[variant]

    def mask(b, h, q_idx, kv_idx):
        return ((kv_idx <= q_idx + 40) & (kv_idx + 90 >= q_idx) & (((q_idx + h) % 7) != 0)) | (kv_idx < 3)

    bm = create_block_mask(mask, None, H, Sq, Skv, device=DEV, BLOCK_SIZE=(48, 80))

    def softcap(score, b, h, q_idx, kv_idx):
        return 20.0 * torch.tanh(score / 20.0) + 0.05 * h

    def make(be):
        return lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=softcap, block_mask=bm, enable_gqa=True,
                                                      return_lse=True, kernel_options=opts(be, extra))

    def inputs():
        return [rn(B, H, Sq, D, dtype=LOW), rn(B, Hkv, Skv, D, dtype=LOW), rn(B, Hkv, Skv, DV, dtype=LOW)], 3

    return Case(f"flex_odd_gqa_d24_dv40_{variant}", make, inputs, LOW, doc=case_flex_odd.__doc__)


def case_flex_adjusted():
    """A causal mask built for 512 x 512 and cropped with torch's BlockMask._adjust to odd lengths
    (its tables keep rows and indices past the ends; full blocks present), GQA H=6 / Hkv=2,
    D=DV=48, 16-bit, default options (DBWD_DQ_ATOMIC on for bf16 D<=64 on CUDA)."""
    B, H, Hkv = pick((2, 6, 2), (1, 6, 2), (1, 2, 1))
    Sq = Skv = pick(203, 75, 37)
    L = pick(512, 256, 128)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    bm = create_block_mask(causal, None, None, L, L, device=DEV,
                           BLOCK_SIZE=pick(128, 128, 32))._adjust(Sq, Skv)
    # (some torch releases' _adjust keeps the lengths rounded up to the block size: label them)
    bm = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                  BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=bm.mask_mod, seq_lengths=(Sq, Skv),
                                  compute_q_blocks=False)

    def make(be):
        return lambda q, k, v: flexebt.flex_attention(q, k, v, block_mask=bm, enable_gqa=True,
                                                      kernel_options=opts(be))

    def inputs():
        return [rn(B, H, Sq, 48, dtype=LOW), rn(B, Hkv, Skv, 48, dtype=LOW), rn(B, Hkv, Skv, 48, dtype=LOW)], 3

    return Case("flex_adjusted_mask_gqa", make, inputs, LOW, doc=case_flex_adjusted.__doc__)


def case_headdim(D, DV, Sq, Skv, dtype, mask=None):
    """Head dims 1..256 (BLOCK_D = max(16, pow2(D)) with masked columns), DV != D, Sq = 1 or Skv = 1,
    no block mask (all-full tables of 128-blocks, HAS_FULL, one partial tile)."""
    B, H = pick((2, 2), (1, 2), (1, 2))

    def make(be):
        return lambda q, k, v: flexebt.flex_attention(q, k, v, block_mask=mask, kernel_options=opts(be))

    def inputs():
        return [rn(B, H, Sq, D, dtype=dtype), rn(B, H, Skv, D, dtype=dtype), rn(B, H, Skv, DV, dtype=dtype)], 3

    return Case(f"flex_headdim_d{D}_dv{DV}_sq{Sq}_skv{Skv}", make, inputs, dtype, doc=case_headdim.__doc__)


def case_tables_handbuilt():
    """Hand-built tables (BlockMask.from_kv_blocks, compute_q_blocks=False, no full tables):
    counts larger than the table width, negative counts, negative indices, indices at and past
    ceil(Skv / BLOCK), blocks listed twice; tables of batch 3 (MB=3, MH=1) over q of batch 3 with
    k/v of batch 1 (broadcast, as torch); BLOCK_SIZE (16, 32); HEAD_GROUP=4 over B*H=6 heads (a
    group that does not divide the heads), REVERSE_Q_ORDER=0.  fp32."""
    B, H = 3, 2
    Sq, Skv = pick((45, 70), (45, 70), (21, 40))
    bq, bkv = 16, 32
    nq, nkv = -(-Sq // bq), -(-Skv // bkv)
    W = nkv + 3
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(-2, nkv + 3, (B, 1, nq + 1, W), generator=g, dtype=torch.int32)
    idx[..., 0] = nkv - 1  # the last (partial) key block
    idx[..., 1] = idx[..., 0]  # listed twice
    num = torch.randint(-1, W + 3, (B, 1, nq + 1), generator=g, dtype=torch.int32)
    num[0, 0, 0] = W + 5  # past the width
    num[1, 0, 0] = -3  # negative
    num[2, 0, :] = 2

    def mm(b, h, q_idx, kv_idx):
        return ((q_idx + kv_idx + b) % 3) != 0

    bm = BlockMask.from_kv_blocks(num.to(DEV), idx.to(DEV), BLOCK_SIZE=(bq, bkv), mask_mod=mm, seq_lengths=(Sq, Skv),
                                  compute_q_blocks=False)
    extra = {"HEAD_GROUP": 4, "REVERSE_Q_ORDER": 0}

    def make(be):
        return lambda q, k, v: flexebt.flex_attention(q, k, v, block_mask=bm, kernel_options=opts(be, extra))

    def inputs():
        return [rn(B, H, Sq, 32), rn(1, H, Skv, 32), rn(1, H, Skv, 16)], 3

    return Case("flex_handbuilt_tables_bcast_kv", make, inputs, torch.float32, doc=case_tables_handbuilt.__doc__)


def case_captured():
    """Captured tensors in every layout the loads take: a transposed slice with storage_offset > 0
    (non-contiguous gradient accumulator, empty_strided), an expanded stride-0 view of a leaf that
    requires grad (read through a contiguous copy), a 0-dim temperature, a relative table indexed by
    kv_idx - q_idx (negative indices wrap; checked path), an fp16 table indexed through int64 ids
    whose values sit at both ends (-E and E-1), a [B, H, Sq, Skv] bias (one element per score with
    the batch: the non-atomic GBUF_SB=0 store), an fp64 per-head slope (bare position), a bool and a
    uint8 tensor read by the mask_mod; DV=200 (fp32 IEEE tiles of the D256 class, 16 x 16).  fp32."""
    B, H = pick((2, 3), (1, 3), (1, 2))
    Sq, Skv = pick((40, 52), (40, 52), (19, 26))
    D, DV = 40, 200
    E = 5
    base = torch.randn(H, Skv + 5, Sq + 3, device=DEV)
    doc = torch.tensor([(-E if i % 4 == 0 else E - 1 if i % 4 == 1 else (i % E) - 2) for i in range(Skv)],
                       dtype=torch.int64, device=DEV)
    allowed = (torch.arange(Sq, device=DEV) % 5) != 1
    flags = (torch.arange(Skv, device=DEV) % 3 == 0).to(torch.uint8)

    def mm(b, h, q_idx, kv_idx):
        return allowed[q_idx] | (flags[kv_idx] > 0)

    bm = create_block_mask(mm, None, None, Sq, Skv, device=DEV, BLOCK_SIZE=16)

    def inputs():
        bias_t = base[:, 2:2 + Skv, 1:1 + Sq].transpose(1, 2).detach().requires_grad_(True)  # [H, Sq, Skv]
        hs_base = rn(Skv, 1)
        temp = torch.tensor(0.9, device=DEV, requires_grad=True)
        rel = rn(H, Sq + Skv, scale=0.3)
        table = rn(E, dtype=torch.float16, scale=0.5)
        bbias = rn(B, H, Sq, Skv, scale=0.3)
        slopes = rn(H, dtype=torch.float64, scale=0.1)
        return [rn(B, H, Sq, D), rn(B, H, Skv, D), rn(B, H, Skv, DV), bias_t, hs_base, temp, rel, table, bbias,
                slopes], 3

    def make(be):
        def f(q, k, v, bias_t, hs_base, temp, rel, table, bbias, slopes):
            hs = hs_base.expand(Skv, H)  # stride 0 along the heads

            def sm(score, b, h, q_idx, kv_idx):
                return (score * temp + bias_t[h, q_idx, kv_idx] + 0.1 * hs[kv_idx, h] + rel[h, kv_idx - q_idx]
                        + table[doc[kv_idx]].float() + bbias[b, h, q_idx, kv_idx]
                        + (slopes[h] * (q_idx - kv_idx)).float())
            return flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, kernel_options=opts(be))
        return f

    return Case("flex_captured_layouts", make, inputs, torch.float32, doc=case_captured.__doc__)


def case_deterministic():
    """torch.use_deterministic_algorithms(True): a bias [H, Sq, Skv] that does not index the batch,
    a strided view whose storage span exceeds its numel, gets one fp32 accumulator per batch element
    (GBUF + off_b * GBUF_SB, SB = storage span); a second bias indexes the batch (GBUF_SB = 0).  B=3,
    odd lengths, causal mask.  fp32."""
    B, H = pick((3, 2), (3, 2), (3, 1))
    Sq, Skv = pick((37, 41), (37, 41), (19, 23))
    base = torch.randn(H, 2 * Sq + 1, Skv + 7, device=DEV)

    def causal(b, h, q_idx, kv_idx):
        return q_idx + 4 >= kv_idx

    bm = create_block_mask(causal, None, None, Sq, Skv, device=DEV, BLOCK_SIZE=32)

    def inputs():
        view = base[:, 1::2, 3:3 + Skv].detach().requires_grad_(True)  # [H, Sq, Skv], row stride 2*(Skv+7)
        bb = rn(B, H, Sq, Skv, scale=0.2)
        return [rn(B, H, Sq, 16), rn(B, H, Skv, 16), rn(B, H, Skv, 16), view, bb], 3

    def make(be):
        def f(q, k, v, view, bb):
            def sm(score, b, h, q_idx, kv_idx):
                return score + view[h, q_idx, kv_idx] + bb[b, h, q_idx, kv_idx]
            return flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, kernel_options=opts(be))
        return f

    return Case("flex_deterministic_batch_acc", make, inputs, torch.float32, deterministic=True,
                doc=case_deterministic.__doc__)


def case_ebt(variant):
    """EBT two streams.  "gqa": S_o=75, S_p=50 (r=25), GQA 4/2, D=40 != DV=24, BLOCK_SIZE (32, 48),
    a frame mask_mod reading an int64 document table of S_o+1 entries (frame positions up to S_o),
    a learned frame bias [H, S_o+1, S_o+1] (bare positions; host-checked), return_lse; default
    options (bf16 D<=64 on CUDA: g_q by bulk reduce-add, the own key's column in the FROM_ACC pass).
    "even": S_o = S_p = 128 (r=0, EVEN: unmasked loads, own keys), block_mask=None (structure mask),
    D=DV=64, USE_TMA=1 with DBWD_DQ_ATOMIC=0."""
    if variant == "gqa":
        B, H, Hkv = pick((2, 4, 2), (1, 4, 2), (1, 2, 1))
        So, Sp = pick((75, 50), (75, 50), (29, 18))
        D, DV = 40, 24
        extra = None
        docs = (torch.arange(So + 1, device=DEV) // 23).to(torch.int64)

        def frame_mask(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])

        bm = flexebt.create_ebt_block_mask(frame_mask, None, None, So, Sp, device=DEV, BLOCK_SIZE=(32, 48))
    else:
        B, H, Hkv = pick((2, 2, 2), (1, 2, 2), (1, 1, 1))
        So = Sp = 128
        D = DV = 64
        extra = {"USE_TMA": 1, "DBWD_DQ_ATOMIC": 0}
        bm = None

    def inputs():
        fb = rn(H, So + 1, So + 1, scale=0.3)
        xs = [rn(B, H, So, D, dtype=LOW), rn(B, Hkv, So, D, dtype=LOW), rn(B, Hkv, So, DV, dtype=LOW),
              rn(B, H, Sp, D, dtype=LOW), rn(B, Hkv, Sp, D, dtype=LOW), rn(B, Hkv, Sp, DV, dtype=LOW)]
        return (xs + [fb], 6) if variant == "gqa" else (xs, 6)

    def make(be):
        def f(*xs):
            sm = None
            if variant == "gqa":
                fb = xs[6]

                def sm(score, b, h, q_idx, kv_idx):
                    return score + fb[h, q_idx, kv_idx]
            return flexebt.flex_ebt_attention(*xs[:6], score_mod=sm, block_mask=bm, enable_gqa=True,
                                              return_lse=True, kernel_options=opts(be, extra))
        return f

    return Case(f"ebt_{variant}", make, inputs, LOW, doc=case_ebt.__doc__)


def case_ebt_tiny(So, Sp):
    """EBT with S_p = 1 (one predicted query, its own key a column of one row), S_o = 1 (r = 0, a
    one-key observed stream) or S_o = 9; GQA 2/1, D=8, DV=12, causal frame mask; fp32."""
    B, H, Hkv = 2, 2, 1

    def inputs():
        return [rn(B, H, So, 8), rn(B, Hkv, So, 8), rn(B, Hkv, So, 12), rn(B, H, Sp, 8), rn(B, Hkv, Sp, 8),
                rn(B, Hkv, Sp, 12)], 6

    bm = flexebt.create_ebt_block_mask(None, None, None, So, Sp, device=DEV)

    def make(be):
        return lambda *xs: flexebt.flex_ebt_attention(*xs, block_mask=bm, enable_gqa=True, kernel_options=opts(be))

    return Case(f"ebt_tiny_so{So}_sp{Sp}", make, inputs, torch.float32, doc=case_ebt_tiny.__doc__)


def case_piecewise(variant):
    """Piecewise attention (two passes, PARTIAL_ROWS in the double backward, the merge kernel, v's
    gradient summed over two launches).  "causal": M=77 < N=130, threshold 13, a user sliding-window
    block mask (BLOCK 64), a learned per-key bias [H, N], D=32 != DV=48, 16-bit.  "m_gt_n": M=90 >
    N=40 (negative offset P), non-causal, fractional threshold 5.5, fp32."""
    if variant == "causal":
        B, H = pick((2, 2), (1, 2), (1, 2))
        M, N = pick((77, 130), (77, 130), (21, 38))
        D, DV, dtype, thr, causal = 32, 48, LOW, 13, True

        def window(b, h, q_idx, kv_idx):
            return (N - M + q_idx - kv_idx) < 60

        bm = create_block_mask(window, None, None, M, N, device=DEV, BLOCK_SIZE=64)
    else:
        B, H = 2, 1
        M, N = pick((90, 40), (90, 40), (26, 11))
        D, DV, dtype, thr, causal, bm = 16, 16, torch.float32, 5.5, False, None

    def inputs():
        xs = [rn(B, H, M, D, dtype=dtype), rn(B, H, N, D, dtype=dtype), rn(B, H, M, D, dtype=dtype),
              rn(B, H, N, D, dtype=dtype), rn(B, H, N, DV, dtype=dtype)]
        return (xs + [rn(H, N, scale=0.3)], 5) if variant == "causal" else (xs, 5)

    def make(be):
        def f(*xs):
            sm = None
            if variant == "causal":
                kb = xs[5]

                def sm(score, b, h, q_idx, kv_idx):
                    return score + kb[h, kv_idx]
            return flexebt.piecewise_attention(*xs[:5], dist_threshold=thr, causal=causal, score_mod=sm,
                                               block_mask=bm, kernel_options=opts(be))
        return f

    return Case(f"piecewise_{variant}", make, inputs, dtype, doc=case_piecewise.__doc__)


def case_jvp_flex():
    """Forward mode (flex_jvp kernel): odd lengths, GQA, D=24 != DV=40, BLOCK_SIZE (48, 80), lse."""
    c = case_flex_odd("atomic")
    c.name, c.jvp, c.dtype = "jvp_flex_odd_gqa", True, c.dtype
    return c


def case_jvp_ebt():
    """Forward mode with the EBT own keys (OWN.DKP / OWN.DVP tangents), S_o=29, S_p=18."""
    B, H, So, Sp = 1, 2, pick(29, 29, 13), pick(18, 18, 7)
    bm = flexebt.create_ebt_block_mask(None, None, None, So, Sp, device=DEV)

    def inputs():
        return [rn(B, H, So, 16), rn(B, H, So, 16), rn(B, H, So, 24), rn(B, H, Sp, 16), rn(B, H, Sp, 16),
                rn(B, H, Sp, 24)], 6

    def make(be):
        return lambda *xs: flexebt.flex_ebt_attention(*xs, block_mask=bm, return_lse=True, kernel_options=opts(be))

    return Case("jvp_ebt", make, inputs, torch.float32, jvp=True, doc=case_jvp_ebt.__doc__)


def all_cases(with_jvp: bool):
    cases = [
        case_flex_odd("tma"),
        case_flex_odd("atomic"),
        case_flex_adjusted(),
        case_headdim(1, 3, 1, 1, LOW),
        case_headdim(72, 130, 1, pick(77, 77, 21), LOW),
        case_headdim(256, 256, pick(33, 33, 17), 1, LOW),
        case_tables_handbuilt(),
        case_captured(),
        case_deterministic(),
        case_ebt("gqa"),
        case_ebt("even"),
        case_ebt_tiny(1, 1),
        case_ebt_tiny(9, 1),
        case_piecewise("causal"),
        case_piecewise("m_gt_n"),
    ]
    if with_jvp:
        cases += [case_jvp_flex(), case_jvp_ebt()]
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--jvp", action="store_true")
    a = ap.parse_args()
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu")
    t0 = time.time()
    results = {}
    try:
        cases = all_cases(a.jvp)
    except Exception:
        traceback.print_exc()
        sys.exit(2)
    for c in cases:
        if a.only and a.only not in c.name:
            continue
        if a.list:
            print(c.name, "--", " ".join((c.doc or "").split())[:160])
            continue
        try:
            results[c.name] = run_jvp_case(c) if c.jvp else run_case(c)
        except Exception as e:  # noqa: BLE001
            results[c.name] = "ERR"
            print(f"ERR      {c.name:34s} {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                  flush=True)
            if os.environ.get("EDGE_TRACEBACK"):
                traceback.print_exc()
    if results:
        n_bad = sum(v != "PASS" for v in results.values())
        print(f"done: {len(results)} cases, {n_bad} not PASS, {time.time() - t0:.1f}s "
              f"({'cpu interpreter' if CPU else torch.cuda.get_device_name()})", flush=True)
        sys.exit(1 if n_bad else 0)


if __name__ == "__main__":
    main()
