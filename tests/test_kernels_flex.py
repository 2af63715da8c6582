"""Single-stream Triton kernels in Triton's CPU interpreter (TRITON_INTERPRET=1) against the
float64 reference: forward, lse, first-order gradients (q, k, v, captured tensors), and second
order through the autograd chain.  Tiny shapes, odd lengths."""

import pytest
import torch

import flexebt
from flexebt import masks, mods
from flexebt.reference.masking import dense_keep
from helpers import rel_err
from spec_tolerance import BOUND, check, eager_attention

T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}


pytestmark = pytest.mark.interpreter


def _doc():
    return masks.generate_document_mask([9, 14, 10])


# name -> (score_mod factory(H, Sq, Skv), mask_mod factory)
VARIANTS = {
    "none": (None, None),
    "causal": (None, lambda: masks.causal_mask),
    "alibi": (lambda H, Sq, Skv: mods.generate_alibi_bias(H), lambda: masks.causal_mask),
    "softcap": (lambda H, Sq, Skv: mods.generate_tanh_softcap(2.0), None),
    "learned_bias": (lambda H, Sq, Skv: mods.generate_bias_score_mod(
        (0.5 * torch.randn(H, Sq, Skv)).requires_grad_()), None),
    "document": (None, _doc),
    "sliding_window": (None, lambda: masks.generate_sliding_window(7)),
}


def run_case(score_f, mask_f, dtype=torch.float32, B=1, H=2, Hkv=None, Sq=33, Skv=33, D=16, Dv=None,
             block=16):
    Hkv = Hkv or H
    Dv = Dv or D
    sm = score_f(H, Sq, Skv) if score_f else None
    mm = mask_f() if mask_f else None
    bm = flexebt.create_block_mask(mm, None, None, Sq, Skv, device="cpu", BLOCK_SIZE=block) if mm else None
    q0, k0, v0 = torch.randn(B, H, Sq, D), torch.randn(B, Hkv, Skv, D), torch.randn(B, Hkv, Skv, Dv)
    gqa = Hkv != H
    captured = [t for t in (getattr(sm, "__closure__", None) or []) if isinstance(t.cell_contents, torch.Tensor)]
    captured = [c.cell_contents for c in captured if c.cell_contents.requires_grad]

    def run(x_dtype, backend):
        q, k, v = (x.to(x_dtype).requires_grad_() for x in (q0, k0, v0))
        out, lse = flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, enable_gqa=gqa, return_lse=True,
                                          kernel_options=backend)
        return q, k, v, out, lse

    q, k, v, out, lse = run(dtype, T)
    rq, rk, rv, rout, rlse = run(torch.float64, R)
    g = torch.randn(rout.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * g).sum(), [q, k, v] + captured)
    rgrads = torch.autograd.grad((rout * g).sum(), [rq, rk, rv] + captured)
    # eager math in the same dtype, for the relative criterion (at most 2x / 3x its error)
    eq, ek, ev = (x.to(dtype).requires_grad_() for x in (q0, k0, v0))
    keep = dense_keep(bm, B, H, Sq, Skv, "cpu") if bm is not None else None
    eout = eager_attention(eq, ek, ev, sm, keep)
    egrads = torch.autograd.grad((eout.double() * g).sum(), [eq, ek, ev] + captured)
    check("out", out, eout, rout, dtype, 2)
    finite = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), finite) and lse.dtype == torch.float32
    assert rel_err(lse[finite], rlse[finite]) < BOUND[dtype]
    for name, a, e, r in zip(["dq", "dk", "dv", "dbias"], grads, egrads, rgrads):
        check(name, a, e, r, dtype, 3)
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_fp32(variant):
    run_case(*VARIANTS[variant])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", ["causal", "alibi", "softcap", "learned_bias"])
def test_variants_half(variant, dtype):
    run_case(*VARIANTS[variant], dtype=dtype)


@pytest.mark.parametrize("D,Dv", [(16, 16), (32, 32), (64, 64), (96, 96), (128, 128), (256, 256), (32, 48)])
def test_head_dims(D, Dv):
    run_case(*VARIANTS["causal"], Sq=19, Skv=19, D=D, Dv=Dv)


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_and_unequal_lengths(Hkv):
    run_case(*VARIANTS["alibi"][:1], lambda: masks.generate_end_aligned_causal_mask(21, 50), H=4, Hkv=Hkv,
             Sq=21, Skv=50, B=2, block=32)


