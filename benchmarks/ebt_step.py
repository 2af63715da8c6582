"""B3: one EBT training step at the reference EBT shape, side by side.

The step is ``examples/ebt/model.py``'s ``CharEBT.loss`` (MCMC refinement of the candidates with
``create_graph=True``, cross-entropy on the refined candidates) and its backward: second order
through every attention layer.  The implementations:

- ``eager_math``: the dense attention math of the reference backend, eager (the EBT reference
  code's way);
- ``compiled_math`` / ``compiled_math_ro``: the same under ``torch.compile(fullgraph=True)`` (inductor),
  default mode and ``mode="reduce-overhead"`` (CUDA graphs);
- ``flexebt``: the Triton kernels, eager;
- ``flexebt_cudagraph``: the eager step captured once in a ``torch.cuda.graph`` and replayed;
- ``flexebt_compiled`` / ``flexebt_compiled_ro``: the kernels as custom ops under
  ``torch.compile(fullgraph=True)``, default mode and ``mode="reduce-overhead"``;
- ``floor_compiled``: the compiled step with the attention replaced by a stand-in that costs
  almost nothing (``out = v * sigmoid(q)`` per stream, differentiable at every order): the rest of
  the step, so the attention's share of each row is visible.  (Its gradients are not comparable.)

The compiled variants take the energy's gradient inside the compiled function, which needs
``torch._dynamo.config.trace_autograd_ops = True``.  Rows: median ms per step, peak GiB above the
model, seconds to the first finished step (compile and kernel builds), and the relative error of
all parameter gradients against ``eager_math``'s on the same batch.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import types

import torch

IMPLS = ("eager_math", "compiled_math", "compiled_math_ro", "flexebt", "flexebt_cudagraph", "flexebt_compiled",
         "flexebt_compiled_ro", "floor_compiled")


def _model_class():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "ebt"))
    from model import CharEBT

    return CharEBT


def _stand_in_attention(q_o, k_o, v_o, q_p, k_p, v_p, block_mask=None, **_):
    """The floor row's attention: no scores at all, still differentiable at every order."""
    return v_o * torch.sigmoid(q_o), v_p * torch.sigmoid(q_p)


@contextlib.contextmanager
def _attention(impl: str):
    """For the floor row, the model module sees the stand-in instead of flexebt's attention."""
    if impl != "floor_compiled":
        yield
        return
    module = sys.modules["model"]
    real = module.flexebt
    module.flexebt = types.SimpleNamespace(flex_ebt_attention=_stand_in_attention,
                                           create_ebt_block_mask=lambda *a, **k: None, masks=real.masks)
    try:
        yield
    finally:
        module.flexebt = real


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None]).cpu()


def _stepper(impl: str, model, tokens, targets):
    """A function running one training step (loss and backward) for ``impl``."""
    if "compiled" in impl:
        # the block mask is made once, before compiling (as examples/ebt/train.py does): made inside the
        # first compiled call, the model's mask cache changes and the second call compiles everything again
        model.block_mask(tokens.shape[1], tokens.device)
        loss_fn = torch.compile(model.loss, fullgraph=True, mode="reduce-overhead" if impl.endswith("_ro") else None)

        def step():
            if impl.endswith("_ro"):
                torch.compiler.cudagraph_mark_step_begin()
            model.zero_grad(set_to_none=True)
            loss_fn(tokens, targets).backward()
        return step

    def eager_step():
        model.zero_grad(set_to_none=False)
        model.loss(tokens, targets).backward()

    if impl != "flexebt_cudagraph":
        return eager_step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # kernels built, launches remembered, .grad buffers made
            eager_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eager_step()
    return graph.replay


def _time(step, reps: int) -> tuple:
    """(p20, p50, p80) ms of ``reps`` timed steps."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return tuple(times[min(len(times) - 1, int(q * len(times)))] for q in (0.2, 0.5, 0.8))


def _measure(impl: str, model, tokens, targets, reps: int) -> tuple:
    """((p20, p50, p80) ms per step, peak GiB above the model, seconds to the first finished step, gradients
    of the first step)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step = _stepper(impl, model, tokens, targets)
    step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    grads = _grads(model)
    for _ in range(2):  # warm: three steps in all before timing
        step()
    ms = _time(step, reps)
    return ms, (torch.cuda.max_memory_allocated() - base) / 2 ** 30, first_s, grads


def run_b3(args, meta, writer):
    CharEBT = _model_class()
    vocab, layers, dim, heads = 256, args.b3_layers, 768, 12
    torch._dynamo.config.trace_autograd_ops = True
    torch._dynamo.config.cache_size_limit = 64
    for dtype_name in args.b3_dtypes:
        dtype = getattr(torch, dtype_name)
        torch.set_float32_matmul_precision("high")
        for S in args.seqs:
            B = args.batch or max(1, args.b3_tokens // S)
            ref_grads = None
            for impl in args.b3_impls:  # in the order given
                os.environ["FLEXEBT_BACKEND"] = "REFERENCE" if "_math" in impl else "AUTO"
                if impl not in IMPLS:
                    raise ValueError(f"B3: unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")
                torch._dynamo.reset()
                torch.manual_seed(0)
                model = CharEBT(vocab, S, dim=dim, heads=heads, layers=layers, mcmc_steps=2).to("cuda", dtype)
                gen = torch.Generator(device="cuda").manual_seed(1)
                tokens = torch.randint(0, vocab, (B, S), device="cuda", generator=gen)
                targets = torch.randint(0, vocab, (B, S), device="cuda", generator=gen)
                peak = first_s = err = float("nan")
                ms = (float("nan"),) * 3
                note = ""
                try:
                    with _attention(impl):
                        ms, peak, first_s, grads = _measure(impl, model, tokens, targets, args.b3_reps)
                    if impl == "eager_math":
                        ref_grads = grads
                    elif ref_grads is not None and impl != "floor_compiled":
                        err = ((grads - ref_grads).norm() / ref_grads.norm()).item()
                    if impl.startswith("flexebt"):
                        from flexebt import runtime

                        launches = runtime.stats()["launches"]
                        note = f"{launches['entries']} launches remembered, {launches['hits']} re-issued so far"
                except torch.OutOfMemoryError:
                    note = "out of memory"
                except Exception as e:  # noqa: BLE001 - a failing implementation is a row, not the end of the run
                    note = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                del model
                torch.cuda.empty_cache()
                writer(dict(meta, suite="B3", impl=impl, variant=f"ebt_step_{layers}L_d{dim}_mcmc2", dtype=dtype_name,
                            B=B, H=heads, S=S, D=dim // heads, mode="train_step", ms=round(ms[1], 2),
                            p20_ms=round(ms[0], 2), p80_ms=round(ms[2], 2),
                            tflops=float("nan"), peak_mem_gib=round(peak, 3), first_step_s=round(first_s, 1),
                            grad_rel_err=f"{err:.2e}", note=note))
    os.environ.pop("FLEXEBT_BACKEND", None)
