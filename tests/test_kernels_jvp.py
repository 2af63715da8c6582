"""Forward mode (JVP) through the fused kernel (one pass: out, lse and their tangents) against the
reference, for torch.func.jvp and torch.autograd.forward_ad; compositions the kernels cannot
differentiate further raise instead of dropping terms."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import flexebt
from flexebt import masks, mods
from helpers import rel_err

pytestmark = pytest.mark.interpreter
T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}
S, D = 37, 16
CASES = {"plain": (None, None), "causal": (None, lambda: masks.causal_mask),
         "softcap": (lambda: mods.generate_tanh_softcap(2.0), lambda: masks.causal_mask),
         "alibi_window": (lambda: mods.generate_alibi_bias(2), lambda: masks.generate_sliding_window(9)),
         "empty_rows": (None, lambda: (lambda b, h, q, kv: (q % 7 != 3) & (kv <= q)))}


def _setup(case):
    sf, mf = CASES[case]
    sm = sf() if sf else None
    bm = flexebt.create_block_mask(mf(), None, None, S, S, device="cpu", BLOCK_SIZE=16) if mf else None
    x = tuple(torch.randn(1, 2, S, D) for _ in range(3))
    t = tuple(torch.randn_like(a) for a in x)
    return sm, bm, x, t


@pytest.mark.parametrize("case", list(CASES))
def test_func_jvp_matches_reference(case):
    sm, bm, x, t = _setup(case)

    def f(backend):
        return lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, return_lse=True,
                                                      kernel_options=backend)

    (o, lse), (do, dlse) = torch.func.jvp(f(T), x, t)
    (ro, rlse), (rdo, rdlse) = torch.func.jvp(f(R), x, t)
    assert rel_err(o, ro) < 1e-5 and rel_err(do, rdo) < 1e-5
    finite = torch.isfinite(rlse)
    assert rel_err(lse[finite], rlse[finite]) < 1e-5 and rel_err(dlse[finite], rdlse[finite]) < 1e-5
    assert torch.isfinite(do).all()


def test_forward_ad_matches_reference():
    sm, bm, x, t = _setup("softcap")
    res = {}
    for backend in (T, R):
        with fwAD.dual_level():
            duals = [fwAD.make_dual(a, b) for a, b in zip(x, t)]
            out = flexebt.flex_attention(*duals, score_mod=sm, block_mask=bm, kernel_options=backend)
            res[backend["BACKEND"]] = fwAD.unpack_dual(out).tangent
    assert rel_err(res["TRITON"], res["REFERENCE"]) < 1e-5


def test_nested_compositions_give_the_reference_values():
    """Forward over reverse, reverse over forward (functorch and torch.autograd.forward_ad): the
    call runs the reference (with a warning) rather than drop terms."""
    sm, bm, x, t = _setup("plain")
    k, v = x[1], x[2]

    def energy(q, backend=T):
        return flexebt.flex_attention(q, k.to(q.dtype), v.to(q.dtype), kernel_options=backend).square().sum()

    def close(a, b):
        assert rel_err(a, b) < 1e-5

    xd, td = x[0].double(), t[0].double()
    with pytest.warns(UserWarning):
        close(torch.func.jvp(torch.func.grad(energy), (x[0],), (t[0],))[1],
              torch.func.jvp(torch.func.grad(lambda q: energy(q, R)), (xd,), (td,))[1])
    close(torch.func.grad(lambda q: torch.func.jvp(energy, (q,), (t[0],))[1])(x[0]),
          torch.func.grad(lambda q: torch.func.jvp(lambda y: energy(y, R), (q,), (td,))[1])(xd))

    def fwad_then_grad(q, tangent, backend):
        q = q.clone().requires_grad_()
        with fwAD.dual_level():
            out = flexebt.flex_attention(fwAD.make_dual(q, tangent), k.to(q.dtype), v.to(q.dtype),
                                         kernel_options=backend)
            return torch.autograd.grad(fwAD.unpack_dual(out).tangent.square().sum(), q)[0]

    with pytest.warns(UserWarning, match="forward_ad"):
        got = fwad_then_grad(x[0], t[0], T)
    close(got, fwad_then_grad(xd, td, R))


@pytest.mark.parametrize("r", [0, 1, 3])
@pytest.mark.parametrize("case", ["plain", "softcap", "alibi_window"])
def test_ebt_func_jvp_matches_reference(case, r):
    sf, mf = {"plain": (None, None), "softcap": (lambda: mods.generate_tanh_softcap(2.0), lambda: masks.ebt_causal_mask),
              "alibi_window": (lambda: mods.generate_alibi_bias(2), lambda: masks.generate_sliding_window(6))}[case]
    S_p = 21
    S_o = S_p + r
    sm = sf() if sf else None
    bm = flexebt.create_ebt_block_mask(mf(), None, None, S_o, S_p, BLOCK_SIZE=16) if mf else None
    x = tuple(torch.randn(1, 2, S, 16) for S in (S_o, S_o, S_o, S_p, S_p, S_p))
    t = tuple(torch.randn_like(a) for a in x)

    def f(backend):
        return lambda *a: flexebt.flex_ebt_attention(*a, score_mod=sm, block_mask=bm, return_lse=True,
                                                     kernel_options=backend)

    _, got = torch.func.jvp(f(T), x, t)
    _, want = torch.func.jvp(f(R), x, t)
    for a, b in zip(got, want):
        finite = torch.isfinite(b)
        assert rel_err(a[finite], b[finite]) < 1e-5


def test_gqa_jvp():
    x = (torch.randn(1, 4, 29, 16), torch.randn(1, 2, 29, 16), torch.randn(1, 2, 29, 16))
    t = tuple(torch.randn_like(a) for a in x)
    sm = mods.generate_alibi_bias(4)

    def f(backend):
        return lambda *a: flexebt.flex_attention(*a, score_mod=sm, enable_gqa=True, kernel_options=backend)

    assert rel_err(torch.func.jvp(f(T), x, t)[1], torch.func.jvp(f(R), x, t)[1]) < 1e-5
    y = tuple(torch.randn(1, h, L, 16) for h, L in ((4, 21), (2, 21), (2, 21), (4, 20), (2, 20), (2, 20)))
    u = tuple(torch.randn_like(a) for a in y)

    def g(backend):
        return lambda *a: flexebt.flex_ebt_attention(*a, enable_gqa=True, kernel_options=backend)

    for a, b in zip(torch.func.jvp(g(T), y, u)[1], torch.func.jvp(g(R), y, u)[1]):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("fn", ["flex", "ebt", "piecewise"])
def test_tangent_of_a_captured_tensor_is_refused_not_dropped(fn):
    """A captured bias table made dual (forward_ad.make_dual) without requires_grad: the kernels pass
    it detached, which would drop its tangent; they refuse, and the reference gives the tangent
    dense math gives."""
    L = 17
    xs = [torch.randn(1, 2, L, 16, dtype=torch.float64) for _ in range(6)]
    bias, tb = 0.3 * torch.randn(2, L + 1, L + 1, dtype=torch.float64), torch.randn(2, L + 1, L + 1, dtype=torch.float64)

    def call(bd, backend, q_tangent=None):
        def sm(s, b, h, q_idx, kv_idx):
            return s + bd[h, q_idx, kv_idx]
        x = [a.to(bd.dtype) for a in xs]  # (float32 for the kernels)
        if q_tangent is not None:
            x[0] = fwAD.make_dual(x[0], q_tangent.to(bd.dtype))
        if fn == "flex":
            return [flexebt.flex_attention(*x[:3], score_mod=sm, kernel_options=backend)]
        if fn == "ebt":
            return list(flexebt.flex_ebt_attention(*x, score_mod=sm, kernel_options=backend))
        return [flexebt.piecewise_attention(*x[:5], dist_threshold=4, score_mod=sm, kernel_options=backend)]

    for q_tangent in (None, torch.randn_like(xs[0])):
        with fwAD.dual_level():
            bd = fwAD.make_dual(bias.float(), tb.float())
            with pytest.raises(NotImplementedError, match="forward-mode tangent"):
                call(bd, T, q_tangent)
        with fwAD.dual_level():  # the reference's tangents against a second forward difference of dense math
            got = [fwAD.unpack_dual(o).tangent for o in call(fwAD.make_dual(bias, tb), R, q_tangent)]
        eps = 1e-6
        plus = call(bias + eps * tb, R) if q_tangent is None else None
        if plus is not None:
            minus = call(bias - eps * tb, R)
            for g, a, b in zip(got, plus, minus):
                assert g is not None and rel_err(g, (a - b) / (2 * eps)) < 1e-6


def test_transforms_over_captured_tensors_and_third_order_take_the_reference():
    """torch.func.grad with respect to a tensor a mod captures (a closure's bias; a model's table
    through functional_call), vmap over a batch of biases alone, and three nested torch.func.grad:
    the kernels take captured tensors by identity and differentiate their double backward only
    through autograd, so these calls run the reference (with a warning) and give its values."""
    L = 17
    q, k, v = (torch.randn(1, 2, L, 16) for _ in range(3))
    bias = 0.3 * torch.randn(2, L, L)

    def energy(q, b, backend):
        def sm(s, bb, h, q_idx, kv_idx):
            return s + b[h, q_idx, kv_idx]
        return flexebt.flex_attention(q, k, v, score_mod=sm, kernel_options=backend).square().sum()

    with pytest.warns(UserWarning, match="a mod capturing a tensor of a torch.func transform"):
        got = torch.func.grad(energy, argnums=(0, 1))(q, bias, T)
    want = torch.func.grad(energy, argnums=(0, 1))(q, bias, R)
    assert all(rel_err(a, b) < 1e-6 for a, b in zip(got, want))

    class Biased(torch.nn.Module):
        def __init__(self, backend):
            super().__init__()
            self.table, self.backend = torch.nn.Parameter(bias.clone()), backend

        def score_mod(self, s, b, h, q_idx, kv_idx):
            return s + self.table[h, q_idx, kv_idx]

        def forward(self, q):
            return flexebt.flex_attention(q, k, v, score_mod=self.score_mod, kernel_options=self.backend)

    grads = []
    for backend in (T, R):
        model = Biased(backend)
        params = dict(model.named_parameters())
        grads.append(torch.func.grad(lambda p, x: torch.func.functional_call(model, p, (x,)).square().sum())(
            params, q)["table"])
    assert rel_err(*grads) < 1e-6

    biases = 0.3 * torch.randn(3, 2, L, L)

    def attend(b, backend):
        def sm(s, bb, h, q_idx, kv_idx):
            return s + b[h, q_idx, kv_idx]
        return flexebt.flex_attention(q, k, v, score_mod=sm, kernel_options=backend)

    got = torch.func.vmap(lambda b: attend(b, T))(biases)
    assert rel_err(got, torch.stack([attend(b, T) for b in biases])) < 1e-6

    def f(x, backend):
        return flexebt.flex_attention(x, k, v, kernel_options=backend).square().sum()

    third = [torch.func.grad(lambda y: torch.func.grad(lambda z: torch.func.grad(lambda w: f(w, be))(z).square().sum())(
        y).square().sum())(q) for be in (T, R)]
    assert rel_err(*third) < 1e-5
