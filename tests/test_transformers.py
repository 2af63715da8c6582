"""flexebt as a transformers attention implementation (flexebt.integrations.transformers): a tiny
randomly initialised Llama with grouped-query attention gives the logits, the padded-batch
logits, the greedy generate (KV cache) and the second-order gradients of plain float64 attention
math registered the same way (transformers' "eager" takes its softmax in fp32, and SDPA's CPU
kernel has no double backward)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.masking_utils")

import flexebt.integrations.transformers as flexebt_hf  # noqa: E402
from helpers import rel_err  # noqa: E402


def _model(attn, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.set_attn_implementation(attn)
    return model


def _math64(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The oracle: dense attention in the inputs' dtype, the mask from transformers' sdpa mask (boolean),
    or a model's own additive one."""
    g = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    s = query @ key.transpose(-1, -2) * scaling
    if attention_mask is None:  # transformers' sdpa mask skips a plain causal mask (SDPA's is_causal)
        Sq, Skv = s.shape[-2:]
        attention_mask = torch.ones(Sq, Skv, dtype=torch.bool).tril(Skv - Sq)
    if attention_mask.dtype == torch.bool:
        s = s.masked_fill(~attention_mask, float("-inf"))
    else:  # an additive mask (Falcon adds its ALiBi bias to it)
        s = s + attention_mask[..., :s.shape[-1]]
    p = torch.softmax(s, -1).nan_to_num(0.0)  # a padding query keeps no key: output 0, as flexebt's
    return (p @ value).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def name():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("math64", _math64)
    AttentionMaskInterface.register("math64", sdpa_mask)
    return flexebt_hf.register()


def test_register_installs_the_attention_and_its_mask(name):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert name == "flexebt"
    assert AttentionInterface._global_mapping[name] is flexebt_hf.attention_forward
    assert name in AttentionMaskInterface._global_mapping  # without it the model would run unmasked


def test_logits_match_math_with_gqa_and_padding(name):
    ids = torch.randint(0, 61, (2, 19))
    pad = torch.ones(2, 19, dtype=torch.long)
    pad[1, :5] = 0  # left padding in the second sequence
    want = _model("math64")(input_ids=ids, attention_mask=pad).logits
    got = _model(name)(input_ids=ids, attention_mask=pad).logits
    assert rel_err(got[0], want[0]) < 1e-12
    assert rel_err(got[1, 5:], want[1, 5:]) < 1e-12
    causal = _model(name)(input_ids=ids[:1, :10]).logits  # a prefix sees nothing after it
    assert rel_err(causal[0], got[0, :10]) < 1e-12


def test_generate_with_a_kv_cache_matches_math(name):
    ids = torch.randint(0, 61, (2, 7))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = _model("math64").generate(ids, **kw)
    got = _model(name).generate(ids, **kw)
    assert torch.equal(got, want)


def test_second_order_gradients_match_math(name):
    """An EBT-style step through the whole model: a gradient w.r.t. the input embeddings with
    create_graph=True, then a loss on it, back to every parameter."""
    ids = torch.randint(0, 61, (1, 15))

    def step(model):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=emb).logits
        (g,) = torch.autograd.grad(logits.square().sum(), emb, create_graph=True)
        params = [p for p in model.parameters()]
        return torch.autograd.grad(g.square().sum(), params, allow_unused=True)

    want = step(_model("math64"))
    got = step(_model(name))
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < 1e-10


@pytest.mark.interpreter
def test_kernels_in_float32(name):
    """The Triton kernels (interpreter) under the same model, float32."""
    import os

    ids = torch.randint(0, 61, (1, 21))
    want = _model("math64")(input_ids=ids).logits
    os.environ["FLEXEBT_BACKEND"] = "TRITON"
    try:
        got = _model(name, torch.float32)(input_ids=ids).logits
    finally:
        del os.environ["FLEXEBT_BACKEND"]
    assert rel_err(got, want) < 1e-5


def test_dropout_is_refused(name):
    import torch.nn as nn

    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="dropout"):
        flexebt_hf.attention_forward(nn.Module(), q, q, q, None, dropout=0.1)


