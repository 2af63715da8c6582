"""Piecewise attention on the kernels (interpreter) against the float64 reference: thresholds at
0, inside and beyond the sequence, M < N (end-aligned), causal and not, score_mod / block_mask
on top, first and second order, JVP; one product per tile outside the crossing tiles; a new
threshold reuses the kernels."""

import pytest
import torch

import flexebt
from flexebt import masks, mods
from flexebt import runtime
from flexebt.piecewise import region_block_masks
from helpers import rel_err, second_order
from spec_tolerance import BOUND

pytestmark = pytest.mark.interpreter
T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}


def _inputs(M, N, D=16, H=2, dtype=torch.float32, grad=False):
    shapes = ((M, D), (N, D), (M, D), (N, D), (N, D))
    return [torch.randn(1, H, S, d, dtype=dtype, requires_grad=grad) for S, d in shapes]


def _f(w, causal, backend, **kw):
    return lambda *a: flexebt.piecewise_attention(*a, dist_threshold=w, causal=causal, kernel_options=backend, **kw)


@pytest.mark.parametrize("M,N,w,causal", [(21, 21, 5, True), (17, 29, 0, True), (17, 29, 100, False),
                                          (33, 33, 7, False), (19, 40, 9.5, True)])
def test_forward_matches_reference(M, N, w, causal):
    x = _inputs(M, N)
    got = _f(w, causal, T)(*x)
    want = _f(w, causal, R)(*[t.double() for t in x])
    assert rel_err(got, want) < BOUND[torch.float32]


def test_bf16_output_and_gradients():
    x = _inputs(40, 40, dtype=torch.bfloat16, grad=True)
    xd = [t.detach().double().requires_grad_() for t in x]
    out, ref = _f(6, True, T)(*x), _f(6, True, R)(*xd)
    assert rel_err(out, ref) < BOUND[torch.bfloat16]
    ct = torch.randn(out.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, x, ct.to(out.dtype))
    want = torch.autograd.grad(ref, xd, ct)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 3 * BOUND[torch.bfloat16]


@pytest.mark.parametrize("M,N,w,causal", [(21, 21, 5, True), (17, 29, 0, False), (18, 30, 40, True)])
def test_first_and_second_order(M, N, w, causal):
    x = _inputs(M, N, grad=True)
    got = second_order(_f(w, causal, T), x)
    want = second_order(_f(w, causal, R), x)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-5


def test_score_mod_and_block_mask_compose():
    """Soft-cap on the chosen score and a sliding window on top of the piecewise structure."""
    M = N = 37
    x = _inputs(M, N, grad=True)
    bm = flexebt.create_block_mask(masks.generate_sliding_window(12), None, None, M, N, device="cpu",
                                   BLOCK_SIZE=16)
    sm = mods.generate_tanh_softcap(3.0)
    got = second_order(_f(4, True, T, score_mod=sm, block_mask=bm), x)
    want = second_order(_f(4, True, R, score_mod=sm, block_mask=bm), x)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert rel_err(a, b) < 1e-5


def test_jvp():
    x = tuple(_inputs(23, 23))
    t = tuple(torch.randn_like(a) for a in x)
    _, got = torch.func.jvp(_f(5, True, T), x, t)
    _, want = torch.func.jvp(_f(5, True, R), tuple(a.double() for a in x), tuple(a.double() for a in t))
    assert rel_err(got, want) < 1e-5


def test_new_threshold_reuses_the_kernels():
    x = _inputs(20, 20)
    _f(3, True, T)(*x)
    built = runtime.kernels.puts
    for w in (4, 9, 0, 50):
        got = _f(w, True, T)(*x)
        assert rel_err(got, _f(w, True, R)(*[t.double() for t in x])) < BOUND[torch.float32]
    assert runtime.kernels.puts == built


def test_one_product_per_tile_off_the_threshold():
    """Each tile runs in the near pass, the far pass, or -- only where the threshold crosses it --
    both; a causal S = 1024, w = 300 layout with 128-blocks has 8 + 28 tiles of one region."""
    S, w, blk = 1024, 300, 128
    near, far = region_block_masks(S, S, w, True, "cpu")

    def tiles(bm):
        n = bm.kv_num_blocks.sum().item()
        return n + (bm.full_kv_num_blocks.sum().item() if bm.full_kv_num_blocks is not None else 0)

    dist_lo = lambda i, j: i * blk - (j * blk + blk - 1)  # noqa: E731  smallest q - kv in tile (i, j)
    dist_hi = lambda i, j: i * blk + blk - 1 - j * blk  # noqa: E731
    nb = S // blk
    causal_tiles = [(i, j) for i in range(nb) for j in range(i + 1)]
    crossing = [(i, j) for i, j in causal_tiles if dist_lo(i, j) < w <= dist_hi(i, j)]
    only_near = [(i, j) for i, j in causal_tiles if dist_hi(i, j) < w]
    only_far = [(i, j) for i, j in causal_tiles if dist_lo(i, j) >= w]
    assert tiles(near) == len(only_near) + len(crossing)
    assert tiles(far) == len(only_far) + len(crossing)
    assert len(only_near) + len(only_far) + len(crossing) == len(causal_tiles)


