"""The quantizer's analytic error bounds, bit packing of random plans, plan layouts and plan (de)serialization.

Bounds checked (quantize.py): for one group x and b bits, shift = fp16(min x), scale >= (max x - shift)/(2^b - 1)
(rounded UP to fp16), so every x reconstructs within scale/2 of itself, plus the fp16 rounding of the shift when
that rounding landed above min x (then x < shift saturates to symbol 0), plus float32 arithmetic noise.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtc_sglang.codec.bitpack import pack_symbols, unpack_symbols
from kvtc_sglang.codec.errors import CalibrationMismatchError, ShapeError
from kvtc_sglang.codec.plan import GROUP_OVERHEAD_BITS, BitPlan, Group, PlanLayout
from kvtc_sglang.codec.quantize import (
    dequantize_groups,
    fake_quantize,
    group_params,
    quantize_groups,
    round_up_fp16,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BITS = (2, 4, 8)
F32_TINY = 2.0 ** -149  # smallest fp32 subnormal
F32_EPS = 2.0 ** -24


def _quantize(x: torch.Tensor, bits):
    shift, scale = group_params(x, bits)
    q = quantize_groups(x, shift, scale, bits)
    return shift, scale, q, dequantize_groups(q, shift, scale)


def _bound(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, bits) -> torch.Tensor:
    """[..., 1] per-group bound on |x - x_hat|: scale/2 + how far the fp16 shift rose above min(x) + fp32 noise
    (relative, plus the smallest fp32 subnormal per level: span / levels underflows for denormal spans)."""
    levels = (2.0 ** torch.as_tensor(bits, dtype=torch.float64)) - 1
    lo = x.double().amin(-1)
    sh, sc = shift.double(), scale.double()
    shift_err = (sh - lo).clamp_min(0)
    mag = x.double().abs().amax(-1) + sh.abs() + levels * sc
    return (sc / 2 + shift_err + 8 * F32_EPS * mag + (levels + 1) * F32_TINY).unsqueeze(-1)


def _data(kind: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if kind == "offset":  # a large common offset: the fp16 shift rounding is visible
        return x * 0.01 + 1234.567
    if kind == "wide":
        return x * 300.0
    if kind == "tiny":
        return x * 1e-3
    return x


# --- quantizer ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("kind", ["normal", "offset", "wide", "tiny"])
@pytest.mark.parametrize("size", [1, 16, 64])
def test_quantizer_error_within_half_scale_plus_shift_rounding(bits, kind, size):
    x = _data(kind, (64, 7, size), seed=bits * 100 + size)
    shift, scale, q, xh = _quantize(x, bits)
    assert shift.dtype == scale.dtype == torch.float16 and shift.shape == scale.shape == (64, 7)
    assert q.dtype == torch.uint8 and int(q.max()) <= (1 << bits) - 1
    assert bool(torch.isfinite(scale).all()) and bool((scale >= 0).all())
    err = (x.double() - xh.double()).abs()
    assert bool((err <= _bound(x, shift, scale, bits)).all()), float((err - _bound(x, shift, scale, bits)).max())


@pytest.mark.parametrize("bits", BITS)
def test_scale_rounded_up_keeps_group_max_in_code_range(bits):
    x = _data("normal", (512, 16), seed=bits)
    shift, scale = group_params(x, bits)
    levels = (1 << bits) - 1
    top = shift.double() + levels * scale.double()
    hi = x.double().amax(-1)
    # shift + levels*scale covers max(x) (up to the float32 rounding of the quotient before the fp16 round-up)
    assert bool((top >= hi - 4 * F32_EPS * (hi.abs() + top.abs())).all())
    # ... and it is the smallest fp16 scale doing so: one fp16 step down would not cover the span
    lower = torch.nextafter(scale, torch.zeros_like(scale)).double()
    span = (hi - shift.double()).clamp_min(0)
    nonzero = scale > 0
    assert bool((lower[nonzero] * levels < span[nonzero] * (1 + 4 * F32_EPS)).all())
    # the max itself reconstructs within scale/2 (it is never clamped away)
    xh = fake_quantize(x, bits)
    at_max = x.argmax(-1, keepdim=True)
    err = (x.gather(-1, at_max) - xh.gather(-1, at_max)).abs().squeeze(-1).double()
    assert bool((err <= scale.double() / 2 + 8 * F32_EPS * (hi.abs() + 1)).all())


def test_round_up_fp16_is_the_least_fp16_not_below():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(10000, generator=g) * 10.0 ** torch.randint(-6, 4, (10000,), generator=g),
                   torch.tensor([0.0, 1.0, 2.0 ** -24, 65504.0, 1.0 + 2.0 ** -11])])
    h = round_up_fp16(x)
    assert h.dtype == torch.float16
    assert bool((h.float() >= x).all())
    below = torch.nextafter(h, torch.full_like(h, -float("inf"))).float()
    assert bool((below < x).all())
    exact = torch.tensor([0.0, 1.0, 0.5, 1024.0])
    assert torch.equal(round_up_fp16(exact).float(), exact)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("value", [0.0, 1.0, -3.5, 10000.0, 2.0 ** -20])
def test_constant_fp16_group_has_zero_scale_and_reconstructs_exactly(bits, value):
    x = torch.full((5, 16), value)
    shift, scale, q, xh = _quantize(x, bits)
    assert bool((scale == 0).all()) and bool((q == 0).all())
    assert torch.equal(xh, x)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("value", [0.1, -1234.567, 3e-6])
def test_constant_group_not_in_fp16_reconstructs_within_bound(bits, value):
    x = torch.full((5, 16), value)
    shift, scale, q, xh = _quantize(x, bits)
    assert bool((q == q[:, :1]).all())  # one symbol for the whole group
    err = (x.double() - xh.double()).abs()
    assert bool((err <= _bound(x, shift, scale, bits)).all())
    assert float(err.max()) <= max(abs(value) * 2.0 ** -11, 2.0 ** -25)  # no worse than storing the value in fp16


def test_fake_quantize_drops_group_at_zero_bits():
    x = torch.randn(3, 16)
    assert torch.equal(fake_quantize(x, 0), torch.zeros_like(x))


def test_error_shrinks_with_bits():
    x = _data("normal", (256, 8, 16), seed=7)
    mse = [float(((x - fake_quantize(x, b)) ** 2).mean()) for b in BITS]
    assert mse[0] > 4 * mse[1] > 16 * mse[2] > 0


def test_tensor_valued_bits_match_per_group_scalar_bits():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 9, 16, generator=g) * 5
    bits = torch.tensor([2, 4, 8, 8, 2, 4, 4, 2, 8])
    shift, scale, q, xh = _quantize(x, bits)
    for j, b in enumerate(bits.tolist()):
        s1, c1, q1, x1 = _quantize(x[:, j], b)
        assert torch.equal(shift[:, j], s1) and torch.equal(scale[:, j], c1)
        assert torch.equal(q[:, j], q1) and torch.equal(xh[:, j], x1)


@pytest.mark.parametrize("bad", [0, 1, 3, 16, torch.tensor([2, 3]), torch.tensor([0, 8])])
def test_unsupported_bits_raise_shape_error(bad):
    x = torch.randn(4, 2, 16)
    with pytest.raises(ShapeError, match="supports"):
        group_params(x, bad)
    with pytest.raises(ShapeError, match="supports"):
        quantize_groups(x, torch.zeros(4, 2, dtype=torch.float16), torch.ones(4, 2, dtype=torch.float16), bad)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-3e4, 3e4, allow_nan=False, width=32), min_size=1, max_size=40),
    bits=st.sampled_from(BITS),
)
def test_quantizer_bound_holds_for_arbitrary_groups(values, bits):
    x = torch.tensor(values, dtype=torch.float32)[None]
    shift, scale, q, xh = _quantize(x, bits)
    err = (x.double() - xh.double()).abs()
    assert bool((err <= _bound(x, shift, scale, bits)).all())


# --- plans ----------------------------------------------------------------------------------------------------------

def random_plan(rng: random.Random, p: int = 700, widths=(2, 4, 8), sizes=(1, 16, 64, 256)) -> BitPlan:
    """A valid plan: size-1 groups anywhere, larger groups at multiples of min(size, 16), random dropped gaps."""
    groups, pos = [], 0
    while pos < p:
        r = rng.random()
        if r < 0.15:  # a dropped gap
            pos += rng.randint(1, 20)
            continue
        if r < 0.55:
            size = 1
        else:
            size = rng.choice(sizes)
            align = min(size, 16)
            pos = -(-pos // align) * align
        if pos + size > p:
            break
        groups.append(Group(pos, size, rng.choice(widths)))
        pos += size
    return BitPlan(tuple(groups), p, float(rng.choice([4, 8, 16, 32])), rng.random())


def _random_symbols(plan: BitPlan, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lay = plan.layout
    top = (1 << lay.coord_bits)  # dropped coords: 1 -> symbol 0
    return (torch.rand(n, lay.rank, generator=g) * top).long().clamp_max(top - 1).to(torch.uint8)


@pytest.mark.parametrize("seed", range(12))
def test_pack_unpack_round_trip_random_plans(seed):
    rng = random.Random(seed)
    widths = [(2, 4, 8), (2,), (4,), (8,), (2, 4), (4, 8)][seed % 6]
    plan = random_plan(rng, p=rng.choice([33, 100, 700]), widths=widths)
    q = _random_symbols(plan, 9, seed)
    packed = pack_symbols(q, plan.layout)
    assert packed.shape == (9, plan.layout.sym_bytes) and packed.dtype == torch.uint8
    back = unpack_symbols(packed, plan.layout)
    kept = plan.layout.coord_bits > 0
    assert torch.equal(back[:, kept], q[:, kept])
    assert bool((back[:, ~kept] == 0).all())


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False), st.sampled_from([(2, 4, 8), (2,), (4,), (8,)]))
def test_pack_unpack_round_trip_hypothesis(rng, widths):
    plan = random_plan(rng, p=rng.randint(1, 120), widths=widths, sizes=(1, 16, 64))
    q = _random_symbols(plan, 3, rng.randint(0, 1000))
    kept = plan.layout.coord_bits > 0
    assert torch.equal(unpack_symbols(pack_symbols(q, plan.layout), plan.layout)[:, kept], q[:, kept])


def test_packed_byte_layout_golden():
    """sym8 bytes first, then sym4 (low nibble first), then sym2 (lowest bits first), each in coordinate order."""
    plan = BitPlan((Group(0, 1, 4), Group(1, 1, 8), Group(2, 1, 4), Group(3, 1, 2), Group(5, 1, 2), Group(6, 1, 4)), 8, 8.0)
    q = torch.tensor([[0xA, 0xBC, 0x5, 1, 0, 2, 0x3]], dtype=torch.uint8)  # coordinate 4 is dropped
    packed = pack_symbols(q, plan.layout)
    assert packed.tolist() == [[0xBC, 0x5A, 0x03, 0b1001]]
    assert unpack_symbols(packed, plan.layout).tolist() == [[0xA, 0xBC, 0x5, 1, 0, 2, 0x3]]


@pytest.mark.parametrize("seed", range(8))
def test_layout_bytes_per_token_is_bits_per_token_plus_section_padding(seed):
    plan = random_plan(random.Random(seed), p=500)
    lay = plan.layout
    n = {b: sum(g.size for g in plan.groups if g.bits == b) for b in (2, 4, 8)}
    assert lay.n_groups == len(plan.groups) and lay.param_bytes == 4 * len(plan.groups)
    assert lay.sym_bytes == n[8] + math.ceil(n[4] / 2) + math.ceil(n[2] / 4)
    pad = (-(4 * n[4]) % 8) + (-(2 * n[2]) % 8)
    assert 8 * lay.bytes_per_token == plan.bits_per_token + pad
    assert plan.bits_per_token == sum(g.size * g.bits for g in plan.groups) + GROUP_OVERHEAD_BITS * len(plan.groups)
    assert lay.rank == plan.rank == (plan.groups[-1].start + plan.groups[-1].size if plan.groups else 0)
    assert plan.nominal_ratio == pytest.approx(16 * plan.p / plan.bits_per_token)


def test_empty_plan_packs_to_nothing():
    plan = BitPlan((), 64, 64.0)
    lay = plan.layout
    assert (plan.rank, plan.bits_per_token, lay.bytes_per_token) == (0, 0, 0)
    q = torch.zeros(5, 0, dtype=torch.uint8)
    assert pack_symbols(q, lay).shape == (5, 0)
    assert unpack_symbols(torch.zeros(5, 0, dtype=torch.uint8), lay).shape == (5, 0)


def test_pack_rejects_wrong_shapes():
    plan = BitPlan((Group(0, 16, 4),), 64, 8.0)
    with pytest.raises(ShapeError, match="symbols"):
        pack_symbols(torch.zeros(2, 15, dtype=torch.uint8), plan.layout)
    with pytest.raises(ShapeError, match="packed"):
        unpack_symbols(torch.zeros(2, 9, dtype=torch.uint8), plan.layout)


@pytest.mark.parametrize("seed", range(6))
def test_plan_dict_round_trip_through_json(seed):
    plan = random_plan(random.Random(seed), p=900)
    d = json.loads(json.dumps(plan.to_dict()))
    back = BitPlan.from_dict(d)
    assert back == plan  # groups, p, target_ratio and expected_mse
    assert d["rank"] == plan.rank and d["bits_per_token"] == plan.bits_per_token


def test_plan_dict_compresses_equal_consecutive_groups_into_runs():
    plan = BitPlan(tuple(Group(16 * i, 16, 4) for i in range(8)) + (Group(200, 1, 2), Group(201, 1, 2)), 256, 16.0)
    assert plan.to_dict()["runs"] == [[0, 16, 4, 8], [200, 1, 2, 2]]
    assert BitPlan.from_dict(plan.to_dict()).groups == plan.groups


@pytest.mark.parametrize(
    "groups, p",
    [
        ((Group(0, 16, 3),), 64),  # unsupported width
        ((Group(0, 16, 0),), 64),  # dropped groups are not listed
        ((Group(0, 0, 4),), 64),  # empty group
        ((Group(0, 16, 4), Group(8, 16, 4)), 64),  # overlap
        ((Group(16, 16, 4), Group(0, 16, 4)), 64),  # out of order
        ((Group(-1, 1, 4),), 64),  # negative start
        ((Group(48, 32, 4),), 64),  # beyond p
    ],
)
def test_invalid_plans_are_rejected(groups, p):
    with pytest.raises(CalibrationMismatchError):
        BitPlan(groups, p, 8.0)


def test_plan_dict_with_inconsistent_bits_per_token_is_rejected():
    d = BitPlan((Group(0, 16, 4),), 64, 8.0).to_dict()
    d["bits_per_token"] += 1
    with pytest.raises(CalibrationMismatchError, match="bits_per_token"):
        BitPlan.from_dict(d)


def test_layout_tables_describe_the_plan():
    plan = BitPlan((Group(0, 1, 8), Group(16, 16, 2), Group(40, 1, 4)), 64, 8.0)
    lay = PlanLayout.from_plan(plan)
    assert lay.coord_bits[0] == 8 and bool((lay.coord_bits[1:16] == 0).all()) and lay.coord_bits[40] == 4
    assert lay.coord_group[0] == 0 and bool((lay.coord_group[16:32] == 1).all()) and lay.coord_group[40] == 2
    assert bool((lay.coord_group[1:16] == -1).all())
    assert lay.group_start.tolist() == [0, 16, 40] and lay.group_size.tolist() == [1, 16, 1]
    assert lay.group_bits.tolist() == [8, 2, 4]
