"""flexebt.flex_attention against torch's own flex_attention on the calls torch accepts: return_aux
with AuxRequest (lse, max_scores), key/value of batch 1 broadcast over the query batch, key/value
in another dtype than the query; and the errors torch raises for the calls it refuses."""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import AuxOutput, AuxRequest, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex

import flexebt
from helpers import rel_err, second_order

T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}


def _torch(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "eager flex_attention is slow" notice
        return torch_flex(*args, **kwargs)


def _causal_drop_rows(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx != 3)  # row 3 keeps nothing


def _sm(score, b, h, q_idx, kv_idx):
    return score * 1.5 - 0.1 * (q_idx - kv_idx) + b


def _dense_max(q, k, sm, keep, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    b = torch.arange(q.shape[0]).view(-1, 1, 1, 1)
    qi = torch.arange(q.shape[2]).view(1, 1, -1, 1)
    ki = torch.arange(k.shape[2]).view(1, 1, 1, -1)
    t = s * 1.5 - 0.1 * (qi - ki) + b
    return torch.where(keep, t, float("-inf")).amax(-1)


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernels", marks=pytest.mark.interpreter)])
def test_return_aux_matches_torch(backend):
    B, H, S, D = 2, 2, 37, 16
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    bm = create_block_mask(_causal_drop_rows, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    opts = T if backend == "kernels" else R
    out, aux = flexebt.flex_attention(q, k, v, score_mod=_sm, block_mask=bm, kernel_options=opts,
                                      return_aux=AuxRequest(lse=True, max_scores=True))
    assert isinstance(aux, AuxOutput)
    want_out, want_aux = _torch(q, k, v, score_mod=_sm, block_mask=bm, return_aux=AuxRequest(lse=True))
    assert rel_err(out, want_out) < 1e-5
    fin = torch.isfinite(want_aux.lse)
    assert torch.equal(fin, torch.isfinite(aux.lse)) and rel_err(aux.lse[fin], want_aux.lse[fin]) < 1e-5
    # torch computes max_scores only on CUDA; its definition: the largest kept modified score, -inf if none
    keep = torch.ones(S, S, dtype=torch.bool).tril()
    keep[3] = False
    want_max = _dense_max(q, k, _sm, keep, D ** -0.5)
    assert aux.max_scores.dtype == torch.float32 and not aux.max_scores.requires_grad
    assert torch.isneginf(aux.max_scores[:, :, 3]).all()
    fin = torch.isfinite(want_max)
    assert torch.equal(fin, torch.isfinite(aux.max_scores))
    assert (aux.max_scores[fin].double() - want_max[fin]).abs().max() < 1e-5 * want_max[fin].abs().max()
    # fields not asked for are None, as torch's
    _, only_max = flexebt.flex_attention(q, k, v, score_mod=_sm, block_mask=bm, kernel_options=opts,
                                         return_aux=AuxRequest(max_scores=True))
    assert only_max.lse is None and only_max.max_scores is not None
    _, only_lse = flexebt.flex_attention(q, k, v, score_mod=_sm, block_mask=bm, kernel_options=opts,
                                         return_aux=AuxRequest(lse=True))
    assert only_lse.max_scores is None and rel_err(only_lse.lse[fin], aux.lse[fin]) < 1e-6


@pytest.mark.interpreter
def test_return_aux_lse_is_differentiable_max_scores_is_not():
    S = 21
    x = [torch.randn(1, 2, S, 16, requires_grad=True) for _ in range(3)]

    def loss(*x, backend=T):
        out, aux = flexebt.flex_attention(*x, score_mod=_sm, kernel_options=backend,
                                          return_aux=AuxRequest(lse=True, max_scores=True))
        assert not aux.max_scores.requires_grad
        return out.square().sum() + aux.lse.sum()

    got = second_order(loss, x)
    want = second_order(lambda *x: loss(*x, backend=R), x)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert rel_err(a, b) < 1e-5


def test_return_aux_with_return_lse_is_refused():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="return_lse and return_aux"):
        flexebt.flex_attention(q, q, q, return_lse=True, return_aux=AuxRequest(lse=True))
    with pytest.raises(TypeError, match="AuxRequest"):
        flexebt.flex_attention(q, q, q, return_aux=True)


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernels", marks=pytest.mark.interpreter)])
def test_kv_batch_one_broadcasts_over_the_query_batch(backend):
    """torch accepts key/value of batch 1 with a query batch B > 1 and a block mask built for B;
    each batch element reads the same keys, whose gradients sum over the batch."""
    Bq, H, S, D = 3, 2, 29, 16
    q = torch.randn(Bq, H, S, D, requires_grad=True)
    k, v = (torch.randn(1, H, S, D, requires_grad=True) for _ in range(2))
    bm = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx - b, Bq, None, S, S, device="cpu",
                           BLOCK_SIZE=16)
    opts = T if backend == "kernels" else R
    out = flexebt.flex_attention(q, k, v, score_mod=_sm, block_mask=bm, kernel_options=opts)
    want = _torch(q.detach(), k.detach(), v.detach(), score_mod=_sm, block_mask=bm)
    assert out.shape == (Bq, H, S, D) and rel_err(out, want) < 1e-5
    x = [q, k, v]
    got = second_order(lambda *x: flexebt.flex_attention(*x, score_mod=_sm, block_mask=bm, kernel_options=opts), x)
    expanded = second_order(lambda q, k, v: flexebt.flex_attention(q, k.expand(Bq, -1, -1, -1), v.expand(Bq, -1, -1, -1),
                                                                  score_mod=_sm, block_mask=bm, kernel_options=R), x)
    for a, b in zip(got[0] + got[1], expanded[0] + expanded[1]):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5


def test_kv_batch_broadcast_refusals_match_torch():
    q = torch.randn(3, 2, 8, 8)
    k1 = torch.randn(1, 2, 8, 8)
    k2 = torch.randn(2, 2, 8, 8)
    bm3 = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 3, None, 8, 8, device="cpu")
    bm1 = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, 8, 8, device="cpu")
    for kv, bm, match in ((k1, None, "block_mask=None"), (k1, bm1, "batch 1"), (k2, bm3, "must match")):
        with pytest.raises((ValueError, RuntimeError)):  # torch refuses each of these too
            _torch(q, kv, kv, block_mask=bm)
        with pytest.raises(ValueError, match=match):
            flexebt.flex_attention(q, kv, kv, block_mask=bm)
    with pytest.raises(ValueError, match="they must match"):
        flexebt.flex_attention(q, k1, k2, block_mask=bm3)  # key and value disagree in batch


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernels", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("q_dtype,kv_dtype,tol", [(torch.float32, torch.float16, 1e-5), (torch.float32, torch.bfloat16, 1e-5),
                                                  (torch.float16, torch.float32, 5e-3), (torch.float64, torch.float32, 1e-12)])
