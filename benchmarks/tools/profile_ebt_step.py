"""Where the time of one EBT training step goes (B3's step, ``benchmarks/ebt_step.py``): wall time
per step against the GPU's busy time, the kernels that take it, and the share of flexebt's own
kernels (``flex_*``), for any of B3's implementations side by side (default: flexebt eager and eager
math; compiled ones compile first).

    python benchmarks/tools/profile_ebt_step.py --S 256 --B 16 --layers 12 --dtype bfloat16
    python benchmarks/tools/profile_ebt_step.py --layers 4 --dtype float32 \
        --impls flexebt_compiled_ro,compiled_math_ro,floor_compiled
    python benchmarks/tools/profile_ebt_step.py --layers 4 --impls flexebt_compiled --python-profile
        # also where the host's Python time goes (cProfile over five steps, by cumulative time)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/

from ebt_step import _attention, _model_class, _stepper  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--S", type=int, default=256)
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--python-profile", action="store_true",
                   help="also cProfile five steps (after the timed ones) and print the top functions")
    p.add_argument("--impls", default="flexebt,eager_math", type=lambda s: s.split(","),
                   help="B3 implementations (benchmarks/ebt_step.py IMPLS)")
    a = p.parse_args(argv)
    CharEBT = _model_class()
    dtype = getattr(torch, a.dtype)
    torch.set_float32_matmul_precision("high")
    torch._dynamo.config.trace_autograd_ops = True  # the compiled rows take the energy's gradient inside
    torch._dynamo.config.cache_size_limit = 64
    for impl in a.impls:
        # math rows run flexebt's reference backend: the dense math of the EBT reference code
        os.environ["FLEXEBT_BACKEND"] = "REFERENCE" if "_math" in impl else "AUTO"
        torch.manual_seed(0)
        with _attention(impl):
            model = CharEBT(256, a.S, dim=768, heads=12, layers=a.layers, mcmc_steps=2).to("cuda", dtype)
            tokens = torch.randint(0, 256, (a.B, a.S), device="cuda")
            targets = torch.randint(0, 256, (a.B, a.S), device="cuda")
            t = time.perf_counter()
            step = _stepper(impl, model, tokens, targets)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            first = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t) / 5 * 1e3
            host = time.perf_counter()
            step()  # host time alone: the Python and launch work until the last launch returns
            host = (time.perf_counter() - host) * 1e3
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            if a.python_profile:
                from host_profile import python_profile

                host_prof = python_profile(step, 5)
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu = sum(e.device_time_total for e in events) / 3 / 1e3
        own = sum(e.device_time_total for e in events if e.key.startswith("flex_")) / 3 / 1e3
        name = impl
        if impl.startswith("flexebt"):
            from flexebt import runtime

            launches = runtime.stats()["launches"]
            name += f" ({launches['entries']} launches remembered, {launches['hits']} re-issued)"
        print(f"== {name}: {torch.cuda.get_device_name()} torch {torch.__version__} S{a.S} B{a.B} "
              f"{a.layers} layers {a.dtype}: wall {wall:.1f} ms/step, host until the last launch {host:.1f} ms, "
              f"GPU busy {gpu:.1f} ms/step, flexebt kernels {own:.1f} ms/step; first three steps {first:.1f} s")
        for e in sorted(events, key=lambda e: -e.device_time_total)[:a.top]:
            print(f"   {e.device_time_total / 3 / 1e3:8.2f} ms {e.count // 3:5d}x  {e.key[:90]}")
        if a.python_profile:
            import pstats

            print(f"-- {impl}: host Python over five steps (cProfile; times are totals over the five)")
            pstats.Stats(host_prof, stream=sys.stdout).sort_stats("cumulative").print_stats(a.top * 4)
        del model, step
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    os.environ.pop("FLEXEBT_BACKEND", None)


if __name__ == "__main__":
    main()
