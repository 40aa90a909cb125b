"""Dynamic-programming bit allocation over PCA coordinates (the bit allocation of KVTC).

Coordinates [0, r) are covered in order by consecutive groups. A group has a size from `sizes`
(default {1, 16, 64, 256, 1024}) and a type from {dropped, 2, 4, 8 bits}; a kept group costs
size*bits + 32 bits per token, a dropped coordinate costs nothing and contributes its full energy.
Group errors are measured by quantizing calibration coefficients with the codec's own quantizer
(`quantize.fake_quantize`), so the DP's objective is exactly the codec's squared error on that data.

Groups of size s >= 16 start at multiples of 16 (size-1 groups anywhere). This keeps every packed
group aligned for the GPU kernels and makes error tables ~16x cheaper to measure; the DP is exact
over that plan space.

The DP is solved once for the largest budget; `DPSolution.plan_for(bits)` then backtracks the
optimal plan for any budget up to it (one calibration pass serves every target ratio).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np
import torch

from kvtc_sglang.codec.plan import GROUP_OVERHEAD_BITS, GROUP_SIZES, BitPlan, Group
from kvtc_sglang.codec.quantize import fake_quantize

DEFAULT_BITS = (2, 4, 8)
ALIGN = 16
CLIP_CANDIDATES = (0.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0)
ClipTable = dict  # {(size, bits): clip factor}; missing entries mean 0 (min/max)


def fit_clip_factors(
    coeffs: torch.Tensor | list[torch.Tensor],
    sizes: tuple[int, ...] = GROUP_SIZES,
    bits: tuple[int, ...] = DEFAULT_BITS,
    candidates: tuple[float, ...] = CLIP_CANDIDATES,
    max_samples: int = 1024,
) -> ClipTable:
    """Per (group size, bits), the clip factor with the least quantization error on calibration data.

    Args:
        coeffs: [n, r] float32 coefficients, or a list of them (e.g. one per feature block) whose
            errors are added up.
    Error is summed over every aligned, non-overlapping group tiling [0, r), on up to max_samples
    tokens. Size-1 groups are always min/max (their single value is stored in the shift).
    """
    blocks = coeffs if isinstance(coeffs, (list, tuple)) else [coeffs]
    table: ClipTable = {}
    for s in sizes:
        tiles_list = []
        for c_ in blocks:
            x = c_[:max_samples].float()
            k = x.shape[1] // s
            if s > 1 and k:
                tiles_list.append(x[:, : k * s].reshape(x.shape[0], k, s))
        if not tiles_list:
            continue
        for b in bits:
            errs = [sum(float(((t - fake_quantize(t, b, c)) ** 2).sum()) for t in tiles_list) for c in candidates]
            table[(s, b)] = float(candidates[int(np.argmin(errs))])
    return table


def group_alignment(size: int, align: int = ALIGN) -> int:
    """Allowed start stride of a group of `size` coordinates."""
    return min(size, align)


@dataclass(frozen=True)
class ErrorTables:
    """Measured squared errors, averaged over calibration tokens.

    Attributes:
        drop: [r] float64, energy of each coordinate (error when dropped).
        options: tuple of (size, bits).
        err: [n_options, r] float64; err[o, start] = error of a group of option o starting at
             `start`, +inf where that start is not allowed.
    """

    drop: np.ndarray
    options: tuple[tuple[int, int], ...]
    err: np.ndarray

    @property
    def r(self) -> int:
        return self.drop.shape[0]


def measure_error_tables(
    coeffs: torch.Tensor,
    sizes: tuple[int, ...] = GROUP_SIZES,
    bits: tuple[int, ...] = DEFAULT_BITS,
    align: int = ALIGN,
    sample_chunk: int = 1024,
    clip: ClipTable | None = None,
) -> ErrorTables:
    """Quantize calibration coefficients group by group and record the mean squared error.

    Args:
        coeffs: [n, r] float32 PCA coefficients (mean-centred features projected on the basis).
        clip: clip factor per (size, bits) used by the encoder (default: min/max everywhere).
    """
    coeffs = coeffs.float()
    n, r = coeffs.shape
    drop = (coeffs.double() ** 2).mean(0).cpu().numpy()
    options = tuple((s, b) for s in sizes if s <= r for b in bits)
    err = np.full((len(options), r), np.inf)
    for oi, (s, b) in enumerate(options):
        acc = np.zeros(r)
        stride = group_alignment(s, align)
        for lo in range(0, n, sample_chunk):
            x = coeffs[lo : lo + sample_chunk]
            for off in range(0, s, stride):
                k = (r - off) // s
                if k == 0:
                    continue
                tiles = x[:, off : off + k * s].reshape(x.shape[0], k, s)
                c = (clip or {}).get((s, b), 0.0)
                e = ((tiles - fake_quantize(tiles, b, c)) ** 2).sum(-1).double().sum(0).cpu().numpy()
                acc[off : off + k * s : s] += e
        valid = np.zeros(r, dtype=bool)
        valid[0 : r - s + 1 : stride] = True
        err[oi] = np.where(valid, acc / n, np.inf)
    return ErrorTables(drop, options, err)


def option_cost(size: int, bits: int) -> int:
    return size * bits + GROUP_OVERHEAD_BITS


@dataclass
class DPSolution:
    """Optimal errors for every (prefix length, budget) and the choices to rebuild plans.

    best[c, u]: least total error covering coordinates [0, c) with at most u*unit bits per token
    (coordinates >= c not counted); choice[c, u]: option index of the last group (-1 = the last
    coordinate is dropped).
    """

    tables: ErrorTables
    unit: int
    best: np.ndarray
    choice: np.ndarray
    p: int

    @property
    def max_bits(self) -> int:
        return (self.best.shape[1] - 1) * self.unit

    def error_curve(self) -> np.ndarray:
        """[U+1] float64: least error (dropped tail included) for each budget in units."""
        return self.best[-1]

    def plan_for(self, budget_bits: float, target_ratio: float = float("nan")) -> BitPlan:
        u = int(min(budget_bits, self.max_bits) // self.unit)
        c = self.tables.r
        expected = float(self.best[c, u])
        groups: list[Group] = []
        while c > 0:
            o = int(self.choice[c, u])
            if o < 0:
                c -= 1
                continue
            s, b = self.tables.options[o]
            c -= s
            u -= option_cost(s, b) // self.unit
            groups.append(Group(c, s, b))
        groups.reverse()
        return BitPlan(tuple(groups), self.p, target_ratio, expected)


def solve(tables: ErrorTables, max_budget_bits: int, p: int | None = None) -> DPSolution:
    """Exact DP over the plan space of `tables` for every budget up to `max_budget_bits`."""
    r = tables.r
    costs = [option_cost(s, b) for s, b in tables.options]
    unit = reduce(math.gcd, costs) if costs else 1
    U = int(max_budget_bits) // unit
    best = np.empty((r + 1, U + 1))
    choice = np.full((r + 1, U + 1), -1, dtype=np.int16)
    best[0] = 0.0
    cost_units = [c // unit for c in costs]
    sizes = [s for s, _ in tables.options]
    for c in range(1, r + 1):
        row = best[c - 1] + tables.drop[c - 1]
        ch = choice[c]
        for oi, (s, cu) in enumerate(zip(sizes, cost_units)):
            start = c - s
            if start < 0 or cu > U:
                continue
            e = tables.err[oi, start]
            if not np.isfinite(e):
                continue
            cand = best[start, : U + 1 - cu] + e
            tgt = row[cu:]
            better = cand < tgt
            if better.any():
                tgt[better] = cand[better]
                ch[cu:][better] = oi
        best[c] = row
    return DPSolution(tables, unit, best, choice, p if p is not None else r)


def budget_bits_for_ratio(p: int, ratio: float) -> int:
    """Per-token bit budget B = 16 * p / CR_target."""
    return int(16 * p // ratio)
