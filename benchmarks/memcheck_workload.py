"""A GPU workload for ``compute-sanitizer --tool memcheck``: every kernel family, first and second
order, over the inputs that once touched memory outside their buffers.

    compute-sanitizer --tool memcheck python benchmarks/memcheck_workload.py

Covers captured tensors that are views (a slice of a larger tensor, a strided view, an expanded
one), several captured tensors of different dtypes in one mod (float bias, int document ids, a
one-element temperature), chained indexing, integer floor division and remainder on negative
operands, block masks cropped with ``BlockMask._adjust`` (tables that list blocks past the end),
odd lengths, GQA, flex / EBT / piecewise, bf16 and fp32, the per-batch accumulators of a
bias under deterministic algorithms, and the double backward with and without DBWD_DQ_ATOMIC.  Prints one line per case and the checks' largest
difference from the float64 reference.  ``--oob`` instead runs a mod that indexes out of
range, which must end in a device-side assertion (run it without the sanitizer, in its own
process).
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

import flexebt


def _second_order(fn, inputs):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    g = torch.Generator(device=inputs[0].device).manual_seed(1)
    cts = [torch.randn(o.shape, generator=g, device=o.device).to(o.dtype) for o in outs]
    first = torch.autograd.grad(sum((o.float() * c.float()).sum() for o, c in zip(outs, cts)), inputs,
                                create_graph=True, allow_unused=True)
    first = [torch.zeros_like(i) if f is None else f for f, i in zip(first, inputs)]
    loss = sum((f.float() ** 2).sum() for f in first)
    second = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [o.detach() for o in outs], first, second


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run(dtype, dev="cuda"):
    torch.manual_seed(0)
    B, H, Hkv, S, D = 2, 4, 2, 203, 64
    big = torch.randn(H, S + 37, S + 41, device=dev)
    bias_view = big[:, 5:S + 5, 3:S + 3].detach().requires_grad_(True)          # a slice
    base = torch.randn(H, 2 * S + 1, device=dev)
    rel_view = base[:, ::2].detach().requires_grad_(True)                        # strided, S + 1 wide
    head_scale = torch.randn(1, H, device=dev).expand(S, H)                      # expanded (stride 0)
    doc = (torch.arange(S, device=dev) // 37).to(torch.int64)
    temp = torch.tensor(0.8, device=dev, requires_grad=True)

    def mixed(score, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        same = doc[q_idx] == doc[kv_idx]
        return (score * temp + bias_view[h, q_idx, kv_idx] + rel_view[h][(d % (S + 1))] * same
                + 0.01 * (d // 3) + 0.02 * torch.remainder(d, 5) + 0.1 * head_scale[q_idx, h])

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    long_mask = create_block_mask(causal, None, None, S + 300, S + 300, device=dev)
    # the long mask's tables, declared for length S: they list blocks past the end (as a mask cropped
    # with BlockMask._adjust does on some torch versions)
    cropped = BlockMask.from_kv_blocks(long_mask.kv_num_blocks, long_mask.kv_indices, long_mask.full_kv_num_blocks,
                                       long_mask.full_kv_indices, BLOCK_SIZE=long_mask.BLOCK_SIZE,
                                       mask_mod=long_mask.mask_mod, seq_lengths=(S, S))
    q = torch.randn(B, H, S, D, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, S, D, device=dev, dtype=dtype, requires_grad=True)
    learned = [bias_view, rel_view, temp]

    def flex(be):
        def f(q_, k_, v_, *_):
            return flexebt.flex_attention(q_, k_, v_, score_mod=mixed, block_mask=cropped, enable_gqa=True,
                                          kernel_options={"BACKEND": be})
        return f

    out, first, second = _second_order(flex("TRITON"), [q, k, v] + learned)
    ref_in = [x.detach().double().requires_grad_(True) for x in (q, k, v)] + learned
    rout, rfirst, rsecond = _second_order(flex("REFERENCE"), ref_in)
    eout, efirst, esecond = _second_order(flex("REFERENCE"), [q, k, v] + learned)  # eager math, same dtype
    print(f"flex {dtype}: error vs float64 (kernels / eager {dtype}): out {_rel(out[0], rout[0]):.1e} / "
          f"{_rel(eout[0], rout[0]):.1e}; first {[f'{_rel(a, r):.1e}/{_rel(e, r):.1e}' for a, e, r in zip(first, efirst, rfirst)]}; "
          f"second {[f'{_rel(a, r):.1e}/{_rel(e, r):.1e}' for a, e, r in zip(second, esecond, rsecond)]}", flush=True)

    # the forward's running maximum written out (return_aux max_scores), same odd shapes and mask
    aux = flexebt.flex_attention(q, k, v, score_mod=mixed, block_mask=cropped, enable_gqa=True,
                                 kernel_options={"BACKEND": "TRITON"},
                                 return_aux=flexebt.AuxRequest(lse=True, max_scores=True))[1]
    print(f"flex {dtype} max_scores: finite rows {torch.isfinite(aux.max_scores).float().mean().item():.3f}", flush=True)

    # EBT two streams, causal frame mask, odd lengths, r = 3
    S_o, S_p = 131, 128
    qo, ko, vo = (torch.randn(B, H, S_o, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    qp, kp, vp = (torch.randn(B, H, S_p, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    ebt_bias = torch.randn(H, S_o + 1, S_o + 1, device=dev)[:, :, :].detach().requires_grad_(True)
    ebt_mask = flexebt.create_ebt_block_mask(None, B, H, S_o, S_p, device=dev)

    def ebt(*xs):
        return flexebt.flex_ebt_attention(*xs[:6], score_mod=lambda s, b, h, qi, ki: s + ebt_bias[h, qi, ki],
                                          block_mask=ebt_mask)

    outs, first, _ = _second_order(ebt, [qo, ko, vo, qp, kp, vp, ebt_bias])
    print(f"ebt {dtype}: outputs {[tuple(o.shape) for o in outs]}, finite {all(torch.isfinite(f).all().item() for f in first)}",
          flush=True)

    # piecewise, odd lengths, causal, a score_mod reading a strided view
    M, N = 150, 211
    q1, q2 = (torch.randn(B, H, M, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
    k1, k2, vv = (torch.randn(B, H, N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
    pw_bias = torch.randn(H, 2 * N + 3, device=dev)[:, 1::2][:, :N].detach().requires_grad_(True)

    def pw(*xs):
        return flexebt.piecewise_attention(*xs[:5], dist_threshold=37, causal=True,
                                           score_mod=lambda s, b, h, qi, ki: s + pw_bias[h, ki])

    outs, first, _ = _second_order(pw, [q1, k1, q2, k2, vv, pw_bias])
    print(f"piecewise {dtype}: finite {all(torch.isfinite(f).all().item() for f in first)}", flush=True)

    # deterministic algorithms: a bias read once per score is added without atomics, into one
    # accumulator per batch element (the sliced bias and the EBT bias do not index the batch)
    torch.use_deterministic_algorithms(True)
    try:
        def flex_bias(q_, k_, v_, *_):
            return flexebt.flex_attention(q_, k_, v_, score_mod=lambda s, b, h, qi, ki: s + bias_view[h, qi, ki],
                                          block_mask=cropped, enable_gqa=True)
        _, det_first, det_second = _second_order(flex_bias, [q, k, v, bias_view])
        _, det_ebt, _ = _second_order(ebt, [qo, ko, vo, qp, kp, vp, ebt_bias])
    finally:
        torch.use_deterministic_algorithms(False)
    _, at_first, at_second = _second_order(flex_bias, [q, k, v, bias_view])
    print(f"deterministic bias {dtype}: dbias vs atomic {_rel(det_first[3], at_first[3]):.1e}, second order "
          f"{_rel(det_second[3], at_second[3]):.1e}; EBT finite {all(torch.isfinite(f).all().item() for f in det_ebt)}",
          flush=True)

    # g_q by atomic adds in the double backward's dk/dv pass (DBWD_DQ_ATOMIC: one bulk reduce-add per
    # tile where the GPU has TMA) against the three-pass path; cropped tables, GQA, EBT

    def flex_soft(options):
        return lambda q_, k_, v_: flexebt.flex_attention(q_, k_, v_, score_mod=lambda s, b, h, qi, ki: 30 * torch.tanh(s / 30),
                                                         block_mask=cropped, enable_gqa=True, kernel_options=options)

    def ebt_plain(options):
        return lambda *xs: flexebt.flex_ebt_attention(*xs, block_mask=ebt_mask, kernel_options=options)

    for name, make, xs in (("flex", flex_soft, [q, k, v]), ("ebt", ebt_plain, [qo, ko, vo, qp, kp, vp])):
        o_off, f_off, s_off = _second_order(make({"DBWD_DQ_ATOMIC": 0}), xs)
        o_on, f_on, s_on = _second_order(make({"DBWD_DQ_ATOMIC": 1}), xs)
        print(f"{name} {dtype} DBWD_DQ_ATOMIC 1 vs 0: out {max(_rel(a, b) for a, b in zip(o_on, o_off)):.1e}, "
              f"second {max(_rel(a, b) for a, b in zip(s_on, s_off)):.1e}", flush=True)


def out_of_range():
    dev = "cuda"
    S = 100
    bias = torch.randn(4, S, S, device=dev)
    q = torch.randn(1, 4, S, 64, device=dev)

    def reads_past_the_end(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx + 1, kv_idx]

    out = flexebt.flex_attention(q, q, q, score_mod=reads_past_the_end)
    torch.cuda.synchronize()
    print("no error raised: WRONG", out.sum().item())
    sys.exit(1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--oob", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run through Triton's interpreter "
                    "(set TRITON_INTERPRET=1)")
    a = ap.parse_args()
    if a.oob:
        out_of_range()
    for dt in (torch.bfloat16, torch.float32):
        run(dt, a.device)
    print("memcheck workload done")
