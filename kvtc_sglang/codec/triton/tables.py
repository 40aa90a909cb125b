"""Device tables the Triton codec prepares once per (calibration artifact, target ratio): plan phase.

`BlockTables` holds, for one feature block of one kind, everything the kernels index:
    enc          [p_b, r_enc] fp16   scale * basis (the projection), zero columns beyond the rank
    w            [p_b, r_dec] fp16   basis / scale (row i reconstructs feature i), zero columns beyond the rank
    mean         [p_b] fp32
    size classes per distinct group size: start/bits/slot of each kept group (int32)
    coord_*      [r_dec] int32       per coordinate: byte plane, bit shift, bits (0 = dropped), group slot
    byte_bits    [sym_bytes] int32   bits of the fields of each symbol byte
    byte_coord   [sym_bytes, 4] int32  coordinate of field f of each symbol byte (-1 = none)
plus the reference `BlockCoder` (float32 matrices) the PyTorch route uses.

`RopeTables` holds per-call cos/sin tables of the tokens being coded (see `rope_tables`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtc_sglang.codec.payload import BlockCoder, KindCoder
from kvtc_sglang.codec.quantize import FP16_MAX
from kvtc_sglang.codec.rope import RopeConfig, rope_inv_freq
from kvtc_sglang.codec.triton.common import round_up

ENC_PAD = 256  # rank padding of the projection (the encode GEMM's widest N tile)
DEC_PAD = 64  # rank padding of the reconstruction (the decode GEMM's K step)


@dataclass
class SizeClass:
    """Kept groups of one size: first coordinate, bits and param slot of each, int32 [count]; the
    encoder's clip factor of each, float32 [count] (0 = min/max range)."""

    size: int
    count: int
    start: torch.Tensor
    bits: torch.Tensor
    slot: torch.Tensor
    clip: torch.Tensor
    clipped: bool  # any clip factor > 0 (a launch-time constant, known at plan time)


@dataclass
class BlockTables:
    index: int
    offset: int  # first feature of the block in the kind's p features
    p: int
    layer_start: int
    layer_end: int
    rank: int
    r_enc: int
    r_dec: int
    n_groups: int
    param_bytes: int
    sym_bytes: int
    coder: BlockCoder
    enc: torch.Tensor
    w: torch.Tensor
    mean: torch.Tensor
    classes: list[SizeClass]
    coord_plane: torch.Tensor
    coord_shift: torch.Tensor
    coord_bits: torch.Tensor
    coord_group: torch.Tensor
    byte_bits: torch.Tensor
    byte_coord: torch.Tensor

    @property
    def bytes_per_token(self) -> int:
        return self.param_bytes + self.sym_bytes

    @classmethod
    def build(cls, index: int, coder: BlockCoder, layer_start: int, layer_end: int) -> "BlockTables":
        dev = coder.mean.device
        layout = coder.layout
        r = layout.rank
        r_enc, r_dec = max(round_up(r, ENC_PAD), ENC_PAD), max(round_up(r, DEC_PAD), DEC_PAD)
        p = coder.p
        enc = torch.zeros(p, r_enc, dtype=torch.float16, device=dev)
        enc[:, :r] = coder.enc.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
        w = torch.zeros(p, r_dec, dtype=torch.float16, device=dev)
        w[:, :r] = coder.dec.T.to(torch.float16)
        i32 = dict(dtype=torch.int32, device=dev)
        classes = []
        by_size: dict[int, list[int]] = {}
        for gi, g in enumerate(coder.plan.groups):
            by_size.setdefault(g.size, []).append(gi)
        clip_of_size = {c.coords.shape[1]: c.clip for c in coder.classes}
        for s, gis in sorted(by_size.items()):
            gs = [coder.plan.groups[i] for i in gis]
            classes.append(SizeClass(
                s, len(gis),
                torch.tensor([g.start for g in gs], **i32),
                torch.tensor([g.bits for g in gs], **i32),
                torch.tensor(gis, **i32),
                clip_of_size[s].to(device=dev, dtype=torch.float32).contiguous(),
                bool((clip_of_size[s] > 0).any()),
            ))
        bits = torch.zeros(r_dec, dtype=torch.int64)
        plane = torch.zeros(r_dec, dtype=torch.int64)
        shift = torch.zeros(r_dec, dtype=torch.int64)
        group = torch.zeros(r_dec, dtype=torch.int64)
        kept = layout.coord_bits > 0
        bits[:r] = layout.coord_bits
        plane[:r] = torch.where(kept, layout.coord_byte + layout.param_bytes, 0)
        shift[:r] = torch.where(kept, layout.coord_shift, 0)
        group[:r] = layout.coord_group.clamp_min(0)
        nb = max(layout.sym_bytes, 1)
        byte_bits = torch.full((nb,), 8, dtype=torch.int64)
        byte_coord = torch.full((nb, 4), -1, dtype=torch.int64)
        for b in (8, 4, 2):
            idx = torch.nonzero(layout.coord_bits == b).flatten()
            if idx.numel() == 0:
                continue
            per = 8 // b
            k = torch.arange(idx.numel())
            byte = layout.coord_byte[idx]
            byte_coord[byte, k % per] = idx
            byte_bits[byte] = b
        return cls(
            index=index, offset=coder.offset, p=p, layer_start=layer_start, layer_end=layer_end, rank=r,
            r_enc=r_enc, r_dec=r_dec, n_groups=layout.n_groups, param_bytes=layout.param_bytes,
            sym_bytes=layout.sym_bytes, coder=coder, enc=enc, w=w, mean=coder.mean.float().contiguous(),
            classes=classes, coord_plane=plane.to(**i32), coord_shift=shift.to(**i32),
            coord_bits=bits.to(**i32), coord_group=group.to(**i32), byte_bits=byte_bits.to(**i32),
            byte_coord=byte_coord.to(**i32).contiguous(),
        )


