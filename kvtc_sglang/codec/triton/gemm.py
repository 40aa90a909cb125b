"""Tensor-core GEMM kernels of the codec.

    project      features [m, p_b] (fp16) @ enc [p_b, r_enc] (fp16) -> coefficients [m, r_enc] (fp32)
    reconstruct  coefficients [m, r_dec] (fp16) @ w[cols].T (fp16) + mean -> (redo RoPE on keys) ->
                 cast -> scatter straight into the pool's per-layer buffers at the tokens' slots

`reconstruct` covers any range of whole layers of a block, so one layer decodes on its own. Its N tile
is HPT whole heads. For keys the tile's weight rows are gathered in pair order (the first dims of the
tile's D/2-pair groups, then their second dims), so after one dot a reshape + split of the accumulator
gives both halves of every RoPE pair and the rotation is elementwise. fp32 accumulation throughout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.launches import launch
from kvtc_sglang.codec.triton import reference as ref
from kvtc_sglang.codec.triton.common import (
    PoolView,
    check_tensor,
    interpreting,
    pow2_factor,
    require_kernels,
    use_reference,
)
from kvtc_sglang.codec.triton.jitlib import dims_of_pair, f32_to_store, layer_base, mma
from kvtc_sglang.codec.triton.tables import BlockTables, RopeTables


@triton.jit
def _project_kernel(a_ptr, stride_a, b_ptr, stride_b, c_ptr, stride_c, K,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
                    INTERP: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * stride_a + rk[None, :]
    b_ptrs = b_ptr + rk.to(tl.int64)[:, None] * stride_b + rn[None, :]
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k + rk)[None, :] < K, other=0.0)
            b = tl.load(b_ptrs, mask=(k + rk)[:, None] < K, other=0.0)
        acc = mma(a, b, acc, INTERP)
        a_ptrs += BK
        b_ptrs += BK * stride_b
    tl.store(c_ptr + rm.to(tl.int64)[:, None] * stride_c + rn[None, :], acc)


@triton.jit(do_not_specialize=["view_layer0", "idx0", "n_rows", "col0"])
def _reconstruct_kernel(c_ptr, stride_c, w_ptr, stride_w, mean_ptr, cos_ptr, sin_ptr,
                        base_ptr, off_ptr, view_layer0, slot_ptr, idx0, n_rows, K, col0,
                        HD: tl.constexpr, D: tl.constexpr, R: tl.constexpr, NEOX: tl.constexpr,
                        ROPE: tl.constexpr, HPT: tl.constexpr, OUT: tl.constexpr, ALIGNED: tl.constexpr,
                        BM: tl.constexpr, BK: tl.constexpr, INTERP: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    HALF: tl.constexpr = D // 2
    BH: tl.constexpr = HPT * HALF
    BN: tl.constexpr = HPT * D
    tile = col0 + pid_n * BN  # block-local feature of the tile's first head
    jn = tl.arange(0, BN)
    if ROPE:
        # tile column jn: first dims of the tile's pairs (jn < BH), then their second dims
        jh = jn % BH
        d1, d2 = dims_of_pair(jh % HALF, D, R, NEOX)
        cols = tile + (jh // HALF) * D + tl.where(jn < BH, d1, d2)
    else:
        cols = tile + jn
    rm = pid_m * BM + tl.arange(0, BM)
    rk = tl.arange(0, BK)
    a_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_c + rk[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_w + rk[:, None]
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, K, BK):
        acc = mma(tl.load(a_ptrs), tl.load(w_ptrs), acc, INTERP)
        a_ptrs += BK
        w_ptrs += BK
    x = acc + tl.load(mean_ptr + cols)[None, :]
    rmask = rm < n_rows
    slot = tl.load(slot_ptr + idx0 + rm, mask=rmask, other=0)
    TPL: tl.constexpr = HD // BN  # tiles per layer
    base = layer_base(base_ptr, off_ptr, view_layer0 + pid_n // TPL, ALIGNED)
    row = base + slot[:, None] * HD + (pid_n % TPL) * BN
    if ROPE:
        x1, x2 = tl.split(tl.permute(tl.reshape(x, (BM, 2, BH)), (0, 2, 1)))
        j = tl.arange(0, BH)
        pr = j % HALF
        e1, e2 = dims_of_pair(pr, D, R, NEOX)
        m2 = rmask[:, None] & (j >= 0)[None, :]
        cs = tl.load(cos_ptr + rm[:, None] * HALF + pr[None, :], mask=m2, other=1.0)
        sn = tl.load(sin_ptr + rm[:, None] * HALF + pr[None, :], mask=m2, other=0.0)
        y1 = x1 * cs - x2 * sn
        y2 = x2 * cs + x1 * sn
        hoff = (j // HALF) * D
        tl.store(row + (hoff + e1)[None, :], f32_to_store(y1, OUT, INTERP), mask=m2)
        tl.store(row + (hoff + e2)[None, :], f32_to_store(y2, OUT, INTERP), mask=m2)
    else:
        m2 = rmask[:, None] & (jn >= 0)[None, :]
        tl.store(row + jn[None, :], f32_to_store(x, OUT, INTERP), mask=m2)


# Launch-configuration overrides, e.g. {"project": {"num_stages": 4}, "reconstruct_k": {"BM": 64}}
# (keys: project, reconstruct_k, reconstruct_v; values update the defaults below). The speed benchmark
# sweeps a few and keeps the fastest.
TUNING: dict[str, dict] = {}


def project_config(r_enc: int) -> dict:
    if interpreting():
        return dict(BM=32, BN=64, BK=64, num_warps=4, num_stages=1)
    bn = 256 if r_enc % 256 == 0 and r_enc >= 1024 else 128
    cfg = dict(BM=128, BN=bn, BK=64, num_warps=8, num_stages=3)
    cfg.update(TUNING.get("project", {}))
    if r_enc % cfg["BN"]:
        cfg["BN"] = 128
    return cfg


def project(a: torch.Tensor, tables: BlockTables, out: torch.Tensor, n_rows: int,
            *, reference: bool | None = None) -> None:
    """Coefficients of features: out[:n_rows] = a[:n_rows] @ tables.enc (the block's scale * basis).

    Args:
        a: shape [m_pad, p_b] (may be a column slice of [m_pad, p]), float16 (float32 for the reference),
           mean-centred features of the block; m_pad a multiple of 128.
        out: shape [m_pad, r_enc], float32; columns >= rank come out 0, rows >= n_rows are not written.
    """
    dev = tables.mean.device
    check_tensor("features", a, dtype=(torch.float16, torch.float32), dim=2, device=dev)
    check_tensor("coefficients", out, dtype=torch.float32, dim=2, device=dev)
    if (a.shape[1] != tables.p or a.stride(1) != 1 or out.shape != (a.shape[0], tables.r_enc) or out.stride(1) != 1
            or not 0 <= n_rows <= a.shape[0]):
        raise ShapeError(f"project: features {tuple(a.shape)} / out {tuple(out.shape)} do not fit p = {tables.p}, "
                         f"r_enc = {tables.r_enc}")
    if use_reference(reference):
        return ref.project(a, tables, out, n_rows)
    require_kernels(a.device)
    if n_rows <= 0:
        return
    cfg = project_config(tables.r_enc)
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    if a.shape[0] % bm or a.dtype != torch.float16:
        raise ShapeError(f"project: kernel needs fp16 features with rows a multiple of {bm}, got {a.dtype} {tuple(a.shape)}")
    grid = (tables.r_enc // bn, triton.cdiv(n_rows, bm))
    launch(_project_kernel, grid, a, a.stride(0), tables.enc, tables.enc.stride(0), out, out.stride(0), tables.p,
                          BM=bm, BN=bn, BK=bk, EVEN_K=tables.p % bk == 0, INTERP=interpreting(),
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def heads_per_tile(n_heads: int, head_dim: int, max_tile_n: int) -> int:
    """Heads of one reconstruct N tile: a power of two dividing H, tile width <= max_tile_n."""
    return max(1, min(pow2_factor(n_heads), max_tile_n // head_dim))


def reconstruct_config(rope: bool) -> dict:
    """Keys default to N tiles of <= 128 columns (the epilogue's cos/sin tiles stay in registers), values <= 256."""
    if interpreting():
        return dict(BM=32, BK=64, max_tile_n=256, num_warps=4, num_stages=1)
    cfg = dict(BM=128, BK=64, max_tile_n=128 if rope else 256, num_warps=8, num_stages=3)
    cfg.update(TUNING.get("reconstruct_k" if rope else "reconstruct_v", {}))
    return cfg


def reconstruct(coeffs: torch.Tensor, tables: BlockTables, rope: RopeTables | None, pool: PoolView, kind: int,
                slots: torch.Tensor, idx0: int, n_rows: int, layers: tuple[int, int],
                *, reference: bool | None = None) -> None:
    """Decode coefficients into pool rows: layers [lo, hi) of this block, tokens [0, n_rows).

    Args:
        coeffs: shape [m_pad, r_dec], float16 (the reference takes any float dtype and width >= rank),
                dequantized coefficients; row i is the token written to slots[idx0 + i]; m_pad a multiple of 128.
        rope: tables of the n_rows tokens (inverse=False) for keys (kind 0), None for values.
        pool: view holding layers [lo, hi); rows are written in its store dtype (fp8 bytes for uint8).
        layers: a range of whole layers inside [tables.layer_start, tables.layer_end).
    """
    lo, hi = layers
    dev = tables.mean.device
    check_tensor("coefficients", coeffs, dtype=(torch.float16, torch.float32), dim=2, device=dev)
    check_tensor("slots", slots, dtype=torch.int64, dim=1, device=dev)
    if not (tables.layer_start <= lo < hi <= tables.layer_end):
        raise ShapeError(f"layers [{lo}, {hi}) are not inside block layers [{tables.layer_start}, {tables.layer_end})")
    if not (pool.layer0 <= lo and hi <= pool.layer0 + pool.n_layers):
        raise ShapeError(f"pool view holds layers [{pool.layer0}, {pool.layer0 + pool.n_layers}), not [{lo}, {hi})")
    if coeffs.shape[1] < tables.rank or coeffs.stride(1) != 1 or coeffs.shape[0] < n_rows:
        raise ShapeError(f"coefficients {tuple(coeffs.shape)} must be [>= {n_rows}, >= {tables.rank}]")
    if idx0 + n_rows > slots.numel():
        raise ShapeError(f"slots [{idx0}, {idx0 + n_rows}) out of range ({slots.numel()} slots)")
    hd, d = pool.row_elems, pool.base.shape[2]
    if rope is not None and (rope.cos.shape != (n_rows, d // 2) or rope.inverse):
        raise ShapeError("keys need forward RoPE tables of shape [n_rows, D/2]")
    if use_reference(reference):
        return ref.reconstruct(coeffs, tables, rope, pool, kind, slots, idx0, n_rows, layers)
    require_kernels(coeffs.device)
    if n_rows <= 0:
        return
    cfg = reconstruct_config(rope is not None)
    bm = cfg["BM"]
    if coeffs.shape[0] % bm or coeffs.shape[1] != tables.r_dec or coeffs.dtype != torch.float16:
        raise ShapeError(f"reconstruct: kernel needs fp16 coefficients [multiple of {bm}, {tables.r_dec}], "
                         f"got {coeffs.dtype} {tuple(coeffs.shape)}")
    hpt = heads_per_tile(pool.base.shape[1], d, cfg["max_tile_n"])
    col0 = (lo - tables.layer_start) * hd
    n_tiles = (hi - lo) * hd // (hpt * d)
    cfg_rope = rope.cfg if rope is not None else None
    cos = rope.cos if rope is not None else tables.mean
    sin = rope.sin if rope is not None else tables.mean
    grid = (triton.cdiv(n_rows, bm), n_tiles)
    launch(
        _reconstruct_kernel, grid, coeffs, coeffs.stride(0), tables.w, tables.w.stride(0), tables.mean, cos, sin,
        pool.base, pool.offsets[kind], lo - pool.layer0, slots, idx0, n_rows, tables.r_dec, col0,
        HD=hd, D=d, R=cfg_rope.rotary_dim if cfg_rope else d, NEOX=(cfg_rope.style == "neox") if cfg_rope else True,
        ROPE=rope is not None, HPT=hpt, OUT=pool.value_code, ALIGNED=pool.aligned, BM=bm, BK=cfg["BK"],
        INTERP=interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