def test_key_value_in_another_dtype(backend, q_dtype, kv_dtype, tol):
    """torch's eager rule: the output has the query's dtype; key and value meet the query in its
    dtype.  Gradients come back in each input's own dtype."""
    if backend == "kernels" and q_dtype == torch.float64:
        pytest.skip("the kernels take float64 to the reference")
    S, D = 23, 16
    q = torch.randn(1, 2, S, D, dtype=q_dtype, requires_grad=True)
    k, v = (torch.randn(1, 2, S, D, dtype=kv_dtype, requires_grad=True) for _ in range(2))
    opts = T if backend == "kernels" else R
    out = flexebt.flex_attention(q, k, v, score_mod=_sm, kernel_options=opts)
    want = _torch(q.detach(), k.detach(), v.detach(), score_mod=_sm)
    assert out.dtype == want.dtype == q_dtype
    assert rel_err(out, want) < tol
    g = torch.autograd.grad(out.to(torch.promote_types(out.dtype, torch.float32)).square().sum(), (q, k, v))
    assert [t.dtype for t in g] == [q_dtype, kv_dtype, kv_dtype]
    xd = [t.detach().double().to(t.dtype).double().requires_grad_() for t in (q, k, v)]
    ref = flexebt.flex_attention(*[t.to(q_dtype).double() for t in xd], score_mod=_sm, kernel_options=R)
    gd = torch.autograd.grad(ref.square().sum(), xd)
    rounding = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-6}  # each gradient is rounded to its input's dtype
    for a, b in zip(g, gd):
        assert rel_err(a, b) < max(20 * tol, rounding.get(a.dtype, 0.0))


