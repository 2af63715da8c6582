"""The two ways a learned bias's gradient is added (GPU): a full bias ``bias[h, q_idx, kv_idx]``
([H, S, S], bf16, causal) through flex_attention, fwd+bwd, with and without
``torch.use_deterministic_algorithms(True)``.  Per shape it prints the time of each mode (two
alternating measurements each), the peak memory, the difference of the bias gradients between
the modes, whether the deterministic gradient repeats bit for bit, and the batch stride the
launcher chose in each mode (``0``: one accumulator, plain read-add-write in the kernels; a span:
one accumulator per batch element; ``atomic``: one fp32 atomic add per score).

    python benchmarks/tools/bias_grad_paths.py --commit <short sha> --out results/bias_grad_paths.txt
"""

import argparse
import os
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/
from bench import _git_commit  # noqa: E402  (puts FLEXEBT_IMPORT_ROOT, or the repository, first)
import flexebt  # noqa: E402
import flexebt.kernels.plan as plan_module  # noqa: E402
from flexebt import masks, mods  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask  # noqa: E402

SHAPES = ((1, 16, 4096, 64), (4, 16, 4096, 64), (1, 16, 2048, 128), (8, 8, 1024, 64))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commit", default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    out = open(a.out, "w") if a.out else None

    def log(line):
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    log(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
        f"commit {a.commit or _git_commit()}")
    log("# B H S D | default ms (x2) | deterministic ms (x2) | peak GiB default / det | rel diff of dbias | "
        "det bit for bit | batch stride default / det")
    strides = []
    real = plan_module.captured_grad_buffers

    def spy(*args, **kw):
        acc = real(*args, **kw)
        strides.append(acc.batch_stride.get(0, "atomic"))
        return acc

    plan_module.captured_grad_buffers = spy
    for B, H, S, D in SHAPES:
        torch.manual_seed(0)
        bias = (0.1 * torch.randn(H, S, S, device="cuda", dtype=torch.bfloat16)).requires_grad_()
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        bm = create_block_mask(masks.causal_mask, None, None, S, S, device="cuda")
        sm = mods.generate_bias_score_mod(bias)
        do = torch.full((B, H, S, D), 0.01, device="cuda", dtype=torch.bfloat16)

        def step():
            o = flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm)
            return torch.autograd.grad(o, (q, k, v, bias), do)[3]

        ms, grad, mem, chose = {False: [], True: []}, {}, {}, {}
        for det in (False, True, False, True):
            torch.use_deterministic_algorithms(det)
            try:
                torch.cuda.reset_peak_memory_stats()
                strides.clear()
                grad[det] = step().float()
                chose[det] = strides[0]
                ms[det].append(triton.testing.do_bench(step, warmup=10, rep=60))
                mem[det] = torch.cuda.max_memory_allocated() / 2**30
            finally:
                torch.use_deterministic_algorithms(False)
        torch.use_deterministic_algorithms(True)
        try:
            same = torch.equal(step(), step())
        finally:
            torch.use_deterministic_algorithms(False)
        diff = ((grad[True] - grad[False]).norm() / grad[False].norm()).item()
        log(f"{B} {H} {S} {D} | {' '.join(f'{x:.3f}' for x in ms[False])} | {' '.join(f'{x:.3f}' for x in ms[True])} | "
            f"{mem[False]:.2f} / {mem[True]:.2f} | {diff:.2e} | {same} | {chose[False]} / {chose[True]}")
        del bias, q, k, v, do
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
