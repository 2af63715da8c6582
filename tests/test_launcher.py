"""The fast re-launch path (kernels/launcher.py, design D45) with stand-ins for Triton kernels:
a launch is re-issued without Triton's binding only when its pass's launch plan key is unchanged,
and an unchanged key must mean the very launch Triton would make -- the same grid, the same
constexprs, the same specialization of every argument.  The passes of kernels/flex.py run here
for real (planning, tables, allocation) with stand-in kernels on CPU tensors; the GPU tests run
the path with the real kernels (tests/test_gpu_fast_launch.py)."""

import types

import torch

import flexebt
import flexebt.kernels.flex as kf
from flexebt import masks
from flexebt.kernels.configs import TileConfig
from flexebt.kernels.grid import GridOrder
from flexebt.kernels.launcher import FastLaunches


def _specialization(a):
    """What Triton specializes an argument on (conservatively: integers by value); an argument
    group (a named tuple) field by field."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, tuple):
        return type(a), tuple(map(_specialization, a))
    return type(a), a if not isinstance(a, float) else None


def _triton_signature(grid, args, kw):
    """What Triton's choice of compiled kernel and its launch depend on, for comparing launches."""
    return grid, tuple(map(_specialization, args)), tuple(sorted(kw.items()))


class FakeKernel:
    """Records launches: ``kernel[grid](...)`` (Triton's path) and ``compiled[grid](...)`` (fast).
    The compiled stand-in remembers the signature of the Triton launch that made it."""

    def __init__(self):
        self.jit_calls, self.fast_calls = [], []

    def __getitem__(self, grid):
        def run(*args, num_warps, num_stages, **kw):
            sig = _triton_signature(grid, args, dict(kw, num_warps=num_warps, num_stages=num_stages))
            self.jit_calls.append((grid, args, kw, sig))
            kernel = self

            class Compiled:
                n_regs, n_spills, metadata = 0, 0, None

                def __getitem__(self, g):
                    return lambda *a: kernel.fast_calls.append((g, a, sig))
            return Compiled()
        return run

    @staticmethod
    def binder(*args, **kw):
        bound = {f"arg{i}": a for i, a in enumerate(args)}
        bound.update(kw)
        return bound, None, None


def _cpu_launches(enabled=True, binder_fails=False):
    """A FastLaunches that serves CPU tensors and binds with the stand-in's binder."""
    fl = FastLaunches(enabled=enabled)
    fl.device_type = "cpu"
    real = fl.remember

    def remember(key, kernel, compiled, grid, args, kwargs, extra=None, binder=None):
        def broken(*a, **k):
            raise AttributeError("no binder in this Triton")
        return real(key, kernel, compiled, grid, args, kwargs, extra, broken if binder_fails else kernel.binder)

    fl.remember = remember
    return fl


def _fast(monkeypatch, binder_fails=False, enabled=True):
    fl = _cpu_launches(enabled, binder_fails)
    monkeypatch.setattr(kf, "_FAST", fl)
    monkeypatch.setattr(kf, "interpreting", lambda: False)  # the test session sets TRITON_INTERPRET
    return fl


