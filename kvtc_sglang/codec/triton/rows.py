"""Row kernels: exact-row copies between the KV pool and a payload, and the feature gather of encode.

    gather_exact      pool rows of given slots, all layers, K and V  -> exact rows [n_ex, 2, L, H, D]
    scatter_exact     exact rows (token range, layer range)          -> pool rows of given slots
    gather_features   pool rows of given slots -> (undo RoPE on keys) - mean -> [m, p] features

Each wrapper checks, launches on the current stream and returns nothing (outputs are arguments);
`KVTC_REFERENCE=1` or `reference=True` routes it to `kvtc_sglang.codec.triton.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.launches import launch
from kvtc_sglang.codec.quantize import FP16_MAX
from kvtc_sglang.codec.triton import reference as ref
from kvtc_sglang.codec.triton.common import (
    PoolView,
    check_tensor,
    interpreting,
    next_pow2,
    pow2_factor,
    require_kernels,
    use_reference,
    value_code,
)
from kvtc_sglang.codec.triton.jitlib import f32_to_store, layer_base, load_as_f32, pair_of_dim
from kvtc_sglang.codec.triton.tables import RopeTables

_FP16_MAX = tl.constexpr(FP16_MAX)  # fp16 features saturate here instead of overflowing to inf


@triton.jit(do_not_specialize=["idx0", "row0", "n_layers"])
def _gather_exact_kernel(base_ptr, off_ptr, slot_ptr, idx0, out_ptr, row0, n_layers,
                         HD: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    e = tl.program_id(0)
    kl = tl.program_id(1)  # kind * n_layers + layer
    slot = tl.load(slot_ptr + idx0 + e)
    src = layer_base(base_ptr, off_ptr, kl, ALIGNED) + slot * HD
    dst = out_ptr + ((row0 + e) * 2 * n_layers + kl).to(tl.int64) * HD
    for c in tl.static_range(0, HD, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        m = cols < HD
        tl.store(dst + cols, tl.load(src + cols, mask=m), mask=m)


@triton.jit(do_not_specialize=["row0", "n_layers_total", "layer_lo", "n_sel", "n_view_layers", "layer0", "idx0"])
def _scatter_exact_kernel(ex_ptr, row0, n_layers_total, layer_lo, n_sel,
                          base_ptr, off_ptr, n_view_layers, layer0, slot_ptr, idx0,
                          HD: tl.constexpr, BLOCK: tl.constexpr, SRC: tl.constexpr, DST: tl.constexpr,
                          RAW: tl.constexpr, ALIGNED: tl.constexpr, INTERP: tl.constexpr):
    e = tl.program_id(0)
    j = tl.program_id(1)  # kind * n_sel + selected layer
    kind = j // n_sel
    layer = layer_lo + j % n_sel
    slot = tl.load(slot_ptr + idx0 + e)
    src = ex_ptr + (((row0 + e) * 2 + kind) * n_layers_total + layer).to(tl.int64) * HD
    dst = layer_base(base_ptr, off_ptr, kind * n_view_layers + layer - layer0, ALIGNED) + slot * HD
    for c in tl.static_range(0, HD, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        m = cols < HD
        if RAW:
            tl.store(dst + cols, tl.load(src + cols, mask=m), mask=m)
        else:
            tl.store(dst + cols, f32_to_store(load_as_f32(src + cols, m, SRC), DST, INTERP), mask=m)


@triton.jit(do_not_specialize=["layer0", "idx0", "n_rows", "n_out"])
def _gather_features_kernel(base_ptr, off_ptr, layer0, slot_ptr, idx0, n_rows, n_out,
                            cos_ptr, sin_ptr, mean_ptr, out_ptr, stride_out,
                            HD: tl.constexpr, D: tl.constexpr, R: tl.constexpr, NEOX: tl.constexpr,
                            ROPE: tl.constexpr, SRC: tl.constexpr, OUT: tl.constexpr, ALIGNED: tl.constexpr,
                            INTERP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    rmask = rows < n_rows
    slot = tl.load(slot_ptr + idx0 + rows, mask=rmask, other=0)
    TPL: tl.constexpr = HD // BC  # tiles per layer (BC divides HD)
    base = layer_base(base_ptr, off_ptr, pid_c // TPL - layer0, ALIGNED)
    within = (pid_c % TPL) * BC + tl.arange(0, BC)
    cols = pid_c * BC + tl.arange(0, BC)
    row_ptr = base + slot[:, None] * HD
    m2 = rmask[:, None] & (cols >= 0)[None, :]
    x = load_as_f32(row_ptr + within[None, :], m2, SRC)
    if ROPE:
        d = within % D
        pair, first, partner = pair_of_dim(d, D, R, NEOX)
        xp = load_as_f32(row_ptr + (within - d + partner)[None, :], m2, SRC)
        HALF: tl.constexpr = D // 2
        cs = tl.load(cos_ptr + rows[:, None] * HALF + pair[None, :], mask=m2, other=1.0)
        sn = tl.load(sin_ptr + rows[:, None] * HALF + pair[None, :], mask=m2, other=0.0)
        sgn = tl.where(first, 1.0, -1.0)
        x = x * cs + (sgn[None, :] * xp) * sn
    x = x - tl.load(mean_ptr + cols)[None, :]
    x = tl.where(m2, x, 0.0)
    if OUT == 1:
        x = tl.minimum(tl.maximum(x, -_FP16_MAX), _FP16_MAX)
    omask = (rows < n_out)[:, None] & (cols >= 0)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :], f32_to_store(x, OUT, INTERP), mask=omask)


def _exact_block(hd: int) -> int:
    return min(next_pow2(hd), 1024)


def gather_exact(pool: PoolView, slots: torch.Tensor, idx0: int, n_rows: int, out: torch.Tensor, row0: int,
                 *, reference: bool | None = None) -> None:
    """Copy the pool rows of slots[idx0 : idx0 + n_rows] (all layers, K and V) into out[row0 : row0 + n_rows].

    Args:
        pool: the whole pool (layer0 == 0); buffers [num_slots, H, D] of the store dtype.
        slots: shape [n], dtype int64, pool slot of each token.
        out: shape [n_ex, 2, L, H, D], store dtype (a view of the payload's exact area).
    """
    if n_rows <= 0:
        return
    check_tensor("slots", slots, dtype=torch.int64, dim=1, device=pool.base.device)
    check_tensor("exact rows", out, dtype=pool.store_dtype, dim=5, device=pool.base.device, contiguous=True)
    if out.shape[1:] != (2, pool.n_layers, *pool.base.shape[1:]) or row0 + n_rows > out.shape[0] or idx0 + n_rows > slots.numel():
        raise ShapeError(f"exact rows {tuple(out.shape)} / slots {slots.numel()} do not fit rows [{row0}, {row0 + n_rows})")
    if use_reference(reference):
        return ref.gather_exact(pool, slots, idx0, n_rows, out, row0)
    require_kernels(out.device)
    hd = pool.row_elems
    launch(
        _gather_exact_kernel, (n_rows, 2 * pool.n_layers), pool.base, pool.offsets, slots, idx0, out, row0, pool.n_layers, HD=hd, BLOCK=_exact_block(hd),
        ALIGNED=pool.aligned)


def scatter_exact(exact: torch.Tensor, row0: int, n_rows: int, pool: PoolView, slots: torch.Tensor, idx0: int,
                  layers: tuple[int, int], *, reference: bool | None = None) -> None:
    """Write exact rows [row0, row0 + n_rows) of layers [lo, hi) into pool slots[idx0 : idx0 + n_rows].

    Args:
        exact: shape [n_ex, 2, L, H, D], the blob's exact dtype (bf16/fp16/fp32, or uint8 fp8 bytes).
        pool: a view holding at least layers [lo, hi) (pool.layer0 <= lo, hi <= layer0 + n_layers).
        layers: model layer range to write.
    Values are converted to the pool's type when the dtypes differ (fp8 bytes only copy to fp8 bytes).
    """
    lo, hi = layers
    if n_rows <= 0 or hi <= lo:
        return
    check_tensor("slots", slots, dtype=torch.int64, dim=1, device=pool.base.device)
    check_tensor("exact rows", exact, dim=5, device=pool.base.device, contiguous=True)
    if not (pool.layer0 <= lo and hi <= pool.layer0 + pool.n_layers and hi <= exact.shape[2]):
        raise ShapeError(f"layers [{lo}, {hi}) are not all in the pool view / exact rows")
    if row0 + n_rows > exact.shape[0] or idx0 + n_rows > slots.numel():
        raise ShapeError(f"exact rows [{row0}, {row0 + n_rows}) or slots [{idx0}, {idx0 + n_rows}) out of range")
    raw = exact.dtype == pool.store_dtype
    if exact.dtype == torch.uint8 and not raw:
        raise ShapeError(f"exact rows are fp8 bytes; cannot write them into a {pool.store_dtype} pool")
    if use_reference(reference):
        return ref.scatter_exact(exact, row0, n_rows, pool, slots, idx0, layers)
    require_kernels(exact.device)
    hd = pool.row_elems
    src = value_code(exact.dtype, pool.kv_dtype)
    dst = pool.value_code
    launch(
        _scatter_exact_kernel, (n_rows, 2 * (hi - lo)), exact, row0, exact.shape[2], lo, hi - lo, pool.base, pool.offsets, pool.n_layers, pool.layer0, slots, idx0,
        HD=hd, BLOCK=_exact_block(hd), SRC=src, DST=dst, RAW=raw, ALIGNED=pool.aligned, INTERP=interpreting())


def feature_tile(hd: int) -> int:
    """Column tile of the feature gather: a power of two dividing H*D, at most 256."""
    return min(pow2_factor(hd), 256)


def gather_features(pool: PoolView, kind: int, slots: torch.Tensor, idx0: int, n_rows: int,
                    rope: RopeTables | None, mean: torch.Tensor, out: torch.Tensor,
                    *, reference: bool | None = None) -> None:
    """Features of the tokens at slots[idx0 : idx0 + n_rows]: RoPE undone (keys), minus the mean.

    Args:
        pool: the whole pool (layer0 == 0), K (kind 0) or V (kind 1) rows are read.
        rope: tables of the n_rows tokens (inverse=True) for keys, None for values.
        mean: shape [p], float32, the kind's feature mean (all blocks).
        out: shape [m_pad >= n_rows, p], float32, float16 (saturated at +-65504) or bfloat16; rows >= n_rows
             are set to 0.
    """
    check_tensor("slots", slots, dtype=torch.int64, dim=1, device=pool.base.device)
    check_tensor("features", out, dtype=(torch.float32, torch.bfloat16, torch.float16), dim=2, device=pool.base.device)
    hd, d = pool.row_elems, pool.base.shape[2]
    p = pool.n_layers * hd
    if pool.layer0 != 0 or out.shape[1] != p or out.stride(1) != 1 or out.shape[0] < n_rows or mean.shape != (p,):
        raise ShapeError(f"features {tuple(out.shape)} / mean {tuple(mean.shape)} do not fit a pool of p = {p}")
    if idx0 + n_rows > slots.numel():
        raise ShapeError(f"slots [{idx0}, {idx0 + n_rows}) out of range ({slots.numel()} slots)")
    if rope is not None and (rope.cos.shape != (n_rows, d // 2) or not rope.inverse):
        raise ShapeError("keys need inverse RoPE tables of shape [n_rows, D/2]")
    if use_reference(reference):
        return ref.gather_features(pool, kind, slots, idx0, n_rows, rope, mean, out)
    require_kernels(out.device)
    bc = feature_tile(hd)
    bt = 64 if interpreting() else max(1, 4096 // bc)
    grid = (triton.cdiv(out.shape[0], bt), p // bc)
    cos = rope.cos if rope is not None else mean
    sin = rope.sin if rope is not None else mean
    cfg = rope.cfg if rope is not None else None
    launch(
        _gather_features_kernel, grid, pool.base, pool.offsets[kind], pool.layer0, slots, idx0, n_rows, out.shape[0], cos, sin, mean, out, out.stride(0),
        HD=hd, D=d, R=cfg.rotary_dim if cfg else d, NEOX=(cfg.style == "neox") if cfg else True,
        ROPE=rope is not None, SRC=pool.value_code, OUT=value_code(out.dtype), ALIGNED=pool.aligned,
        INTERP=interpreting(), BT=bt, BC=bc)
