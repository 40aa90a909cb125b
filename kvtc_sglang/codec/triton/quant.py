"""Quantization kernels: per-token-per-group min/max params, bit packing, unpacking + dequantization.

A block's section holds n tokens of [param_bytes + sym_bytes] bytes stored byte-plane major: byte j
of token t is at section[j * m_total + t] (m_total = coded tokens of the blob). The kernels write or
read the rows [row0, row0 + n_rows) of it, so long runs can be coded in token chunks.

    group_params       coefficients [n, r] fp32 -> fp16 (shift, scale) of each kept group, written to
                       the section's param planes and to a float32 copy `params` [2, G, m_pad]
    pack               coefficients + params -> symbol planes (fields OR-ed into bytes, PlanLayout order)
    unpack_dequantize  section -> coefficients [m_pad, r_pad] (dropped coordinates 0)

The arithmetic is the reference's (`kvtc_sglang.codec.quantize`): the range [lo, hi] is the group's
min/max, clipped to mean +- c * std when the group's clip factor c > 0; fp16 shift = round(lo), scale
= fp16 of (hi - shift) / (2^b - 1) rounded up, q = clamp(round_half_even((x - shift) / scale)), IEEE
division. Bytes equal the reference's for equal coefficients, except that the clipped range's mean and
standard deviation are accumulated in one pass (sum and sum of squares) where the reference makes two,
which can move a clipped range by an ulp.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.launches import launch
from kvtc_sglang.codec.triton import reference as ref
from kvtc_sglang.codec.triton.common import (
    check_tensor,
    interpreting,
    next_pow2,
    require_kernels,
    use_reference,
    value_code,
)
from kvtc_sglang.codec.triton.jitlib import f32_to_store, rint
from kvtc_sglang.codec.triton.tables import BlockTables


@triton.jit(do_not_specialize=["n_groups", "size", "n_slots", "n_rows"])
def _group_params_kernel(c_ptr, stride_c, start_ptr, bits_ptr, slot_ptr, clip_ptr, n_groups, size, n_slots,
                         sec_ptr, m_total, row0, n_rows, par_ptr, stride_par,
                         BT: tl.constexpr, GP: tl.constexpr, CH: tl.constexpr, CLIP: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_g = tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    tmask = t < n_rows
    g = pid_g * GP + tl.arange(0, GP)
    gmask = g < n_groups
    start = tl.load(start_ptr + g, mask=gmask, other=0)
    bits = tl.load(bits_ptr + g, mask=gmask, other=8)
    slot = tl.load(slot_ptr + g, mask=gmask, other=0)
    lo = tl.full((BT, GP), float("inf"), tl.float32)
    hi = tl.full((BT, GP), float("-inf"), tl.float32)
    s1 = tl.zeros((BT, GP), tl.float32)
    s2 = tl.zeros((BT, GP), tl.float32)
    row_ptr = c_ptr + t.to(tl.int64)[:, None, None] * stride_c
    m2 = tmask[:, None] & gmask[None, :]
    for c0 in range(0, size, CH):
        cc = c0 + tl.arange(0, CH)
        m3 = m2[:, :, None] & (cc < size)[None, None, :]
        x = tl.load(row_ptr + (start[:, None] + cc[None, :])[None, :, :], mask=m3, other=0.0)
        lo = tl.minimum(lo, tl.min(tl.where(m3, x, float("inf")), axis=2))
        hi = tl.maximum(hi, tl.max(tl.where(m3, x, float("-inf")), axis=2))
        if CLIP:
            s1 += tl.sum(x, axis=2)
            s2 += tl.sum(x * x, axis=2)
    if CLIP:
        c = tl.load(clip_ptr + g, mask=gmask, other=0.0)[None, :]
        mean = s1 / size
        std = tl.sqrt(tl.maximum(s2 / size - mean * mean, 0.0))
        on = c > 0
        lo = tl.where(on, tl.maximum(lo, mean - c * std), lo)
        hi = tl.where(on, tl.minimum(hi, mean + c * std), hi)
    shift16 = lo.to(tl.float16)
    shift = shift16.to(tl.float32)
    span = tl.maximum(hi - shift, 0.0)
    levels = ((1 << bits) - 1).to(tl.float32)
    q = tl.math.div_rn(span, tl.broadcast_to(levels[None, :], (BT, GP)))
    s16 = q.to(tl.float16)
    bump = (s16.to(tl.float32) < q).to(tl.int16)
    scale16 = (s16.to(tl.int16, bitcast=True) + bump).to(tl.float16, bitcast=True)
    scale = scale16.to(tl.float32)
    tl.store(par_ptr + slot[None, :] * stride_par + t[:, None], shift, mask=m2)
    tl.store(par_ptr + (n_slots + slot)[None, :] * stride_par + t[:, None], scale, mask=m2)
    sb = shift16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    cb = scale16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    out = sec_ptr + row0 + t[:, None]
    plane = (4 * slot)[None, :].to(tl.int64) * m_total
    tl.store(out + plane, (sb & 0xFF).to(tl.uint8), mask=m2)
    tl.store(out + plane + m_total, (sb >> 8).to(tl.uint8), mask=m2)
    tl.store(out + plane + 2 * m_total, (cb & 0xFF).to(tl.uint8), mask=m2)
    tl.store(out + plane + 3 * m_total, (cb >> 8).to(tl.uint8), mask=m2)


@triton.jit(do_not_specialize=["n_slots", "sym_bytes", "n_rows"])
def _pack_kernel(c_ptr, stride_c, par_ptr, stride_par, n_slots, byte_bits_ptr, byte_coord_ptr, group_ptr,
                 sym_bytes, param_bytes, sec_ptr, m_total, row0, n_rows,
                 BT: tl.constexpr, BJ: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_j = tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    tmask = t < n_rows
    j = pid_j * BJ + tl.arange(0, BJ)
    jmask = j < sym_bytes
    b = tl.load(byte_bits_ptr + j, mask=jmask, other=8)
    levels = ((1 << b) - 1).to(tl.float32)
    acc = tl.zeros((BT, BJ), tl.int32)
    row_ptr = c_ptr + t.to(tl.int64)[:, None] * stride_c
    for f in tl.static_range(4):
        coord = tl.load(byte_coord_ptr + j * 4 + f, mask=jmask, other=-1)
        valid = coord >= 0
        cidx = tl.where(valid, coord, 0)
        g = tl.load(group_ptr + cidx, mask=valid, other=0)
        m2 = tmask[:, None] & valid[None, :]
        x = tl.load(row_ptr + cidx[None, :], mask=m2, other=0.0)
        sh = tl.load(par_ptr + g[None, :] * stride_par + t[:, None], mask=m2, other=0.0)
        sc = tl.load(par_ptr + (n_slots + g)[None, :] * stride_par + t[:, None], mask=m2, other=1.0)
        pos = sc > 0
        v = tl.math.div_rn(x - sh, tl.where(pos, sc, 1.0))
        q = tl.where(pos, rint(v), 0.0)
        q = tl.minimum(tl.maximum(q, 0.0), levels[None, :])
        acc = acc | tl.where(m2, q.to(tl.int32) << (f * b)[None, :], 0)
    out = sec_ptr + (param_bytes + j)[None, :].to(tl.int64) * m_total + row0 + t[:, None]
    tl.store(out, acc.to(tl.uint8), mask=tmask[:, None] & jmask[None, :])


@triton.jit(do_not_specialize=["n_rows", "n_out"])
def _unpack_kernel(sec_ptr, m_total, row0, n_rows, n_out, plane_ptr, shift_ptr, bits_ptr, group_ptr,
                   out_ptr, stride_out, OUT: tl.constexpr, INTERP: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    t = pid_t * BT + tl.arange(0, BT)
    tmask = t < n_rows
    c = pid_c * BC + tl.arange(0, BC)
    plane = tl.load(plane_ptr + c)
    sh = tl.load(shift_ptr + c)
    b = tl.load(bits_ptr + c)
    g = tl.load(group_ptr + c)
    m2 = tmask[:, None] & (b > 0)[None, :]
    src = sec_ptr + row0 + t[:, None]
    byte = tl.load(src + plane[None, :].to(tl.int64) * m_total, mask=m2, other=0).to(tl.int32)
    q = (byte >> sh[None, :]) & ((1 << b) - 1)[None, :]
    pp = src + (4 * g)[None, :].to(tl.int64) * m_total
    s0 = tl.load(pp, mask=m2, other=0).to(tl.int32)
    s1 = tl.load(pp + m_total, mask=m2, other=0).to(tl.int32)
    c0 = tl.load(pp + 2 * m_total, mask=m2, other=0).to(tl.int32)
    c1 = tl.load(pp + 3 * m_total, mask=m2, other=0).to(tl.int32)
    shift = (s0 | (s1 << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    scale = (c0 | (c1 << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    val = tl.where(m2, q.to(tl.float32) * scale + shift, 0.0)
    omask = (t < n_out)[:, None] & (c >= 0)[None, :]
    tl.store(out_ptr + t.to(tl.int64)[:, None] * stride_out + c[None, :], f32_to_store(val, OUT, INTERP), mask=omask)


def _check_coeffs(name: str, coeffs: torch.Tensor, tables: BlockTables, n_rows: int, width: int, dtypes) -> None:
    check_tensor(name, coeffs, dtype=dtypes, dim=2, device=tables.mean.device)
    if coeffs.stride(1) != 1 or coeffs.shape[0] < n_rows or coeffs.shape[1] < width:
        raise ShapeError(f"{name} {tuple(coeffs.shape)} needs at least [{n_rows}, {width}] with unit column stride")


def _check_section(section: torch.Tensor, tables: BlockTables, m_total: int, row0: int, n_rows: int) -> None:
    check_tensor("section", section, dtype=torch.uint8, dim=1, device=tables.mean.device, contiguous=True)
    if section.numel() != m_total * tables.bytes_per_token:
        raise ShapeError(f"section has {section.numel()} bytes, {m_total} tokens x {tables.bytes_per_token} expected")
    if row0 < 0 or row0 + n_rows > m_total:
        raise ShapeError(f"rows [{row0}, {row0 + n_rows}) outside a section of {m_total} tokens")


def group_params(coeffs: torch.Tensor, tables: BlockTables, section: torch.Tensor, m_total: int, row0: int,
                 n_rows: int, params: torch.Tensor, *, reference: bool | None = None) -> None:
    """Shift/scale of every kept group of tokens [0, n_rows) of `coeffs`.

    Args:
        coeffs: shape [>= n_rows, >= rank], float32, PCA coefficients of the tokens (row i = section row row0 + i).
        section: 1-D uint8 of m_total * bytes_per_token bytes (this block's section); param planes written.
        params: shape [2, n_groups, >= n_rows], float32; [0] shifts, [1] scales (fp16 values) written.
    """
    _check_coeffs("coefficients", coeffs, tables, n_rows, tables.rank, torch.float32)
    _check_section(section, tables, m_total, row0, n_rows)
    check_tensor("params", params, dtype=torch.float32, dim=3, device=tables.mean.device, contiguous=True)
    if params.shape[0] != 2 or params.shape[1] != tables.n_groups or params.shape[2] < n_rows:
        raise ShapeError(f"params {tuple(params.shape)} must be [2, {tables.n_groups}, >= {n_rows}]")
    if use_reference(reference):
        return ref.group_params(coeffs, tables, section, m_total, row0, n_rows, params)
    require_kernels(coeffs.device)
    if n_rows <= 0:
        return
    for cl in tables.classes:
        ch = min(next_pow2(cl.size), 64)
        gp = max(1, 64 // ch)
        bt = 64 if interpreting() else 32
        grid = (triton.cdiv(n_rows, bt), triton.cdiv(cl.count, gp))
        launch(
            _group_params_kernel, grid, coeffs, coeffs.stride(0), cl.start, cl.bits, cl.slot, cl.clip, cl.count, cl.size, tables.n_groups,
            section, m_total, row0, n_rows, params, params.stride(1), BT=bt, GP=gp, CH=ch,
            CLIP=cl.clipped)


def pack(coeffs: torch.Tensor, tables: BlockTables, params: torch.Tensor, section: torch.Tensor, m_total: int,
         row0: int, n_rows: int, *, reference: bool | None = None) -> None:
    """Quantize tokens [0, n_rows) of `coeffs` with `params` and write the section's symbol planes.

    Args: as `group_params`; `params` must hold its output for the same tokens.
    """
    _check_coeffs("coefficients", coeffs, tables, n_rows, tables.rank, torch.float32)
    _check_section(section, tables, m_total, row0, n_rows)
    check_tensor("params", params, dtype=torch.float32, dim=3, device=tables.mean.device, contiguous=True)
    if use_reference(reference):
        return ref.pack(coeffs, tables, params, section, m_total, row0, n_rows)
    require_kernels(coeffs.device)
    if n_rows <= 0 or tables.sym_bytes == 0:
        return
    bt, bj = (64, 64) if interpreting() else (64, 32)
    grid = (triton.cdiv(n_rows, bt), triton.cdiv(tables.sym_bytes, bj))
    launch(
        _pack_kernel, grid, coeffs, coeffs.stride(0), params, params.stride(1), tables.n_groups, tables.byte_bits, tables.byte_coord,
        tables.coord_group, tables.sym_bytes, tables.param_bytes, section, m_total, row0, n_rows, BT=bt, BJ=bj)


def unpack_dequantize(section: torch.Tensor, tables: BlockTables, m_total: int, row0: int, n_rows: int,
                      out: torch.Tensor, *, reference: bool | None = None) -> None:
    """Dequantized coefficients of section rows [row0, row0 + n_rows) into out[:n_rows].

    Args:
        out: shape [m_pad >= n_rows, width], float32 or float16, width >= rank (the kernel needs a
             multiple of 64, <= r_dec); columns >= rank and rows >= n_rows are set to 0.
    Non-finite params are not checked here (the blob CRC-32 guards against corruption).
    """
    _check_section(section, tables, m_total, row0, n_rows)
    _check_coeffs("coefficients", out, tables, n_rows, tables.rank, (torch.float32, torch.float16))
    if use_reference(reference):
        return ref.unpack_dequantize(section, tables, m_total, row0, n_rows, out)
    require_kernels(out.device)
    if out.shape[1] % 64 or out.shape[1] > tables.r_dec:
        raise ShapeError(f"coefficient buffer width {out.shape[1]} must be a multiple of 64 and <= {tables.r_dec}")
    bt, bc = (64, 64) if interpreting() else (32, 64)
    grid = (triton.cdiv(out.shape[0], bt), out.shape[1] // bc)
    launch(
        _unpack_kernel, grid, section, m_total, row0, n_rows, out.shape[0], tables.coord_plane, tables.coord_shift, tables.coord_bits,
        tables.coord_group, out, out.stride(0), OUT=value_code(out.dtype), INTERP=interpreting(), BT=bt, BC=bc)
