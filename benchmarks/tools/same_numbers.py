"""Whether two checkouts of flexebt compute the same numbers, bit for bit: a fixed set of calls
(flex with and without mods, a learned bias and a learned temperature, GQA with a window, EBT with
and without a frame bias, piecewise, forward mode) runs through each checkout's kernels under
Triton's CPU interpreter, and every output, gradient, second-order gradient (captured tensors
included) and tangent is compared with ``torch.equal``.  A refactoring of the kernel engine that
keeps the math must leave them all equal.

    git archive <commit> | tar -x -C /tmp/before
    python benchmarks/tools/same_numbers.py /tmp/before .

Each checkout runs in its own process (its own kernel cache directory under /tmp).
"""

import os
import subprocess
import sys
import tempfile


def run_calls(root: str, out: str) -> None:
    """Run the calls through the flexebt at ``root``; save the results to ``out``."""
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, root)
    import torch

    import flexebt
    from flexebt import masks, mods

    if not os.path.abspath(flexebt.__file__).startswith(os.path.abspath(root)):
        raise RuntimeError(f"imported {flexebt.__file__}, not the checkout at {root}")
    res = {}

    def second(name, fn, xs, extra=()):
        """Outputs, gradients (create_graph) and the gradients of a random functional of those."""
        xs = [x.detach().requires_grad_() for x in xs]
        leaves = xs + list(extra)
        out = fn(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        g = torch.Generator().manual_seed(7)
        cot = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, leaves, cot, create_graph=True, allow_unused=True)
        res.update({f"{name}/out{i}": o.detach() for i, o in enumerate(outs)})
        res.update({f"{name}/g{i}": gr.detach() for i, gr in enumerate(grads) if gr is not None})
        loss = sum((gr.float() * torch.randn(gr.shape, generator=g)).sum() for gr in grads if gr is not None)
        gg = torch.autograd.grad(loss, leaves, allow_unused=True)
        res.update({f"{name}/gg{i}": gr.detach() for i, gr in enumerate(gg) if gr is not None})

    T = {"BACKEND": "TRITON"}
    torch.set_float32_matmul_precision("highest")

    g = torch.Generator().manual_seed(0)

    def r(*s, dt=torch.float32):
        return torch.randn(*s, generator=g).to(dt)

    B, H, S, D = 2, 2, 37, 16
    q, k, v = r(B, H, S, D), r(B, H, S, D), r(B, H, S, D)
    second("plain", lambda q, k, v: flexebt.flex_attention(q, k, v, kernel_options=T), [q, k, v])
    causal = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    second("causal_alibi", lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=mods.generate_alibi_bias(H),
                                                                  block_mask=causal, kernel_options=T), [q, k, v])
    bias = r(H, S, S).requires_grad_()
    def learned(s, b, h, qi, ki):
        return s + bias[h, qi, ki]
    second("learned_bias", lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=learned, block_mask=causal,
                                                                  kernel_options=T), [q, k, v], [bias])
    temp = r(H).abs().add(0.5).requires_grad_()
    def tempered(s, b, h, qi, ki):
        return torch.tanh(s * temp[h]) * 3.0
    second("softcap_temp", lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=tempered, kernel_options=T),
           [q, k, v], [temp])
    window = flexebt.create_block_mask(lambda b, h, qi, ki: (qi - ki).abs() <= 9, None, None, S, S, device="cpu",
                                       BLOCK_SIZE=16)
    kg, vg = r(B, 1, S, D), r(B, 1, S, 24)
    second("gqa_window", lambda q, k, v: flexebt.flex_attention(q, k, v, block_mask=window, enable_gqa=True,
                                                                kernel_options=T), [q, kg, vg])
    # EBT
    xs = [r(B, H, S, D) for _ in range(6)]
    ebm = flexebt.create_ebt_block_mask(None, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    second("ebt", lambda *x: flexebt.flex_ebt_attention(*x, block_mask=ebm, kernel_options=T), xs)
    fbias = r(H, S + 1, S + 1).requires_grad_()
    def frame_bias(s, b, h, qi, ki):
        return s + fbias[h, qi, ki]
    second("ebt_bias", lambda *x: flexebt.flex_ebt_attention(*x, score_mod=frame_bias, block_mask=ebm, kernel_options=T),
           xs, [fbias])
    # piecewise
    M = N = 29
    p = [r(1, 2, M, D), r(1, 2, N, D), r(1, 2, M, D), r(1, 2, N, D), r(1, 2, N, D)]
    second("piecewise", lambda *x: flexebt.piecewise_attention(*x, 7, causal=True, kernel_options=T), p)
    # forward mode
    tang = [r(B, H, S, D) for _ in range(3)]
    o, t = torch.func.jvp(lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=mods.generate_alibi_bias(H),
                                                                 block_mask=causal, kernel_options=T), (q, k, v), tuple(tang))
    res["jvp/out"], res["jvp/tangent"] = o, t
    o, t = torch.func.jvp(lambda *x: flexebt.flex_ebt_attention(*x, block_mask=ebm, kernel_options=T)[1], tuple(xs),
                          tuple(r(B, H, S, D) for _ in range(6)))
    res["jvp_ebt/out"], res["jvp_ebt/tangent"] = o, t
    torch.save(res, out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--run":
        run_calls(argv[1], argv[2])
        return 0
    if len(argv) != 2:
        print(__doc__)
        return 2
    import torch

    tmp = tempfile.mkdtemp(prefix="flexebt_same_numbers_")
    results = []
    for i, root in enumerate(argv):
        out = os.path.join(tmp, f"{i}.pt")
        env = dict(os.environ, FLEXEBT_CACHE_DIR=os.path.join(tmp, f"cache{i}"))
        subprocess.run([sys.executable, os.path.abspath(__file__), "--run", os.path.abspath(root), out], env=env,
                       check=True)
        results.append(torch.load(out))
    a, b = results
    if a.keys() != b.keys():
        print("the two checkouts return different sets of results:", sorted(set(a) ^ set(b)))
        return 1
    differ = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k].nan_to_num(), b[k].nan_to_num())]
    for k in differ:
        print(f"differs: {k}  max |a - b| = {(a[k].double() - b[k].double()).abs().max().item():.3e}")
    print(f"{len(a)} results compared, {len(differ)} differ")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
