"""Single-stream Triton kernels on CUDA at real sizes against the float64 reference (pytest -m gpu)."""

import pytest
import torch

import flexebt
from flexebt import masks, mods
from flexebt.reference.masking import dense_keep
from helpers import large_logit_orders, rel_err, ulp_of_largest_logit
from spec_tolerance import check, eager_attention

pytestmark = pytest.mark.gpu
T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}


def _case(variant, H, S):
    if variant == "causal":
        return None, masks.causal_mask
    if variant == "alibi":
        return mods.generate_alibi_bias(H), masks.causal_mask
    if variant == "softcap":
        return mods.generate_tanh_softcap(20.0), masks.causal_mask
    if variant == "learned_bias":
        return mods.generate_bias_score_mod((0.5 * torch.randn(H, S, S, device="cuda")).requires_grad_()), None
    if variant == "document":
        return None, masks.generate_doc_mask_mod(masks.causal_mask,
                                                 torch.tensor([0, 300, 700, 1000, S], device="cuda"))
    if variant == "sliding_window":
        return None, masks.generate_sliding_window(256)
    raise KeyError(variant)


def _run(variant, dtype, B=2, H=4, Hkv=None, Sq=1000, Skv=1000, D=64, Dv=None):
    Hkv, Dv = Hkv or H, Dv or D
    sm, mm = _case(variant, H, max(Sq, Skv))
    bm = flexebt.create_block_mask(mm, None, None, Sq, Skv, device="cuda") if mm else None
    q0, k0, v0 = (torch.randn(B, h, S, d, device="cuda") for h, S, d in ((H, Sq, D), (Hkv, Skv, D), (Hkv, Skv, Dv)))
    captured = [c.cell_contents for c in (getattr(sm, "__closure__", None) or [])
                if isinstance(c.cell_contents, torch.Tensor) and c.cell_contents.requires_grad]
    g = torch.randn(B, H, Sq, Dv, device="cuda", dtype=torch.float64)

    def run(x_dtype, fn):
        xs = [x.to(x_dtype).requires_grad_() for x in (q0, k0, v0)]
        out = fn(*xs)
        return out, torch.autograd.grad((out.double() * g).sum(), xs + captured)

    gqa = H != Hkv
    out, grads = run(dtype, lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm,
                                                                   enable_gqa=gqa, kernel_options=T))
    ref, rgrads = run(torch.float64, lambda q, k, v: flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm,
                                                                            enable_gqa=gqa, kernel_options=R))
    keep = dense_keep(bm, B, H, Sq, Skv, "cuda") if bm is not None else None
    eout, egrads = run(dtype, lambda q, k, v: eager_attention(q, k, v, sm, keep))
    check("out", out, eout, ref, dtype, 2)
    for name, a, e, r in zip(["dq", "dk", "dv", "dbias"], grads, egrads, rgrads):
        check(name, a, e, r, dtype, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("variant", ["causal", "alibi", "softcap", "learned_bias", "document", "sliding_window"])
def test_variants(variant, dtype):
    _run(variant, dtype)


@pytest.mark.parametrize("D", [16, 32, 64, 96, 128, 256])
def test_head_dims(D):
    _run("causal", torch.bfloat16, D=D, Sq=777, Skv=777)


def test_gqa_unequal_lengths():
    _run("alibi", torch.bfloat16, H=8, Hkv=2, Sq=513, Skv=1531)


def test_second_order_matches_reference():
    x = [torch.randn(1, 2, 300, 64, device="cuda", requires_grad=True) for _ in range(3)]
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, 300, 300, device="cuda")

    def loss(backend):
        out = flexebt.flex_attention(*x, block_mask=bm, kernel_options=backend)
        g = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        return sum(t.square().sum() for t in g)

    for a, b in zip(torch.autograd.grad(loss(T), x), torch.autograd.grad(loss(R), x)):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("D,Hkv,S", [(64, 4, 1000), (128, 2, 2048), (80, 4, 777)])
def test_tma_matches_pointer_loads(dtype, D, Hkv, S):
    """kernel_options USE_TMA: tiles through tensor descriptors give the pointer loads' output,
    lse and gradients (odd lengths, head dim 80 below its 128 tile, GQA, causal and ALiBi)."""
    q0 = torch.randn(2, 4, S, D, device="cuda", dtype=dtype)
    k0, v0 = (torch.randn(2, Hkv, S, D, device="cuda", dtype=dtype) for _ in range(2))
    g_out = torch.randn_like(q0)
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cuda")

    def run(sm, options):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        out, lse = flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, enable_gqa=True, return_lse=True,
                                          kernel_options=options)
        return (out, lse) + torch.autograd.grad(out, [q, k, v], g_out)

    for sm in (None, mods.generate_alibi_bias(4)):
        for a, b in zip(run(sm, {**T, "USE_TMA": True}), run(sm, {**T, "USE_TMA": False})):
            assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_mod", [False, True])
