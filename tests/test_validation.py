"""Every documented input constraint raises a clear ValueError / TypeError (never assert/IndexError)."""

import functools
import math
import re

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

import flexebt
from flexebt import masks
from flexebt.compat import ebt_attention


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def flex(**over):
    args = dict(query=t(1, 2, 8, 16), key=t(1, 2, 8, 16), value=t(1, 2, 8, 16))
    args.update(over)
    return flexebt.flex_attention(**args)


def ebt(S_o=6, S_p=6, **over):
    names = ["q_o", "k_o", "v_o", "q_p", "k_p", "v_p"]
    args = {n: t(1, 2, S_o if n.endswith("_o") else S_p, 16) for n in names}
    args.update(over)
    return flexebt.flex_ebt_attention(**args)


FLEX_CASES = {
    "rank": (dict(query=t(2, 8, 16)), ValueError, "4 dimensions"),
    # (key/value in another dtype than the query are cast, as torch does: tests/test_torch_parity.py)
    "integer_dtype": (dict(query=torch.ones(1, 2, 8, 16, dtype=torch.int64)), TypeError, "dtype"),
    "not_a_tensor": (dict(value=[1, 2]), TypeError, "torch.Tensor"),
    "head_dim": (dict(key=t(1, 2, 8, 32)), ValueError, "head dim"),
    "batch": (dict(key=t(2, 2, 8, 16), value=t(2, 2, 8, 16)), ValueError, "batch"),
    "kv_length": (dict(value=t(1, 2, 9, 16)), ValueError, "positions"),
    "heads_without_gqa": (dict(key=t(1, 1, 8, 16), value=t(1, 1, 8, 16)), ValueError, "enable_gqa"),
    "gqa_divisibility": (dict(query=t(1, 3, 8, 16), enable_gqa=True), ValueError, "multiple"),
    "kv_heads_differ": (dict(value=t(1, 1, 8, 16)), ValueError, "heads"),
    "block_mask_lengths": (dict(block_mask=flexebt.create_block_mask(masks.causal_mask, None, None, 16, 16,
                                                                     device="cpu")), ValueError, "built for"),
    "block_mask_heads": (dict(block_mask=flexebt.create_block_mask(masks.causal_mask, None, 3, 8, 8, device="cpu")),
                         ValueError, "H=3"),
    "block_mask_type": (dict(block_mask=torch.ones(8, 8)), TypeError, "BlockMask"),
    "score_mod_type": (dict(score_mod=3), TypeError, "callable"),
    "scale_type": (dict(scale="big"), TypeError, "scale"),
    "unknown_backend": (dict(kernel_options={"BACKEND": "CUDNN"}), ValueError, "Unknown backend"),
    "kernel_options_type": (dict(kernel_options="TRITON"), TypeError, "kernel_options"),
}


@pytest.mark.parametrize("case", list(FLEX_CASES))
def test_flex_attention_errors(case):
    over, exc, msg = FLEX_CASES[case]
    with pytest.raises(exc, match=msg):
        flex(**over)


def test_device_mismatch():
    meta = torch.empty(1, 2, 8, 16, device="meta")
    with pytest.raises(ValueError, match="device"):
        flex(key=meta)


EBT_CASES = {
    "predicted_longer": (dict(S_o=4, S_p=6), ValueError, "longer"),
    "q_o_rank": (dict(q_o=t(2, 6, 16)), ValueError, "4 dimensions"),
    "stream_head_dim": (dict(q_p=t(1, 2, 6, 32), k_p=t(1, 2, 6, 32)), ValueError, "head dims"),
    "stream_heads": (dict(q_p=t(1, 4, 6, 16)), ValueError, "heads"),
    "observed_lengths": (dict(k_o=t(1, 2, 7, 16), v_o=t(1, 2, 7, 16)), ValueError, "positions"),
    "predicted_lengths": (dict(k_p=t(1, 2, 5, 16), v_p=t(1, 2, 5, 16)), ValueError, "positions"),
    "batch": (dict(v_p=t(2, 2, 6, 16)), ValueError, "batch"),
    "gqa_needed": (dict(k_o=t(1, 1, 6, 16), v_o=t(1, 1, 6, 16), k_p=t(1, 1, 6, 16), v_p=t(1, 1, 6, 16)),
                   ValueError, "enable_gqa"),
    "block_mask_lengths": (dict(block_mask=flexebt.create_ebt_block_mask(None, None, None, 6, 5)), ValueError,
                           "built for"),
    "torch_block_mask": (dict(block_mask=flexebt.create_block_mask(masks.causal_mask, None, None, 7, 7,
                                                                   device="cpu")), TypeError, "create_ebt_block_mask"),
    "block_mask_type": (dict(block_mask="causal"), TypeError, "EBTBlockMask"),
    "block_mask_batch": (dict(block_mask=flexebt.create_ebt_block_mask(None, 3, None, 6, 6)), ValueError, "B=3"),
}