@dataclass
class KindTables:
    """All blocks of one kind (0 = K, 1 = V): feature mean [p] fp32 and per-block tables."""

    kind: int
    p: int
    mean: torch.Tensor
    blocks: list[BlockTables]

    @property
    def bytes_per_token(self) -> int:
        return sum(b.bytes_per_token for b in self.blocks)

    @classmethod
    def build(cls, kind: int, coder: KindCoder, layer_ranges: list[tuple[int, int]]) -> "KindTables":
        blocks = [BlockTables.build(i, bc, lo, hi) for i, (bc, (lo, hi)) in enumerate(zip(coder.blocks, layer_ranges))]
        mean = torch.cat([b.mean for b in blocks]).contiguous()
        return cls(kind, coder.p, mean, blocks)

    def block_of_layer(self, layer: int) -> BlockTables:
        for b in self.blocks:
            if b.layer_start <= layer < b.layer_end:
                return b
        raise IndexError(f"no feature block holds layer {layer}")


@dataclass
class RopeTables:
    """cos/sin of the tokens being coded, one row per token and one column per pair of a head.

    positions: [n] int64. cos, sin: [n, D/2] float32; column i < R/2 is the rotated pair i (cos/sin of
    position * inv_freq[i], times YaRN's attention factor when re-applying, divided by it when undoing),
    columns >= R/2 pair the pass-through dims (cos = 1, or 1/factor when undoing; sin = 0), matching
    `kvtc_sglang.codec.rope`.
    """

    cfg: RopeConfig
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    inverse: bool


_INV_FREQ: dict = {}


def rope_tables(cfg: RopeConfig, positions: torch.Tensor, inverse: bool) -> RopeTables:
    """RopeTables for `positions` ([n] int64, on the device the kernels run on); no host sync."""
    dev = positions.device
    key = (hash(cfg), str(dev))
    inv = _INV_FREQ.get(key)
    if inv is None:
        inv = _INV_FREQ[key] = rope_inv_freq(cfg, dev)
    n, half, rh = positions.numel(), cfg.head_dim // 2, cfg.rotary_dim // 2
    angle = positions.to(torch.float32)[:, None] * inv[None, :]
    c, s = angle.cos(), angle.sin()
    att = cfg.attention_scaling
    pass_value = 1.0
    if att != 1.0:
        if inverse:
            c, s, pass_value = c / att, s / att, 1.0 / att
        else:
            c, s = c * att, s * att
    cos = torch.full((n, half), pass_value, dtype=torch.float32, device=dev)
    sin = torch.zeros((n, half), dtype=torch.float32, device=dev)
    cos[:, :rh] = c
    sin[:, :rh] = s
    return RopeTables(cfg, positions, cos, sin, inverse)
