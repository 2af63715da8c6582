"""Grid order of the first-order passes (GPU; design D44): the head group each pass picks by
default, and the time of the default against the plain head-by-head order (HEAD_GROUP=1),
alternated twice, for single-stream causal attention and EBT.

    python benchmarks/tools/grid_order.py --D 64,128 --S 1024,4096,16384
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root
import flexebt  # noqa: E402
from flexebt.kernels import flex as flex_mod  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/
from bench import timed  # noqa: E402

CHOSEN: dict = {}
_pick = flex_mod.head_group


def _recording(order, cfg, options, device, resident):
    g = _pick(order, cfg, options, device, resident)
    CHOSEN[order.which] = (g, order.tiles(cfg), resident)
    return g


def compare(name, fn, inputs, modes, extra=None):
    for opts in [dict(extra or {}), dict(extra or {}, HEAD_GROUP=1)] * 2:
        CHOSEN.clear()
        t = {m: timed(lambda: fn(opts), m, inputs)[0] for m in modes}
        label = "plain (HEAD_GROUP=1)" if "HEAD_GROUP" in opts else "default"
        picks = ", ".join(f"{w} group {g} of {n} tiles/head, {r}/SM" for w, (g, n, r) in sorted(CHOSEN.items()))
        print(f"  {name} {label}: " + ", ".join(f"{m} {ms:.3f} ms" for m, ms in t.items()) + f"   [{picks}]",
              flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--D", default="64,128")
    p.add_argument("--S", default="1024,4096,16384")
    p.add_argument("--tokens", type=int, default=32768, help="B x S of the single-stream runs (H = 16)")
    p.add_argument("--ebt", default="2048,4096,8192", help="EBT lengths (B8 H8 bf16 D64); '' for none")
    a = p.parse_args()
    flex_mod.head_group = _recording
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    modes = ("fwd", "fwd+bwd")
    for D in [int(x) for x in a.D.split(",") if x]:
        for S in [int(x) for x in a.S.split(",") if x]:
            B, H = max(1, a.tokens // S), 16
            x = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
            bm = flexebt.create_block_mask(flexebt.masks.causal_mask, None, None, S, S, device="cuda")
            compare(f"causal B{B} H{H} S{S} D{D}",
                    lambda o: flexebt.flex_attention(*x, block_mask=bm, kernel_options=o), x, modes)
    for S in [int(x) for x in a.ebt.split(",") if x]:
        x = [torch.randn(8, 8, S, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(6)]
        bm = flexebt.create_ebt_block_mask(None, None, None, S, S, device="cuda")
        compare(f"EBT B8 H8 S{S} D64", lambda o: flexebt.flex_ebt_attention(*x, block_mask=bm, kernel_options=o),
                x, modes)


if __name__ == "__main__":
    main()