@pytest.mark.parametrize("case", list(EBT_CASES))
def test_flex_ebt_attention_errors(case):
    over, exc, msg = EBT_CASES[case]
    with pytest.raises(exc, match=msg):
        ebt(**over)


@pytest.mark.parametrize("args,exc,msg", [
    (dict(mask_mod=None, B=None, H=None, S_obs=4, S_pred=5), ValueError, "longer"),
    (dict(mask_mod=None, B=None, H=None, S_obs=0, S_pred=0), ValueError, "positive"),
    (dict(mask_mod=None, B=0, H=None, S_obs=4, S_pred=4), ValueError, "positive"),
    (dict(mask_mod="causal", B=None, H=None, S_obs=4, S_pred=4), TypeError, "callable"),
])
def test_create_ebt_block_mask_errors(args, exc, msg):
    with pytest.raises(exc, match=msg):
        flexebt.create_ebt_block_mask(**args)


def pw(**over):
    args = dict(q1=t(1, 2, 6, 16), k1=t(1, 2, 8, 16), q2=t(1, 2, 6, 16), k2=t(1, 2, 8, 16), v=t(1, 2, 8, 16),
                dist_threshold=3)
    args.update(over)
    return flexebt.piecewise_attention(**args)


@pytest.mark.parametrize("over,exc,msg", [
    (dict(dist_threshold=-1), ValueError, ">= 0"),
    (dict(dist_threshold="far"), TypeError, "number"),
    (dict(q2=t(1, 2, 5, 16)), ValueError, "must match"),
    (dict(k2=t(1, 2, 8, 8)), ValueError, "must match"),
    (dict(v=t(1, 2, 7, 16)), ValueError, "positions"),
    (dict(q1=t(1, 2, 6, 8), q2=t(1, 2, 6, 8)), ValueError, "head dim"),
    (dict(v=t(1, 2, 8, 16, dtype=torch.float16)), ValueError, "dtype"),
])
def test_piecewise_errors(over, exc, msg):
    with pytest.raises(exc, match=msg):
        pw(**over)


@pytest.mark.parametrize("bad", [lambda: flexebt.mods.generate_bias_score_mod(torch.zeros(5)),
                                 lambda: flexebt.mods.generate_relative_position_bias(torch.zeros(2, 4), 2),
                                 lambda: flexebt.mods.generate_relative_position_bias(torch.zeros(2, 5), -1),
                                 lambda: flexebt.masks.generate_frame_mask(torch.zeros(4, 4)),
                                 lambda: flexebt.masks.generate_document_mask([3, -1])])
def test_builder_errors(bad):
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize("bad, msg", [
    (lambda: flexebt.mods.generate_alibi_bias(0), "H must be a positive integer"),
    (lambda: flexebt.mods.generate_alibi_bias(2.5), "H must be a positive integer"),
    (lambda: flexebt.mods.generate_tanh_softcap(0), "finite nonzero"),
    (lambda: flexebt.mods.generate_tanh_softcap(float("inf")), "finite nonzero"),
    (lambda: flexebt.mods.generate_tanh_softcap("30"), "finite nonzero"),
    (lambda: flexebt.masks.generate_sliding_window(-1), "window_size must be an integer >= 0"),
    (lambda: flexebt.masks.generate_sliding_window(2.5), "window_size must be an integer >= 0"),
    (lambda: flexebt.masks.generate_prefix_lm_mask(None), "prefix_length must be an integer >= 0"),
    (lambda: flexebt.masks.generate_document_mask([2.5, 13.5]), "each length must be an integer >= 0"),
    (lambda: flexebt.masks.generate_document_mask(torch.tensor([[4, 12]])), "1-d integer tensor"),
    (lambda: flexebt.masks.generate_doc_mask_mod(flexebt.masks.causal_mask, [2, 4, 16]), "starting at 0"),
    (lambda: flexebt.masks.generate_doc_mask_mod(flexebt.masks.causal_mask, [0, 8, 4]), "never decreasing"),
])
def test_builder_parameters_are_checked(bad, msg):
    """Parameters that would give silent nonsense (no bias, NaN, every row masked, truncated
    lengths) or fail at the first call are refused by the builder, naming the parameter."""
    with pytest.raises((ValueError, TypeError), match=msg):
        bad()