def test_fully_masked_rows_zero_and_finite():
    def drop_rows(b, h, q_idx, kv_idx):
        return (q_idx % 5 != 2) & (kv_idx <= q_idx)

    q, k, v = (torch.randn(1, 2, 23, 16, requires_grad=True) for _ in range(3))
    bm = flexebt.create_block_mask(drop_rows, None, None, 23, 23, device="cpu", BLOCK_SIZE=16)
    out, lse = flexebt.flex_attention(q, k, v, block_mask=bm, return_lse=True, kernel_options=T)
    assert torch.all(out[:, :, 2::5] == 0) and torch.all(lse[:, :, 2::5] == float("-inf"))
    g = torch.autograd.grad(out.square().sum(), [q, k, v])
    assert all(torch.isfinite(x).all() for x in g) and torch.all(g[0][:, :, 2::5] == 0)


def test_non_finite_scores_give_torch_row_results():
    """A row with a +inf score: output NaN, lse +inf; a NaN score: output, lse and max_scores NaN;
    a row masked to -inf: 0, -inf; -0.0 biases change nothing.  As torch's eager math gives them
    (the reference), gradients included."""
    from torch.nn.attention.flex_attention import AuxRequest

    S = 20
    bias = torch.zeros(S, S)
    bias[2, 5], bias[4], bias[6, 3], bias[10] = float("inf"), float("-inf"), float("nan"), -0.0

    def sm(score, b, h, q_idx, kv_idx):
        return score + bias[q_idx, kv_idx]

    x = [torch.randn(1, 2, S, 16, requires_grad=True) for _ in range(3)]
    res = [flexebt.flex_attention(*x, score_mod=sm, kernel_options=o, return_aux=AuxRequest(lse=True, max_scores=True))
           for o in (T, R)]
    (out, aux), (r_out, r_aux) = res
    for a, b in ((out, r_out), (aux.lse, r_aux.lse), (aux.max_scores, r_aux.max_scores)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
        fin = torch.isfinite(b)
        assert torch.equal(a[~fin & ~b.isnan()], b[~fin & ~b.isnan()])
        assert rel_err(a[fin], b[fin]) < 1e-5
    ok = [r for r in range(S) if r not in (2, 6)]
    got = torch.autograd.grad(out[..., ok, :].sum(), x)
    want = torch.autograd.grad(r_out[..., ok, :].sum(), x)
    for a, b in zip(got, want):  # (the NaN rows' zero cotangents times NaN reach k and v in both)
        assert torch.equal(a.isnan(), b.isnan()) and rel_err(a[~b.isnan()], b[~b.isnan()]) < 1e-5


def test_lse_gradient_and_second_order_through_the_chain():
    bias = (0.3 * torch.randn(2, 17, 17)).requires_grad_()
    sm = mods.generate_bias_score_mod(bias)
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, 17, 17, device="cpu", BLOCK_SIZE=16)
    x = [torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3)]

    def loss(backend):
        out, lse = flexebt.flex_attention(*x, score_mod=sm, block_mask=bm, return_lse=True, kernel_options=backend)
        energy = out.square().sum() + (lse * torch.linspace(0, 1, 17)).sum()
        g = torch.autograd.grad(energy, x + [bias], create_graph=True)
        return sum(t.square().sum() for t in g)

    a = torch.autograd.grad(loss(T), x + [bias])
    b = torch.autograd.grad(loss(R), x + [bias])
    for ga, gb in zip(a, b):
        assert rel_err(ga, gb) < 1e-4


def test_block_size_must_fit_tiles():
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, 20, 20, device="cpu", BLOCK_SIZE=4)
    x = torch.randn(1, 1, 20, 16)
    with pytest.raises(ValueError, match="multiples of 16"):
        flexebt.flex_attention(x, x, x, block_mask=bm, kernel_options=T)


