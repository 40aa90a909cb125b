"""Transform + quantize + pack for one tensor kind (the reference PyTorch path).

`KindCoder` holds, for one kind (K or V) and one target ratio, the device tensors every call needs:
per block the mean, the basis truncated to the plan's rank (float32), and group index tables. It is
built once (plan) and used per run of tokens (encode/decode), allocating only its outputs.

Section bytes of n tokens for one block: [n, 4*G] params (fp16 shift, scale per kept group) followed
by [n, sym_bytes] packed symbols; concatenated per token and stored byte-plane major (byte j of every
token, then byte j+1 ...), which groups similar bytes together for the entropy stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtc_sglang.codec.artifact import FeatureBlock
from kvtc_sglang.codec.bitpack import pack_symbols, unpack_symbols
from kvtc_sglang.codec.errors import BlobFormatError, ShapeError
from kvtc_sglang.codec.plan import BitPlan, PlanLayout
from kvtc_sglang.codec.quantize import dequantize_groups, group_params, quantize_groups


@dataclass
class _SizeClass:
    """All kept groups of one size: coordinate indices [G_s, s], bits [G_s], param slots [G_s],
    clip factors [G_s] float32 (0 = min/max)."""

    coords: torch.Tensor
    bits: torch.Tensor
    slots: torch.Tensor
    clip: torch.Tensor


@dataclass
class BlockCoder:
    offset: int
    p: int
    mean: torch.Tensor  # [p] float32
    enc: torch.Tensor  # [p, r] float32: diag(scale) @ basis[:, :r]
    dec: torch.Tensor  # [r, p] float32: basis[:, :r].T @ diag(1 / scale)
    plan: BitPlan
    layout: PlanLayout
    classes: list[_SizeClass]

    @property
    def bytes_per_token(self) -> int:
        return self.layout.bytes_per_token

    @classmethod
    def build(cls, block: FeatureBlock, plan: BitPlan, device: torch.device, clip: dict | None = None) -> "BlockCoder":
        r = plan.rank
        basis = block.basis[:, :r].to(dtype=torch.float32)
        scale = block.scale_or_ones()[:, None]
        enc = (scale * basis).to(device)
        dec = (basis / scale).T.contiguous().to(device)
        by_size: dict[int, list[int]] = {}
        for gi, g in enumerate(plan.groups):
            by_size.setdefault(g.size, []).append(gi)
        classes = []
        for s, gis in sorted(by_size.items()):
            starts = torch.tensor([plan.groups[i].start for i in gis], dtype=torch.int64)
            coords = starts[:, None] + torch.arange(s)[None, :]
            bits = torch.tensor([plan.groups[i].bits for i in gis], dtype=torch.int64)
            cl = torch.tensor([(clip or {}).get((s, plan.groups[i].bits), 0.0) for i in gis], dtype=torch.float32)
            classes.append(_SizeClass(coords.to(device), bits.to(device), torch.tensor(gis, dtype=torch.int64, device=device), cl.to(device)))
        return cls(block.offset, block.p, block.mean.to(device, torch.float32), enc, dec, plan, plan.layout, classes)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [n, p] float32 block features -> [n, bytes_per_token] uint8 (token-major)."""
        n = x.shape[0]
        d = (x - self.mean) @ self.enc  # [n, r]
        params = torch.empty(n, self.layout.n_groups, 2, dtype=torch.float16, device=x.device)
        q = torch.zeros(n, self.layout.rank, dtype=torch.uint8, device=x.device)
        for c in self.classes:
            xs = d[:, c.coords]  # [n, G_s, s]
            shift, scale = group_params(xs, c.bits, c.clip)
            params[:, c.slots, 0] = shift
            params[:, c.slots, 1] = scale
            q[:, c.coords] = quantize_groups(xs, shift, scale, c.bits)
        sym = pack_symbols(q, self.layout)
        return torch.cat([params.reshape(-1).view(torch.uint8).reshape(n, -1), sym], dim=1)

    def coefficients(self, rec: torch.Tensor) -> torch.Tensor:
        """rec: [n, bytes_per_token] uint8 -> dequantized coefficients [n, r] float32."""
        n = rec.shape[0]
        pb = self.layout.param_bytes
        # clone, not contiguous(): a one-token record is already contiguous but may start at an odd byte offset
        params = rec[:, :pb].clone(memory_format=torch.contiguous_format).view(-1).view(torch.float16).reshape(n, self.layout.n_groups, 2)
        if not bool(torch.isfinite(params).all()):
            raise BlobFormatError("non-finite quantization parameters in a blob")
        q = unpack_symbols(rec[:, pb:].contiguous(), self.layout)
        d = torch.zeros(n, self.layout.rank, dtype=torch.float32, device=rec.device)
        for c in self.classes:
            d[:, c.coords] = dequantize_groups(q[:, c.coords], params[:, c.slots, 0], params[:, c.slots, 1])
        return d

    def decode(self, rec: torch.Tensor) -> torch.Tensor:
        """rec: [n, bytes_per_token] uint8 -> reconstructed block features [n, p] float32."""
        return self.coefficients(rec) @ self.dec + self.mean


class KindCoder:
    """All blocks of one kind (K or V) for one plan; features [n, p] <-> section bytes."""

    def __init__(self, blocks: list[FeatureBlock], plans: tuple[BitPlan, ...], p: int, device: torch.device,
                 clip: dict | None = None):
        if len(blocks) != len(plans):
            raise ShapeError(f"{len(blocks)} feature blocks but {len(plans)} plans")
        self.p = p
        pos = 0
        for b in blocks:
            if b.offset != pos:
                raise ShapeError(f"feature blocks must tile [0, {p}) in order; block at {b.offset} follows {pos}")
            pos += b.p
        if pos != p:
            raise ShapeError(f"feature blocks cover {pos} of {p} features")
        self.blocks = [BlockCoder.build(b, pl, device, clip) for b, pl in zip(blocks, plans)]
        self.bytes_per_token = sum(b.bytes_per_token for b in self.blocks)

    def section_bytes(self, n: int) -> int:
        return n * self.bytes_per_token

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [n, p] float32 -> 1-D uint8 section of n * bytes_per_token bytes (byte-plane major per block)."""
        if x.dim() != 2 or x.shape[1] != self.p:
            raise ShapeError(f"expected features [n, {self.p}], got {tuple(x.shape)}")
        parts = []
        for b in self.blocks:
            rec = b.encode(x[:, b.offset : b.offset + b.p].float())
            parts.append(rec.T.contiguous().flatten())
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=x.device)

    def decode(self, section: torch.Tensor, n: int, rows: slice | None = None) -> torch.Tensor:
        """section: 1-D uint8 of n tokens -> features [n', p] float32 (n' = tokens selected by rows)."""
        if section.numel() != self.section_bytes(n):
            raise BlobFormatError(f"section has {section.numel()} bytes, expected {self.section_bytes(n)}")
        out = None
        pos = 0
        for b in self.blocks:
            size = n * b.bytes_per_token
            rec = section[pos : pos + size].view(b.bytes_per_token, n).T
            pos += size
            if rows is not None:
                rec = rec[rows]
            rec = rec.contiguous()
            if out is None:
                out = torch.empty(rec.shape[0], self.p, dtype=torch.float32, device=section.device)
            out[:, b.offset : b.offset + b.p] = b.decode(rec)
        return out