@pytest.mark.interpreter
def test_return_aux_under_compile():
    import torch._dynamo

    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))

    def f(q, k, v):
        out, aux = flexebt.flex_attention(q, k, v, score_mod=_sm, kernel_options=T,
                                          return_aux=AuxRequest(lse=True, max_scores=True))
        return out, aux.lse, aux.max_scores

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    want = f(q, k, v)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernels", marks=pytest.mark.interpreter)])
def test_forward_mode_through_return_aux(backend):
    """torch.func.jvp and forward_ad through a call that also returns max_scores: the outputs'
    tangents are the plain call's, max_scores has none."""
    import torch.autograd.forward_ad as fwAD

    x = tuple(torch.randn(1, 2, 19, 16) for _ in range(3))
    t = tuple(torch.randn_like(a) for a in x)
    opts = T if backend == "kernels" else R

    def f(*a):
        out, aux = flexebt.flex_attention(*a, score_mod=_sm, kernel_options=opts,
                                          return_aux=AuxRequest(lse=True, max_scores=True))
        return out, aux.lse

    _, (d_out, d_lse) = torch.func.jvp(f, x, t)
    _, (w_out, w_lse) = torch.func.jvp(lambda *a: flexebt.flex_attention(*a, score_mod=_sm, kernel_options=R,
                                                                          return_lse=True), x, t)
    assert rel_err(d_out, w_out) < 1e-5 and rel_err(d_lse, w_lse) < 1e-5
    with fwAD.dual_level():
        duals = [fwAD.make_dual(a, b) for a, b in zip(x, t)]
        out, aux = flexebt.flex_attention(*duals, score_mod=_sm, kernel_options=opts,
                                          return_aux=AuxRequest(max_scores=True))
        assert rel_err(fwAD.unpack_dual(out).tangent, w_out) < 1e-5
        assert fwAD.unpack_dual(aux.max_scores).tangent is None


def test_value_alone_in_another_dtype():
    """torch accepts a value whose dtype alone differs from the query's; the output has the query's dtype."""
    q, k = torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    v = torch.randn(1, 2, 12, 16, dtype=torch.float16)
    out = flexebt.flex_attention(q, k, v, kernel_options=R)
    want = _torch(q, k, v)
    assert out.dtype == want.dtype == torch.float32 and rel_err(out, want) < 1e-6


@pytest.mark.parametrize("backend", ["reference", pytest.param("kernels", marks=pytest.mark.interpreter)])
def test_scale_as_a_one_element_tensor(backend):
    """torch takes ``scale=torch.tensor(0.5)``: the same attention as ``scale=0.5``, for each public
    function; a scale that requires grad is refused (its gradient would be dropped), as is a
    tensor of several elements."""
    opts = T if backend == "kernels" else {"BACKEND": "REFERENCE"}
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16) for _ in range(3))
    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 24, 24, device="cpu")
    ref = torch_flex(q, k, v, block_mask=bm, scale=0.37)
    for s in (torch.tensor(0.37), torch.tensor([0.37]), torch.tensor(0.37, dtype=torch.float64)):
        got = flexebt.flex_attention(q, k, v, block_mask=bm, scale=s, kernel_options=opts)
        assert rel_err(got, ref) < 1e-5
        assert rel_err(got, flexebt.flex_attention(q, k, v, block_mask=bm, scale=0.37, kernel_options=opts)) == 0
    ebm = flexebt.create_ebt_block_mask(None, None, None, 24, 16)
    x = [torch.randn(1, 2, n, 16) for n in (24, 24, 24, 16, 16, 16)]
    assert all(torch.equal(a, b) for a, b in zip(
        flexebt.flex_ebt_attention(*x, block_mask=ebm, scale=torch.tensor(0.37), kernel_options=opts),
        flexebt.flex_ebt_attention(*x, block_mask=ebm, scale=0.37, kernel_options=opts)))
    y = [torch.randn(1, 2, 24, 16) for _ in range(5)]
    assert torch.equal(flexebt.piecewise_attention(*y, 5, scale=torch.tensor(0.37), kernel_options=opts),
                       flexebt.piecewise_attention(*y, 5, scale=0.37, kernel_options=opts))
    with pytest.raises(NotImplementedError, match="scale is a tensor that requires grad.*score \\* w"):
        flexebt.flex_attention(q, k, v, scale=torch.tensor(0.37, requires_grad=True), kernel_options=opts)
    with pytest.raises(TypeError, match="one-element real tensor"):
        flexebt.flex_attention(q, k, v, scale=torch.tensor([0.37, 0.5]), kernel_options=opts)
    # a forward-mode tangent on the scale would be dropped by reading its value: refused
    with pytest.raises(NotImplementedError, match="forward-mode tangent"):
        torch.func.jvp(lambda s: flexebt.flex_attention(q, k, v, scale=s, kernel_options=opts),
                       (torch.tensor(0.37),), (torch.tensor(1.0),))
    with torch.autograd.forward_ad.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode tangent"):
            flexebt.flex_attention(q, k, v, kernel_options=opts,
                                   scale=torch.autograd.forward_ad.make_dual(torch.tensor(0.37), torch.tensor(1.0)))


