"""Triton route of the batched pool codec: kernels that read and write payload bytes in blob rows directly.

Same functions and arguments as `kvtc_sglang.codec.triton.batched_reference` (the PyTorch route), launched once per
batch (not per job) on the current stream:

    gather_exact_rows   exact tokens' pool rows (all layers, K and V)      -> their blob rows        grid (E, 2L)
    group_params_rows   coefficients -> fp16 (shift, scale) of every kept group, written to the section's
                        param planes in the blob rows (and float32 params for pack)   grid (tiles, groups), per size class
    pack_rows           coefficients + params -> symbol planes in the blob rows     grid (tiles, bytes)
    unpack_rows         section planes in the blob rows -> dequantized coefficients grid (tiles, coords)
    scatter_exact_rows  exact tokens' blob rows of a layer range -> their pool slots grid (E, 2 * layers)
    crc32_rows          zlib CRC-32 of every payload (see crc32.py for the math)   grid (programs,)
    copy_rows           blob rows -> other blob rows                               grid (rows,)
plus the shared feature-gather / projection / reconstruction kernels (rows.py, gemm.py), which already take
a per-row slot table and integer offsets.

Addressing: payload byte o of job j is blob row r = o // RB (RB = row_bytes, constexpr) at byte o % RB; the
row's address a = rows_cat[ROWS[j] + r] resolves to base_u8 + off[a % NB] + (a // NB) * RB (NB = 2L,
constexpr) or, for a >= n_pool_rows, to the scratch area (off[NB]). Every per-call value (row offsets,
counts, job counts, section fields) is a runtime argument listed in `do_not_specialize`, and every per-call
index tensor (row tables, job tables, the caller's row tensors of copy_rows) is listed in
`do_not_specialize_on_alignment`, so a new batch never compiles a new variant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtc_sglang.codec import crc32 as crcmath
from kvtc_sglang.codec.batch_plan import CRC_BLOCK, EF, DecodePlan, EncodePlan
from kvtc_sglang.codec.launches import launch
from kvtc_sglang.codec.triton.pool_rows import PoolRows
from kvtc_sglang.codec.triton.common import interpreting, next_pow2, value_code
from kvtc_sglang.codec.triton.gemm import project, reconstruct  # noqa: F401 (re-exported: same route API)
from kvtc_sglang.codec.triton.jitlib import f32_to_store, rint
from kvtc_sglang.codec.triton.rows import gather_features  # noqa: F401
from kvtc_sglang.codec.triton.tables import BlockTables

JOB_SEARCH_STEPS = 16  # binary-search steps over the job table: up to 2^16 jobs (batched.MAX_JOBS)
_ROWS, _M = 0, 2  # job-table fields shared by the encode and decode tables (batch_plan.EF / DF)


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _row_offset(off_ptr, addr, n_pool_rows, mask, NB: tl.constexpr, RB: tl.constexpr):
    """Byte offset (from base_u8) of the row at address `addr` (pool row or scratch row)."""
    in_pool = addr < n_pool_rows
    buf = tl.where(in_pool, addr % NB, NB)
    row = tl.where(in_pool, addr // NB, addr - n_pool_rows)
    return tl.load(off_ptr + buf, mask=mask, other=0) + row * RB


@triton.jit
def _payload_ptr(base_ptr, off_ptr, rows_ptr, row_base, o, n_pool_rows, mask, NB: tl.constexpr,
                 RB: tl.constexpr):
    """Pointer to payload byte o of the job whose rows start at rows_ptr[row_base]."""
    r = o // RB
    addr = tl.load(rows_ptr + row_base + r, mask=mask, other=0)
    return base_ptr + _row_offset(off_ptr, addr, n_pool_rows, mask, NB, RB) + (o - r * RB)


@triton.jit
def _xor(a, b):
    return a ^ b


@triton.jit
def _multmod(a, b):
    """a * b modulo the CRC-32 polynomial (reflected, uint32): zlib's multmodp with a fixed 32 steps."""
    p = tl.zeros_like(b)
    for i in range(32):
        bit = (a >> (31 - i)) & 1
        p = p ^ tl.where(bit != 0, b, 0)
        b = tl.where((b & 1) != 0, (b >> 1) ^ 0xEDB88320, b >> 1)
    return p


# ----------------------------------------------------------------------------------------------- exact rows
@triton.jit(do_not_specialize=["n_pool_rows"],
            do_not_specialize_on_alignment=["rows_ptr", "ex_slot_ptr", "ex_row_ptr"])
