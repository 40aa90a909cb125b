"""The DP bit allocation is exactly optimal over its plan space (checked by brute force on small cases), respects
its budget, improves monotonically with budget; its objective is the codec's own squared error; the min-plus budget
split across blocks is optimal; layer partitions tile the layers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtc_sglang.codec.calibrate import allocate_budget, layer_partition
from kvtc_sglang.codec.dp import (
    budget_bits_for_ratio,
    group_alignment,
    measure_error_tables,
    option_cost,
    solve,
)
from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.quantize import fake_quantize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _coeffs(n: int, r: int, seed: int, decay: float = 0.7) -> torch.Tensor:
    """[n, r] float32 coefficients with geometrically decaying variance and a non-zero mean (like PCA output)."""
    g = torch.Generator().manual_seed(seed)
    std = decay ** torch.arange(r, dtype=torch.float32)
    return (torch.randn(n, r, generator=g) + 0.3 * torch.randn(1, r, generator=g)) * std * 4


def _all_plans(tables):
    """Every plan of the tables' space as (cost_bits, error, groups): each coordinate is dropped or starts an
    allowed group (finite table entry) that fits."""
    r = tables.r
    out = []

    def rec(c, cost, err, groups):
        if c == r:
            out.append((cost, err, tuple(groups)))
            return
        rec(c + 1, cost, err + tables.drop[c], groups)
        for oi, (s, b) in enumerate(tables.options):
            if c + s <= r and np.isfinite(tables.err[oi, c]):
                rec(c + s, cost + option_cost(s, b), err + tables.err[oi, c], groups + [(c, s, b)])

    rec(0, 0, 0.0, [])
    return out


def _plan_error(tables, plan) -> float:
    """Error of a plan according to the tables: its groups' errors plus the energy of every coordinate it drops."""
    index = {opt: i for i, opt in enumerate(tables.options)}
    covered = np.zeros(tables.r, dtype=bool)
    err = 0.0
    for g in plan.groups:
        err += tables.err[index[(g.size, g.bits)], g.start]
        covered[g.start : g.start + g.size] = True
    return err + float(tables.drop[~covered].sum())