def _launch(kernel, x, plan=("plan",), n=7, flag=True):
    cfg = TileConfig(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    order = GridOrder("fwd", 6, 100, "BLOCK_M", 1024)
    kf._launch(kernel, plan, lambda c, tma: (x, n, 0.5), lambda: (order, dict(FLAG=flag), cfg, ("test",)), None,
               torch.device("cpu"))


def test_second_launch_skips_triton_binding(monkeypatch):
    k, fl = FakeKernel(), _fast(monkeypatch)
    x = torch.zeros(64)
    _launch(k, x)
    assert len(k.jit_calls) == 1 and not k.fast_calls
    y = torch.ones(64)
    _launch(k, y)
    assert len(k.jit_calls) == 1 and len(k.fast_calls) == 1 and fl.hits == 1
    grid, args, _ = k.fast_calls[0]
    assert grid == (2 * 6, 1, 1)  # 2 tiles of 64 rows x 6 heads (one head per group off CUDA)
    # our positional arguments for this call, then Triton's bound values of the other parameters
    assert args[0] is y and args[1:3] == (7, 0.5) and args[3:] == (True, 1, 64, 32)


def test_another_plan_goes_through_triton(monkeypatch):
    k, fl = FakeKernel(), _fast(monkeypatch)
    x = torch.zeros(64)
    _launch(k, x)
    _launch(k, x, plan=("other plan",), flag=False)
    assert len(k.jit_calls) == 2 and not k.fast_calls and fl.hits == 0
    assert k.jit_calls[1][2]["FLAG"] is False


def test_a_new_kernel_object_with_a_reused_id_is_not_confused(monkeypatch):
    k, fl = FakeKernel(), _fast(monkeypatch)
    x = torch.zeros(64)
    _launch(k, x)
    other = FakeKernel()
    entries = fl.store._entries
    key = next(iter(entries))
    entries[(id(other),) + key[1:]] = entries.pop(key)  # as if `other` took k's id
    _launch(other, x)
    assert len(other.jit_calls) == 1 and not other.fast_calls and not k.fast_calls


def test_without_a_usable_binder_every_launch_goes_through_triton(monkeypatch):
    k, fl = FakeKernel(), _fast(monkeypatch, binder_fails=True)
    x = torch.zeros(64)
    for _ in range(3):
        _launch(k, x)
    assert len(k.jit_calls) == 3 and not k.fast_calls and not fl.enabled


def test_switched_by_environment(monkeypatch):
    monkeypatch.setenv("FLEXEBT_FAST_LAUNCH", "0")
    assert not FastLaunches().enabled
    monkeypatch.setenv("FLEXEBT_FAST_LAUNCH", "1")
    assert FastLaunches().enabled
    monkeypatch.delenv("FLEXEBT_FAST_LAUNCH")
    assert FastLaunches().enabled  # on by default (validated on the GPU: tests/test_gpu_fast_launch.py)


def test_unhashable_values_are_never_fast(monkeypatch):
    k, fl = FakeKernel(), _fast(monkeypatch)
    x = torch.zeros(64)
    for _ in range(2):
        _launch(k, x, plan=("plan", [1, 2]))
    assert len(k.jit_calls) == 2 and not k.fast_calls and fl.enabled


# ---- the passes' plan keys: an equal key must mean an equal Triton launch ---------------------


def _kern():
    """A stand-in ModKernels: the first-order kernels of a mod without score_mod."""
    module = types.SimpleNamespace(flex_fwd=FakeKernel(), flex_bwd_dq=FakeKernel(), flex_bwd_dkdv=FakeKernel())
    return types.SimpleNamespace(module=module, gathers=False, traced_score=None, grad_slots=[])


def _unaligned(*shape, dtype=torch.bfloat16):
    """A contiguous tensor whose data does not start on a 16-byte boundary."""
    n = 1
    for s in shape:
        n *= s
    return torch.zeros(n + 1, dtype=dtype)[1:].view(*shape)


def _pass_inputs(B=1, H=2, Hkv=2, Sq=100, Skv=100, D=32, dtype=torch.bfloat16, block=32, mask=True,
                 q=None, k=None, dout=None, dlse=False):
    mk = lambda *s: torch.zeros(*s, dtype=dtype)  # noqa: E731
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, Sq, Skv, device="cpu", BLOCK_SIZE=block) \
        if mask else None
    return dict(q=mk(B, H, Sq, D) if q is None else q, k=mk(B, Hkv, Skv, D) if k is None else k,
                v=mk(B, Hkv, Skv, D), tables=kf.tables_from_block_mask(bm, Sq, Skv, "cpu"),
                dout=mk(B, H, Sq, D) if dout is None else dout,
                dlse=torch.zeros(B, H, Sq) if dlse else None)


def _run_passes(kern, x, options=None, scale=0.125):
    out, lse, msum = kf.flex_forward(kern, x["q"], x["k"], x["v"], scale, x["tables"], [], options)
    dq, delta, ref, _ = kf.dq_pass(kern, x["q"], x["k"], x["v"], out, msum, x["dout"], x["dlse"], scale,
                                   x["tables"], [], options)
    kf.dkdv_pass(kern, x["q"], x["k"], x["v"], ref, delta, x["dout"], scale, x["tables"], [], options)