def _gather_exact_rows_kernel(base_ptr, off_ptr, rows_ptr, ex_slot_ptr, ex_row_ptr, n_pool_rows,
                              NB: tl.constexpr, RB: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    kl = tl.program_id(1)
    slot = tl.load(ex_slot_ptr + e)
    src = base_ptr + tl.load(off_ptr + kl) + slot * RB
    addr = tl.load(rows_ptr + tl.load(ex_row_ptr + e) + kl)
    dst = base_ptr + _row_offset(off_ptr, addr, n_pool_rows, addr >= 0, NB, RB)
    for c in tl.static_range(0, RB, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        m = cols < RB
        tl.store(dst + cols, tl.load(src + cols, mask=m), mask=m)


@triton.jit(do_not_specialize=["n_pool_rows", "layer_lo", "n_sel"],
            do_not_specialize_on_alignment=["rows_ptr", "ex_slot_ptr", "ex_row_ptr"])
def _scatter_exact_rows_kernel(base_ptr, off_ptr, rows_ptr, ex_slot_ptr, ex_row_ptr, n_pool_rows, layer_lo, n_sel,
                               L: tl.constexpr, NB: tl.constexpr, RB: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0)
    j = tl.program_id(1)  # kind * n_sel + selected layer
    kl = (j // n_sel) * L + layer_lo + j % n_sel
    addr = tl.load(rows_ptr + tl.load(ex_row_ptr + e) + kl)
    src = base_ptr + _row_offset(off_ptr, addr, n_pool_rows, addr >= 0, NB, RB)
    dst = base_ptr + tl.load(off_ptr + kl) + tl.load(ex_slot_ptr + e) * RB
    for c in tl.static_range(0, RB, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        m = cols < RB
        tl.store(dst + cols, tl.load(src + cols, mask=m), mask=m)


@triton.jit(do_not_specialize=["n_pool_rows"],
            do_not_specialize_on_alignment=["src_ptr", "dst_ptr"])
def _copy_rows_kernel(base_ptr, off_ptr, src_ptr, dst_ptr, n_pool_rows, NB: tl.constexpr, RB: tl.constexpr,
                      BLOCK: tl.constexpr):
    i = tl.program_id(0)
    a = tl.load(src_ptr + i)
    b = tl.load(dst_ptr + i)
    src = base_ptr + _row_offset(off_ptr, a, n_pool_rows, a >= 0, NB, RB)
    dst = base_ptr + _row_offset(off_ptr, b, n_pool_rows, b >= 0, NB, RB)
    for c in tl.static_range(0, RB, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        m = cols < RB
        tl.store(dst + cols, tl.load(src + cols, mask=m), mask=m)


@triton.jit(do_not_specialize=["n_pool_rows", "nbytes"], do_not_specialize_on_alignment=["rows_ptr", "flat_ptr"])
def _rows_flat_kernel(base_ptr, off_ptr, rows_ptr, flat_ptr, n_pool_rows, nbytes, TO_FLAT: tl.constexpr,
                      NB: tl.constexpr, RB: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    a = tl.load(rows_ptr + i)
    row = base_ptr + _row_offset(off_ptr, a, n_pool_rows, a >= 0, NB, RB)
    for c in tl.static_range(0, RB, BLOCK):
        cols = c + tl.arange(0, BLOCK)
        o = i.to(tl.int64) * RB + cols
        m = (cols < RB) & (o < nbytes)
        if TO_FLAT:
            tl.store(flat_ptr + o, tl.load(row + cols, mask=m), mask=m)
        else:
            tl.store(row + cols, tl.load(flat_ptr + o, mask=m), mask=m)


# ----------------------------------------------------------------------------------------------- quantization
@triton.jit(do_not_specialize=["n_groups", "size", "n_slots", "n_pool_rows", "n_jobs", "sec_field", "c0", "n_rows"],
            do_not_specialize_on_alignment=["rows_ptr", "jt_ptr", "row_job_ptr", "row_tok_ptr"])
def _group_params_rows_kernel(c_ptr, stride_c, start_ptr, bits_ptr, slot_ptr, clip_ptr, n_groups, size, n_slots,
                              par_ptr, stride_par, base_ptr, off_ptr, rows_ptr, n_pool_rows, jt_ptr, n_jobs,
                              sec_field, row_job_ptr, row_tok_ptr, c0, n_rows,
                              NB: tl.constexpr, RB: tl.constexpr, BT: tl.constexpr, GP: tl.constexpr,
                              CH: tl.constexpr, CLIP: tl.constexpr):
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
    for cc0 in range(0, size, CH):
        cc = cc0 + tl.arange(0, CH)
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
    # payload addresses: job of each row, its section offset, plane stride and rows
    job = tl.load(row_job_ptr + c0 + t, mask=tmask, other=0)
    tok = tl.load(row_tok_ptr + c0 + t, mask=tmask, other=0)
    m_job = tl.load(jt_ptr + _M * n_jobs + job, mask=tmask, other=0)
    sec = tl.load(jt_ptr + sec_field * n_jobs + job, mask=tmask, other=0)
    rbase = tl.load(jt_ptr + _ROWS * n_jobs + job, mask=tmask, other=0)
    o = (sec + tok)[:, None] + (4 * slot)[None, :].to(tl.int64) * m_job[:, None]
    rb2 = rbase[:, None] + tl.zeros((BT, GP), tl.int64)
    tl.store(_payload_ptr(base_ptr, off_ptr, rows_ptr, rb2, o, n_pool_rows, m2, NB, RB), (sb & 0xFF).to(tl.uint8),
             mask=m2)
    o = o + m_job[:, None]
    tl.store(_payload_ptr(base_ptr, off_ptr, rows_ptr, rb2, o, n_pool_rows, m2, NB, RB), (sb >> 8).to(tl.uint8),
             mask=m2)
    o = o + m_job[:, None]
    tl.store(_payload_ptr(base_ptr, off_ptr, rows_ptr, rb2, o, n_pool_rows, m2, NB, RB), (cb & 0xFF).to(tl.uint8),
             mask=m2)
    o = o + m_job[:, None]
    tl.store(_payload_ptr(base_ptr, off_ptr, rows_ptr, rb2, o, n_pool_rows, m2, NB, RB), (cb >> 8).to(tl.uint8),
             mask=m2)


@triton.jit(do_not_specialize=["n_slots", "sym_bytes", "param_bytes", "n_pool_rows", "n_jobs", "sec_field", "c0",
                               "n_rows"],
            do_not_specialize_on_alignment=["rows_ptr", "jt_ptr", "row_job_ptr", "row_tok_ptr"])
def _pack_rows_kernel(c_ptr, stride_c, par_ptr, stride_par, n_slots, byte_bits_ptr, byte_coord_ptr, group_ptr,
                      sym_bytes, param_bytes, base_ptr, off_ptr, rows_ptr, n_pool_rows, jt_ptr, n_jobs, sec_field,
                      row_job_ptr, row_tok_ptr, c0, n_rows,
                      NB: tl.constexpr, RB: tl.constexpr, BT: tl.constexpr, BJ: tl.constexpr):
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
    job = tl.load(row_job_ptr + c0 + t, mask=tmask, other=0)
    tok = tl.load(row_tok_ptr + c0 + t, mask=tmask, other=0)
    m_job = tl.load(jt_ptr + _M * n_jobs + job, mask=tmask, other=0)
    sec = tl.load(jt_ptr + sec_field * n_jobs + job, mask=tmask, other=0)
    rbase = tl.load(jt_ptr + _ROWS * n_jobs + job, mask=tmask, other=0)
    o = (sec + tok)[:, None] + (param_bytes + j)[None, :].to(tl.int64) * m_job[:, None]
    om = tmask[:, None] & jmask[None, :]
    rb2 = rbase[:, None] + tl.zeros((BT, BJ), tl.int64)
    tl.store(_payload_ptr(base_ptr, off_ptr, rows_ptr, rb2, o, n_pool_rows, om, NB, RB), acc.to(tl.uint8), mask=om)


@triton.jit(do_not_specialize=["n_pool_rows", "n_jobs", "sec_field", "c0", "n_rows", "n_out"],
            do_not_specialize_on_alignment=["rows_ptr", "jt_ptr", "row_job_ptr", "row_tok_ptr"])
def _unpack_rows_kernel(base_ptr, off_ptr, rows_ptr, n_pool_rows, jt_ptr, n_jobs, sec_field, row_job_ptr,
                        row_tok_ptr, c0, n_rows, n_out, plane_ptr, shift_ptr, bits_ptr, group_ptr, out_ptr, stride_out,
                        NB: tl.constexpr, RB: tl.constexpr, OUT: tl.constexpr, INTERP: tl.constexpr,
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
    job = tl.load(row_job_ptr + c0 + t, mask=tmask, other=0)
    tok = tl.load(row_tok_ptr + c0 + t, mask=tmask, other=0)
    m_job = tl.load(jt_ptr + _M * n_jobs + job, mask=tmask, other=0)
    sec = tl.load(jt_ptr + sec_field * n_jobs + job, mask=tmask, other=0)
    rbase = tl.load(jt_ptr + _ROWS * n_jobs + job, mask=tmask, other=0)
    rb2 = rbase[:, None] + tl.zeros((BT, BC), tl.int64)
    o0 = (sec + tok)[:, None] + tl.zeros((BT, BC), tl.int64)
    mj = m_job[:, None]
    byte = tl.load(_payload_ptr(base_ptr, off_ptr, rows_ptr, rb2, o0 + plane[None, :].to(tl.int64) * mj, n_pool_rows,
                                m2, NB, RB), mask=m2, other=0).to(tl.int32)
    q = (byte >> sh[None, :]) & ((1 << b) - 1)[None, :]
    op = o0 + (4 * g)[None, :].to(tl.int64) * mj
    s0 = tl.load(_payload_ptr(base_ptr, off_ptr, rows_ptr, rb2, op, n_pool_rows, m2, NB, RB), mask=m2,
                 other=0).to(tl.int32)
    s1 = tl.load(_payload_ptr(base_ptr, off_ptr, rows_ptr, rb2, op + mj, n_pool_rows, m2, NB, RB), mask=m2,
                 other=0).to(tl.int32)
    k0 = tl.load(_payload_ptr(base_ptr, off_ptr, rows_ptr, rb2, op + 2 * mj, n_pool_rows, m2, NB, RB), mask=m2,
                 other=0).to(tl.int32)
    k1 = tl.load(_payload_ptr(base_ptr, off_ptr, rows_ptr, rb2, op + 3 * mj, n_pool_rows, m2, NB, RB), mask=m2,
                 other=0).to(tl.int32)
    shift = (s0 | (s1 << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    scale = (k0 | (k1 << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    val = tl.where(m2, q.to(tl.float32) * scale + shift, 0.0)
    omask = (t < n_out)[:, None] & (c >= 0)[None, :]
    tl.store(out_ptr + t.to(tl.int64)[:, None] * stride_out + c[None, :], f32_to_store(val, OUT, INTERP), mask=omask)


# ----------------------------------------------------------------------------------------------- CRC-32
@triton.jit(do_not_specialize=["n_pool_rows", "n_jobs"],
            do_not_specialize_on_alignment=["rows_ptr", "jt_ptr", "acc_ptr"])
def _crc32_rows_kernel(base_ptr, off_ptr, rows_ptr, n_pool_rows, jt_ptr, n_jobs, table_ptr, x2n_ptr, acc_ptr,
                       F_ROWS: tl.constexpr, F_NBYTES: tl.constexpr, F_CRCP0: tl.constexpr,
                       NB: tl.constexpr, RB: tl.constexpr, SEG: tl.constexpr, BLOCK: tl.constexpr,
                       STEPS: tl.constexpr):
    pid = tl.program_id(0)
    # the job owning this program: rightmost j with CRCP0[j] <= pid (programs never span jobs)
    job = pid * 0
    for k in tl.static_range(STEPS - 1, -1, -1):
        cand = job + (1 << k)
        ok = cand < n_jobs
        first = tl.load(jt_ptr + F_CRCP0 * n_jobs + tl.minimum(cand, n_jobs - 1))
        job = tl.where(ok & (first <= pid), cand, job)
    nbytes = tl.load(jt_ptr + F_NBYTES * n_jobs + job)
    rbase = tl.load(jt_ptr + F_ROWS * n_jobs + job)
    seg = (pid - tl.load(jt_ptr + F_CRCP0 * n_jobs + job)) * BLOCK + tl.arange(0, BLOCK)
    start = seg.to(tl.int64) * SEG
    ln = tl.minimum(tl.maximum(nbytes - start, 0), SEG)
    live = ln > 0
    r = start // RB
    addr = tl.load(rows_ptr + rbase + r, mask=live, other=0)
    ptr = base_ptr + _row_offset(off_ptr, addr, n_pool_rows, live, NB, RB) + (start - r * RB)
    crc = tl.zeros((BLOCK,), tl.uint32)
    for i in range(SEG):
        on = i < ln
        byte = tl.load(ptr + i, mask=on, other=0).to(tl.uint32)
        nxt = tl.load(table_ptr + ((crc ^ byte) & 0xFF), mask=on, other=0).to(tl.uint32, bitcast=True) ^ (crc >> 8)
        crc = tl.where(on, nxt, crc)
    # times x^(8 d), d = payload bytes after the segment (zlib's x2nmodp(d, 3))
    d = nbytes - start - ln
    mul = tl.full((BLOCK,), 0x80000000, tl.uint32)
    for k in range(32):
        x2n = tl.load(x2n_ptr + ((k + 3) & 31)).to(tl.uint32, bitcast=True)
        mul = tl.where(((d >> k) & 1) != 0, _multmod(x2n + tl.zeros_like(mul), mul), mul)
    crc = tl.where(live, _multmod(mul, crc), 0)
    tl.atomic_xor(acc_ptr + job, tl.reduce(crc, 0, _xor).to(tl.int32, bitcast=True))


# ----------------------------------------------------------------------------------------------- wrappers
def _copy_block(rb: int) -> int:
    return min(next_pow2(rb), 1024)


def begin_encode(pool: PoolRows, plan: EncodePlan):
    return None


def finish_encode(pool: PoolRows, plan: EncodePlan, st) -> None:
    return None


def begin_decode(pool: PoolRows, plan: DecodePlan):
    return None


def encode_exact(pool: PoolRows, plan: EncodePlan, st) -> None:
    if plan.n_exact == 0:
        return
    NB, RB = pool.rows_per_slot, pool.row_bytes
    launch(_gather_exact_rows_kernel, (plan.n_exact, NB), pool.base_u8, pool.byte_offsets, plan.rows_cat,
           plan.ex_slot, plan.ex_row, pool.n_pool_rows, NB=NB, RB=RB, BLOCK=_copy_block(RB),
           name="gather_exact_rows")


def decode_exact(pool: PoolRows, plan: DecodePlan, st, layers: tuple[int, int]) -> None:
    lo, hi = layers
    if plan.n_exact == 0 or hi <= lo:
        return
    NB, RB = pool.rows_per_slot, pool.row_bytes
    launch(_scatter_exact_rows_kernel, (plan.n_exact, 2 * (hi - lo)), pool.base_u8, pool.byte_offsets,
           plan.rows_cat, plan.ex_slot, plan.ex_row, pool.n_pool_rows, lo, hi - lo, L=pool.n_layers, NB=NB, RB=RB,
           BLOCK=_copy_block(RB), name="scatter_exact_rows")


def copy_rows(pool: PoolRows, src: torch.Tensor, dst: torch.Tensor) -> None:
    RB = pool.row_bytes
    launch(_copy_rows_kernel, (src.numel(),), pool.base_u8, pool.byte_offsets, src, dst, pool.n_pool_rows,
           NB=pool.rows_per_slot, RB=RB, BLOCK=_copy_block(RB), name="copy_rows")


def rows_to_flat(pool: PoolRows, rows: torch.Tensor, out: torch.Tensor) -> None:
    """Payload bytes stored in `rows` -> out (1-D uint8, out.numel() bytes = the payload size)."""
    RB = pool.row_bytes
    launch(_rows_flat_kernel, (rows.numel(),), pool.base_u8, pool.byte_offsets, rows, out, pool.n_pool_rows,
           out.numel(), TO_FLAT=True, NB=pool.rows_per_slot, RB=RB, BLOCK=_copy_block(RB), name="rows_to_flat")


def flat_to_rows(pool: PoolRows, flat: torch.Tensor, rows: torch.Tensor) -> None:
    """flat (1-D uint8 payload) -> the rows; bytes past the payload in the last row are left as they are."""
    RB = pool.row_bytes
    launch(_rows_flat_kernel, (rows.numel(),), pool.base_u8, pool.byte_offsets, rows, flat, pool.n_pool_rows,
           flat.numel(), TO_FLAT=False, NB=pool.rows_per_slot, RB=RB, BLOCK=_copy_block(RB), name="flat_to_rows")


def quantize(pool: PoolRows, plan: EncodePlan, st, bt: BlockTables, section: int, coeffs: torch.Tensor,
             params: torch.Tensor, c0: int, n: int) -> None:
    """group_params_rows (one launch per size class) + pack_rows for coded rows c0 .. c0 + n - 1."""
    if n == 0:
        return
    NB, RB = pool.rows_per_slot, pool.row_bytes
    field = plan.sec_field0 + section
    bt_rows = 64 if interpreting() else 32
    stride_par = params.stride(1)
    for cl in bt.classes:
        ch = min(next_pow2(cl.size), 64)
        gp = max(1, 64 // ch)
        grid = (triton.cdiv(n, bt_rows), triton.cdiv(cl.count, gp))
        launch(_group_params_rows_kernel, grid, coeffs, coeffs.stride(0), cl.start, cl.bits, cl.slot, cl.clip,
               cl.count, cl.size, bt.n_groups, params, stride_par, pool.base_u8, pool.byte_offsets, plan.rows_cat,
               pool.n_pool_rows, plan.jt, plan.n_jobs, field, plan.row_job, plan.row_tok, c0, n,
               NB=NB, RB=RB, BT=bt_rows, GP=gp, CH=ch, CLIP=cl.clipped, name="group_params_rows")
    if bt.sym_bytes == 0:
        return
    bt2, bj = (64, 64) if interpreting() else (64, 32)
    grid = (triton.cdiv(n, bt2), triton.cdiv(bt.sym_bytes, bj))
    launch(_pack_rows_kernel, grid, coeffs, coeffs.stride(0), params, stride_par, bt.n_groups, bt.byte_bits,
           bt.byte_coord, bt.coord_group, bt.sym_bytes, bt.param_bytes, pool.base_u8, pool.byte_offsets, plan.rows_cat,
           pool.n_pool_rows, plan.jt, plan.n_jobs, field, plan.row_job, plan.row_tok, c0, n,
           NB=NB, RB=RB, BT=bt2, BJ=bj, name="pack_rows")


def unpack(pool: PoolRows, plan: DecodePlan, st, bt: BlockTables, section: int, c0: int, n: int,
           out: torch.Tensor) -> None:
    """Dequantized coefficients of coded rows c0 .. c0 + n - 1 -> out ([m_pad >= n, r_dec] fp16); rows >= n 0."""
    bt_rows, bc = (64, 64) if interpreting() else (32, 64)
    grid = (triton.cdiv(out.shape[0], bt_rows), out.shape[1] // bc)
    launch(_unpack_rows_kernel, grid, pool.base_u8, pool.byte_offsets, plan.rows_cat, pool.n_pool_rows, plan.jt,
           plan.n_jobs, plan.sec_field0 + section, plan.row_job, plan.row_tok, c0, n, out.shape[0],
           bt.coord_plane, bt.coord_shift, bt.coord_bits, bt.coord_group, out, out.stride(0),
           NB=pool.rows_per_slot, RB=pool.row_bytes, OUT=value_code(out.dtype), INTERP=interpreting(),
           BT=bt_rows, BC=bc, name="unpack_rows")


_TABLES: dict = {}


def _crc_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = str(device)
    t = _TABLES.get(key)
    if t is None:
        from kvtc_sglang.codec.transfer import to_device_async

        def i32(values):
            return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32)

        t = _TABLES[key] = (to_device_async(i32(crcmath.byte_table()), device),
                            to_device_async(i32(crcmath.x2n_table()), device))
    return t


def crc(pool: PoolRows, plan: EncodePlan, st) -> torch.Tensor:
    """zlib CRC-32 of each job's payload: [J] int64 (one launch over every payload's segments)."""
    J = plan.n_jobs
    acc = plan.jt[EF.CRCK * J : (EF.CRCK + 1) * J].to(torch.int32)  # starts at the conditioning constant
    if plan.n_crc_programs:
        table, x2n = _crc_tables(pool.device)
        launch(_crc32_rows_kernel, (plan.n_crc_programs,), pool.base_u8, pool.byte_offsets, plan.rows_cat,
               pool.n_pool_rows, plan.jt, J, table, x2n, acc, F_ROWS=int(EF.ROWS), F_NBYTES=int(EF.NBYTES),
               F_CRCP0=int(EF.CRCP0), NB=pool.rows_per_slot, RB=pool.row_bytes, SEG=pool.crc_segment,
               BLOCK=CRC_BLOCK, STEPS=JOB_SEARCH_STEPS, name="crc32_rows")
    return acc.to(torch.int64) & 0xFFFFFFFF
