"""EBT two-stream Triton kernels in the interpreter against the float64 reference:
r = 0, 1, 3; causal, sliding-window and random frame masks; learned frame bias with gradient;
soft-cap; GQA; fully masked rows; odd lengths; first order, and second order through the chain."""

import pytest
import torch

import flexebt
from flexebt import masks, mods
from helpers import rel_err, second_order
from spec_tolerance import BOUND

pytestmark = pytest.mark.interpreter
T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}


def _random_frame_mask(F):
    m = torch.rand(F, F) < 0.6
    m[4] = False  # frame 4 keeps nothing: observed row 4 and a predicted row are empty
    return masks.generate_frame_mask(m)


MASKS = {"none": lambda F: None, "causal": lambda F: masks.ebt_causal_mask,
         "sliding_window": lambda F: masks.generate_sliding_window(5), "random": _random_frame_mask}
MODS = {"none": lambda F, H: None, "frame_bias": lambda F, H: mods.generate_bias_score_mod(
    (0.5 * torch.randn(H, F, F)).requires_grad_()), "softcap": lambda F, H: mods.generate_tanh_softcap(2.0),
    "alibi": lambda F, H: mods.generate_alibi_bias(H)}
CASES = [(m, "none") for m in MASKS] + [("causal", s) for s in ("frame_bias", "softcap", "alibi")] + \
        [("random", "frame_bias")]


def _captured(sm):
    return [c.cell_contents for c in (getattr(sm, "__closure__", None) or [])
            if isinstance(c.cell_contents, torch.Tensor) and c.cell_contents.requires_grad]


def _run(mask, mod, r, dtype=torch.float32, B=1, H=2, Hkv=None, S_p=19, D=16, block=16):
    Hkv = Hkv or H
    S_o = S_p + r
    F = S_o + 1
    mm, sm = MASKS[mask](F), MODS[mod](F, H)
    bm = flexebt.create_ebt_block_mask(mm, None, None, S_o, S_p, BLOCK_SIZE=block) if mm else None
    x0 = [torch.randn(B, h, S, D) for h, S in ((H, S_o), (Hkv, S_o), (Hkv, S_o), (H, S_p), (Hkv, S_p), (Hkv, S_p))]
    cap = _captured(sm)
    gqa = Hkv != H

    def run(xd, backend):
        x = [t.to(xd).requires_grad_() for t in x0]
        outs = flexebt.flex_ebt_attention(*x, score_mod=sm, block_mask=bm, enable_gqa=gqa, return_lse=True,
                                          kernel_options=backend)
        g_o, g_p = (torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
                    for i, o in enumerate(outs[:2]))
        lse_w = torch.linspace(0, 1, S_p, dtype=torch.float64)
        loss = (outs[0].double() * g_o).sum() + (outs[1].double() * g_p).sum() + \
            (torch.where(torch.isfinite(outs[3]), outs[3], 0).double() * lse_w).sum()
        return outs, torch.autograd.grad(loss, x + cap)

    outs, grads = run(dtype, T)
    routs, rgrads = run(torch.float64, R)
    tol = BOUND[dtype]
    for name, a, b in zip(["out_o", "out_p"], outs[:2], routs[:2]):
        assert rel_err(a, b) < tol, name
    for name, a, b in zip(["lse_o", "lse_p"], outs[2:], routs[2:]):
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        assert rel_err(a[torch.isfinite(b)], b[torch.isfinite(b)]) < tol, name
    for name, a, b in zip(["dq_o", "dk_o", "dv_o", "dq_p", "dk_p", "dv_p", "dbias"], grads, rgrads):
        assert torch.isfinite(a).all() and rel_err(a, b) < 3 * tol, name
    return outs