# Each case changes one thing Triton or the pass's planning depends on, or nothing that matters.
_CASES = {
    "base": lambda: (_pass_inputs(), None, 0.125),
    "same shapes, new tensors": lambda: (_pass_inputs(), None, 0.125),
    "another scale": lambda: (_pass_inputs(), None, 0.3),
    "negative scale": lambda: (_pass_inputs(), None, -0.3),
    "longer queries": lambda: (_pass_inputs(Sq=130), None, 0.125),
    "longer keys": lambda: (_pass_inputs(Skv=64), None, 0.125),
    "more batches": lambda: (_pass_inputs(B=3), None, 0.125),
    "gqa": lambda: (_pass_inputs(H=4, Hkv=2), None, 0.125),
    "head dim 64": lambda: (_pass_inputs(D=64), None, 0.125),
    "fp32": lambda: (_pass_inputs(dtype=torch.float32), None, 0.125),
    "fp32, tf32 allowed": lambda: (_pass_inputs(dtype=torch.float32), None, 0.125, "high"),
    "fp32, IEEE products asked": lambda: (_pass_inputs(dtype=torch.float32), {"FP32_PRODUCTS": "ieee"}, 0.125),
    "fp16": lambda: (_pass_inputs(dtype=torch.float16), None, 0.125),
    "no block mask": lambda: (_pass_inputs(mask=False), None, 0.125),
    "block size 64": lambda: (_pass_inputs(block=64), None, 0.125),
    "unaligned q": lambda: (_pass_inputs(q=_unaligned(1, 2, 100, 32)), None, 0.125),
    "unaligned k": lambda: (_pass_inputs(k=_unaligned(1, 2, 100, 32)), None, 0.125),
    "unaligned dout": lambda: (_pass_inputs(dout=_unaligned(1, 2, 100, 32)), None, 0.125),
    "strided q": lambda: (_pass_inputs(q=torch.zeros(1, 100, 2, 32, dtype=torch.bfloat16).transpose(1, 2)),
                          None, 0.125),
    "dlse": lambda: (_pass_inputs(dlse=True), None, 0.125),
    "tile options": lambda: (_pass_inputs(), {"BLOCK_M": 16, "BLOCK_N2": 16}, 0.125),
    "order option": lambda: (_pass_inputs(), {"REVERSE_Q_ORDER": 0}, 0.125),
    "warps option": lambda: (_pass_inputs(), {"num_warps": 8}, 0.125),
}


def test_equal_plan_keys_mean_equal_triton_launches(monkeypatch):
    kern, fast = _kern(), _cpu_launches()
    for name, case in list(_CASES.items()) + list(_CASES.items()):  # the second round hits
        x, options, scale, *precision = case()
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: (precision or ["highest"])[0])
        _check_same_launches(monkeypatch, kern, fast, name, lambda: _run_passes(kern, x, options, scale))
    for kn in vars(kern.module).values():
        assert len(kn.fast_calls) >= len(_CASES)  # every case hit in the second round


def _check_same_launches(monkeypatch, kern, fast, name, run):
    """Run the passes through Triton's own path, then through ``fast``: each kernel launches once,
    and a re-issued launch must have been made for a signature equal to Triton's."""
    slow = _fast(monkeypatch, enabled=False)
    marks = {n: len(kn.jit_calls) for n, kn in vars(kern.module).items()}
    run()
    want = {n: kn.jit_calls[marks[n]][3] for n, kn in vars(kern.module).items()}
    assert slow.hits == 0
    monkeypatch.setattr(kf, "_FAST", fast)
    marks = {n: (len(kn.jit_calls), len(kn.fast_calls)) for n, kn in vars(kern.module).items()}
    run()
    for n, kn in vars(kern.module).items():
        new_jit, new_fast = kn.jit_calls[marks[n][0]:], kn.fast_calls[marks[n][1]:]
        assert len(new_jit) + len(new_fast) == 1
        got = new_jit[0][3] if new_jit else new_fast[0][2]
        assert got == want[n], f"{name}: {n} re-issued a launch Triton would not make"


def _all_kern():
    """A stand-in ModKernels with every entry kernel."""
    from flexebt.kernels.signatures import SIGNATURES

    module = types.SimpleNamespace(**{name: FakeKernel() for name in SIGNATURES})
    return types.SimpleNamespace(module=module, gathers=False, traced_score=None, grad_slots=[])


def _ebt_inputs(S=100, S2=None, dtype=torch.bfloat16, own_dtype=None, kp=None, gkp=None, q_off=0, H=2, Hkv=2,
                q2=None):
    """Inputs of every pass of an EBT call: the observed stream over the keys, the predicted stream
    (length S2) with its own keys, and the double backward's cotangents."""
    S2 = S if S2 is None else S2
    mk = lambda *s, dt=dtype: torch.zeros(*s, dtype=dt)  # noqa: E731
    D, B = 32, 1
    own_dtype = own_dtype or dtype
    q2 = mk(B, H, S2, D) if q2 is None else q2
    own = kf.OwnKeys(kp=mk(B, Hkv, S2, D, dt=own_dtype) if kp is None else kp, vp=mk(B, Hkv, S2, D, dt=own_dtype),
                     keep=torch.ones(B, H, S2, dtype=torch.int8))
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=32)
    bm2 = flexebt.create_block_mask(masks.causal_mask, None, None, S2, S, device="cpu", BLOCK_SIZE=32)
    return dict(q=mk(B, H, S, D), k=mk(B, Hkv, S, D), v=mk(B, Hkv, S, D), q2=q2, own=own, q_off=q_off,
                tables=kf.tables_from_block_mask(bm, S, S, "cpu"), tables2=kf.tables_from_block_mask(bm2, S2, S, "cpu"),
                own_cts=(mk(B, Hkv, S2, D) if gkp is None else gkp, mk(B, Hkv, S2, D)))


