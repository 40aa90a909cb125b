"""PyTorch references of the Triton codec kernels, one per kernel wrapper and with its signature.

They compute with the reference codec's own functions and float32 matrices (`BlockCoder.enc/dec`,
`quantize.group_params/quantize_groups`, `bitpack.pack_symbols`, `BlockCoder.coefficients`,
`rope.undo_rope/apply_rope`), in the same order as `KVTCCodec`, so a pipeline routed here
(`KVTC_REFERENCE=1`, or `reference=True`) produces the reference codec's bytes and values. They accept
the same buffers as the kernels (padded rows/columns are zeroed) and run on any device.
"""

from __future__ import annotations

import torch

from kvtc_sglang.codec.bitpack import pack_symbols
from kvtc_sglang.codec.quantize import group_params as _group_params
from kvtc_sglang.codec.quantize import quantize_groups
from kvtc_sglang.codec.rope import apply_rope, undo_rope
from kvtc_sglang.codec.triton.common import PoolView
from kvtc_sglang.codec.triton.tables import BlockTables, RopeTables


def _rows(pool: PoolView, kind: int, slots: torch.Tensor) -> torch.Tensor:
    return torch.stack([b[slots] for b in pool.buffers(kind)], dim=1)


def _to_store(x: torch.Tensor, buf: torch.Tensor, kv_dtype: torch.dtype | None) -> torch.Tensor:
    if x.dtype == buf.dtype:
        return x
    if buf.dtype == torch.uint8:
        return x.to(kv_dtype).view(torch.uint8)
    return x.to(buf.dtype)


def gather_exact(pool: PoolView, slots, idx0, n_rows, out, row0) -> None:
    s = slots[idx0 : idx0 + n_rows]
    for kind in (0, 1):
        out[row0 : row0 + n_rows, kind] = _rows(pool, kind, s)


def scatter_exact(exact, row0, n_rows, pool: PoolView, slots, idx0, layers) -> None:
    s = slots[idx0 : idx0 + n_rows]
    for kind in (0, 1):
        for layer in range(*layers):
            buf = pool.buffers(kind)[layer - pool.layer0]
            buf[s] = _to_store(exact[row0 : row0 + n_rows, kind, layer], buf, pool.kv_dtype)


def gather_features(pool: PoolView, kind, slots, idx0, n_rows, rope: RopeTables | None, mean, out) -> None:
    rows = _rows(pool, kind, slots[idx0 : idx0 + n_rows])
    x = rows.view(pool.kv_dtype).float() if rows.dtype == torch.uint8 else rows.float()
    if rope is not None:
        x = undo_rope(x, rope.positions, rope.cfg)
    out[:n_rows] = (x.reshape(n_rows, -1) - mean).to(out.dtype)
    out[n_rows:] = 0


def project(a, tables: BlockTables, out, n_rows) -> None:
    r = tables.rank
    out[:n_rows, :r] = a[:n_rows].float().contiguous() @ tables.coder.enc
    out[:n_rows, r:] = 0


def _planes(section: torch.Tensor, tables: BlockTables, m_total: int) -> torch.Tensor:
    return section.view(tables.bytes_per_token, m_total)


def group_params(coeffs, tables: BlockTables, section, m_total, row0, n_rows, params) -> None:
    d = coeffs[:n_rows, : tables.rank].float()
    planes = _planes(section, tables, m_total)
    for c in tables.coder.classes:
        shift, scale = _group_params(d[:, c.coords], c.bits, c.clip)
        params[0, c.slots, :n_rows] = shift.float().T
        params[1, c.slots, :n_rows] = scale.float().T
        raw = torch.stack([shift, scale], dim=-1).contiguous().view(torch.uint8).reshape(n_rows, -1)
        idx = (4 * c.slots[:, None] + torch.arange(4, device=c.slots.device)[None, :]).flatten()
        planes[idx, row0 : row0 + n_rows] = raw.T


def pack(coeffs, tables: BlockTables, params, section, m_total, row0, n_rows) -> None:
    d = coeffs[:n_rows, : tables.rank].float()
    q = torch.zeros(n_rows, tables.rank, dtype=torch.uint8, device=coeffs.device)
    for c in tables.coder.classes:
        shift = params[0, c.slots, :n_rows].T.to(torch.float16)
        scale = params[1, c.slots, :n_rows].T.to(torch.float16)
        q[:, c.coords] = quantize_groups(d[:, c.coords], shift, scale, c.bits)
    sym = pack_symbols(q, tables.coder.layout)
    _planes(section, tables, m_total)[tables.param_bytes :, row0 : row0 + n_rows] = sym.T


def unpack_dequantize(section, tables: BlockTables, m_total, row0, n_rows, out) -> None:
    rec = _planes(section, tables, m_total)[:, row0 : row0 + n_rows].T.contiguous()
    d = tables.coder.coefficients(rec)
    out.zero_()
    out[:n_rows, : tables.rank] = d.to(out.dtype)


def reconstruct(coeffs, tables: BlockTables, rope: RopeTables | None, pool: PoolView, kind, slots, idx0, n_rows,
                layers) -> None:
    lo, hi = layers
    hd_shape = tuple(pool.base.shape[1:])
    x = coeffs[:n_rows, : tables.rank].float() @ tables.coder.dec + tables.coder.mean
    x = x.view(n_rows, tables.layer_end - tables.layer_start, *hd_shape)[:, lo - tables.layer_start : hi - tables.layer_start]
    if rope is not None:
        x = apply_rope(x, rope.positions, rope.cfg)
    s = slots[idx0 : idx0 + n_rows]
    for layer in range(lo, hi):
        buf = pool.buffers(kind)[layer - pool.layer0]
        value = x[:, layer - lo]
        buf[s] = value.to(pool.kv_dtype).view(torch.uint8) if buf.dtype == torch.uint8 else value.to(buf.dtype)