def test_first_order_is_fused_and_exact():
    """Without create_graph the backward is the two passes' kernels with the merged (out, lse):
    no composition node in the graph; q1 is q2 (one tensor, gradients summed), a learned bias
    read by both passes, an lse-free loss."""
    M, N, H = 26, 34, 2
    q, k1, k2, v = (torch.randn(1, H, S, 16, requires_grad=True) for S in (M, N, N, N))
    bias = (0.5 * torch.randn(H, M, N)).requires_grad_()
    sm = mods.generate_bias_score_mod(bias)
    out = _f(7, True, T, score_mod=sm)(q, k1, q, k2, v)
    assert type(out.grad_fn).__name__ == "AttentionBackward"
    ct = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k1, k2, v, bias], ct)
    xd = [t.detach().double().requires_grad_() for t in (q, k1, k2, v, bias)]
    ref = _f(7, True, R, score_mod=mods.generate_bias_score_mod(xd[4]))(xd[0], xd[1], xd[0], xd[2], xd[3])
    want = torch.autograd.grad(ref, xd, ct.double())
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@pytest.fixture
def fused_double_backwards(monkeypatch):
    """Count the fused double backwards of piecewise plans (five inputs)."""
    import flexebt.autograd

    calls = []
    original = flexebt.autograd.plan_double_backward

    def spy(plan, *args, **kwargs):
        calls.append(plan.n_inputs)
        return original(plan, *args, **kwargs)

    monkeypatch.setattr(flexebt.autograd, "plan_double_backward", spy)
    return calls


def test_second_order_with_a_learned_bias(fused_double_backwards):
    """The double backward is the fused one (both passes' row statistics summed before use), the
    bias's first- and second-order gradients included."""
    M = N = 29
    x = _inputs(M, N, grad=True)
    bias = (0.5 * torch.randn(2, M, N)).requires_grad_()
    got = second_order(lambda *a: _f(6, True, T, score_mod=mods.generate_bias_score_mod(a[5]))(*a[:5]), x + [bias])
    assert fused_double_backwards == [5]
    want = second_order(lambda *a: _f(6, True, R, score_mod=mods.generate_bias_score_mod(a[5]))(*a[:5]), x + [bias])
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("w", [0, 5, 11.5, 100])
def test_fused_second_order_one_tensor_as_both_queries(w, fused_double_backwards):
    """q1 is q2 and k1 is k2 (plain attention when so): each input's first- and second-order
    gradients sum both passes' shares; thresholds with every pair far, split, and every pair near."""
    M, N = 19, 27
    q, k, v = (torch.randn(1, 2, S, 16, requires_grad=True) for S in (M, N, N))
    kern = lambda q, k, v: _f(w, True, T)(q, k, q, k, v)  # noqa: E731
    ref = lambda q, k, v: _f(w, True, R)(q, k, q, k, v)  # noqa: E731
    got = second_order(kern, [q, k, v])
    assert fused_double_backwards == [5]
    want = second_order(ref, [q, k, v])
    plain = second_order(lambda q, k, v: flexebt.flex_attention(
        q, k, v, block_mask=flexebt.create_block_mask(lambda b, h, i, j: N - M + i >= j, None, None, M, N,
                                                      device="cpu"), kernel_options=R), [q, k, v])
    for a, b, c in zip(got[0] + got[1], want[0] + want[1], plain[0] + plain[1]):
        assert rel_err(a, b) < 1e-5 and rel_err(b, c) < 1e-5


def test_forward_mode_ad_matches_reference():
    """torch.autograd.forward_ad through the kernels' JVP: the passes' tangents merge exactly."""
    import torch.autograd.forward_ad as fwAD

    x = _inputs(22, 30)
    t = [torch.randn_like(a) for a in x]
    with fwAD.dual_level():
        got = fwAD.unpack_dual(_f(7, True, T)(*[fwAD.make_dual(a, b) for a, b in zip(x, t)])).tangent
    _, want = torch.func.jvp(_f(7, True, R), tuple(a.double() for a in x), tuple(a.double() for a in t))
    assert rel_err(got, want) < 1e-5


def test_rows_with_no_key_give_zero_and_zero_gradients():
    """A block mask that keeps nothing for the first queries: out 0, finite zero gradients there."""
    M = N = 40
    bm = flexebt.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= 9, None, None, M, N, device="cpu",
                                   BLOCK_SIZE=16)
    x = _inputs(M, N, grad=True)
    out = _f(5, False, T, block_mask=bm)(*x)
    assert (out[:, :, :9] == 0).all()
    grads = torch.autograd.grad(out.square().sum(), x)
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, :, :9] == 0).all() and (grads[2][:, :, :9] == 0).all()
    want = torch.autograd.grad(_f(5, False, R, block_mask=bm)(*[t.double() for t in x]).square().sum(), x)
    # the reference's autograd: compare each input's gradient
    for a, b in zip(grads, want):
        assert rel_err(a, b) < 1e-5
    # second order: the empty rows' statistics are zero in both passes
    got = second_order(_f(5, False, T, block_mask=bm), x)
    want = second_order(_f(5, False, R, block_mask=bm), x)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-5
    assert (got[1][0][:, :, :9] == 0).all()