def test_builder_parameters_torch_would_pass():
    """Integer tensors for document lengths and offsets, a negative soft-cap (the same mod), and
    attention-gym's approx=True (flexebt computes tanh itself) are accepted."""
    import math

    q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
    a = flexebt.masks.generate_document_mask(torch.tensor([4, 12]))
    b = flexebt.masks.generate_document_mask([4, 12])
    grid = torch.arange(16)
    assert torch.equal(a(0, 0, grid[:, None], grid[None, :]), b(0, 0, grid[:, None], grid[None, :]))
    s = torch.linspace(-40, 40, 9, dtype=torch.float64)
    for mod in (flexebt.mods.generate_tanh_softcap(-30), flexebt.mods.generate_tanh_softcap(30, approx=True)):
        assert torch.allclose(mod(s, 0, 0, 0, 0), 30 * torch.tanh(s / 30), rtol=0, atol=1e-12)
    assert math.isfinite(float(flexebt.flex_attention(q, k, v, score_mod=flexebt.mods.generate_tanh_softcap(
        30, approx=True)).sum()))


# ---- score_mod / mask_mod signatures: checked before any tracing ----

CALLS = []


def three_arg_score_mod(score, b, h):
    CALLS.append(1)
    return score


def five_arg_mask_mod(b, h, q_idx, kv_idx, extra):
    CALLS.append(1)
    return q_idx >= kv_idx


def keyword_only_score_mod(score, b, h, q_idx, kv_idx, *, temperature):
    CALLS.append(1)
    return score / temperature


def _torch_mask(mask_mod, S=8):
    causal = flexebt.create_block_mask(masks.causal_mask, None, None, S, S, device="cpu")
    return BlockMask.from_kv_blocks(causal.kv_num_blocks, causal.kv_indices, causal.full_kv_num_blocks,
                                    causal.full_kv_indices, BLOCK_SIZE=causal.BLOCK_SIZE, mask_mod=mask_mod,
                                    seq_lengths=(S, S))


BAD_MODS = {
    "flex_score_mod": (lambda: flex(score_mod=three_arg_score_mod), "three_arg_score_mod",
                       r"score_mod\(score, b, h, q_idx, kv_idx\)"),
    "flex_keyword_only": (lambda: flex(score_mod=keyword_only_score_mod), "keyword_only_score_mod", "temperature"),
    "flex_mask_mod": (lambda: flex(block_mask=_torch_mask(five_arg_mask_mod)), "five_arg_mask_mod",
                      r"mask_mod\(b, h, q_idx, kv_idx\)"),
    "ebt_score_mod": (lambda: ebt(score_mod=three_arg_score_mod), "three_arg_score_mod", "5 positional"),
    "ebt_mask_mod": (lambda: flexebt.create_ebt_block_mask(five_arg_mask_mod, None, None, 6, 6), "five_arg_mask_mod",
                     "4 positional"),
    "piecewise_score_mod": (lambda: pw(score_mod=three_arg_score_mod), "three_arg_score_mod", "5 positional"),
    "piecewise_mask_mod": (lambda: pw(block_mask=_torch_mask(five_arg_mask_mod)._adjust(6, 8)), "five_arg_mask_mod",
                           "4 positional"),
}


