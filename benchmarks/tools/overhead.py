"""flexebt's own Python work per call (CPU; the Triton launches are stubbed out), to keep the
dispatch path lean: small-S steps and many-layer models are CPU-bound on a GPU machine.

    python benchmarks/tools/overhead.py            # up to the launch
    python benchmarks/tools/overhead.py --bind     # also each launch's argument binding (a launch
                                                   # seen before binds its arguments, then re-issues)
"""

import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels are never launched here; no GPU needed
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))  # the repository root

import torch  # noqa: E402

import flexebt  # noqa: E402
import flexebt.kernels.flex as kernels_flex  # noqa: E402
from flexebt import masks, mods  # noqa: E402


def _binding_only(launch):
    """A stand-in launch that binds the pass's arguments for its tile configuration (worked out once
    per launch plan, as a remembered launch does) and launches nothing."""
    seen = {}

    def bind(kernel, plan, args, spec, options, device):
        if plan not in seen:
            order, constexprs, cfg, key = spec()
            seen[plan] = (cfg, constexprs.get("USE_TMA", False))
        args(*seen[plan])
    return bind


def main(S: int = 256, n: int = 200):
    stub = _binding_only if "--bind" in sys.argv else (lambda launch: (lambda *a, **k: None))
    with kernels_flex.wrap_launches(stub):  # flexebt's Python only
        _measure(S, n)


def _measure(S: int, n: int):
    T = {"BACKEND": "TRITON"}
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu")
    x = [torch.randn(1, 2, S, 64, requires_grad=True) for _ in range(3)]
    sm = mods.generate_alibi_bias(2)
    ebm = flexebt.create_ebt_block_mask(None, None, None, S, S)
    y = [torch.randn(1, 2, S, 64, requires_grad=True) for _ in range(6)]

    def fwd():
        return flexebt.flex_attention(*x, score_mod=sm, block_mask=bm, kernel_options=T)

    def fwd_bwd():
        o = fwd()
        torch.autograd.grad(o, x, torch.ones_like(o))

    def ebt_fwd():
        return flexebt.flex_ebt_attention(*y, block_mask=ebm, kernel_options=T)

    def ebt_fwd_bwd():
        o = ebt_fwd()
        torch.autograd.grad(o, y, [torch.ones_like(t) for t in o])

    def ebt_second_order():
        """The EBT step's attention: forward, create_graph gradient, backward through it."""
        out_o, out_p = ebt_fwd()
        grads = torch.autograd.grad(out_p.sum() + out_o.sum(), y, create_graph=True)
        torch.autograd.grad(sum(g.sum() for g in grads), y)

    cases = [("flex fwd", fwd), ("flex fwd+bwd", fwd_bwd), ("ebt fwd", ebt_fwd), ("ebt fwd+bwd", ebt_fwd_bwd),
             ("ebt 2nd order", ebt_second_order)]
    if len(sys.argv) > 1 and sys.argv[1] == "--profile":
        import cProfile
        import pstats

        for _ in range(3):
            ebt_second_order()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(50):
            ebt_second_order()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    for name, f in cases:
        for _ in range(3):
            f()
        best = float("inf")
        for _ in range(5):  # the best of five rounds: a busy host only ever slows a round down
            t = time.perf_counter()
            for _ in range(n // 5):
                f()
            best = min(best, (time.perf_counter() - t) / (n // 5))
        print(f"{name:14s} {best * 1e6:6.0f} us per call (Python only, best of 5 rounds)")


if __name__ == "__main__":
    main()
