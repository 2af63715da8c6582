"""Profile one EBT fwd+bwd step (GPU): top CUDA kernels and CPU-side time, to find fixed costs;
with ``--floor``, time the B1 floor (2 x SDPA causal) under each SDPA backend; with ``--ab``,
A/B one kernel option on the EBT fwd and fwd+bwd; with ``--sweep``, time sets of kernel options
(tiles) one after the other.

    python benchmarks/tools/profile_ebt.py --S 1024
    python benchmarks/tools/profile_ebt.py --S 4096 --floor --ab USE_TMA=0,1 --no-profile
    python benchmarks/tools/profile_ebt.py --S 4096 --sweep "BLOCK_M1=64,BLOCK_N1=128,dkdv_num_warps=8" --no-profile
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
import flexebt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/
from bench import timed  # noqa: E402


def floor(x):
    """The SDPA backend the default dispatch picks, and 2 x SDPA causal under each backend."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = x[0], x[1], x[2]
    params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, True, False)
    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True)
    print(f"default SDPA backend choice: {SDPBackend(choice).name} "
          f"(flash eligible: {torch.backends.cuda.can_use_flash_attention(params)}, "
          f"cudnn eligible: {torch.backends.cuda.can_use_cudnn_attention(params)})", flush=True)

    def two():
        return (F.scaled_dot_product_attention(x[0], x[1], x[2], is_causal=True),
                F.scaled_dot_product_attention(x[3], x[4], x[5], is_causal=True))

    for name in ("default", "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        for mode in ("fwd", "fwd+bwd"):
            try:
                if name == "default":
                    ms, _ = timed(two, mode, x)
                else:
                    with sdpa_kernel(getattr(SDPBackend, name)):
                        ms, _ = timed(two, mode, x)
                print(f"  2 x SDPA causal [{name}] {mode}: {ms:.3f} ms", flush=True)
            except RuntimeError as e:
                print(f"  2 x SDPA causal [{name}] {mode}: {type(e).__name__} {str(e).splitlines()[0][:80]}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--S", type=int, default=1024)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--floor", action="store_true", help="time 2 x SDPA causal under each SDPA backend")
    p.add_argument("--ab", default="", help="A/B one kernel option, 'KEY=v1,v2' (e.g. LINEAR_SCORE=1,0: the forward's "
                   "raw-max path)")
    p.add_argument("--options", default="", help="kernel_options for every flexebt run, 'KEY=int,...'")
    p.add_argument("--sweep", default="", help="kernel_options sets timed one after the other (plus the defaults), "
                   "';'-separated, each 'KEY=int,...' (e.g. 'BLOCK_M1=64,BLOCK_N1=128,dkdv_num_warps=8')")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="modes of the A/B and the sweep (fwd, fwd+bwd, "
                   "fwd+bwd+dbwd)")
    p.add_argument("--no-profile", action="store_true")
    a = p.parse_args()
    base = {k: int(v) for k, v in (x.split("=") for x in a.options.split(",") if x)}
    x = [torch.randn(8, 8, a.S, a.D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(6)]
    bm = flexebt.create_ebt_block_mask(None, None, None, a.S, a.S, device="cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; EBT bf16 B8 H8 S{a.S} D{a.D}", flush=True)
    if a.floor:
        floor(x)
    if a.ab:
        key, values = a.ab.split("=")
        for val in [int(v) for v in values.split(",")] * 2:  # twice, interleaved
            opts = dict(base, **{key: val})
            f = lambda: flexebt.flex_ebt_attention(*x, block_mask=bm, kernel_options=opts)  # noqa: E731
            t = {mode: timed(f, mode, x)[0] for mode in a.modes.split(",")}
            print(f"  flexebt {key}={val}: " + ", ".join(f"{m} {ms:.3f} ms" for m, ms in t.items()), flush=True)
    if a.sweep:
        for text in [""] + a.sweep.split(";"):
            opts = dict(base, **{k: int(v) for k, v in (x.split("=") for x in text.split(",") if x)})
            f = lambda: flexebt.flex_ebt_attention(*x, block_mask=bm, kernel_options=opts)  # noqa: E731
            try:
                t = {mode: timed(f, mode, x)[0] for mode in a.modes.split(",")}
                print(f"  flexebt [{text or 'defaults'}]: " + ", ".join(f"{m} {ms:.3f} ms" for m, ms in t.items()),
                      flush=True)
            except Exception as e:  # out of resources
                print(f"  flexebt [{text}]: failed {type(e).__name__}", flush=True)
    if a.no_profile:
        return

    def step():
        o = flexebt.flex_ebt_attention(*x, block_mask=bm, kernel_options=base or None)
        torch.autograd.grad(o, x, [torch.ones_like(t) for t in o])

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
