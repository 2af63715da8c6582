"""The fast re-launch path (kernels/launcher.py, design D45) with a stand-in for a Triton kernel:
a launch is re-issued without Triton's binding only when everything Triton's choice of compiled
kernel depends on is unchanged; anything new goes through ``kernel[grid]``.  (On CPU the real
kernels run in the interpreter, which never takes this path; the GPU tests run it.)"""

import types

import torch

import flexebt.kernels.flex as kf
from flexebt.kernels.configs import TileConfig
from flexebt.kernels.grid import GridOrder
from flexebt.kernels.launcher import FastLaunches


class FakeKernel:
    """Records launches: ``kernel[grid](...)`` (Triton's path) and ``compiled[grid](...)`` (fast)."""

    PARAMS = ("x", "n", "scale", "HEAD_GROUP", "BLOCK_M", "BLOCK_N", "FLAG")

    def __init__(self):
        self.jit_calls, self.fast_calls = [], []
        kernel = self

        class Compiled:
            n_regs, n_spills, metadata = 0, 0, None

            def __getitem__(self, grid):
                return lambda *args: kernel.fast_calls.append((grid, args))

        self.compiled = Compiled()

    def __getitem__(self, grid):
        def run(*args, num_warps, num_stages, **kw):
            self.jit_calls.append((grid, args, kw))
            return self.compiled
        return run

    def binder(self, *args, **kw):
        bound = dict(zip(self.PARAMS, args))
        bound.update({p: kw[p] for p in self.PARAMS[len(args):]})
        return bound, None, None


def _launches(binder_fails=False):
    fl = FastLaunches(enabled=True)
    real = fl.remember

    def remember(key, kernel, compiled, grid, args, kwargs, binder=None):
        def broken(*a, **k):
            raise AttributeError("no binder in this Triton")
        return real(key, kernel, compiled, grid, args, kwargs, broken if binder_fails else kernel.binder)

    fl.remember = remember
    return fl


def _launch(monkeypatch, fl, kernel, x, n=7, scale=0.5, flag=True):
    monkeypatch.setattr(kf, "_FAST", fl)
    monkeypatch.setattr(kf, "head_group", lambda *a: 2)
    monkeypatch.setattr(kf, "interpreting", lambda: False)  # the test session sets TRITON_INTERPRET
    monkeypatch.setattr(kf, "resident_programs", lambda *a: 2)
    cfg = TileConfig(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    order = GridOrder("fwd", 6, 100, "BLOCK_M", 1024)
    kf._launch(kernel, order, lambda c: (x, n, scale), dict(FLAG=flag), cfg, ("test",), None, torch.device("cuda", 0))


def test_second_launch_skips_triton_binding(monkeypatch):
    k, fl = FakeKernel(), _launches()
    x = torch.zeros(64)
    _launch(monkeypatch, fl, k, x)
    assert len(k.jit_calls) == 1 and not k.fast_calls
    _launch(monkeypatch, fl, k, x)
    assert len(k.jit_calls) == 1 and len(k.fast_calls) == 1
    grid, args = k.fast_calls[0]
    assert grid == (2 * 6, 1, 1)  # 2 tiles of 64 rows x 6 heads
    # our positional arguments, then Triton's bound values of the remaining parameters in order
    assert args[:3] == (x, 7, 0.5) and args[3:] == (2, 64, 32, True)


def test_anything_triton_specializes_on_misses(monkeypatch):
    k, fl = FakeKernel(), _launches()
    base = torch.zeros(64)
    _launch(monkeypatch, fl, k, base)
    _launch(monkeypatch, fl, k, base[1:])           # not 16-byte aligned
    _launch(monkeypatch, fl, k, base.double())      # another dtype
    _launch(monkeypatch, fl, k, base, n=16)         # an integer of another value (class)
    _launch(monkeypatch, fl, k, base, n=1)          # Triton specializes the int 1 ...
    _launch(monkeypatch, fl, k, base, n=True)       # ... and True == 1 is a bool, not that int
    _launch(monkeypatch, fl, k, base, flag=False)   # a constexpr
    assert len(k.jit_calls) == 7 and not k.fast_calls
    _launch(monkeypatch, fl, k, torch.ones(64))     # another aligned float32 tensor: same kernel
    assert len(k.fast_calls) == 1 and k.fast_calls[0][1][0] is not base


def test_a_new_kernel_object_with_a_reused_id_is_not_confused(monkeypatch):
    k, fl = FakeKernel(), _launches()
    x = torch.zeros(64)
    _launch(monkeypatch, fl, k, x)
    other = FakeKernel()
    key = next(iter(fl._entries))
    fl._entries[(id(other),) + key[1:]] = fl._entries.pop(key)  # as if `other` took k's id
    _launch(monkeypatch, fl, other, x)
    assert len(other.jit_calls) == 1 and not other.fast_calls and not k.fast_calls


def test_without_a_usable_binder_every_launch_goes_through_triton(monkeypatch):
    k, fl = FakeKernel(), _launches(binder_fails=True)
    x = torch.zeros(64)
    for _ in range(3):
        _launch(monkeypatch, fl, k, x)
    assert len(k.jit_calls) == 3 and not k.fast_calls and not fl.enabled


def test_switched_by_environment(monkeypatch):
    monkeypatch.setenv("FLEXEBT_FAST_LAUNCH", "0")
    assert not FastLaunches().enabled
    monkeypatch.setenv("FLEXEBT_FAST_LAUNCH", "1")
    assert FastLaunches().enabled
    monkeypatch.delenv("FLEXEBT_FAST_LAUNCH")
    assert not FastLaunches().enabled  # opt-in until validated on the GPU machine (design D45)


def test_unhashable_values_are_never_fast():
    fl = FastLaunches(enabled=True)
    assert fl.key(object(), 0, 4, (torch.zeros(2),), {"X": [1, 2]}) is None
    assert not fl.launch(None, object(), ())


def test_descriptor_signature_carries_its_block_shape():
    from flexebt.kernels.launcher import _arg_signature

    t = torch.zeros(4, 64, 16)
    d = types.SimpleNamespace(base=t, shape=list(t.shape), strides=list(t.stride()), block_shape=[1, 32, 16])
    e = types.SimpleNamespace(base=t, shape=list(t.shape), strides=list(t.stride()), block_shape=[1, 64, 16])
    assert _arg_signature((d,)) != _arg_signature((e,))
    assert _arg_signature((d,)) == _arg_signature((d,))
    assert _arg_signature((object(),)) is None  # an unknown kind of argument: never fast
    assert FastLaunches(enabled=True).key(object(), 0, 4, (object(),), {}) is None