@pytest.mark.parametrize("DV", [16, 24])
def test_merge_kernel_matches_the_torch_merge(DV):
    """The merge through each part's max and sum equals the torch merge through their lse, with
    parts empty on one side or both; and where every score of a row is huge (max -1e9), which the
    lse of a part can no longer tell apart from its max, it still weighs the parts by their sums."""
    from flexebt.kernels.merge import merge_partial_softmax

    oa, ob = torch.randn(2, 3, 70, DV), torch.randn(2, 3, 70, DV)
    ma, mb = torch.randn(2, 3, 70) * 4, torch.randn(2, 3, 70) * 4
    sa, sb = 1 + 4 * torch.rand(2, 3, 70), 1 + 4 * torch.rand(2, 3, 70)
    for m, l_, idx in ((ma, sa, (0, 0, slice(0, 5))), (mb, sb, (0, 1, slice(3, 9))),
                       (ma, sa, (1, 2, slice(10, 12))), (mb, sb, (1, 2, slice(10, 12)))):
        m[idx], l_[idx] = float("-inf"), 0.0  # only b / only a / neither
    la, lb = ma + sa.log(), mb + sb.log()
    got_o, got_l, got_ms = merge_partial_softmax(oa, torch.stack((ma, sa), -1), ob, torch.stack((mb, sb), -1))
    want_o, want_l = merge_partial_attention(oa.double(), la.double(), ob.double(), lb.double())
    assert rel_err(got_o, want_o) < 1e-6
    assert torch.equal(torch.isneginf(got_l), torch.isneginf(want_l))
    fin = torch.isfinite(want_l)
    assert rel_err(got_l[fin], want_l[fin]) < 1e-6
    assert rel_err(got_ms[..., 0][fin], torch.maximum(ma, mb)[fin]) == 0
    assert rel_err(got_ms[..., 1][fin].log() + got_ms[..., 0][fin], want_l[fin]) < 1e-6
    assert (got_o[1, 2, 10:12] == 0).all()
    # rows of huge scores: the part's lse rounds to its max, the sums still weigh the parts
    huge = torch.full((1, 1, 4), -1e9)
    three, five = torch.full((1, 1, 4), 3.0), torch.full((1, 1, 4), 5.0)
    o, _, ms = merge_partial_softmax(oa[:1, :1, :4], torch.stack((huge, three), -1), ob[:1, :1, :4],
                                     torch.stack((huge, five), -1))
    assert rel_err(o, (3 * oa[:1, :1, :4] + 5 * ob[:1, :1, :4]) / 8) < 1e-6
    assert torch.equal(ms[..., 1], torch.full((1, 1, 4), 8.0))


def merge_partial_attention(out_a, lse_a, out_b, lse_b):
    """The merge written out in torch (the oracle of the merge kernel): rows empty in both parts
    give 0 and -inf."""
    lse = torch.logaddexp(lse_a, lse_b)
    empty = torch.isneginf(lse)
    safe = torch.where(empty, 0.0, lse)
    out = torch.exp(lse_a - safe).unsqueeze(-1) * out_a + torch.exp(lse_b - safe).unsqueeze(-1) * out_b
    return torch.where(empty.unsqueeze(-1), 0.0, out), lse


def test_tensor_read_by_score_mod_and_block_mask_gets_its_gradient_once():
    """A captured tensor that the score_mod and the block mask's mask_mod both read sits in two
    kernel slots; its first- and second-order gradients must be counted once."""
    bias = (0.5 * torch.randn(2, 23)).requires_grad_()

    def scaled(score, b, h, q_idx, kv_idx):
        return torch.tanh(bias[h, q_idx]) * score

    def gate(b, h, q_idx, kv_idx):
        return (bias[h, kv_idx] < bias[h, q_idx]) | (q_idx >= kv_idx)

    bm = torch.nn.attention.flex_attention.create_block_mask(gate, 1, 2, 23, 23, device="cpu", BLOCK_SIZE=16)
    x = _inputs(23, 23, grad=True)
    kern, ref = (_f(5, True, be, score_mod=scaled, block_mask=bm) for be in (T, R))
    f1, s1 = second_order(lambda *a: kern(*a[:5]), x + [bias])
    f2, s2 = second_order(lambda *a: ref(*a[:5]), x + [bias])
    for a, b in zip(f1 + s1, f2 + s2):
        assert rel_err(a, b) < 1e-5
