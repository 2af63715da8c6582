"""flexebt benchmarks (suites B1-B4, docs/benchmarks.md).  One CLI, fixed rows, run on a GPU.

    python benchmarks/bench.py --suite B2 --dims 64,128 --seqs 1024,2048,4096,8192,16384 \
        --out benchmarks/results/B2_h100 --commit $(git rev-parse --short HEAD)

Every row: suite, device, torch, triton, commit, impl, variant, dtype, B, H, S, D, mode, ms,
tflops, peak_mem_gib.  FLOPs: 4 B H S^2 D per forward (dense), halved for causal; a backward
counts 2.5x a forward.  ``ms`` is the best of three triton.testing.do_bench medians (``p20_ms`` and
``p80_ms``: the 20th and 80th percentiles of that same run), with the
outputs' cotangents made outside the timed step (since commit a775d76; earlier result files
made them inside and took one median).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F

# FLEXEBT_IMPORT_ROOT: measure the flexebt of another checkout with this harness (tools/ab_commits.py)
sys.path.insert(0, os.environ.get("FLEXEBT_IMPORT_ROOT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flexebt  # noqa: E402
from flexebt import masks, mods  # noqa: E402
from ebt_step import IMPLS as B3_IMPLS, run_b3  # noqa: E402

FIELDS = ["suite", "device", "torch", "triton", "commit", "timestamp", "impl", "variant", "dtype", "B", "H", "S", "D",
          "mode", "ms", "p20_ms", "p80_ms", "tflops", "peak_mem_gib", "first_step_s", "grad_rel_err", "note"]


def _git_commit() -> str:
    """The checkout's commit (short), or "unknown" outside a git checkout."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
# FLOPs per mode in units of one forward: a backward counts 2.5; the double backward (the
# backward of the backward: row statistics, g_q and g_k/g_v passes) is counted as 2x fwd+bwd.
MODES = {"fwd": 1.0, "fwd+bwd": 3.5, "fwd+bwd+dbwd": 10.5}


def b2_variant(name, H, S, device):
    """(score_mod, mask_mod, causal) of a B2 workload; all causal."""
    if name == "causal":
        return None, masks.causal_mask
    if name == "alibi":
        return mods.generate_alibi_bias(H), masks.causal_mask
    if name == "softcap":
        return mods.generate_tanh_softcap(30.0), masks.causal_mask
    if name == "learned_bias":
        bias = (0.1 * torch.randn(H, S, S, device=device, dtype=torch.bfloat16)).requires_grad_()
        return mods.generate_bias_score_mod(bias), masks.causal_mask
    raise KeyError(name)


