"""Where the time of one eager EBT training step goes (B3's step, ``benchmarks/ebt_step.py``):
wall time per step against the GPU's busy time, and the kernels that take it, for flexebt's
kernels and for the dense math side by side.

    python benchmarks/tools/profile_ebt_step.py --S 256 --B 16 --layers 12 --dtype bfloat16
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

from ebt_step import _model_class  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--S", type=int, default=256)
    p.add_argument("--B", type=int, default=16)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--top", type=int, default=12)
    a = p.parse_args(argv)
    CharEBT = _model_class()
    dtype = getattr(torch, a.dtype)
    torch.set_float32_matmul_precision("high")
    for backend in ("AUTO", "REFERENCE"):
        os.environ["FLEXEBT_BACKEND"] = backend
        torch.manual_seed(0)
        model = CharEBT(256, a.S, dim=768, heads=12, layers=a.layers, mcmc_steps=2).to("cuda", dtype)
        tokens = torch.randint(0, 256, (a.B, a.S), device="cuda")
        targets = torch.randint(0, 256, (a.B, a.S), device="cuda")

        def step():
            model.zero_grad(set_to_none=False)
            model.loss(tokens, targets).backward()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
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
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu = sum(e.device_time_total for e in events) / 3 / 1e3
        name = "flexebt" if backend == "AUTO" else "eager_math"
        if backend == "AUTO":
            from flexebt import runtime

            launches = runtime.stats()["launches"]
            name += f" ({launches['entries']} launches remembered, {launches['hits']} re-issued)"
        print(f"== {name}: {torch.cuda.get_device_name()} torch {torch.__version__} S{a.S} B{a.B} "
              f"{a.layers} layers {a.dtype}: wall {wall:.1f} ms/step, host until the last launch {host:.1f} ms, "
              f"GPU busy {gpu:.1f} ms/step")
        for e in sorted(events, key=lambda e: -e.device_time_total)[:a.top]:
            print(f"   {e.device_time_total / 3 / 1e3:8.2f} ms {e.count // 3:5d}x  {e.key[:90]}")
        del model
        torch.cuda.empty_cache()
    os.environ.pop("FLEXEBT_BACKEND", None)


if __name__ == "__main__":
    main()