@pytest.mark.parametrize("r, seed", [(6, 0), (7, 1), (8, 2)])
def test_dp_matches_brute_force_on_small_cases(r, seed):
    tables = measure_error_tables(_coeffs(64, r, seed), sizes=(1, 2, 4), bits=(2, 4, 8), align=2)
    plans = _all_plans(tables)
    max_cost = max(c for c, _, _ in plans)
    sol = solve(tables, max_cost, p=r)
    assert sol.unit == 2  # gcd of 34, 36, 40, 48, 64
    for budget in sorted({0, 33, 34, 35, 70, 100, 150, 200, max_cost // 2, max_cost - 1, max_cost}):
        brute = min(e for c, e, _ in plans if c <= budget)
        plan = sol.plan_for(budget)
        assert plan.bits_per_token <= budget
        assert plan.expected_mse == pytest.approx(brute, rel=1e-12, abs=1e-12)
        assert _plan_error(tables, plan) == pytest.approx(plan.expected_mse, rel=1e-12, abs=1e-12)
        for g in plan.groups:  # the plan is in the space: aligned starts
            assert g.start % group_alignment(g.size, 2) == 0


def test_brute_force_space_is_the_aligned_space():
    tables = measure_error_tables(_coeffs(16, 8, 0), sizes=(1, 2, 4), bits=(2,), align=2)
    starts = {(s, c) for _, _, groups in _all_plans(tables) for c, s, _ in groups}
    assert {c for s, c in starts if s == 4} == {0, 2, 4}
    assert {c for s, c in starts if s == 2} == {0, 2, 4, 6}
    assert {c for s, c in starts if s == 1} == set(range(8))


def test_error_tables_are_the_quantizers_measured_error():
    x = _coeffs(40, 48, 3, decay=0.95)
    tables = measure_error_tables(x, sizes=(1, 16), bits=(2, 8), align=16, sample_chunk=7)
    np.testing.assert_allclose(tables.drop, (x.double() ** 2).mean(0).numpy(), rtol=1e-12)
    for oi, (s, b) in enumerate(tables.options):
        for start in range(48):
            allowed = start % group_alignment(s) == 0 and start + s <= 48
            if not allowed:
                assert tables.err[oi, start] == np.inf
                continue
            g = x[:, start : start + s]
            want = float(((g - fake_quantize(g, b)) ** 2).sum(-1).double().mean())
            assert tables.err[oi, start] == pytest.approx(want, rel=1e-5)


@pytest.fixture(scope="module")
def larger():
    """r = 256 coefficients, the default group sizes {1, 16, 64, 256} and alignment 16."""
    x = _coeffs(512, 256, 5, decay=0.98)
    tables = measure_error_tables(x)
    return x, tables, solve(tables, budget_bits_for_ratio(256, 2), p=256)


def test_budget_respected_and_error_monotone_in_budget(larger):
    x, tables, sol = larger
    total_energy = float(tables.drop.sum())
    curve = sol.error_curve()
    assert curve[0] == pytest.approx(total_energy)
    assert bool(np.all(np.diff(curve) <= 1e-12 * total_energy))
    prev = math.inf
    for budget in range(0, sol.max_bits + 1, 97):
        plan = sol.plan_for(budget)
        assert plan.bits_per_token <= budget
        assert plan.expected_mse <= prev + 1e-12 * total_energy
        assert _plan_error(tables, plan) == pytest.approx(plan.expected_mse, rel=1e-9)
        prev = plan.expected_mse
    assert sol.plan_for(0).groups == () and sol.plan_for(0).expected_mse == pytest.approx(total_energy)
    assert sol.plan_for(10 * sol.max_bits).expected_mse == pytest.approx(curve[-1])  # clipped to the solved maximum


def test_plan_expected_mse_is_the_codecs_error_on_the_calibration_data(larger):
    """Quantizing the same coefficients with the plan's groups gives exactly the DP's expected error."""
    x, tables, sol = larger
    plan = sol.plan_for(budget_bits_for_ratio(256, 8), 8.0)
    xh = torch.zeros_like(x)
    for g in plan.groups:
        xh[:, g.start : g.start + g.size] = fake_quantize(x[:, g.start : g.start + g.size], g.bits)
    measured = float(((x - xh) ** 2).sum(-1).double().mean())
    assert plan.expected_mse == pytest.approx(measured, rel=1e-5)
    assert plan.target_ratio == 8.0 and plan.p == 256
    # the DP keeps the high-variance leading coordinates: nothing after its rank, and coordinate 0 kept
    assert plan.groups[0].start == 0 and plan.rank < 256


def test_budget_bits_for_ratio():
    assert budget_bits_for_ratio(5760, 8) == 11520
    assert budget_bits_for_ratio(5760, 32) == 2880
    assert budget_bits_for_ratio(100, 3) == 533


# --- allocate_budget (calibrate.py) ---------------------------------------------------------------------------------

def _curve(rng, length):
    return np.sort(rng.random(length) * 10)[::-1].copy()  # non-increasing


def _brute_split(curves, total):
    def at(c, u):
        return c[min(u, len(c) - 1)]

    best = math.inf
    for units in itertools.product(*[range(total + 1)] * len(curves)):
        if sum(units) <= total:
            best = min(best, sum(at(c, u) for c, u in zip(curves, units)))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_allocate_budget_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    parts = 2 + seed % 3
    curves = [_curve(rng, int(rng.integers(2, 9))) for _ in range(parts)]
    total = int(rng.integers(0, 12 if parts < 4 else 8))
    units = allocate_budget(curves, total)
    assert len(units) == parts and sum(units) == total and min(units) >= 0
    got = sum(c[min(u, len(c) - 1)] for c, u in zip(curves, units))
    assert got == pytest.approx(_brute_split(curves, total), abs=1e-12)


def test_allocate_budget_single_curve_clips_to_its_length():
    assert allocate_budget([np.array([3.0, 2.0, 1.0])], 10) == [2]
    assert allocate_budget([np.array([3.0, 2.0, 1.0])], 1) == [1]


def test_allocate_budget_prefers_the_part_that_gains_most():
    flat = np.array([1.0, 0.99, 0.98, 0.97])
    steep = np.array([100.0, 10.0, 1.0, 0.1])
    assert allocate_budget([flat, steep], 3) == [0, 3]


# --- layer_partition -------------------------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.integers(1, 64).flatmap(lambda L: st.tuples(st.just(L), st.integers(1, L))))
def test_layer_partition_tiles_layers_evenly(case):
    L, n = case
    parts = layer_partition(L, n)
    assert len(parts) == n and parts[0][0] == 0 and parts[-1][1] == L
    assert all(a < b for a, b in parts) and all(parts[i][1] == parts[i + 1][0] for i in range(n - 1))
    sizes = [b - a for a, b in parts]
    assert max(sizes) - min(sizes) <= 1


def test_layer_partition_examples_and_errors():
    assert layer_partition(30, 1) == [(0, 30)]
    assert layer_partition(30, 3) == [(0, 10), (10, 20), (20, 30)]
    for bad in (0, 31, -1):
        with pytest.raises(ShapeError, match="layer_blocks"):
            layer_partition(30, bad)
