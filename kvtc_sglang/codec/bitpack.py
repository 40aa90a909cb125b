"""Packing quantized symbols into bytes following a plan's layout (see `plan.PlanLayout`).

PyTorch reference; the Triton kernels read and write the same bytes.
"""

from __future__ import annotations

import torch

from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.plan import PlanLayout


def pack_symbols(q: torch.Tensor, layout: PlanLayout) -> torch.Tensor:
    """q: [n, rank] uint8 symbols (dropped coordinates ignored) -> [n, sym_bytes] uint8."""
    if q.dim() != 2 or q.shape[1] != layout.rank:
        raise ShapeError(f"expected symbols [n, {layout.rank}], got {tuple(q.shape)}")
    dev = q.device
    kept = (layout.coord_bits > 0).to(dev)
    shift = layout.coord_shift.to(dev)[kept]
    byte = layout.coord_byte.to(dev)[kept]
    vals = q[:, kept].to(torch.int32) << shift.to(torch.int32)
    out = torch.zeros(q.shape[0], layout.sym_bytes, dtype=torch.int32, device=dev)
    out.index_add_(1, byte, vals)  # fields of one byte never overlap, so the sum is a bitwise OR
    return out.to(torch.uint8)


def unpack_symbols(packed: torch.Tensor, layout: PlanLayout) -> torch.Tensor:
    """packed: [n, sym_bytes] uint8 -> [n, rank] uint8 symbols (0 for dropped coordinates)."""
    if packed.dim() != 2 or packed.shape[1] != layout.sym_bytes:
        raise ShapeError(f"expected packed symbols [n, {layout.sym_bytes}], got {tuple(packed.shape)}")
    dev = packed.device
    bits = layout.coord_bits.to(dev)
    byte = layout.coord_byte.to(dev)
    shift = layout.coord_shift.to(dev)
    mask = (1 << bits) - 1
    if layout.sym_bytes == 0:
        return torch.zeros(packed.shape[0], layout.rank, dtype=torch.uint8, device=dev)
    v = (packed[:, byte.clamp(max=max(layout.sym_bytes - 1, 0))].to(torch.int32) >> shift.to(torch.int32)) & mask.to(torch.int32)
    return v.to(torch.uint8)