@pytest.mark.parametrize("backend", ["REFERENCE", pytest.param("TRITON", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("case", list(BAD_MODS))
def test_mod_of_the_wrong_arity_is_refused_before_tracing(case, backend, monkeypatch):
    monkeypatch.setenv("FLEXEBT_BACKEND", backend)
    call, name, expected = BAD_MODS[case]
    CALLS.clear()
    with pytest.raises(TypeError, match=name) as err:
        call()
    assert re.search(expected, str(err.value))
    assert CALLS == []  # never called, never traced


def _star_args(*args):
    return args[0] * 0.5


def _with_default(score, b, h, q_idx, kv_idx, scale=2.0):
    return score * scale


def _star_mask(b, h, *idx):
    return idx[0] >= idx[1]


@pytest.mark.parametrize("score_mod", [_star_args, _with_default, functools.partial(_with_default, scale=3.0),
                                       lambda s, *rest: s],
                         ids=["star_args", "default", "partial", "lambda"])
def test_mod_signatures_with_star_args_and_defaults_are_accepted(score_mod):
    out = flex(score_mod=score_mod, kernel_options={"BACKEND": "REFERENCE"})
    assert out.shape == (1, 2, 8, 16)
    flex(block_mask=_torch_mask(_star_mask), kernel_options={"BACKEND": "REFERENCE"})


# ---- kernel_options: declared keys, declared types ----

BAD_OPTIONS = [
    ({"BLOCK_M": "32"}, TypeError, "BLOCK_M.*'32'.*str.*power of two"),
    ({"BLOCK_N": 32.0}, TypeError, "BLOCK_N.*32.0.*float.*power of two"),
    ({"BLOCK_M": True}, TypeError, "BLOCK_M.*True.*bool"),
    ({"BLOCK_M2": -16}, ValueError, "BLOCK_M2.*-16.*power of two >= 16"),
    ({"BLOCK_N1": 48}, ValueError, "BLOCK_N1.*48.*power of two"),
    ({"BLOCK_M": 8}, ValueError, "BLOCK_M.*8.*>= 16"),
    ({"num_warps": 3}, ValueError, "num_warps.*3.*power of two"),
    ({"dq_num_stages": 0}, ValueError, "dq_num_stages.*0.*int >= 1"),
    ({"USE_TMA": "yes"}, TypeError, "USE_TMA.*'yes'.*bool"),
    ({"USE_TMA": 2}, ValueError, "USE_TMA.*2.*bool"),
    ({"HEAD_GROUP": 1.5}, TypeError, "HEAD_GROUP.*1.5.*float"),
    ({"FP32_PRODUCTS": 1}, TypeError, "FP32_PRODUCTS.*1.*'ieee'"),
    ({"FP32_PRODUCTS": "tf32"}, ValueError, "FP32_PRODUCTS.*'tf32'.*'tf32x3'"),
    ({"BLOCK_MM": 32}, ValueError, "unknown kernel_options key 'BLOCK_MM'.*Did you mean 'BLOCK_M'"),
    ({"PRESCALE_Q": True}, ValueError, "unknown kernel_options key 'PRESCALE_Q'.*Did you mean 'PRESCALE_QK'"),
    ({"PRESCALE_QK": 2}, ValueError, "PRESCALE_QK.*2"),
    ({"BACKEND": "CUDNN"}, ValueError, "Unknown backend 'CUDNN'"),
]


@pytest.mark.parametrize("fn", ["flex", "ebt", "piecewise"])
@pytest.mark.parametrize("options,exc,msg", BAD_OPTIONS, ids=[str(o) for o, _, _ in BAD_OPTIONS])
def test_kernel_options_are_validated_from_their_declaration(fn, options, exc, msg):
    call = {"flex": flex, "ebt": ebt, "piecewise": pw}[fn]
    with pytest.raises(exc, match=msg):
        call(kernel_options={"BACKEND": "REFERENCE", **options})


def test_declared_kernel_options_are_accepted():
    from flexebt._validation import KERNEL_OPTIONS

    assert {"BLOCK_M", "BLOCK_N1", "fwd_num_warps", "dbwd_dkdv_head_group", "USE_TMA"} <= set(KERNEL_OPTIONS)
    opts = {"BACKEND": "REFERENCE", "BLOCK_M": 32, "BLOCK_N2": 16, "num_warps": 4, "fwd_num_stages": 2,
            "HEAD_GROUP": 0, "dq_head_group": 2, "USE_TMA": True, "REVERSE_Q_ORDER": 0, "FP32_PRODUCTS": "ieee"}
    flex(kernel_options=opts)
    ebt(kernel_options=opts)
    pw(kernel_options=opts)


TORCH_OPTIONS = {"PRESCALE_QK": True, "ROWS_GUARANTEED_SAFE": False, "BLOCKS_ARE_CONTIGUOUS": True, "WRITE_DQ": True,
                 "FORCE_USE_FLEX_ATTENTION": True, "kpack": 2, "matrix_instr_nonkdim": 0, "waves_per_eu": 1}


@pytest.mark.parametrize("backend", ["FLASH", "TRITON_DECODE", "AUTO"])
def test_torch_kernel_options_run_as_written_for_torch(backend):
    """Every key of torch's FlexKernelOptions is accepted: its hints to torch's own kernels change no
    result and are left out of the options the kernels see; torch's names of its fused backends
    ask for flexebt's kernels."""
    from torch.nn.attention import flex_attention as torch_flex

    from flexebt.backends import requested_backend
    from flexebt.kernels.options import KernelOptions

    declared = getattr(torch_flex, "FlexKernelOptions", None)
    if declared is not None:
        from flexebt._validation import KERNEL_OPTIONS

        assert set(declared.__annotations__) <= set(KERNEL_OPTIONS)
    assert requested_backend({"BACKEND": backend}) == ("AUTO" if backend == "AUTO" else "TRITON")
    assert KernelOptions.of({**TORCH_OPTIONS, "BLOCK_M": 32}) == KernelOptions.of({"BLOCK_M": 32})
    x = dict(query=t(1, 2, 8, 16), key=t(1, 2, 8, 16), value=t(1, 2, 8, 16))
    ref = flex(**x, kernel_options={"BACKEND": "REFERENCE"})
    assert torch.equal(flex(**x, kernel_options={"BACKEND": "REFERENCE", **TORCH_OPTIONS}), ref)
    ebt(kernel_options={"BACKEND": "REFERENCE", **TORCH_OPTIONS})
    pw(kernel_options={"BACKEND": "REFERENCE", **TORCH_OPTIONS})


# ---- head dim 0 ----

@pytest.mark.parametrize("call,name", [
    (lambda: flex(query=t(1, 2, 8, 0), key=t(1, 2, 8, 0)), "query"),
    (lambda: flex(value=t(1, 2, 8, 0)), "value"),
    (lambda: ebt(**{n: t(1, 2, 6, 0) for n in ("q_o", "k_o", "v_o", "q_p", "k_p", "v_p")}), "q_o"),
    (lambda: pw(q1=t(1, 2, 6, 0), k1=t(1, 2, 8, 0), q2=t(1, 2, 6, 0), k2=t(1, 2, 8, 0)), "q1"),
    (lambda: ebt_attention(*[t(1, 2, 6, 0) for _ in range(6)]), "q_o"),
], ids=["flex_qk", "flex_value", "ebt", "piecewise", "compat"])
def test_head_dim_zero_is_refused(call, name):
    with pytest.raises(ValueError, match=f"{name} has head dim D=0"):
        call()


# ---- heads too large for the kernels' 32-bit row offsets ----

@pytest.mark.parametrize("family", ["flex", "ebt", "piecewise"])
@pytest.mark.parametrize("where", ["query", "key"])
def test_heads_of_2_31_elements_are_refused_on_the_kernels(family, where):
    """The kernels address a row inside one head with a 32-bit offset (row * D): a head of 2**31 or
    more elements is refused before anything runs (meta tensors: nothing is allocated), naming the
    size; one element less passes the check (and fails later, for want of data)."""
    def call(long_rows):
        m = dict(dtype=torch.bfloat16, device="meta")
        short = torch.empty(1, 1, 16, 64, **m)
        long = torch.empty(1, 1, long_rows, 64, **m)
        q, k = (long, short) if where == "query" else (short, long)
        o = {"BACKEND": "TRITON"}
        if family == "flex":
            return flexebt.flex_attention(q, k, k, kernel_options=o)
        if family == "ebt":
            return flexebt.flex_ebt_attention(long, long, long, short, short, short, kernel_options=o)
        return flexebt.piecewise_attention(q, k, q, k, k, 8, kernel_options=o)

    with pytest.raises(ValueError, match=r"holds 33554432 rows of 64 = 2147483648 elements.*32-bit"):
        call(2 ** 25)
    with pytest.raises(Exception) as e:
        call(2 ** 25 - 1)
    assert "32-bit" not in str(e.value)


# ---- empty sequences: zeros, lse -inf, zero gradients (first and second order), no launch ----

def _x(*shape):
    return torch.randn(*shape, requires_grad=True)


def _flex_lse(x, o):
    return flexebt.flex_attention(*x, return_lse=True, kernel_options=o)


EMPTY = {
    "flex_Sq0": (lambda: [_x(1, 2, 0, 16), _x(1, 2, 5, 16), _x(1, 2, 5, 16)],
                 _flex_lse, [(1, 2, 0, 16), (1, 2, 0)]),
    "flex_Skv0": (lambda: [_x(1, 2, 5, 16), _x(1, 2, 0, 16), _x(1, 2, 0, 16)],
                  _flex_lse, [(1, 2, 5, 16), (1, 2, 5)]),
    "flex_both0": (lambda: [_x(1, 2, 0, 16), _x(1, 2, 0, 16), _x(1, 2, 0, 16)],
                   _flex_lse, [(1, 2, 0, 16), (1, 2, 0)]),
    "ebt_0_0": (lambda: [_x(1, 2, 0, 16) for _ in range(6)],
                lambda x, o: flexebt.flex_ebt_attention(*x, return_lse=True, kernel_options=o),
                [(1, 2, 0, 16), (1, 2, 0, 16), (1, 2, 0), (1, 2, 0)]),
    "piecewise_M0": (lambda: [_x(1, 2, 0, 16), _x(1, 2, 5, 16), _x(1, 2, 0, 16), _x(1, 2, 5, 16), _x(1, 2, 5, 16)],
                     lambda x, o: flexebt.piecewise_attention(*x, dist_threshold=2, kernel_options=o), [(1, 2, 0, 16)]),
    "piecewise_N0": (lambda: [_x(1, 2, 5, 16), _x(1, 2, 0, 16), _x(1, 2, 5, 16), _x(1, 2, 0, 16), _x(1, 2, 0, 16)],
                     lambda x, o: flexebt.piecewise_attention(*x, dist_threshold=2, causal=True, kernel_options=o),
                     [(1, 2, 5, 16)]),
}


@pytest.mark.parametrize("backend", ["REFERENCE", pytest.param("TRITON", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("case", list(EMPTY))
def test_empty_sequences(case, backend, monkeypatch):
    make, call, shapes = EMPTY[case]
    if backend == "TRITON":  # nothing may be launched
        import flexebt.kernels.flex as kflex

        monkeypatch.setattr(kflex, "_launch", lambda *a, **k: pytest.fail("a kernel was launched"))
    x = make()
    outs = call(x, {"BACKEND": backend})
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert [tuple(o.shape) for o in outs] == shapes
    for o in outs:
        if o.dim() == 4:
            assert o.dtype == x[0].dtype and torch.equal(o, torch.zeros_like(o))
        else:
            assert o.dtype == torch.float32 and bool(torch.isneginf(o).all())
    loss = sum(torch.where(torch.isfinite(o), o, 0.0).square().sum() + o.clamp(min=-1).sum() for o in outs)
    first = torch.autograd.grad(loss, x, create_graph=True, allow_unused=True)
    first = [torch.zeros_like(a) if g is None else g for g, a in zip(first, x)]
    for g, a in zip(first, x):
        assert g.shape == a.shape and torch.equal(g, torch.zeros_like(a))
    if any(g.requires_grad for g in first):
        second = torch.autograd.grad(sum((g * torch.randn_like(g)).sum() for g in first if g.requires_grad), x,
                                     allow_unused=True)
        assert all(s is None or torch.equal(s, torch.zeros_like(s)) for s in second)


@pytest.mark.parametrize("backend", ["REFERENCE", pytest.param("TRITON", marks=pytest.mark.interpreter)])
def test_ebt_without_predicted_tokens_is_attention_over_the_observed_stream(backend):
    x = [_x(1, 2, 7, 16) for _ in range(3)] + [_x(1, 2, 0, 16) for _ in range(3)]
    out_o, out_p, lse_o, lse_p = flexebt.flex_ebt_attention(*x, return_lse=True, kernel_options={"BACKEND": backend})
    ref, ref_lse = flexebt.flex_attention(*(t.detach().double() for t in x[:3]), return_lse=True,
                                          kernel_options={"BACKEND": "REFERENCE"})
    assert out_p.shape == (1, 2, 0, 16) and lse_p.shape == (1, 2, 0)
    assert (out_o.double() - ref).abs().max() < 1e-5 and (lse_o.double() - ref_lse).abs().max() < 1e-5


# ---- piecewise dist_threshold ----

@pytest.mark.parametrize("w,exc,msg", [
    (float("nan"), ValueError, "dist_threshold is NaN"),
    (-math.inf, ValueError, "dist_threshold must be >= 0, got -inf"),
    (-2 ** 31, ValueError, "dist_threshold must be >= 0"),
    ("3", TypeError, "dist_threshold must be a number.*'3'"),
    (None, TypeError, "dist_threshold must be a number.*None"),
    (torch.tensor(3.0), TypeError, "dist_threshold must be a number.*Tensor"),
])
@pytest.mark.parametrize("backend", ["REFERENCE", pytest.param("TRITON", marks=pytest.mark.interpreter)])
def test_piecewise_threshold_refusals(w, exc, msg, backend):
    with pytest.raises(exc, match=msg):
        pw(dist_threshold=w, kernel_options={"BACKEND": backend})


@pytest.mark.interpreter
@pytest.mark.parametrize("w", [math.inf, 2 ** 31, 2 ** 40, 1e300, 7.5])
def test_piecewise_huge_thresholds_are_exact_on_both_backends(w):
    """dist = P + m - n is at most N - 1: every threshold above N means 'all pairs near', which the
    kernels (an int32 threshold) compute exactly."""
    x = [torch.randn(1, 2, S, 16) for S in (6, 8, 6, 8, 8)]
    kern = flexebt.piecewise_attention(*x, dist_threshold=w, causal=True, kernel_options={"BACKEND": "TRITON"})
    ref = flexebt.piecewise_attention(*(t.double() for t in x), dist_threshold=w, causal=True,
                                      kernel_options={"BACKEND": "REFERENCE"})
    near = flexebt.piecewise_attention(*(t.double() for t in x), dist_threshold=8 if w > 8 else w, causal=True,
                                       kernel_options={"BACKEND": "REFERENCE"})
    assert torch.equal(ref, near)
    assert (kern.double() - ref).abs().max() < 1e-5


def test_inputs_laid_out_b_s_h_d_are_recognised():
    """[B, S, H, D] tensors: the error says transpose(1, 2) instead of blaming the mask or the heads."""
    B, S, H, D = 1, 40, 4, 16
    x = [torch.randn(B, S, H, D) for _ in range(3)]
    bm = flexebt.create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, S, S, device="cpu")
    with pytest.raises(ValueError, match=r"look laid out \[B, S, H, D\].*transpose\(1, 2\)"):
        flexebt.flex_attention(*x, block_mask=bm)
    with pytest.raises(ValueError, match=r"transpose\(1, 2\)"):  # no mask, Sq != Skv: reads as a head mismatch
        flexebt.flex_attention(torch.randn(B, S, H, D), torch.randn(B, S + 3, H, D), torch.randn(B, S + 3, H, D))
    ebt = flexebt.create_ebt_block_mask(None, None, None, S, S - 1)
    xo = [torch.randn(B, S, H, D) for _ in range(3)]
    xp = [torch.randn(B, S - 1, H, D) for _ in range(3)]
    with pytest.raises(ValueError, match=r"look laid out \[B, S, H, D\]"):
        flexebt.flex_ebt_attention(*xo, *xp, block_mask=ebt)
    with pytest.raises(ValueError, match=r"look laid out \[B, S, H, D\]"):
        flexebt.piecewise_attention(x[0], x[1], x[0], x[1], x[2], 5, block_mask=bm)
    assert torch.equal(flexebt.flex_attention(*[t.transpose(1, 2) for t in x], block_mask=bm),
                       flexebt.flex_attention(*[t.transpose(1, 2).contiguous() for t in x], block_mask=bm))


def test_kernel_options_page_lists_every_declared_option():
    """docs/kernel-options.md holds the declared options' table as it is generated now."""
    import pathlib

    from flexebt._validation import KERNEL_OPTIONS, kernel_options_table

    page = (pathlib.Path(__file__).parent.parent / "docs" / "kernel-options.md").read_text()
    assert kernel_options_table() in page
    assert all(f"| `{k}` |" in page for k in KERNEL_OPTIONS)