def prepared(fn, mode, inputs):
    """(step, peak memory in GiB) of fwd or fwd+bwd (fn may return a tuple of outputs).  The
    cotangents of the outputs are made once, outside the timed step: at small sizes a call is
    host-bound on the GPU machine, and two extra tensor ops per step (~100 us of host time each
    there) would weigh on every implementation alike."""
    first = fn()
    cts = [torch.full_like(o, 0.01) for o in (first if isinstance(first, (tuple, list)) else (first,))]
    del first

    def step():
        out = fn()
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if mode == "fwd+bwd":
            torch.autograd.grad(outs, inputs, grad_outputs=cts)
        elif mode == "fwd+bwd+dbwd":
            # EBT-style: gradients with create_graph, a loss on them, its gradient w.r.t. the inputs
            g = torch.autograd.grad(outs, inputs, grad_outputs=cts, create_graph=True)
            torch.autograd.grad(sum((t.float() ** 2).sum() for t in g), inputs)
        return out

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return step, (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def quantiles_ms(step) -> tuple:
    """(p20, p50, p80) in ms of one ``triton.testing.do_bench`` run."""
    import triton.testing

    return tuple(triton.testing.do_bench(step, warmup=25, rep=100, quantiles=[0.2, 0.5, 0.8]))


def spread(q: tuple) -> dict:
    """The row fields of a (p20, p50, p80) triple: ``ms`` is the median."""
    return dict(ms=round(q[1], 4), p20_ms=round(q[0], 4), p80_ms=round(q[2], 4))


def timed_spread(fn, mode, inputs, repeats: int = 3):
    """(p20, p50, p80) of the do_bench run with the best median out of ``repeats``, and the peak
    memory of fwd or fwd+bwd.  Host-side hiccups only ever slow a run down, so the best of a few
    medians is the steadier figure."""
    step, peak = prepared(fn, mode, inputs)
    return min((quantiles_ms(step) for _ in range(repeats)), key=lambda q: q[1]), peak


def timed(fn, mode, inputs, repeats: int = 3):
    """(best median ms, peak GiB): ``timed_spread`` without the spread."""
    q, peak = timed_spread(fn, mode, inputs, repeats)
    return q[1], peak


def timed_side_by_side(calls: dict, modes, inputs, repeats: int = 3) -> dict:
    """``{(name, mode): ((p20, p50, p80), peak)}`` for every call and mode, each the best of ``repeats``
    do_bench medians taken in rounds (every call and mode once per round), so that a slow spell
    of the host lands on all of them alike rather than on whichever ran then (B2 at S = 1k is
    host-bound for every implementation on the GPU machine; single runs there swing by tens of %).
    A call that runs out of memory gets NaN."""
    steps, best = {}, {}
    for name, fn in calls.items():
        for mode in modes:
            try:
                steps[name, mode] = prepared(fn, mode, inputs)
            except torch.OutOfMemoryError:
                best[name, mode] = ((float("nan"),) * 3, float("nan"))
                torch.cuda.empty_cache()
    for _ in range(repeats):
        for key, (step, peak) in steps.items():
            q = quantiles_ms(step)
            best[key] = (min(q, best[key][0], key=lambda x: x[1]) if key in best else q, peak)
    return best


def parse_impl(impl: str):
    """``"flexebt:USE_TMA=0;BLOCK_M=64"`` -> ("flexebt", {"USE_TMA": 0, "BLOCK_M": 64}): flexebt with
    kernel_options, as an implementation of its own in the rows (for A/B runs)."""
    name, _, opts = impl.partition(":")
    return name, {k: int(v) for k, v in (x.split("=") for x in opts.split(";") if x)}


def run_b2(args, meta, writer):
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    dtype = getattr(torch, args.dtype)
    for D in args.dims:
        for S in args.seqs:
            # Constant token count (B * S = args.tokens) unless --batch is given: small S still fills the GPU.
            B, H = (args.batch or max(1, args.tokens // S)), args.heads
            for variant in args.variants:
                # A fresh compile per shape: dynamo's recompile limit would otherwise silently fall
                # back to eager (dense) FlexAttention after a few shapes.
                torch._dynamo.reset()
                compiled = torch.compile(torch_flex, dynamic=False)
                sm, mm = b2_variant(variant, H, S, "cuda")
                bm = flexebt.create_block_mask(mm, None, None, S, S, device="cuda")
                q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
                flops = 4 * B * H * S * S * D / 2
                impls = {
                    "torch_flex_compiled": lambda: compiled(q, k, v, score_mod=sm, block_mask=bm),
                }
                if variant == "causal":
                    impls["sdpa_causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
                calls = {}
                for impl in args.impls:
                    name, opts = parse_impl(impl)
                    if name == "flexebt":
                        calls[impl] = (lambda o: lambda: flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm,
                                                                                kernel_options=o or None))(opts)
                    elif impl in impls:
                        calls[impl] = impls[impl]
                for (impl, mode), (qs, peak) in timed_side_by_side(calls, args.modes, [q, k, v]).items():
                    writer(dict(meta, suite="B2", impl=impl, variant=variant, dtype=args.dtype, B=B, H=H, S=S, D=D,
                                mode=mode, **spread(qs), tflops=round(flops * MODES[mode] / qs[1] / 1e9, 2),
                                peak_mem_gib=round(peak, 3)))
                del q, k, v
                torch.cuda.empty_cache()


def run_b4(args, meta, writer):
    """B4: piecewise (NLPE) attention, causal, threshold w = S / 8 (--piecewise-w overrides),
    fwd and fwd+bwd: flexebt piecewise vs a plain causal flexebt attention of the same size (the
    yardstick of the B4 target: piecewise <= 1.6x of it) and eager math (dense, small S).  FLOPs as a
    causal attention (each kept pair is scored once)."""
    dtype = getattr(torch, args.dtype)
    for D in args.dims:
        for S in args.seqs:
            B, H = (args.batch or max(1, args.tokens // S)), args.heads
            w = args.piecewise_w or S // 8
            variant = f"piecewise_causal_w{w}" if args.piecewise_w else "piecewise_causal_w=S/8"
            x = [torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(5)]
            bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cuda")
            flops = 4 * B * H * S * S * D / 2
            impls = {
                "flexebt_piecewise": lambda: flexebt.piecewise_attention(*x, dist_threshold=w, causal=True),
                "flexebt_causal": lambda: flexebt.flex_attention(x[0], x[1], x[4], block_mask=bm),
            }
            if S <= args.eager_max_s:
                impls["eager_math"] = lambda: flexebt.piecewise_attention(
                    *x, dist_threshold=w, causal=True, kernel_options={"BACKEND": "REFERENCE"})
            for impl in args.impls:
                name, opts = parse_impl(impl)
                if name == "flexebt_piecewise" and opts:  # with kernel_options, an implementation of its own
                    impls[impl] = lambda o=opts: flexebt.piecewise_attention(*x, dist_threshold=w, causal=True,
                                                                             kernel_options=o)
                if impl not in impls:
                    continue
                for mode in args.modes:
                    try:
                        qs, peak = timed_spread(impls[impl], mode, x if impl != "flexebt_causal" else [x[0], x[1], x[4]])
                    except torch.OutOfMemoryError:
                        qs, peak = (float("nan"),) * 3, float("nan")
                        torch.cuda.empty_cache()
                    writer(dict(meta, suite="B4", impl=impl, variant=variant, dtype=args.dtype, B=B,
                                H=H, S=S, D=D, mode=mode, **spread(qs),
                                tflops=round(flops * MODES[mode] / qs[1] / 1e9, 2), peak_mem_gib=round(peak, 3)))
            del x
            torch.cuda.empty_cache()


def _concat_ebt_mask(S):
    """r = 0 EBT over the concatenated streams [o; p] as one causal-style mask (an oracle of the
    two-stream semantics)."""

    def ebt_concat_mask(b, h, q, kv):
        obs_q, obs_kv = q < S, kv < S
        i = q - S  # predicted row i sits at frame i + 1: sees observed 0..i and itself
        return (obs_q & obs_kv & (kv <= q)) | (~obs_q & ((obs_kv & (kv <= i)) | (kv == q)))

    return ebt_concat_mask


def run_b1(args, meta, writer):
    """EBT attention, r = 0, causal, B8 H8: flexebt vs ebt_flash_attention 0.2.0, torch flex_attention
    (compiled) over the concatenated streams, eager math (small S) and 2 x SDPA causal (the floor)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    try:
        from ebt_flash_attention.ebt_attention import ebt_attention as efa
    except ImportError:
        efa = None
    B, H = 8, 8
    for dtype_name, D in args.b1_configs:
        dtype = getattr(torch, dtype_name)
        # fp32: ebt_flash_attention's tl.dot takes tf32 products, so both sides run under the same
        # policy (matmul precision "high" lets flexebt use tf32); the variant says so.
        torch.set_float32_matmul_precision("high" if dtype == torch.float32 else "highest")
        variant = "ebt_causal_r0_tf32" if dtype == torch.float32 else "ebt_causal_r0"
        for S in args.seqs:
            torch._dynamo.reset()
            compiled = torch.compile(torch_flex, dynamic=False)
            x = [torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(6)]
            bm = flexebt.create_ebt_block_mask(None, None, None, S, S, device="cuda")
            bm_cat = create_block_mask(_concat_ebt_mask(S), None, None, 2 * S, 2 * S, device="cuda")
            tril = torch.tril(torch.ones(S + 1, S + 1, dtype=torch.bool, device="cuda"))
            flops = 4 * B * H * S * S * D  # two causal attentions of length S

            def concat():
                q, k, v = (torch.cat([x[i], x[i + 3]], dim=2) for i in range(3))
                return compiled(q, k, v, block_mask=bm_cat)

            def two_sdpa(backend=None):
                # the B1 targets name the flash backend as the floor; the default dispatch of torch 2.11
                # picks cuDNN on Hopper, which is faster there (design D42): both are reported
                def run():
                    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                        return (F.scaled_dot_product_attention(x[0], x[1], x[2], is_causal=True),
                                F.scaled_dot_product_attention(x[3], x[4], x[5], is_causal=True))
                return run

            impls = {
                "flexebt": lambda: flexebt.flex_ebt_attention(*x, block_mask=bm),
                "torch_flex_concat_compiled": concat,
                "sdpa_2x_causal": two_sdpa(),
                "sdpa_2x_causal_flash": two_sdpa(SDPBackend.FLASH_ATTENTION),
                "sdpa_2x_causal_cudnn": two_sdpa(SDPBackend.CUDNN_ATTENTION),
            }
            if efa is not None:
                impls["ebt_flash_attention"] = lambda: efa(*x, attn_mask=tril, causal=True)
            if S <= args.eager_max_s:
                impls["eager_math"] = lambda: flexebt.flex_ebt_attention(*x, block_mask=bm,
                                                                        kernel_options={"BACKEND": "REFERENCE"})
            for impl in args.impls:
                name, opts = parse_impl(impl)
                if name == "flexebt" and opts:  # flexebt with kernel_options, an implementation of its own
                    impls[impl] = lambda o=opts: flexebt.flex_ebt_attention(*x, block_mask=bm, kernel_options=o)
                if impl not in impls:
                    continue
                for mode in args.modes:
                    try:
                        qs, peak = timed_spread(impls[impl], mode, x)
                    except torch.OutOfMemoryError:
                        qs, peak = (float("nan"),) * 3, float("nan")
                        torch.cuda.empty_cache()
                    except (RuntimeError, NotImplementedError) as e:  # no double backward (torch flex, SDPA flash, ebt_flash_attention)
                        print(f"# {impl} {mode} S={S}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
                        qs, peak = (float("nan"),) * 3, float("nan")
                    writer(dict(meta, suite="B1", impl=impl, variant=variant, dtype=dtype_name, B=B, H=H,
                                S=S, D=D, mode=mode, **spread(qs), tflops=round(flops * MODES[mode] / qs[1] / 1e9, 2),
                                peak_mem_gib=round(peak, 3)))
            del x
            torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    """The command line: every flag has its help text."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="B2", choices=["B1", "B2", "B3", "B4"],
                   help="B1 EBT attention, B2 single-stream variants, B3 EBT training step, B4 piecewise")
    p.add_argument("--piecewise-w", type=int, default=0, help="B4 threshold; default S // 8")
    p.add_argument("--b3-dtypes", default="float32,bfloat16", type=lambda s: s.split(","),
                   help="B3 dtypes, comma-separated (float32 runs with matmul precision 'high')")
    p.add_argument("--b3-reps", type=int, default=10, help="B3 timed steps per row (after three warm ones)")
    p.add_argument("--b3-layers", type=int, default=12, help="B3 transformer layers (the reference shape has 12)")
    p.add_argument("--b3-tokens", type=int, default=4096, help="B3 tokens per batch: B16 at S256")
    p.add_argument("--b3-impls", default=",".join(B3_IMPLS), type=lambda s: s.split(","),
                   help="B3 implementations, run in the order given (eager_math first gives the gradient "
                        f"reference); any of: {', '.join(B3_IMPLS)}")
    p.add_argument("--b1-configs", default="float32:32,bfloat16:64,bfloat16:128",
                   type=lambda s: [(a, int(b)) for a, b in (x.split(":") for x in s.split(","))],
                   help="B1 dtype:head-dim pairs, comma-separated")
    p.add_argument("--eager-max-s", type=int, default=2048, help="B1/B4: the largest S at which eager math runs")
    p.add_argument("--dims", default="64,128", type=lambda s: [int(x) for x in s.split(",")],
                   help="B2/B4 head dims, comma-separated")
    p.add_argument("--seqs", default="1024,2048,4096,8192,16384", type=lambda s: [int(x) for x in s.split(",")],
                   help="sequence lengths, comma-separated (every suite)")
    p.add_argument("--variants", default="causal,alibi,softcap,learned_bias", type=lambda s: s.split(","),
                   help="B2 variants, comma-separated")
    p.add_argument("--impls", default="flexebt,torch_flex_compiled,sdpa_causal,torch_flex_concat_compiled,"
                   "sdpa_2x_causal,sdpa_2x_causal_flash,sdpa_2x_causal_cudnn,ebt_flash_attention,eager_math,"
                   "flexebt_piecewise,flexebt_causal",
                   type=lambda s: s.split(","),
                   help="B1/B2/B4 implementations (each suite runs the ones it knows); 'flexebt:KEY=V;KEY=V' "
                        "(B4: 'flexebt_piecewise:KEY=V') adds flexebt with those kernel_options as an "
                        "implementation of its own")
    p.add_argument("--modes", default="fwd,fwd+bwd", type=lambda s: s.split(","),
                   help="B1/B2/B4 modes, comma-separated: fwd, fwd+bwd, fwd+bwd+dbwd (B1: the EBT-style double backward)")
    p.add_argument("--dtype", default="bfloat16", help="B2/B4 dtype")
    p.add_argument("--batch", type=int, default=0, help="fixed batch; default: tokens // S")
    p.add_argument("--tokens", type=int, default=16384, help="B2/B4 tokens per batch (B = tokens // S)")
    p.add_argument("--heads", type=int, default=16, help="B2/B4 heads")
    p.add_argument("--commit", default=os.environ.get("FLEXEBT_COMMIT"),
                   help="commit recorded in every row (default: FLEXEBT_COMMIT, else the checkout's git HEAD)")
    p.add_argument("--out", required=True, help="path prefix; writes PREFIX.csv and PREFIX.json")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.py: the benchmarks time CUDA kernels and this machine has no CUDA device "
              "(torch.cuda.is_available() is False); run them on a GPU machine.", file=sys.stderr)
        raise SystemExit(2)
    import triton

    import datetime

    args.commit = args.commit or _git_commit()

    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=args.commit, timestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        w.writeheader()

        def writer(row):
            rows.append(row)
            w.writerow(row)
            f.flush()
            print(" ".join(f"{k}={row[k]}" for k in ("impl", "variant", "D", "S", "mode", "ms", "p20_ms", "p80_ms", "tflops",
                                                     "peak_mem_gib", "first_step_s", "grad_rel_err", "note")
                           if k in row), flush=True)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            {"B1": run_b1, "B2": run_b2, "B3": run_b3, "B4": run_b4}[args.suite](args, meta, writer)
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