@pytest.mark.parametrize("mode", ["ieee", "tf32x3"])
def test_fp32_products_option(mode):
    """Both fp32 product modes run and meet the fp32 bound (on a GPU they differ; here they run
    the same interpreter math, so this checks the plumbing), and a bad value is refused."""
    S = 21
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    x = [torch.randn(1, 2, S, 16, requires_grad=True) for _ in range(3)]
    out = flexebt.flex_attention(*x, block_mask=bm, kernel_options={**T, "FP32_PRODUCTS": mode})
    ref = flexebt.flex_attention(*(t.double() for t in x), block_mask=bm, kernel_options={"BACKEND": "REFERENCE"})
    assert rel_err(out, ref) < BOUND[torch.float32]
    with pytest.raises(ValueError, match="FP32_PRODUCTS"):
        flexebt.flex_attention(*x, block_mask=bm, kernel_options={**T, "FP32_PRODUCTS": "tf32"})


def test_kernels_are_cached_not_regenerated():
    from flexebt import runtime

    bias = torch.randn(2, 17, 17)
    x = torch.randn(1, 2, 17, 16)
    flexebt.flex_attention(x, x, x, score_mod=mods.generate_bias_score_mod(bias), kernel_options=T)
    n = runtime.kernels.puts
    other = torch.randn(2, 17, 17)  # same builder, new tensor values: same kernel
    out = flexebt.flex_attention(x, x, x, score_mod=mods.generate_bias_score_mod(other), kernel_options=T)
    assert runtime.kernels.puts == n
    ref = flexebt.flex_attention(x, x, x, score_mod=mods.generate_bias_score_mod(other), kernel_options=R)
    assert rel_err(out, ref) < 1e-5


def test_block_tables_are_converted_once_per_mask():
    """The kernel tables of a block mask are cached per mask object and lengths: a second call
    with the same mask reuses them; another mask (even a freed one's reused id) gets its own."""
    from flexebt.kernels import flex as kernels_flex

    x = torch.randn(1, 2, 40, 16)
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    first = kernels_flex.cached_tables(bm, 40, 40, x.device)
    out = flexebt.flex_attention(x, x, x, block_mask=bm, kernel_options=T)
    assert kernels_flex.cached_tables(bm, 40, 40, x.device) is first
    window = flexebt.create_block_mask(masks.generate_sliding_window(5), None, None, 40, 40, device="cpu",
                                       BLOCK_SIZE=16)
    assert kernels_flex.cached_tables(window, 40, 40, x.device) is not first
    got = flexebt.flex_attention(x, x, x, block_mask=window, kernel_options=T)
    want = flexebt.flex_attention(x, x, x, block_mask=window, kernel_options=R)
    assert rel_err(got, want) < 1e-5 and rel_err(out, flexebt.flex_attention(x, x, x, block_mask=bm,
                                                                           kernel_options=R)) < 1e-5


def test_unsupported_op_names_the_op():
    def weird(score, b, h, q_idx, kv_idx):
        return torch.atan(score)

    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(NotImplementedError, match="atan"):
        flexebt.flex_attention(x, x, x, score_mod=weird, kernel_options=T)


def test_global_tensor_mod():
    out = flexebt.flex_attention(*(torch.randn(1, 2, 17, 16) for _ in range(3)), score_mod=_global_bias_mod,
                                 kernel_options=T)
    ref = flexebt.flex_attention(*(torch.randn(1, 2, 17, 16) for _ in range(3)), score_mod=_global_bias_mod,
                                 kernel_options=R)
    assert out.shape == ref.shape


GLOBAL_BIAS = torch.randn(17, 17)


def _global_bias_mod(score, b, h, q_idx, kv_idx):
    return score + GLOBAL_BIAS[q_idx, kv_idx]


def test_even_lengths_and_tile_overrides():
    """Lengths that are multiples of the sparse block take the unmasked (EVEN) path; kernel_options
    tiles are honoured and checked."""
    x = [torch.randn(1, 2, 64, 32) for _ in range(3)]
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, 64, 64, device="cpu", BLOCK_SIZE=32)
    ref = flexebt.flex_attention(*x, block_mask=bm, kernel_options=R)
    out = flexebt.flex_attention(*x, block_mask=bm, kernel_options=dict(T, BLOCK_M=32, BLOCK_N=16))
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match="BLOCK_N"):
        flexebt.flex_attention(*x, block_mask=bm, kernel_options=dict(T, BLOCK_N=64))


