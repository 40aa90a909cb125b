"""Per-batch tables of the batched pool codec, built on the host from host-known sizes.

One batch of J jobs gets:
    a job table [F, J] int64 (field-major: field f of job j at f * J + j; fields `EF` / `DF` below),
    per-exact-token index arrays (E = exact tokens of the batch),
all packed into one host int64 buffer and moved to the device with ONE pinned, non-blocking copy; and on
the device, by a constant number of tensor ops (no host reads):
    rows_cat / slots_cat   the jobs' row and slot tensors concatenated (job j's part starts at a host-known
                           offset, recorded in the job table)
    row_job, row_tok       for each coded token of the batch ("coded row" r in 0 .. M-1, jobs back to back):
                           its job and its token index inside the job's sections
    row_slot, row_pos      its pool slot (source on encode, destination on decode) and absolute position
Kernels index these with integer offsets they are not specialized on, so a batch of any shape reuses the
kernels compiled for the first one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

from kvtc_sglang.codec.crc32 import conditioning
from kvtc_sglang.codec.payload_layout import BlobLayout, TokenRange
from kvtc_sglang.codec.transfer import to_device_async

CRC_BLOCK = 64  # CRC segments per kernel program (programs never span two jobs)
_ALIGN = 8  # int64 elements: sub-arrays of the packed buffer start 64-byte aligned


class EF(IntEnum):
    """Encode job-table fields (the sections' payload offsets follow at SEC + s)."""

    ROWS = 0  # offset of the job's rows in rows_cat
    IDX0 = 1  # offset in slots_cat of the job's first coded token
    M = 2  # coded tokens (the sections' plane stride)
    CROW0 = 3  # first coded row of the job in the batch
    TOK0 = 4  # section token of the job's first coded row (0 on encode)
    POS0 = 5  # absolute position of the job's first coded token
    NBYTES = 6  # payload bytes
    CRCK = 7  # conditioning constant of the payload's CRC (crc32.conditioning(nbytes))
    CRCP0 = 8  # first CRC program of the job
    SEC = 9


class DF(IntEnum):
    """Decode job-table fields (same meaning where the names match)."""

    ROWS = 0
    IDX0 = 1  # offset in dst_cat of the destination of the job's first decoded coded token
    M = 2
    CROW0 = 3
    TOK0 = 4  # section token of the first decoded coded token (c_lo - n_head)
    POS0 = 5
    SEC = 6


def _round(x: int) -> int:
    return -(-x // _ALIGN) * _ALIGN


def _pack_host(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Concatenate int64 host arrays (each 64-byte aligned), one pinned non-blocking copy, device views."""
    sizes = [a.size for a in arrays]
    offs, total = [], 0
    for s in sizes:
        offs.append(total)
        total += _round(max(s, 1))
    buf = np.zeros(total, dtype=np.int64)
    for a, o in zip(arrays, offs):
        buf[o : o + a.size] = a.reshape(-1)
    dev = to_device_async(torch.from_numpy(buf), device)
    return [dev[o : o + s] for o, s in zip(offs, sizes)]


def _cat(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(tensors)


def _row_tables(jt: torch.Tensor, n_jobs: int, n_rows: int, crow0: int, tok0: int, idx0: int, pos0: int,
                index_src: torch.Tensor, device: torch.device):
    """row_job, row_tok, row_slot, row_pos of the M coded rows (device ops, no host reads)."""
    if n_rows == 0:
        z = torch.zeros(0, dtype=torch.int64, device=device)
        return z, z, z, z
    r = torch.arange(n_rows, dtype=torch.int64, device=device)
    starts = jt[crow0 * n_jobs : (crow0 + 1) * n_jobs]
    job = torch.searchsorted(starts, r, right=True) - 1
    i = r - starts[job]
    tok = jt[tok0 * n_jobs : (tok0 + 1) * n_jobs][job] + i
    slot = index_src[jt[idx0 * n_jobs : (idx0 + 1) * n_jobs][job] + i]
    pos = jt[pos0 * n_jobs : (pos0 + 1) * n_jobs][job] + i
    return job, tok, slot, pos


@dataclass
class EncodePlan:
    """Device and host tables of one encode batch (see the module docstring)."""

    n_jobs: int
    layouts: tuple[BlobLayout, ...]
    n_rows: int  # M: coded rows of the batch
    n_exact: int  # E: exact tokens of the batch
    n_crc_programs: int
    jt: torch.Tensor  # [F * J] int64 device
    rows_cat: torch.Tensor  # [sum rows] int64 device
    slots_cat: torch.Tensor
    ex_slot: torch.Tensor  # [E] pool slot of each exact token
    ex_row: torch.Tensor  # [E] index in rows_cat of the exact token's first blob row
    row_job: torch.Tensor  # [M]
    row_tok: torch.Tensor  # [M]
    row_slot: torch.Tensor  # [M] source slot
    row_pos: torch.Tensor  # [M] position
    rows_off: tuple[int, ...]  # host: offset of each job's rows in rows_cat
    nbytes: tuple[int, ...]  # host: payload bytes of each job
    sec_field0: int = EF.SEC

    @property
    def tensors(self) -> tuple:
        return (self.jt, self.rows_cat, self.slots_cat, self.ex_slot, self.ex_row, self.row_job, self.row_tok,
                self.row_slot, self.row_pos)


def plan_encode(jobs, layouts: list[BlobLayout], crc_segment: int, device: torch.device) -> EncodePlan:
    J = len(jobs)
    n_sec = len(layouts[0].sections) if layouts else 0
    F = EF.SEC + n_sec
    jt = np.zeros((F, J), dtype=np.int64)
    ex_src, ex_row = [], []
    rows_off = slots_off = crow = ex0 = prog = 0
    roff = []
    for j, (job, lay) in enumerate(zip(jobs, layouts)):
        n, nh, ntl, m = lay.n_tokens, lay.n_head, lay.n_tail, lay.n_coded
        jt[EF.ROWS, j] = rows_off
        jt[EF.IDX0, j] = slots_off + nh
        jt[EF.M, j] = m
        jt[EF.CROW0, j] = crow
        jt[EF.TOK0, j] = 0
        jt[EF.POS0, j] = job.start_pos + nh
        jt[EF.NBYTES, j] = lay.nbytes
        jt[EF.CRCK, j] = conditioning(lay.nbytes)
        jt[EF.CRCP0, j] = prog
        for s, sec in enumerate(lay.sections):
            jt[EF.SEC + s, j] = sec.offset
        if nh + ntl:
            toks = np.concatenate([np.arange(nh), np.arange(n - ntl, n)])
            ex_src.append(slots_off + toks)
            ex_row.append(rows_off + np.arange(nh + ntl) * lay.rows_per_slot)
        roff.append(rows_off)
        rows_off += lay.n_rows
        slots_off += n
        crow += m
        ex0 += nh + ntl
        n_seg = -(-lay.nbytes // crc_segment)
        prog += -(-n_seg // CRC_BLOCK)
    ex_src_a = np.concatenate(ex_src) if ex_src else np.zeros(0, np.int64)
    ex_row_a = np.concatenate(ex_row) if ex_row else np.zeros(0, np.int64)
    jt_d, ex_src_d, ex_row_d = _pack_host([jt, ex_src_a, ex_row_a], device)
    rows_cat = _cat([job.dst_rows for job in jobs], device)
    slots_cat = _cat([job.src_slots for job in jobs], device)
    ex_slot = slots_cat[ex_src_d] if ex0 else ex_src_d
    job_, tok, slot, pos = _row_tables(jt_d, J, crow, EF.CROW0, EF.TOK0, EF.IDX0, EF.POS0, slots_cat, device)
    return EncodePlan(J, tuple(layouts), crow, ex0, prog, jt_d, rows_cat, slots_cat, ex_slot, ex_row_d, job_, tok,
                      slot, pos, tuple(roff), tuple(lay.nbytes for lay in layouts))


@dataclass
class DecodePlan:
    n_jobs: int
    layouts: tuple[BlobLayout, ...]
    ranges: tuple[TokenRange, ...]
    n_rows: int
    n_exact: int
    jt: torch.Tensor
    rows_cat: torch.Tensor
    dst_cat: torch.Tensor
    ex_slot: torch.Tensor  # [E] destination slot of each exact token
    ex_row: torch.Tensor  # [E] index in rows_cat of the exact token's first blob row
    row_job: torch.Tensor
    row_tok: torch.Tensor
    row_slot: torch.Tensor  # [M] destination slot
    row_pos: torch.Tensor
    rows_off: tuple[int, ...]
    nbytes: tuple[int, ...]
    sec_field0: int = DF.SEC

    @property
    def tensors(self) -> tuple:
        return (self.jt, self.rows_cat, self.dst_cat, self.ex_slot, self.ex_row, self.row_job, self.row_tok,
                self.row_slot, self.row_pos)


def plan_decode(jobs, ranges: list[TokenRange], device: torch.device) -> DecodePlan:
    J = len(jobs)
    layouts = [job.layout for job in jobs]
    n_sec = len(layouts[0].sections) if layouts else 0
    F = DF.SEC + n_sec
    jt = np.zeros((F, J), dtype=np.int64)
    ex_dst, ex_row = [], []
    rows_off = dst_off = crow = ex0 = 0
    roff = []
    for j, (job, lay, tr) in enumerate(zip(jobs, layouts, ranges)):
        jt[DF.ROWS, j] = rows_off
        jt[DF.IDX0, j] = dst_off + tr.coded_dst0
        jt[DF.M, j] = lay.n_coded
        jt[DF.CROW0, j] = crow
        jt[DF.TOK0, j] = tr.coded_tok0
        jt[DF.POS0, j] = job.start_pos + lay.n_head + tr.coded_tok0
        for s, sec in enumerate(lay.sections):
            jt[DF.SEC + s, j] = sec.offset
        if tr.head_n + tr.tail_n:
            rows = np.concatenate([np.arange(tr.head_row0, tr.head_row0 + tr.head_n),
                                   np.arange(tr.tail_row0, tr.tail_row0 + tr.tail_n)])
            dst = np.concatenate([np.arange(tr.head_n), np.arange(tr.tail_dst0, tr.tail_dst0 + tr.tail_n)])
            ex_row.append(rows_off + rows * lay.rows_per_slot)
            ex_dst.append(dst_off + dst)
        roff.append(rows_off)
        rows_off += lay.n_rows
        dst_off += tr.b - tr.a
        crow += tr.coded_n
        ex0 += tr.head_n + tr.tail_n
    ex_dst_a = np.concatenate(ex_dst) if ex_dst else np.zeros(0, np.int64)
    ex_row_a = np.concatenate(ex_row) if ex_row else np.zeros(0, np.int64)
    jt_d, ex_dst_d, ex_row_d = _pack_host([jt, ex_dst_a, ex_row_a], device)
    rows_cat = _cat([job.src_rows for job in jobs], device)
    dst_cat = _cat([job.dst_slots for job in jobs], device)
    ex_slot = dst_cat[ex_dst_d] if ex0 else ex_dst_d
    job_, tok, slot, pos = _row_tables(jt_d, J, crow, DF.CROW0, DF.TOK0, DF.IDX0, DF.POS0, dst_cat, device)
    return DecodePlan(J, tuple(layouts), tuple(ranges), crow, ex0, jt_d, rows_cat, dst_cat, ex_slot, ex_row_d, job_,
                      tok, slot, pos, tuple(roff), tuple(lay.nbytes for lay in layouts))


def plan_crc(rows: list[torch.Tensor], layouts: list[BlobLayout], crc_segment: int,
             device: torch.device) -> EncodePlan:
    """An EncodePlan that only describes stored payloads (rows, sizes): what the CRC pass needs."""
    J = len(rows)
    n_sec = len(layouts[0].sections) if layouts else 0
    jt = np.zeros((EF.SEC + n_sec, J), dtype=np.int64)
    off = prog = 0
    roff = []
    for j, lay in enumerate(layouts):
        jt[EF.ROWS, j] = off
        jt[EF.NBYTES, j] = lay.nbytes
        jt[EF.CRCK, j] = conditioning(lay.nbytes)
        jt[EF.CRCP0, j] = prog
        roff.append(off)
        off += lay.n_rows
        prog += -(-(-(-lay.nbytes // crc_segment)) // CRC_BLOCK)  # ceil(ceil(nbytes / segment) / block)
    (jt_d,) = _pack_host([jt], device)
    z = torch.zeros(0, dtype=torch.int64, device=device)
    return EncodePlan(J, tuple(layouts), 0, 0, prog, jt_d, _cat(list(rows), device), z, z, z, z, z, z, z,
                      tuple(roff), tuple(lay.nbytes for lay in layouts))