def test_softcap_and_sinks(name):
    """Soft-capping and attention sinks against the same math written out."""
    import torch.nn as nn

    q, k, v = (torch.randn(1, 4, 9, 8, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(4, dtype=torch.float64)
    out, _ = flexebt_hf.attention_forward(nn.Module(), q, k, v, None, scaling=0.3, softcap=2.0, s_aux=sinks)
    s = 2.0 * torch.tanh(q @ k.transpose(-1, -2) * 0.3 / 2.0)
    s = torch.cat([s, sinks.view(1, 4, 1, 1).expand(1, 4, 9, 1)], -1)
    p = torch.softmax(s, -1)[..., :-1]
    assert rel_err(out, (p @ v).transpose(1, 2)) < 1e-12


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_dense_4d_mask_is_applied(name, kind):
    """A dense mask handed to the attention function (bool as SDPA reads it, or additive), with a
    batch dimension of 1 broadcast over the batch."""
    import torch.nn as nn

    q, k, v = (torch.randn(2, 4, 9, 8, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(1, 1, 9, 9) < 0.6
    keep[..., 0] = True  # every row keeps a key
    mask = keep if kind == "bool" else torch.where(keep, 0.0, float("-inf")).double()
    out, _ = flexebt_hf.attention_forward(nn.Module(), q, k, v, mask, scaling=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)
    assert rel_err(out, want.transpose(1, 2)) < 1e-12


def test_softcap_then_a_dense_mask(name):
    """The soft-cap applies to the score before the dense mask's bias is added."""
    import torch.nn as nn

    q, k, v = (torch.randn(1, 2, 7, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 2, 7, 7, dtype=torch.float64)
    out, _ = flexebt_hf.attention_forward(nn.Module(), q, k, v, bias, scaling=0.5, softcap=1.5)
    s = 1.5 * torch.tanh(q @ k.transpose(-1, -2) * 0.5 / 1.5) + bias
    assert rel_err(out, (torch.softmax(s, -1) @ v).transpose(1, 2)) < 1e-12


def _same_to_second_order(ours, math, q, k, v, extra):
    """``ours`` and ``math`` (functions of q, k, v and one more tensor) agree -- finite -- in their
    outputs, the gradients of q and ``extra`` (create_graph=True) and the second-order gradients of
    k and ``extra`` through them."""
    results = []
    for f in (ours, math):
        out = f(q, k, v, extra)
        g = torch.autograd.grad(out.square().sum(), (q, extra), create_graph=True)
        results.append((out, *g, *torch.autograd.grad(sum(x.square().sum() for x in g), (k, extra))))
    for a, b in zip(*results):
        assert torch.isfinite(a).all() and rel_err(a, b) < 1e-10


@pytest.mark.parametrize("shape", [(2, 1, 1, 9), (1, 1, 9, 9), (2, 4, 1, 9), (1, 4, 9, 1)])
def test_every_size_one_dimension_of_a_dense_mask_broadcasts(name, shape):
    """A padding mask [B, 1, 1, Skv] (a user's, as BERT takes it) and other broadcast shapes, as
    SDPA reads them; an integer mask is refused, as SDPA refuses it."""
    import torch.nn as nn

    q, k, v = (torch.randn(2, 4, 9, 8, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(shape) < 0.6
    keep[..., 0] = True
    for mask in (keep, torch.zeros(shape, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)):
        out, _ = flexebt_hf.attention_forward(nn.Module(), q, k, v, mask, scaling=0.3)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        assert rel_err(out, want.transpose(1, 2)) < 1e-12
    with pytest.raises(TypeError, match="int64"):
        flexebt_hf.attention_forward(nn.Module(), q, k, v, keep.long(), scaling=0.3)


def test_position_bias_is_added_and_learned(name):
    """T5's relative-position bias arrives as ``position_bias`` [1, H, Sq, Skv]: added to the scores
    after the mask, with its gradient first and second order; a tiny T5 (encoder padding, decoder,
    cross-attention, generate) gives plain float64 math's logits and tokens."""
    import torch.nn as nn

    q, k, v = (torch.randn(2, 4, 7, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keep[1, ..., 5:] = False

    def math(q, k, v, bias):
        s = (q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf")) + bias
        return (torch.softmax(s, -1) @ v).transpose(1, 2)

    def ours(q, k, v, bias):
        return flexebt_hf.attention_forward(nn.Module(), q, k, v, keep, scaling=1.0, position_bias=bias)[0]

    _same_to_second_order(ours, math, q, k, v, bias)

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).double().eval()
    ids, dec = torch.randint(1, 64, (2, 9)), torch.randint(1, 64, (2, 6))
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, 6:] = 0
    res = {}
    for impl in ("sdpa", name):
        model.set_attn_implementation(impl)
        res[impl] = (model(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits,
                     model.generate(ids, attention_mask=am, max_new_tokens=5, do_sample=False))
    assert rel_err(res[name][0], res["sdpa"][0]) < 1e-12
    assert torch.equal(res[name][1], res["sdpa"][1])


def test_keywords_flexebt_does_not_implement_are_refused(name):
    import torch.nn as nn

    q = torch.randn(1, 2, 4, 8)
    sel = torch.zeros(1, 4, 2, dtype=torch.long)
    for kw in ({"indices": sel}, {"block_indices": sel}, {"topk_indices": sel}):  # block_indices: MiniMax-M3
        with pytest.raises(NotImplementedError, match=next(iter(kw))):
            flexebt_hf.attention_forward(nn.Linear(1, 1), q, q, q, None, **kw)
    out, _ = flexebt_hf.attention_forward(nn.Linear(1, 1), q, q, q, None, block_indices=None, scaling=0.5)
    assert out.shape == (1, 4, 2, 8)  # absent (None) selections change nothing


def test_block_mask_query_slices_select_query_tokens(name):
    """A model may select query tokens of its masks as of a dense [B, H, Sq, Skv] mask (Gemma 4's
    KV-shared layers take mask[:, :, -n:, :]); the mask function's block masks then mean those
    tokens, the whole range included (n = 0)."""
    from torch.nn.attention.flex_attention import create_block_mask

    S = 21
    lengths = torch.tensor([21, 15])

    def padded_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx < lengths[b])

    full = create_block_mask(padded_causal, 2, None, S, S, device="cpu", BLOCK_SIZE=16)
    full.__class__ = flexebt_hf._QuerySliceableBlockMask
    q, k, v = (torch.randn(2, 2, S, 8, dtype=torch.float64) for _ in range(3))
    whole = flexebt_hf.attention_forward(torch.nn.Linear(1, 1), q, k, v, full, scaling=0.3)[0]
    assert full[:, :, slice(0, None), :] is full
    for n in (1, 5, 17):
        part = full[:, :, slice(-n, None), :]
        assert part.seq_lengths == (n, S)
        got = flexebt_hf.attention_forward(torch.nn.Linear(1, 1), q[:, :, -n:], k, v, part, scaling=0.3)[0]
        assert rel_err(got, whole[:, -n:]) < 1e-12
    assert full[0].kv_num_blocks.shape == full.kv_num_blocks[0:1].shape  # other indexing is torch's


@pytest.mark.skipif(not hasattr(transformers, "Gemma4ForCausalLM"), reason="a transformers without Gemma 4")
def test_gemma4_kv_shared_layers_match_math(name):
    """Gemma 4 with KV-shared layers slices every layer's mask to the tokens whose logits it keeps:
    logits and greedy generate equal the math oracle's."""
    config = transformers.AutoConfig.for_model(
        "gemma4_text", vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, global_head_dim=8,
        layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2, sliding_window=4,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=61, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    ids = torch.randint(3, 61, (1, 12))
    results = []
    for impl in ("math64", name):
        model.set_attn_implementation(impl)
        results.append((model(input_ids=ids).logits, model.generate(ids, max_new_tokens=4, do_sample=False)))
    assert rel_err(results[1][0], results[0][0]) < 1e-10
    assert torch.equal(results[1][1], results[0][1])


def test_sinks_with_padded_rows_have_finite_second_order_gradients(name):
    """A padded query keeps no key (lse = -inf): its sink weight and every derivative of it are 0,
    not NaN; elsewhere the gradients are the written-out softmax's."""
    import torch.nn as nn

    q, k, v = (torch.randn(2, 4, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sinks = torch.randn(4, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep[1, :, :, :2] = False
    keep[1, :, :2, :] = False  # two padded queries in the second sequence: they keep nothing

    def math(q, k, v, sinks):
        s = (q @ k.transpose(-1, -2)) * 0.3
        s = torch.cat([s.masked_fill(~keep, float("-inf")), sinks.view(1, 4, 1, 1).expand(2, 4, 6, 1)], -1)
        return (torch.softmax(s, -1)[..., :-1] @ v).transpose(1, 2)

    def ours(q, k, v, sinks):
        return flexebt_hf.attention_forward(nn.Module(), q, k, v, keep, scaling=0.3, s_aux=sinks)[0]

    _same_to_second_order(ours, math, q, k, v, sinks)


def test_generate_with_a_static_cache_matches_sdpa(name):
    """A static cache bumps the offsets its mask reads, in place, before each layer's attention; the
    mask function copies them when the mask is made.  Without padding (nothing else hides the
    next, empty cache slot), every decoding step gives SDPA's logits."""
    ids = torch.randint(1, 61, (1, 7))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static", output_logits=True,
              return_dict_in_generate=True)
    want = torch.stack(_model("sdpa").generate(ids, **kw).logits)
    got = torch.stack(_model(name).generate(ids, **kw).logits)
    assert rel_err(got, want) < 1e-12


def test_output_attentions_warns_that_none_are_returned(name):
    import torch.nn as nn

    q = torch.randn(1, 2, 4, 8)
    with pytest.warns(UserWarning, match="output_attentions"):
        flexebt_hf.attention_forward(nn.Module(), q, q, q, None, output_attentions=True)


def test_per_token_sinks_first_and_second_order(name):
    """``sinks`` [B, H, Sq, 1] (one sink logit per query token, Inkling2): the written-out softmax
    over the scores and the sink, with padded rows, first and second order."""
    import torch.nn as nn

    q, k, v = (torch.randn(2, 4, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sinks = torch.randn(2, 4, 6, 1, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    keep[1, :, :2, :] = False

    def math(q, k, v, sinks):
        s = ((q @ k.transpose(-1, -2)) * 0.3).masked_fill(~keep, float("-inf"))
        return (torch.softmax(torch.cat([s, sinks], -1), -1)[..., :-1] @ v).transpose(1, 2)

    def ours(q, k, v, sinks):
        return flexebt_hf.attention_forward(nn.Module(), q, k, v, keep, scaling=0.3, sinks=sinks)[0]

    _same_to_second_order(ours, math, q, k, v, sinks)


def _tiny(model_type: str, attn: str, **config):
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(model_type, vocab_size=61, **config)
    model = transformers.AutoModelForCausalLM.from_config(cfg).double().eval()
    model.set_attn_implementation(attn)
    return model


def test_models_that_take_no_block_mask_get_a_dense_one(name):
    """Models that declare no flex attention support work on their mask as a tensor: Falcon adds its
    ALiBi bias to it, GPT-2 reads ``mask.ndim`` (a static cache's precomputed mask reaches it as
    ``attention_mask``).  flexebt's mask function gives them SDPA's dense mask and its attention
    applies it: SDPA's logits (Falcon, left padding) and tokens and logits (GPT-2, static cache);
    Falcon's second-order gradients match the float64 math."""
    falcon = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                  new_decoder_architecture=False, multi_query=False, parallel_attn=True, bias=False)
    ids = torch.randint(3, 61, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    want = _tiny("falcon", "sdpa", **falcon)(ids, attention_mask=mask).logits
    got = _tiny("falcon", name, **falcon)(ids, attention_mask=mask).logits
    assert rel_err(got[1, 3:], want[1, 3:]) < 1e-12 and rel_err(got[0], want[0]) < 1e-12

    def second(attn):
        model = _tiny("falcon", attn, **falcon)
        emb = model.get_input_embeddings()(ids[:1]).detach().requires_grad_()
        g, = torch.autograd.grad(model(inputs_embeds=emb).logits.square().sum(), emb, create_graph=True)
        return torch.autograd.grad(g.square().sum(), [p for p in model.parameters() if p.requires_grad][:6])

    for a, b in zip(second(name), second("math64")):
        assert rel_err(a, b) < 1e-10

    gpt2 = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static", output_logits=True,
              return_dict_in_generate=True)
    prompt = torch.randint(3, 61, (1, 7))
    want = _tiny("gpt2", "sdpa", **gpt2).generate(prompt, **kw)
    got = _tiny("gpt2", name, **gpt2).generate(prompt, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert rel_err(torch.stack(got.logits), torch.stack(want.logits)) < 1e-12