def test_torch_func_grad_through_the_kernels():
    """torch.func.grad builds kernels and launches them inside the transform (plain tensors for
    Triton, functorch wraps the results)."""
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    k, v = torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    sm = mods.generate_tanh_softcap(2.0)

    def energy(q, backend):
        return flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, kernel_options=backend).square().sum()

    q = torch.randn(1, 2, 32, 16)
    g = torch.func.grad(lambda x: energy(x, T))(q)
    assert rel_err(g, torch.func.grad(lambda x: energy(x, R))(q)) < 1e-5


def test_compositions_beyond_the_kernels_run_the_reference():
    """Forward-over-reverse (jvp(grad)), hessian (vmap + jvp + grad) and reverse-over-forward
    give the reference's values: the call falls back to the dense reference, with a warning."""
    S = 20
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    k, v = torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)
    sm = mods.generate_tanh_softcap(2.0)

    def energy(q, backend):
        return flexebt.flex_attention(q, k.to(q.dtype), v.to(q.dtype), score_mod=sm, block_mask=bm,
                                      kernel_options=backend).square().sum()

    q, t = torch.randn(1, 2, S, 16), torch.randn(1, 2, S, 16)
    with pytest.warns(UserWarning, match="reference"):
        _, hvp = torch.func.jvp(torch.func.grad(lambda x: energy(x, T)), (q,), (t,))
    _, want = torch.func.jvp(torch.func.grad(lambda x: energy(x, R)), (q.double(),), (t.double(),))
    assert rel_err(hvp, want) < 1e-5
    q1 = torch.randn(1, 1, 6, 16)
    k1, v1 = torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16)

    def f(x, backend):
        return flexebt.flex_attention(x, k1.to(x.dtype), v1.to(x.dtype), kernel_options=backend).square().sum()

    h = torch.func.hessian(lambda x: f(x, T))(q1)
    assert rel_err(h, torch.func.hessian(lambda x: f(x, R))(q1.double())) < 1e-5
    # reverse over forward: a JVP inside an autograd graph
    qg = q.clone().requires_grad_()
    _, jv = torch.func.jvp(lambda x: energy(x, T), (qg,), (t,))
    (g,) = torch.autograd.grad(jv, qg)
    qd = q.double().requires_grad_()
    _, jv_ref = torch.func.jvp(lambda x: energy(x, R), (qd,), (t.double(),))
    assert rel_err(g, torch.autograd.grad(jv_ref, qd)[0]) < 1e-5


def test_fp32_product_mode_and_tile_table_per_pass():
    """fp32 under "highest": tf32x3 everywhere up to D64 (the double backward on its own tile
    table, with a D32 class), IEEE in the double backward above D64; FP32_PRODUCTS overrides."""
    from flexebt.kernels import configs
    from flexebt.kernels.flex import _precision, _products, _tiles_for

    f32 = torch.float32
    assert torch.get_float32_matmul_precision() == "highest"
    assert _products(f32, None, False, 128) == 2 and _tiles_for(f32, None, False, 128) == "tf32"
    assert _products(f32, None, True, 64) == 2 and _tiles_for(f32, None, True, 64) == "tf32x3"
    assert _products(f32, None, True, 128) == 1 and _tiles_for(f32, None, True, 128) == "ieee"
    # Triton's interpreter (these CPU tests) sums every product in fp64, whatever the GPU would take
    assert _precision(f32, None, True, 128)["DOT"] == 3 and _precision(torch.bfloat16)["DOT"] == 3
    assert _tiles_for(f32, {"FP32_PRODUCTS": "tf32x3"}, True, 128) == "tf32x3"
    assert _tiles_for(f32, {"FP32_PRODUCTS": "ieee"}, True, 32) == "ieee"
    assert _tiles_for(torch.bfloat16, None, True, 32) == "bf16"
    cfg = lambda D, table: configs._default_flex_config("dbwd_dq", D, 128, 128, False, table, False)  # noqa: E731
    assert (cfg(32, "tf32x3").BLOCK_M, cfg(32, "tf32x3").BLOCK_N) == (64, 64)
    assert (cfg(64, "tf32x3").BLOCK_M, cfg(64, "tf32x3").BLOCK_N) == (32, 32)
    assert cfg(32, "bf16") == cfg(64, "bf16")  # other tables have no D32 class