def test_return_aux_max_scores_cuda(dtype, with_mod):
    """AuxRequest(max_scores=True) on the kernels (the forward's running max) against torch's own
    flex_attention on CUDA and the reference; rows that keep nothing give -inf."""
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as torch_flex

    B, H, S, D = 2, 4, 700, 64
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype) for _ in range(3))
    sm = (lambda s, b, h, q_idx, kv_idx: s * 1.3 - 0.01 * (q_idx - kv_idx)) if with_mod else None  # noqa: E731
    bm = create_block_mask(lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx != 5), None, None, S, S,
                           device="cuda")
    aux = AuxRequest(lse=True, max_scores=True)
    out, got = flexebt.flex_attention(q, k, v, score_mod=sm, block_mask=bm, kernel_options=T, return_aux=aux)
    _, ref = flexebt.flex_attention(q.double(), k.double(), v.double(), score_mod=sm, block_mask=bm,
                                    kernel_options=R, return_aux=aux)
    _, want = torch_flex(q, k, v, score_mod=sm, block_mask=bm, return_aux=aux)
    assert torch.isneginf(got.max_scores[:, :, 5]).all()
    fin = torch.isfinite(ref.max_scores)
    assert torch.equal(fin, torch.isfinite(got.max_scores)) and torch.equal(fin, torch.isfinite(want.max_scores))
    scale = ref.max_scores[fin].abs().max()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert (got.max_scores[fin].double() - ref.max_scores[fin]).abs().max() < tol * scale
    assert (got.max_scores[fin].double() - want.max_scores[fin].double()).abs().max() < tol * scale


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_rounding_inside_a_mod_matches_torch(low):
    """A score_mod that rounds the score through a 16-bit type: the compiled kernels round to nearest
    even, as torch does (Triton's CPU interpreter truncates to bfloat16, so only the GPU checks
    this)."""
    # integer q and k: every order of summation gives the same products, so both sides round the same
    # fp32 scores (q.k times the scale), most of which are not 16-bit numbers
    q, k = (torch.randint(-2, 3, (2, 4, 300, 64), device="cuda").float() for _ in range(2))
    v = torch.randn(2, 4, 300, 64, device="cuda")

    def sm(s, b, h, q_idx, kv_idx):
        return s.to(low).to(s.dtype) * 0.7

    out = flexebt.flex_attention(q, k, v, score_mod=sm, scale=0.1, kernel_options=T)
    ref = flexebt.flex_attention(q, k, v, score_mod=sm, scale=0.1, kernel_options=R)
    scores = (q @ k.transpose(-1, -2)) * 0.1
    truncated = torch.softmax((scores.view(torch.int32) & -65536).view(torch.float32) * 0.7, -1) @ v
    if low == torch.bfloat16:
        assert rel_err(truncated, ref) > 1e-3  # (what truncation would give: the test can tell them apart)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("magnitude", [4.0, 10.0])
def test_large_logits_without_a_score_mod_cuda(magnitude):
    """Logits of 50 to 350 in fp32 on the GPU's own products: first and second order within 3x eager
    fp32 math's error, 1e-5, or one ulp of the largest logit -- the passes rebuild the scores (k q^T
    in the key-tile passes), and the tensor cores promise no summation order, so a rebuilt score may
    miss the forward's by an ulp (the CPU twin: tests/test_huge_scores.py)."""
    S, D = 300, 64
    torch.manual_seed(0)
    x64 = [torch.randn(2, 4, S, D, dtype=torch.float64, device="cuda") * m for m in (magnitude, magnitude, 1.0)]
    bm = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cuda")
    keep = torch.ones(S, S, dtype=torch.bool, device="cuda").tril()

    def eager(q, k, v):
        s = ((q @ k.transpose(-1, -2)) * D ** -0.5).masked_fill(~keep, float("-inf"))
        return torch.softmax(s, -1) @ v

    def orders(fn, dtype):
        return large_logit_orders(fn, x64, dtype)

    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        ref, base = orders(eager, torch.float64), orders(eager, torch.float32)
        got = orders(lambda q, k, v: flexebt.flex_attention(q, k, v, block_mask=bm, kernel_options=T), torch.float32)
    finally:
        torch.set_float32_matmul_precision(prev)
    ulp = ulp_of_largest_logit(x64[0], x64[1], D ** -0.5)
    for name, a, e, r in zip(["out", "dq", "dk", "dv", "ddq", "ddk", "ddv"], got, base, ref):
        bound = max((2 if name == "out" else 3) * rel_err(e.detach(), r), 1e-5, ulp)
        assert rel_err(a.detach(), r) <= bound, (name, rel_err(a.detach(), r), bound)