def test_tensor_scale_under_compile_names_the_float():
    """Under torch.compile the kernels need the scale as a constant: a tensor is refused with the
    way out (dynamo's error carries flexebt's message)."""
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    f = torch.compile(lambda q, k, v, s: flexebt.flex_attention(q, k, v, scale=s, kernel_options=T), fullgraph=True,
                      backend="eager")
    with pytest.raises(Exception, match="scale is a tensor inside torch.compile.*Pass a Python float"):
        f(q, k, v, torch.tensor(0.3))


@pytest.mark.parametrize("backend", [pytest.param(T, marks=pytest.mark.interpreter), R])
def test_torch_one_block_mask_over_any_lengths(backend):
    """torch's "no-op" block mask (one block of 2**30, what torch's flex_attention makes for
    block_mask=None; torch's tests pass it explicitly) and masks of that block size with a mask_mod,
    a full block or no block: torch skips its length check for them and so does flexebt, with the
    results of torch's kernels, first and second order; batches that list the block differently are
    refused."""
    from torch.nn.attention.flex_attention import BlockMask, _create_empty_block_mask

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, S, 16, requires_grad=True) for S in (21, 37, 37))
    big = 1 << 30

    def one_block(kind, mask_mod=None):
        num = torch.ones(1, 1, 1, dtype=torch.int32) * (kind != "none")
        idx = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
        zero = torch.zeros_like(num)
        full = (num, idx) if kind == "full" else (zero, idx)
        part = (num, idx) if kind == "partial" else (zero, idx)
        return BlockMask.from_kv_blocks(*part, *full, BLOCK_SIZE=big, mask_mod=mask_mod, seq_lengths=(1, 1))

    cases = [_create_empty_block_mask(q, k), one_block("partial", _causal_drop_rows), one_block("full")]
    for bm in cases:
        want = _torch(q.detach().double(), k.detach().double(), v.detach().double(), block_mask=bm)
        got = flexebt.flex_attention(q, k, v, block_mask=bm, kernel_options=backend)
        assert rel_err(got, want) < 1e-5
    # no block listed: nothing kept, as torch's kernels read the tables (its eager path reads only
    # the mask_mod, here keeping everything)
    out, lse = flexebt.flex_attention(q, k, v, block_mask=one_block("none"), return_lse=True, kernel_options=backend)
    assert not out.any() and (lse == float("-inf")).all()
    ref = create_block_mask(_causal_drop_rows, None, None, 21, 37, device="cpu")
    x = [q, k, v]
    got = second_order(lambda *a: flexebt.flex_attention(*a, block_mask=cases[1], kernel_options=backend), x)
    want = second_order(lambda *a: flexebt.flex_attention(*a, block_mask=ref, kernel_options=backend), x)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.equal(a, b)
    mixed = BlockMask.from_kv_blocks(torch.tensor([[[1]], [[0]]], dtype=torch.int32),
                                     torch.zeros(2, 1, 1, 1, dtype=torch.int32), BLOCK_SIZE=big, seq_lengths=(1, 1))
    with pytest.raises(ValueError, match="lists that block"):
        flexebt.flex_attention(q, k, v, block_mask=mixed, kernel_options=backend)