def test_size_dependent_defaults(monkeypatch):
    """Short key loops (Skv <= SHORT_KV) give the bf16 D128 forward its own tiles, and a pass
    below TMA_MIN_WORK loads through pointers by default; explicit kernel_options still win."""
    from flexebt.kernels import configs
    from flexebt.kernels.flex import TMA_MIN_WORK, _tma_pays

    fwd = lambda kv_len, options=None, tiles="bf16", D=128: configs._flex_config(  # noqa: E731
        "fwd", D, 128, 128, configs.KernelOptions.of(options).for_pass("fwd"), False, tiles, False, False,
        0 < kv_len <= configs.SHORT_KV)
    short, long_ = fwd(configs.SHORT_KV), fwd(configs.SHORT_KV + 1)
    assert (short.BLOCK_M, short.BLOCK_N) == (64, 64) and short != long_
    assert fwd(0) == long_  # kv_len not given
    assert fwd(512, D=64) == fwd(4096, D=64) and fwd(512, tiles="tf32") == fwd(4096, tiles="tf32")
    assert fwd(512, {"BLOCK_M": 128, "BLOCK_N": 128}).BLOCK_M == 128
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU's tables, not the interpreter's tiny tiles
    assert configs.flex_config("fwd", 128, 128, 128, None, kv_len=1000) == short
    D = 64
    q = torch.empty(1, 1, 1, D).expand(1, 16, 1024, D)
    k_small, k_big = (torch.empty(1, 1, 1, D).expand(1, 16, n, D) for n in (TMA_MIN_WORK // (16 * 1024 * D) - 1,
                                                                            TMA_MIN_WORK // (16 * 1024 * D)))
    assert not _tma_pays(q, k_small) and _tma_pays(q, k_big)


@pytest.mark.parametrize("D,Hkv", [(16, 2), (24, 1)])
def test_tma_loads_match_pointer_loads(D, Hkv):
    """kernel_options USE_TMA (tiles through tensor descriptors over [B * heads, S, D]: K/V in the
    forward and the dq pass, q/dO in the dk/dv pass): same output, lse and gradients as the
    pointer loads -- odd lengths (zero-filled rows past S), a head dim below its tile
    (zero-filled columns), GQA, a causal mask with partial and full blocks."""
    S, H = 45, 2
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    q0 = torch.randn(2, H, S, D)
    k0, v0 = (torch.randn(2, Hkv, S, D) for _ in range(2))
    g_out, g_lse = torch.randn(2, H, S, D), torch.randn(2, H, S)

    def run(options):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        out, lse = flexebt.flex_attention(q, k, v, block_mask=bm, enable_gqa=True, return_lse=True,
                                          kernel_options=options)
        return (out, lse) + torch.autograd.grad([out, lse], [q, k, v], [g_out, g_lse])

    for a, b in zip(run({**T, "USE_TMA": True}), run(T)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scale", [0.3, -0.3])
def test_scale_sign_without_score_mod(scale):
    """With no score_mod the forward takes its row max on the raw products when scale > 0
    (LINEAR_SCORE); a negative scale must take the general path and still be exact."""
    q, k, v = (torch.randn(1, 2, 37, 16, dtype=torch.float64) for _ in range(3))
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, 37, 37, device="cpu", BLOCK_SIZE=16)
    out, lse = flexebt.flex_attention(q.float(), k.float(), v.float(), block_mask=bm, scale=scale,
                                      return_lse=True, kernel_options=T)
    rout, rlse = flexebt.flex_attention(q, k, v, block_mask=bm, scale=scale, return_lse=True, kernel_options=R)
    assert rel_err(out, rout) < BOUND[torch.float32] and rel_err(lse, rlse) < BOUND[torch.float32]


def test_tma_is_a_hint():
    """Rows that are not 16-byte aligned (bf16, D = 20: 40 bytes) take the pointer loads."""
    from flexebt.kernels.flex import _use_tma

    x16 = torch.randn(1, 1, 8, 16)
    assert _use_tma({"USE_TMA": True}, x16, x16)
    assert not _use_tma({"USE_TMA": True}, torch.randn(1, 1, 8, 20, dtype=torch.bfloat16), x16)
    assert not _use_tma(None, x16, x16) and not _use_tma({"USE_TMA": False}, x16, x16)
    # the double backward's passes take TMA only when asked (slower there by default, design D42)
    assert _use_tma({"USE_TMA": True}, x16, by_default=False) and not _use_tma(None, x16, by_default=False)