@pytest.mark.parametrize("r", [0, 1, 3])
@pytest.mark.parametrize("mask,mod", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_matches_reference(mask, mod, r):
    _run(mask, mod, r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    _run("causal", "frame_bias", 1, dtype=dtype)


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa(Hkv):
    _run("causal", "alibi", 1, H=4, Hkv=Hkv, B=2)


def test_head_dims_and_lengths():
    _run("causal", "none", 2, S_p=37, D=64)
    _run("sliding_window", "none", 0, S_p=16, D=32, block=32)


def test_streams_of_different_lengths():
    """The observed stream's tiles all inside (S_o = 32), the predicted stream's not (S_p = 29), and
    under GQA: both streams' key passes add into the observed keys' gradients."""
    _run("causal", "softcap", 3, S_p=29, H=4, Hkv=2)
    _run("sliding_window", "frame_bias", 3, S_p=29)


def test_tma_and_pointer_loads_agree():
    """USE_TMA (q / dO tiles through descriptors in the dk/dv passes, K / V in the forward and dq
    passes): the same outputs and gradients, bit for bit."""
    torch.manual_seed(0)
    bm = flexebt.create_ebt_block_mask(None, None, None, 32, 29, BLOCK_SIZE=16)
    x0 = [torch.randn(1, h, S, 16) for h, S in ((4, 32), (2, 32), (2, 32), (4, 29), (2, 29), (2, 29))]

    def run(options):
        x = [t.clone().requires_grad_() for t in x0]
        outs = flexebt.flex_ebt_attention(*x, score_mod=mods.generate_tanh_softcap(2.0), block_mask=bm,
                                          enable_gqa=True, kernel_options=options)
        return (*outs, *torch.autograd.grad(sum((o * o).sum() for o in outs), x))

    for a, b in zip(run({**T, "USE_TMA": True}), run(T)):
        assert torch.equal(a, b)


def test_fully_masked_rows_are_zero():
    outs = _run("random", "none", 0)
    # frame 4: observed row 4 and predicted row 3 (frame = i + 1) keep nothing
    assert torch.all(outs[0][:, :, 4] == 0) and torch.all(outs[1][:, :, 3] == 0)
    assert torch.all(outs[2][:, :, 4] == float("-inf")) and torch.all(outs[3][:, :, 3] == float("-inf"))


def test_second_order_through_the_chain():
    bias = (0.3 * torch.randn(20, 20)).requires_grad_()
    sm = mods.generate_bias_score_mod(bias)
    bm = flexebt.create_ebt_block_mask(None, None, None, 19, 18, BLOCK_SIZE=16)
    x = [torch.randn(1, 2, S, 16, requires_grad=True) for S in (19, 19, 19, 18, 18, 18)]

    def f(backend):
        return lambda *a: flexebt.flex_ebt_attention(*a[:6], score_mod=sm, block_mask=bm, kernel_options=backend)

    a1, a2 = second_order(f(T), x + [bias])
    b1, b2 = second_order(f(R), x + [bias])
    for u, w in zip(a1 + a2, b1 + b2):
        assert rel_err(u, w) < 1e-4


def test_compat_runs_on_the_kernels(monkeypatch):
    monkeypatch.setenv("FLEXEBT_BACKEND", "TRITON")
    x = [torch.randn(1, 2, 17, 16) for _ in range(6)]
    mask = torch.tril(torch.ones(18, 18, dtype=torch.bool))
    out = flexebt.compat.ebt_attention(*x, attn_mask=mask, causal=True)
    monkeypatch.setenv("FLEXEBT_BACKEND", "REFERENCE")
    ref = flexebt.compat.ebt_attention(*x, attn_mask=mask, causal=True)
    assert rel_err(out[0], ref[0]) < 1e-5 and rel_err(out[1], ref[1]) < 1e-5


def test_plan_cache_rereads_captured_tensors():
    """A repeated call reuses the cached plan but the mod's current tensors (a new bias object
    bound in the same closure cell, e.g. after an optimizer replaced it)."""
    holder = [torch.zeros(20, 20)]

    def bias_mod(score, b, h, q_idx, kv_idx):
        return score + holder[0][q_idx, kv_idx]

    bm = flexebt.create_ebt_block_mask(None, None, None, 19, 19, BLOCK_SIZE=16)
    x = [torch.randn(1, 2, 19, 16) for _ in range(6)]
    flexebt.flex_ebt_attention(*x, score_mod=bias_mod, block_mask=bm, kernel_options=T)
    holder[0] = torch.randn(20, 20)
    out = flexebt.flex_ebt_attention(*x, score_mod=bias_mod, block_mask=bm, kernel_options=T)
    ref = flexebt.flex_ebt_attention(*x, score_mod=bias_mod, block_mask=bm, kernel_options=R)
    assert rel_err(out[1], ref[1]) < 1e-5


def test_ebt_hessian_matches_the_reference():
    """torch.func.hessian over the EBT kernels' path (falls back to the reference: vmap + jvp)."""
    x = [torch.randn(1, 1, 5, 16) for _ in range(6)]
    bm = flexebt.create_ebt_block_mask(None, None, None, 5, 5)

    def energy(q_p, backend, dtype):
        xs = [t.to(dtype) for t in x]
        return flexebt.flex_ebt_attention(*xs[:3], q_p, *xs[4:], block_mask=bm,
                                          kernel_options={"BACKEND": backend})[1].square().sum()

    h = torch.func.hessian(lambda q: energy(q, "TRITON", torch.float32))(x[3])
    want = torch.func.hessian(lambda q: energy(q, "REFERENCE", torch.float64))(x[3].double())
    assert rel_err(h, want) < 1e-5


def _streams(S_o=21, S_p=19, H=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, S, D, generator=g).requires_grad_() for S in (S_o,) * 3 + (S_p,) * 3]


def test_observed_outputs_do_not_depend_on_the_predicted_stream():
    """Each stream's outputs are their own autograd node: the observed outputs have no graph to
    the predicted stream (as in the reference), so a gradient with respect to the predicted stream
    never runs the observed stream's backward above this call."""
    bm = flexebt.create_ebt_block_mask(None, None, None, 21, 19, BLOCK_SIZE=16)
    for backend in (T, R):
        x = _streams()
        out_o, out_p = flexebt.flex_ebt_attention(*x, block_mask=bm, kernel_options=backend)
        assert torch.autograd.grad(out_o.sum(), x[3:], allow_unused=True) == (None, None, None)
        with pytest.raises(RuntimeError, match="not have been used"):
            torch.autograd.grad(out_o.sum(), x[3])
        assert all(g is not None for g in torch.autograd.grad(out_p.sum(), x[1:], allow_unused=True))


@pytest.mark.parametrize("captured", [False, True])
def test_gradient_of_some_inputs_skips_the_key_pass_of_the_others(monkeypatch, captured):
    """autograd.grad with respect to the predicted stream (and a captured bias) only: the dk/dv pass
    over the observed keys is not launched, and every gradient still equals the reference's, first
    order and second order (the energy-gradient step of EBT training)."""
    import flexebt.kernels.plan as plan_mod

    launches = []
    real = plan_mod.dkdv_pass
    monkeypatch.setattr(plan_mod, "dkdv_pass", lambda *a, **k: launches.append(1) or real(*a, **k))
    bias = (0.5 * torch.randn(2, 22, 22)).requires_grad_()
    sm = mods.generate_bias_score_mod(bias) if captured else None
    bm = flexebt.create_ebt_block_mask(masks.ebt_causal_mask, None, None, 21, 19, BLOCK_SIZE=16)

    def step(backend):
        x = _streams(seed=3)
        # the streams as a model has them: computed (projections), not leaves
        out_o, out_p = flexebt.flex_ebt_attention(*[t * 1.0 for t in x], score_mod=sm, block_mask=bm,
                                                  kernel_options=backend)
        energy = (out_p.sin() * out_p).sum() + 0.1 * (out_o * out_o).sum()
        wrt = x[3:] + ([bias] if captured else [])
        del launches[:]
        first = torch.autograd.grad(energy, wrt, create_graph=True)
        n_first = len(launches)
        loss = sum((f * f).sum() for f in first) + out_o.pow(2).sum()
        second = torch.autograd.grad(loss, x + ([bias] if captured else []), allow_unused=True)
        return n_first, [f.detach() for f in first] + list(second)

    n_first, got = step(T)
    _, want = step(R)
    assert n_first == 0  # the only key pass left would have been the observed keys'
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < 1e-4


def test_predicted_stream_gradient_with_views_gqa_and_several_captured_tensors(monkeypatch):
    """The energy-gradient step with the streams as views of one projection (transposed, not
    contiguous), GQA (4 query heads, 2 key heads), r = 3, odd lengths, and a mod reading three
    captured tensors: a learned frame bias, a learned per-head scale that is negative and zero for
    some heads, and a frozen integer table indexed with negative (wrapping) positions.  No key pass
    in the energy gradient; every gradient equals the reference's, first and second order."""
    import flexebt.kernels.plan as plan_mod

    launches = []
    real = plan_mod.dkdv_pass
    monkeypatch.setattr(plan_mod, "dkdv_pass", lambda *a, **k: launches.append(1) or real(*a, **k))
    H, Hkv, D, S_p, r = 4, 2, 16, 17, 3
    S_o = S_p + r
    g = torch.Generator().manual_seed(7)
    bias = (0.5 * torch.randn(S_o + 1, S_o + 1, generator=g)).requires_grad_()
    head_scale = torch.tensor([0.7, -0.4, 0.0, 1.3]).requires_grad_()
    table = torch.randint(-3, 4, (S_o + 1,), generator=g)

    def sm(score, b, h, q_idx, kv_idx):
        return score * (1 + head_scale[h]) + bias[q_idx, kv_idx] + 0.1 * table[-1 - kv_idx]

    bm = flexebt.create_ebt_block_mask(masks.ebt_causal_mask, None, None, S_o, S_p, BLOCK_SIZE=16)
    w = torch.randn(D, (H + 2 * Hkv) * D, generator=g) / 4
    tok_o, tok_p = torch.randn(1, S_o, D, generator=g), torch.randn(1, S_p, D, generator=g)

    def streams(tok, wm):
        x = (tok @ wm).view(1, tok.shape[1], H + 2 * Hkv, D).transpose(1, 2)  # [B, heads, S, D] views
        return x[:, :H], x[:, H:H + Hkv], x[:, H + Hkv:]

    def step(backend):
        wm = w.clone().requires_grad_()
        tp = tok_p.clone().requires_grad_()
        q_o, k_o, v_o = streams(tok_o, wm)
        q_p, k_p, v_p = streams(tp, wm)
        assert not q_o.is_contiguous()
        out_o, out_p = flexebt.flex_ebt_attention(q_o, k_o, v_o, q_p, k_p, v_p, score_mod=sm, block_mask=bm,
                                                  enable_gqa=True, kernel_options=backend)
        energy = (out_p * out_p.sin()).sum() + 0.1 * out_o.square().sum()
        del launches[:]
        (g_tok,) = torch.autograd.grad(energy, tp, create_graph=True)  # the candidates' gradient only
        n_first = len(launches)
        loss = g_tok.square().sum() + out_o.square().sum()
        return n_first, [g_tok.detach(), *torch.autograd.grad(loss, [wm, tp, bias, head_scale])]

    n_first, got = step(T)
    _, want = step(R)
    assert n_first == 0
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-4