def _run_ebt_passes(kern, x, scale=0.125):
    """Each entry kernel once: the predicted stream's forward, dq and forward mode with own keys,
    the dk/dv pass of its queries (the observed stream's passes are single-stream ones), the double
    backward's three passes with own keys."""
    q, k, v, q2, own, t, t2, off = x["q"], x["k"], x["v"], x["q2"], x["own"], x["tables"], x["tables2"], x["q_off"]
    out, lse, msum = kf.flex_forward(kern, q2, k, v, scale, t2, [], None, off, own)
    dout = torch.zeros_like(out)
    _, delta, ref, _ = kf.dq_pass(kern, q2, k, v, out, msum, dout, None, scale, t2, [], None, off, own)
    kf.dkdv_pass(kern, q2, k, v, ref, delta, dout, scale, t2, [], None, off)
    g = (torch.zeros_like(q2), torch.zeros_like(k), torch.zeros_like(v))
    _, stats, ref2 = kf.dbwd_rows_pass(kern, q2, k, v, out, dout, msum, None, *g, scale, t2, [], None, off, own,
                                       x["own_cts"])
    kf.dbwd_dq_pass(kern, q2, k, v, out, dout, msum, None, *g, stats, scale, t2, [], None, off, own, x["own_cts"])
    kf.dbwd_dkdv_pass(kern, q2, k, v, out, dout, ref2, None, *g, stats, scale, t2, [], None, off)
    kf.flex_jvp(kern, q2, k, v, *g, scale, t2, [], None, off, own, x["own_cts"])


# Cases for the passes with argument groups: each changes one thing in a group's tensors or sizes.
_EBT_CASES = {
    "base": lambda: _ebt_inputs(),
    "same shapes, new tensors": lambda: _ebt_inputs(),
    "frame offset": lambda: _ebt_inputs(q_off=100),
    "frame offset 1": lambda: _ebt_inputs(q_off=1),
    "shorter predicted stream": lambda: _ebt_inputs(S2=64),
    "gqa": lambda: _ebt_inputs(H=4, Hkv=2),
    "fp32 own keys": lambda: _ebt_inputs(own_dtype=torch.float32),
    "unaligned predicted queries": lambda: _ebt_inputs(q2=_unaligned(1, 2, 100, 32)),
    "unaligned own keys": lambda: _ebt_inputs(kp=_unaligned(1, 2, 100, 32)),
    "unaligned own-key cotangents": lambda: _ebt_inputs(gkp=_unaligned(1, 2, 100, 32)),
}


def test_equal_plan_keys_mean_equal_triton_launches_of_grouped_arguments(monkeypatch):
    """As above, for every entry kernel and the argument groups: the own keys, the predicted
    stream's dk/dv pass (its frame offset and tables), the double backward and forward mode."""
    kern, fast = _all_kern(), _cpu_launches()
    for name, case in list(_EBT_CASES.items()) + list(_EBT_CASES.items()):
        x = case()
        _check_same_launches(monkeypatch, kern, fast, name, lambda: _run_ebt_passes(kern, x))
    for kn in vars(kern.module).values():
        assert len(kn.fast_calls) >= len(_EBT_CASES)


def test_wrap_launches_sees_every_pass_and_restores_the_launch():
    """The benchmark tools' instrumentation point: every pass of a call goes through the wrapper,
    named by its declared kernel, and the launch is restored after the block."""
    import flexebt
    import flexebt.kernels.flex as kf
    from flexebt.kernels.signatures import SIGNATURES

    seen = []

    def record(launch):
        def wrapped(kernel, plan, args, spec, options, device):
            seen.append(kernel.fn.__name__)  # recorded, not run (the outputs stay unwritten)
        return wrapped

    real = kf._launch
    x = [torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3)]
    with kf.wrap_launches(record):
        out = flexebt.flex_attention(*x, kernel_options={"BACKEND": "TRITON"})
        torch.autograd.grad(out, x, torch.ones_like(out))
    assert kf._launch is real
    assert seen == ["flex_fwd", "flex_bwd_dq", "flex_bwd_dkdv"] and set(seen) <= set(SIGNATURES)
