"""Bit plans: which PCA coordinates are kept, in which groups, at how many bits.

A plan covers PCA coordinates [0, rank) with consecutive groups; each group is (start, size, bits)
with bits in {0, 2, 4, 8}. Groups with 0 bits are dropped (cost nothing, reconstruct as 0 = the
calibration mean); coordinates >= rank are dropped too. Each kept group costs size*bits payload bits
plus GROUP_OVERHEAD_BITS (a 16-bit shift and a 16-bit scale) per token.

Packed layout of one token (``PlanLayout``), byte aligned per section:
    params  [G_kept, 2] float16  (shift, scale) in group order           -> 4*G_kept bytes
    sym8    one byte per coordinate of 8-bit groups, coordinate order
    sym4    two coordinates per byte (low nibble first), coordinate order
    sym2    four coordinates per byte (lowest bits first), coordinate order
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property

import torch

from kvtc_sglang.codec.errors import CalibrationMismatchError

GROUP_OVERHEAD_BITS = 32
GROUP_SIZES = (1, 16, 64, 256, 1024)
GROUP_BITS = (0, 2, 4, 8)


@dataclass(frozen=True)
class Group:
    start: int
    size: int
    bits: int


@dataclass(frozen=True)
class BitPlan:
    """A DP-chosen grouping of PCA coordinates for one tensor kind (K or V) and one target ratio.

    Attributes:
        groups: kept groups (bits > 0) in coordinate order; gaps between them are dropped.
        p: features per token of the tensor kind.
        target_ratio: compression ratio the plan was solved for (before the entropy stage).
        expected_mse: mean squared error per token (sum over the p features) on calibration data.
    """

    groups: tuple[Group, ...]
    p: int
    target_ratio: float
    expected_mse: float = float("nan")

    def __post_init__(self):
        pos = 0
        for g in self.groups:
            if g.bits not in (2, 4, 8) or g.size <= 0 or g.start < pos:
                raise CalibrationMismatchError(f"invalid plan group {g} (previous end {pos})")
            pos = g.start + g.size
        if pos > self.p:
            raise CalibrationMismatchError(f"plan covers {pos} coordinates but p = {self.p}")

    @property
    def rank(self) -> int:
        """Number of leading PCA coordinates the plan needs (end of the last kept group)."""
        return self.groups[-1].start + self.groups[-1].size if self.groups else 0

    @property
    def bits_per_token(self) -> int:
        return sum(g.size * g.bits + GROUP_OVERHEAD_BITS for g in self.groups)

    @property
    def nominal_ratio(self) -> float:
        """16-bit size of the features over the plan's bits (before the entropy stage)."""
        return 16.0 * self.p / max(self.bits_per_token, 1)

    @cached_property
    def layout(self) -> "PlanLayout":
        return PlanLayout.from_plan(self)

    # Serialization: runs of equal (size, bits) groups laid end to end, plus gaps of dropped coords.
    def to_dict(self) -> dict:
        runs: list[list[int]] = []  # [start, size, bits, count]
        for g in self.groups:
            if runs:
                s, sz, b, c = runs[-1]
                if sz == g.size and b == g.bits and s + sz * c == g.start:
                    runs[-1][3] += 1
                    continue
            runs.append([g.start, g.size, g.bits, 1])
        return {
            "p": self.p,
            "target_ratio": self.target_ratio,
            "rank": self.rank,
            "bits_per_token": self.bits_per_token,
            "nominal_ratio": round(self.nominal_ratio, 4),
            "expected_mse": self.expected_mse,
            "runs": runs,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BitPlan":
        groups = []
        for start, size, bits, count in d["runs"]:
            for i in range(count):
                groups.append(Group(int(start) + i * int(size), int(size), int(bits)))
        plan = cls(tuple(groups), int(d["p"]), float(d["target_ratio"]), float(d.get("expected_mse", "nan")))
        if "bits_per_token" in d and plan.bits_per_token != int(d["bits_per_token"]):
            raise CalibrationMismatchError("plan runs do not add up to the recorded bits_per_token")
        return plan

    def with_groups(self, groups) -> "BitPlan":
        return dataclasses.replace(self, groups=tuple(groups))


@dataclass(frozen=True)
class PlanLayout:
    """Per-coordinate lookup tables for packing a plan's symbols into bytes.

    All tables are int64 CPU tensors of shape [rank] (coordinates of dropped groups have bits 0):
        coord_bits   bits of the coordinate's group (0 = dropped)
        coord_group  index of the kept group (into params), -1 when dropped
        coord_byte   byte offset of the coordinate's symbol inside the symbol area
        coord_shift  bit offset inside that byte
    Scalars: n_groups (kept), param_bytes = 4*n_groups, sym_bytes, bytes_per_token.
    """

    rank: int
    n_groups: int
    sym_bytes: int
    coord_bits: torch.Tensor
    coord_group: torch.Tensor
    coord_byte: torch.Tensor
    coord_shift: torch.Tensor
    group_start: torch.Tensor
    group_size: torch.Tensor
    group_bits: torch.Tensor

    @property
    def param_bytes(self) -> int:
        return 4 * self.n_groups

    @property
    def bytes_per_token(self) -> int:
        return self.param_bytes + self.sym_bytes

    @classmethod
    def from_plan(cls, plan: BitPlan) -> "PlanLayout":
        r = plan.rank
        bits = torch.zeros(r, dtype=torch.int64)
        group = torch.full((r,), -1, dtype=torch.int64)
        for gi, g in enumerate(plan.groups):
            bits[g.start : g.start + g.size] = g.bits
            group[g.start : g.start + g.size] = gi
        byte = torch.zeros(r, dtype=torch.int64)
        shift = torch.zeros(r, dtype=torch.int64)
        offset = 0
        for b in (8, 4, 2):
            idx = torch.nonzero(bits == b).flatten()
            per_byte = 8 // b
            k = torch.arange(idx.numel())
            byte[idx] = offset + k // per_byte
            shift[idx] = (k % per_byte) * b
            offset += (idx.numel() + per_byte - 1) // per_byte
        gs = torch.tensor([g.start for g in plan.groups], dtype=torch.int64)
        gz = torch.tensor([g.size for g in plan.groups], dtype=torch.int64)
        gb = torch.tensor([g.bits for g in plan.groups], dtype=torch.int64)
        return cls(r, len(plan.groups), offset, bits, group, byte, shift, gs, gz, gb)
