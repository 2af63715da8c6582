"""Where the time of a small-S call goes (GPU): for B2's shapes (B * S = 16k tokens, H16) it
prints, per S, the do_bench time of fwd and fwd+bwd, the GPU time of the kernels of one fwd+bwd
(torch.profiler, summed per kernel), and the host time of one fwd+bwd (a loop of calls the GPU
does not hold back).  At the smallest S also: the fast re-launch path off / on, the host cost of
each launch, the host time with the launches stubbed, a cProfile of fwd+bwd (top functions by own
time), an autograd floor (a Function that launches nothing) and torch's compiled fwd+bwd.
A call whose do_bench time is near its host time and far above its kernel time is host-bound.

    python benchmarks/tools/small_s.py --S 1024,2048,4096 --D 64 --variant causal
"""
import argparse
import cProfile
import os
import pstats
import sys
import time
import warnings

import torch
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/
import flexebt  # noqa: E402
from flexebt import runtime  # noqa: E402
from bench import b2_variant  # noqa: E402

warnings.simplefilter("ignore")


def kernel_times(fn):
    """GPU time (ms) of each kernel of one call of ``fn``, by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            out[e.key[:60]] = t / 1e3
    return out


def host_ms(fn, n=30):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return t


def launch_breakdown(fwd_bwd, n=200):
    """Host time of each launch of one fwd+bwd, four ways: Triton's JIT call (argument tuple
    built, ``kernel[grid](...)``), the argument tuple alone, the compiled kernel's launcher called
    directly with Triton's bound arguments (no binding, no cache key), and flexebt's fast path as
    it runs (plan key, lookup, argument tuple, launcher)."""
    import flexebt.kernels.flex as kf
    import triton

    seen = []

    def spy(real):
        def launch(kernel, plan, args, spec, options, device):
            seen.append((kernel, plan, args, spec, options, device))
            return real(kernel, plan, args, spec, options, device)
        return launch

    with kf.wrap_launches(spy):
        fwd_bwd()
    real = kf._launch  # the fast path as it runs (this tool measures the launcher itself)
    for kernel, plan, args, spec, options, device in seen:
        order, kwargs, cfg, key = spec()
        cfg = runtime.tile_fits.get((id(kernel), key, cfg), kernel, default=cfg)
        group = kf.head_group(order, cfg, options, device,
                              runtime.residency.get((id(kernel), key, cfg), kernel, default=2))
        grid = (order.tiles(cfg) * order.n_bh,)
        tma = kwargs.get("USE_TMA", False)
        kw = dict(kwargs, HEAD_GROUP=group, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)

        def jit():
            kernel[grid](*args(cfg, tma), **kw)

        def build():
            args(cfg, tma)

        def fast():
            real(kernel, plan, args, spec, options, device)

        t_jit, t_args = host_ms(jit, n), host_ms(build, n)
        line = f"    {kernel.__name__:16s} jit call {t_jit * 1e3:6.1f} us | args {t_args * 1e3:5.1f} us"
        try:
            compiled = kernel[grid](*args(cfg, tma), **kw)
            dev = triton.runtime.driver.active.get_current_device()
            binder = kernel.device_caches[dev][4]
            launch_kw = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
            bound = list(binder(*args(cfg, tma), **launch_kw)[0].values())
            runner = compiled[(grid[0], 1, 1)]
            line += f" | direct launcher {host_ms(lambda: runner(*bound), n) * 1e3:6.1f} us"
        except Exception as e:  # the launcher's calling convention is Triton-internal
            line += f" | direct launcher n/a ({type(e).__name__}: {str(e)[:80]})"
        line += f" | flexebt fast path {host_ms(fast, n) * 1e3:6.1f} us" if kf._FAST.enabled else ""
        print(line, flush=True)
    a = torch.empty(1, device="cuda")
    print(f"    torch.empty on CUDA: {host_ms(lambda: torch.empty(16, 16, 1024, 64, device='cuda'), n) * 1e3:.1f} us;"
          f" tiny add: {host_ms(lambda: a + 1, n) * 1e3:.1f} us", flush=True)


class _Floor(torch.autograd.Function):
    """The least an attention Function can cost the host: outputs allocated, nothing launched."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def floor_fwd_bwd(q, k, v, do):
    torch.autograd.grad(_Floor.apply(q, k, v), (q, k, v), do)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--S", default="1024,2048,4096", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--D", default=64, type=int)
    p.add_argument("--variant", default="causal")
    p.add_argument("--tokens", default=16384, type=int)
    p.add_argument("--heads", default=16, type=int)
    p.add_argument("--torch", default=1, type=int, help="also time torch's compiled flex_attention (smallest S)")
    p.add_argument("--cprofile", default=40, type=int,
                   help="fwd+bwd calls profiled at the smallest S (0: none)")
    p.add_argument("--options", default="", help="kernel_options of the flexebt calls, 'KEY=int,KEY=int'")
    args = p.parse_args(argv)
    opts = {k: int(v) for k, v in (x.split("=") for x in args.options.split(",") if x)} or None
    bench = lambda f: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")  # noqa: E731
    calls = []
    for S in args.S:
        B, H = max(1, args.tokens // S), args.heads
        sm, mm = b2_variant(args.variant, H, S, "cuda")
        bm = flexebt.create_block_mask(mm, None, None, S, S, device="cuda")
        q, k, v = (torch.randn(B, H, S, args.D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        do = torch.randn(B, H, S, args.D, device="cuda", dtype=torch.bfloat16)

        def fwd(q=q, k=k, v=v, sm=sm, bm=bm):
            return flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, kernel_options=opts)

        def fwd_bwd(fwd=fwd, q=q, k=k, v=v, do=do):
            torch.autograd.grad(fwd(), (q, k, v), do)

        calls.append((S, fwd_bwd))
        fwd_bwd()
        fwd_bwd()
        t_f, t_fb = bench(fwd), bench(fwd_bwd)
        h = host_ms(fwd_bwd)
        print(f"S={S} B={B}: do_bench fwd {t_f:.3f} fwd+bwd {t_fb:.3f} | host per fwd+bwd {h:.3f} ms", flush=True)
        if S == min(args.S):
            import flexebt.kernels.flex as kf
            from flexebt.kernels.launcher import FastLaunches

            default = kf._FAST
            for on in (False, True):  # the fast re-launch path (launcher.py) off and on
                kf._FAST = FastLaunches(enabled=on)
                fwd_bwd()
                print(f"    fast re-launch {'on ' if on else 'off'}: do_bench fwd+bwd {bench(fwd_bwd):.3f} | host "
                      f"{host_ms(fwd_bwd):.3f} ms", flush=True)
            kf._FAST = default
            launch_breakdown(fwd_bwd)
            with kf.wrap_launches(lambda launch: (lambda *a, **k: None)):
                print(f"    host per fwd+bwd with the launches stubbed: {host_ms(fwd_bwd):.3f} ms", flush=True)
            if args.cprofile:  # where the host time of a fwd+bwd goes (launches included)
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(args.cprofile):
                    fwd_bwd()
                pr.disable()
                torch.cuda.synchronize()
                pstats.Stats(pr).sort_stats("tottime").print_stats(30)
            print(f"    autograd floor (a Function with three empty outputs in its backward): "
                  f"{host_ms(lambda: floor_fwd_bwd(q, k, v, do)):.3f} ms", flush=True)
            if args.torch:
                from torch.nn.attention.flex_attention import flex_attention as torch_flex

                compiled = torch.compile(torch_flex, dynamic=False)

                def torch_fwd_bwd():
                    torch.autograd.grad(compiled(q, k, v, score_mod=sm, block_mask=bm), (q, k, v), do)

                torch_fwd_bwd()
                print(f"    torch flex_attention compiled: do_bench fwd+bwd {bench(torch_fwd_bwd):.3f} | "
                      f"host {host_ms(torch_fwd_bwd):.3f} ms", flush=True)
    # last: CUDA launches stay slower for the rest of the process after a profiler session
    for S, fwd_bwd in calls:
        kt = kernel_times(fwd_bwd)
        print(f"S={S}: kernels of one fwd+bwd {sum(kt.values()):.3f} ms", flush=True)
        for name, t in sorted(kt.items(), key=lambda x: -x[1]):
            print(f"    {t:8.3f}  {name}")


if __name__ == "__main__":
    main()
