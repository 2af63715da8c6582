"""Integer arithmetic inside mods means what it means in torch's eager flex_attention, which passes
int64 positions: values past 2^31 (hashes with large constants, products of positions, int32
captured tensors plus a position) are exact in both backends, at first and second order; the
kernels compute in int32 only what provably fits (codegen/intervals.py), and the intervals that
decide it hold every value a mod computes.  One-element integer and bool tensors read as values
work like float ones.
"""

import random

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

import flexebt
from flexebt.codegen.intervals import POSITION_LIMIT, integer_intervals, kernel_dtypes
from flexebt.codegen.source import position_extents
from flexebt.codegen.trace import trace_mask_mod, trace_score_mod
from helpers import rel_err, second_order

pytestmark = pytest.mark.interpreter
T = {"BACKEND": "TRITON"}
R = {"BACKEND": "REFERENCE"}
B, H, S, D = 1, 2, 37, 8

_OFFSETS = torch.tensor([2 ** 31 - 200 + 3 * i for i in range(S)], dtype=torch.int32)  # int32, near its top
_SCALE = torch.tensor([1.5, -0.75], requires_grad=True)  # learned, so the derivative graphs carry the integers

# Each mod's integer values leave int32 for some positions of a 37-long call; in torch (int64 positions)
# they are exact.  The float factor makes every second-order term depend on them.
SCORE_MODS = {
    "hash_uint32_constant": lambda s, b, h, q, k: s * (1 + ((q * 40503 + k * 2654435761) % 97) * 0.01),
    "int64_constant": lambda s, b, h, q, k: s + ((k + 2 ** 33) % 5) * 0.3 * _SCALE[h],
    "product_of_positions": lambda s, b, h, q, k: s * _SCALE[h] + ((q * k * 100000000) % 7) * 0.2,
    "int32_tensor_plus_position": lambda s, b, h, q, k: s + ((_OFFSETS[q] + k * 7) % 11) * 0.1 * _SCALE[h],
    "floor_division_of_a_large_product": lambda s, b, h, q, k: s * (1 + ((k * 3000000000) // 1000000000) * 0.05),
    "comparison_with_a_large_constant": lambda s, b, h, q, k: torch.where(q * 2 ** 40 + k > 2654435761 * 500,
                                                                          s * _SCALE[h], s),
}


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(B, H, S, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("name", sorted(SCORE_MODS))
def test_integer_values_past_int32_match_torch(name):
    sm = SCORE_MODS[name]
    q, k, v = (x.detach() for x in _inputs(torch.float64))
    with torch.no_grad():
        want = torch_flex_attention(q, k, v, score_mod=sm)  # torch's own eager flex_attention (int64 positions)
        assert rel_err(flexebt.flex_attention(q, k, v, score_mod=sm, kernel_options=R), want) < 1e-12
        got = flexebt.flex_attention(q.float(), k.float(), v.float(), score_mod=sm, kernel_options=T)
        assert rel_err(got, want) < 2e-6


@pytest.mark.parametrize("name", ["hash_uint32_constant", "product_of_positions", "int32_tensor_plus_position",
                                  "comparison_with_a_large_constant"])
def test_integer_values_past_int32_second_order(name):
    sm = SCORE_MODS[name]
    xs = _inputs()
    learned = [_SCALE] if name != "hash_uint32_constant" else []

    def run(backend):
        return lambda *a: flexebt.flex_attention(*a[:3], score_mod=sm, kernel_options=backend)

    got = second_order(run(T), xs + learned)
    want = second_order(run(R), xs + learned)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.isfinite(a).all() and rel_err(a, b) < 2e-5


def test_mask_mod_past_int32_matches_torch():
    """A mask_mod hash in the kernels' partial tiles and in the block mask torch builds agree."""
    def hashed(b, h, q, k):
        return ((q * 2654435761 + k * 40503) % 5 != 0) | (q == k)

    bm = create_block_mask(hashed, None, None, S, S, device="cpu", BLOCK_SIZE=16)
    q, k, v = (x.detach() for x in _inputs(torch.float64))
    with torch.no_grad():
        want = torch_flex_attention(q, k, v, block_mask=bm)
        got = flexebt.flex_attention(q.float(), k.float(), v.float(), block_mask=bm, kernel_options=T)
    assert rel_err(got, want) < 2e-6


def test_ebt_frame_hash_matches_the_reference():
    """Frame positions through the EBT kernels: a hash of frames past int32, first and second order."""
    def sm(s, b, h, q, k):
        return s * (1 + ((q * 2654435761 + k) % 13) * 0.02) * _SCALE[h]

    Sp = 29
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(B, H, n, D, generator=g).requires_grad_() for n in (S, S, S, Sp, Sp, Sp)]
    bm = flexebt.create_ebt_block_mask(flexebt.masks.ebt_causal_mask, None, None, S, Sp, BLOCK_SIZE=16)

    def run(backend):
        return lambda *a: flexebt.flex_ebt_attention(*a[:6], score_mod=sm, block_mask=bm, kernel_options=backend)

    got = second_order(run(T), xs + [_SCALE])
    want = second_order(run(R), xs + [_SCALE])
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.isfinite(a).all() and rel_err(a, b) < 2e-5


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_zero_dim_integer_tensor_read_as_a_value(dtype):
    """``dist < w`` with a captured 0-d integer (or bool) ``w``: first and second order."""
    w = torch.tensor(True if dtype == torch.bool else 4, dtype=dtype)
    temp = torch.tensor(0.8, requires_grad=True)

    def windowed(s, b, h, q, k):
        return torch.where((q - k).abs() < w, s * temp, s - 5 * temp)

    xs = _inputs()
    with torch.no_grad():
        want = torch_flex_attention(*[x.detach().double() for x in xs], score_mod=windowed)
        assert rel_err(flexebt.flex_attention(*xs, score_mod=windowed, kernel_options=T), want) < 2e-6

    def run(backend):
        return lambda *a: flexebt.flex_attention(*a[:3], score_mod=windowed, kernel_options=backend)

    got = second_order(run(T), xs + [temp])
    want2 = second_order(run(R), xs + [temp])
    for a, b in zip(got[0] + got[1], want2[0] + want2[1]):
        assert rel_err(a, b) < 2e-5


def test_common_mods_compute_in_int32():
    """The narrowing keeps ordinary index arithmetic in int32 (no cost for the usual mods), and widens
    exactly the values that may not fit."""
    bias = torch.randn(2 * S - 1)
    doc = torch.zeros(S, dtype=torch.int32)
    relative = trace_score_mod(lambda s, b, h, q, k: s + bias[q - k + S - 1] + (q - k) * 0.5)
    assert set(kernel_dtypes(relative.graph).values()) <= {torch.int32}
    docs = trace_mask_mod(lambda b, h, q, k: (doc[q] == doc[k]) & (q - k <= 128) & (q >= k))
    assert set(kernel_dtypes(docs.graph).values()) <= {torch.int32, torch.bool}
    hashed = trace_mask_mod(lambda b, h, q, k: (q * 2654435761) % 7 == 0)
    wide = {n for n, dt in kernel_dtypes(hashed.graph).items() if dt == torch.int64}
    assert len(wide) == 1  # the product (its remainder by 7 is small again)


def test_extents_past_the_position_limit_are_refused():
    position_extents(1, 1, POSITION_LIMIT, POSITION_LIMIT)
    with pytest.raises(ValueError, match="2\\^30"):
        position_extents(1, 1, POSITION_LIMIT + 1, 16)


# --- the intervals hold every value: random integer expressions, evaluated at random positions ------
_INT_OPS = [
    lambda x, y: x + y, lambda x, y: x - y, lambda x, y: x * y, lambda x, y: -x, lambda x, y: x.abs(),
    lambda x, y: x // (y.abs() + 1), lambda x, y: x // -(y.abs() + 1), lambda x, y: x % (y.abs() + 1),
    lambda x, y: x % -(y.abs() + 1), lambda x, y: torch.fmod(x, y.abs() + 1), lambda x, y: x & y,
    lambda x, y: x | y, lambda x, y: x ^ y, lambda x, y: ~x, lambda x, y: x >> 3, lambda x, y: x << 5,
    lambda x, y: torch.maximum(x, y), lambda x, y: torch.minimum(x, y), lambda x, y: x.clamp(-1000, 77),
    lambda x, y: torch.where(x > y, x, y * 3), lambda x, y: x ** 2, lambda x, y: x ** 3, lambda x, y: x.sign(),
    lambda x, y: x * 2654435761, lambda x, y: x + 2 ** 33, lambda x, y: x.to(torch.int32),
    lambda x, y: torch.div(x, y.abs() + 1, rounding_mode="trunc"), lambda x, y: (x > y).long() * 5,
]
_TABLE = torch.tensor([-2 ** 31, -5, 0, 9, 2 ** 31 - 1], dtype=torch.int32)


def _random_mask_mod(rng):
    steps = [(rng.randrange(len(_INT_OPS)), rng.randrange(6), rng.randrange(6)) for _ in range(6)]

    def mod(b, h, q, k):
        vals = [b, h, q, k, q - k, _TABLE[k % 5]]
        for op, i, j in steps:
            vals.append(_INT_OPS[op](vals[-1 - i], vals[-1 - j]))
        return vals[-1] % 3 == 0
    return mod


def test_intervals_hold_every_value():
    rng = random.Random(0)
    positions = [0, 1, 2, 1000, POSITION_LIMIT - 2, POSITION_LIMIT - 1]
    for _ in range(40):
        traced = trace_mask_mod(_random_mask_mod(rng))
        bounds = integer_intervals(traced.graph)
        for _ in range(6):
            args = [torch.tensor([rng.choice(positions)], dtype=torch.int64) for _ in range(4)]
            seen = {}

            class Record(torch.fx.Interpreter):
                def run_node(self, n):
                    out = super().run_node(n)
                    if isinstance(out, torch.Tensor) and not out.is_floating_point():
                        seen[n.name] = int(out.reshape(-1)[0])
                    return out

            Record(traced.graph).run(*args)
            for name, value in seen.items():
                if name in bounds:
                    lo, hi = bounds[name]
                    assert lo <= value <= hi, (name, value, bounds[name])


# --- integer dtypes and numbers as torch promotes them -------------------------------------------
_G = torch.Generator().manual_seed(11)
_I8 = torch.randint(-128, 128, (S,), generator=_G, dtype=torch.int8)
_U8 = torch.randint(0, 256, (S,), generator=_G, dtype=torch.uint8)
_I16 = torch.randint(-2 ** 15, 2 ** 15, (S,), generator=_G, dtype=torch.int16)
_I32 = torch.randint(-2 ** 31, 2 ** 31 - 1, (S,), generator=_G, dtype=torch.int32)
_W64 = torch.tensor(2 ** 31)  # 0-d int64
_W32 = torch.tensor(100, dtype=torch.int32)  # 0-d int32


def _copy_past_int32(s, b, h, q, k):
    x = k * 0
    x.copy_(k * 2 ** 33 + k)
    return s * (1 + 0.1 * ((x + 1) % 5))


def _copy_into_int32(s, b, h, q, k):
    x = (k * 0).to(torch.int32)
    x.copy_(k * 2 ** 31 + k)  # truncated to int32, as torch does
    return s * (1 + 0.1 * (x % 5))


def _factor(value):
    """A score_mod scaling the score by a function of an integer (or bool) value."""
    return lambda s, b, h, q, k: s * (1 + 0.05 * (value(q, k) % 7))


PROMOTION_MODS = {
    # a 0-d tensor counts like any other value (torch applies the mod per score)
    "int32_table_plus_0d_int64": _factor(lambda q, k: _I32[k] + _W64),
    "uint8_table_plus_0d_int32": _factor(lambda q, k: _U8[k] + _W32),
    "int32_table_times_tensor_made_inside": _factor(lambda q, k: _I32[k] * torch.tensor(3)),
    "int8_sums_are_int64": _factor(lambda q, k: _I8[q].sum() + _I8[k].sum()),
    "uint8_sums_are_int64": _factor(lambda q, k: _U8[q].sum() - _U8[k].sum()),
    # mixed dtypes: uint8 with int8 is int16 in torch
    "int8_minus_uint8": _factor(lambda q, k: _I8[q] - _U8[k]),
    "uint8_greater_than_int8": _factor(lambda q, k: (_U8[k] > _I8[q]).long() * 3 + 1),
    # a number is cast to the tensor's dtype, as torch casts it
    "int32_below_2_pow_40": _factor(lambda q, k: (_I32[k] < 2 ** 40).long() + 1),
    "int32_floor_div_uint32_range": _factor(lambda q, k: _I32[k] // 4294967295),
    "int32_equal_past_int32": _factor(lambda q, k: (_I32[k] == 2 ** 32 + 1000).long() + 2),
    "int16_remainder_65535": _factor(lambda q, k: _I16[k] % 65535 + 3),
    "uint8_greater_than_minus_one": _factor(lambda q, k: (_U8[k] > -1).long() + 2),
    "int16_greater_than_40000": _factor(lambda q, k: (_I16[k] > 40000).long() + 2),
    "position_minus_2_pow_63": _factor(lambda q, k: k - 2 ** 63),
    # bool with a number is int64
    "bool_plus_uint32_range": _factor(lambda q, k: (q >= k) + 4294967295),
    "bool_remainder": _factor(lambda q, k: (q > k) % 3 + 1),
    "uint8_remainder": _factor(lambda q, k: _U8[k] % 7),
    # a constant divisor between 2^31 and 2^32
    "remainder_by_uint32_range_constant": _factor(lambda q, k: (q * 31 + k) % 2654435761),
    # where and clamp weigh a 0-d operand less, as torch's per-score evaluation does
    "where_with_0d_int64_branch": _factor(lambda q, k: torch.where(q >= k, _I8[k], torch.tensor(0)) * 20),
    "where_with_0d_int16_branch": _factor(lambda q, k: torch.where(q > k, torch.tensor(-30000, dtype=torch.int16),
                                                                   _I8[k])),
    "clamp_with_0d_int16_bound": _factor(lambda q, k: torch.clamp(_I8[k], min=torch.tensor(200, dtype=torch.int16))),
    # in-place integer ops
    "shift_left_in_place": _factor(lambda q, k: (q + k).bitwise_left_shift_(33) % 97),
    "xor_in_place_past_int32": _factor(lambda q, k: (q + k).bitwise_xor_(2 ** 40) % 97),
    "and_in_place_int8_number": _factor(lambda q, k: _I8[k].clone().bitwise_and_(-200)),
    # an integer to a float power is a float
    "int8_to_the_power_2_0": lambda s, b, h, q, k: s - 1e-4 * _I8[k] ** 2.0,
    "int32_to_the_power_3_0": lambda s, b, h, q, k: s - 1e-20 * torch.pow(_I32[k], 3.0),
    "int_to_the_power_0_5": lambda s, b, h, q, k: s - 0.1 * (q - k).abs() ** 0.5,
    "int_to_the_power_minus_0_5": lambda s, b, h, q, k: s * (k + 1) ** -0.5,
    # copy_ takes the source's values, cast to the destination's dtype
    "copy_past_int32": None,
    "copy_into_int32": None,
}
PROMOTION_MODS["copy_past_int32"] = _copy_past_int32
PROMOTION_MODS["copy_into_int32"] = _copy_into_int32


@pytest.mark.parametrize("name", sorted(PROMOTION_MODS))
def test_integer_promotion_matches_torch(name):
    sm = PROMOTION_MODS[name]
    q, k, v = (x.detach() for x in _inputs(torch.float64))
    with torch.no_grad():
        want = torch_flex_attention(q, k, v, score_mod=sm)
        assert rel_err(flexebt.flex_attention(q, k, v, score_mod=sm, kernel_options=R), want) < 1e-12
        got = flexebt.flex_attention(q.float(), k.float(), v.float(), score_mod=sm, kernel_options=T)
        assert rel_err(got, want) < 2e-6


def test_learned_table_indexed_by_a_promoted_value_second_order():
    """``learn[(u8[kv] + w) % 11]`` with a 0-d int32 ``w``: torch computes the index in int32 (values
    past 255); first and second order, the table's gradient included."""
    learn = torch.randn(11, requires_grad=True)

    def sm(s, b, h, q, k):
        return s * learn[(_U8[k] + _W32) % 11]

    xs = _inputs()

    def run(backend):
        return lambda *a: flexebt.flex_attention(*a[:3], score_mod=sm, kernel_options=backend)

    got = second_order(run(T), xs + [learn])
    want = second_order(run(R), xs + [learn])
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert torch.isfinite(a).all() and rel_err(a, b) < 2e-5


# torch's float functions of an integer or bool operand promote it to the default float dtype;
# floor / ceil / trunc / round of an integer tensor return it unchanged
_INT_FUNCTIONS = {
    "sin_cos_tan_of_b": lambda s, b, h, q, k: torch.sin(torch.cos(s)) + torch.tan(b) + torch.cos(h),
    "exp_of_distance": lambda s, b, h, q, k: s + torch.exp(-(q - k).abs()) + torch.exp2(-(q - k).abs()),
    "sqrt_rsqrt_of_positions": lambda s, b, h, q, k: s - 0.1 * torch.sqrt(k) + torch.rsqrt(q + 1),
    "logs_of_positions": lambda s, b, h, q, k: s * torch.log2(h + 1) + torch.log(q + 1) - torch.log10(k + 1),
    "erf_sigmoid_reciprocal": lambda s, b, h, q, k: s + torch.erf(q - k) + torch.sigmoid(k - 5) + torch.reciprocal(q + 1),
    "hyperbolic": lambda s, b, h, q, k: s + torch.tanh(q - k) + 0.01 * torch.cosh(k % 3) - 0.01 * torch.sinh(h),
    "bool_operand": lambda s, b, h, q, k: s + torch.sin(q >= k),
    "floor_ceil_trunc_round_of_int": lambda s, b, h, q, k: s + (torch.floor(q) - torch.ceil(k) + torch.trunc(q - k)
                                                                 + torch.round(q - 2 * k)) * 0.1,
}


@pytest.mark.parametrize("name", list(_INT_FUNCTIONS))
def test_float_functions_of_integers(name):
    """torch.sin(b), torch.exp(q_idx - kv_idx), ... (torch's own test mod ``_trig`` among them):
    computed as torch does, in the forward and the gradients."""
    mod = _INT_FUNCTIONS[name]
    torch.manual_seed(0)
    x = [torch.randn(B, H, 21, 16, requires_grad=True) for _ in range(3)]
    want = torch_flex_attention(*[t.detach() for t in x], score_mod=mod)
    got = flexebt.flex_attention(*x, score_mod=mod, kernel_options=T)
    assert rel_err(got, want) < 1e-5
    g = torch.autograd.grad(got.square().sum(), x)
    x64 = [t.detach().double().requires_grad_() for t in x]
    r = flexebt.flex_attention(*x64, score_mod=mod, kernel_options=R)
    for a, b in zip(g, torch.autograd.grad(r.square().sum(), x64)):
        assert rel_err(a, b) < 1e-5
