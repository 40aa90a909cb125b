"""A test double of the pool codec contract (codec/interfaces.py ``PoolCodec``), lossless where it matters.

It reads and writes real pool rows exactly as the contract says (payload bytes in the rows named by row addresses
``slot * 2L + buffer``, scratch rows after the pool's), so the tier's placement, ordering and accounting are tested
against real memory. What it stores per coded token is not a transform code but the token's identity: the test KV
data carries the token id and position in elements 0 and 1 of every K row (``FakeKV``), so the double keeps
(token, position, checksum) and regenerates the rows at decode. Coded rows come back with +1.0 in their last
element (a marker of "restored lossily"); exact (sink/window) rows come back bit-exact. A coded token whose rows were
not the KV of (token, position) when encoded (garbage read from freed or unwritten slots) decodes to NaN rows.

Sizes: exact tokens take 2L rows each, coded tokens ``coded_bytes_per_token`` bytes each (default: a slot / 8).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

import torch

from kvtc_sglang.cache import audit, faults


@dataclass(frozen=True)
class FakeLayout:
    n_tokens: int
    n_head: int
    n_tail: int
    n_coded: int
    nbytes: int
    row_bytes: int

    @property
    def n_rows(self) -> int:
        return -(-self.nbytes // self.row_bytes)


@dataclass
class EncodeJob:
    src_slots: torch.Tensor
    start_pos: int
    n_head: int
    n_tail: int
    dst_rows: torch.Tensor
    crc_out: torch.Tensor | None = None


@dataclass
class DecodeJob:
    src_rows: torch.Tensor
    layout: FakeLayout
    start_pos: int
    token_range: tuple
    dst_slots: torch.Tensor


@dataclass
class FakePoolRows:
    buffers: list           # 2L buffers [slots, H, D]
    views: list             # uint8 [slots, row_bytes] views of them
    row_bytes: int
    n_slots: int
    scratch: torch.Tensor | None
    scratch_rows: int

    @property
    def n_pool_rows(self) -> int:
        return self.n_slots * len(self.buffers)

    def scratch_addresses(self, start: int, n: int) -> torch.Tensor:
        if start + n > self.scratch_rows:
            raise ValueError("scratch overflow")
        return torch.arange(self.n_pool_rows + start, self.n_pool_rows + start + n, dtype=torch.int64)


@dataclass
class FakeEncodeBatch:
    crc: torch.Tensor  # [n_jobs] int64: zlib CRC-32 of each payload
    payloads: list


@dataclass
class FakeDecodeBatch:
    jobs: list
    pool: object = None
    rows: list = field(default_factory=list)   # per job: (k, v) [n, L, H, D] float32 to write
    layers_done: set = field(default_factory=set)


class FakeKV:
    """Deterministic KV rows of (token, position): K[l, h, 0] = token, K[l, h, 1] = position, the rest a smooth
    function of everything; V a different one. Values are small exact-in-float32 numbers."""

    def __init__(self, L: int, H: int, D: int):
        self.L, self.H, self.D = L, H, D
        grid = torch.arange(L * H * D, dtype=torch.float64).view(L, H, D)
        self._grid = grid
        self._cache: dict = {}

    def rows(self, token: int, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (int(token), int(pos))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        g = self._grid
        k = torch.round(torch.sin(g * 0.37 + token * 1.3 + pos * 0.11) * 64) / 64
        v = torch.round(torch.cos(g * 0.21 + token * 0.7 - pos * 0.05) * 64) / 64
        k[..., 0] = token
        k[..., 1] = pos
        out = (k.float(), v.float())
        self._cache[key] = out
        return out

    def batch(self, tokens, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        ks, vs = zip(*(self.rows(t, start + i) for i, t in enumerate(tokens))) if len(tokens) else ((), ())
        if not ks:
            e = torch.empty(0, self.L, self.H, self.D)
            return e, e.clone()
        return torch.stack(ks), torch.stack(vs)


class FakePoolCodec:
    """The double (see the module docstring).

    Args:
        kv: the FakeKV the test writes into the pool (used to regenerate coded rows).
        coded_bytes_per_token: payload bytes of one coded token (>= 24).
        in_place: "scratch" (plan scratch rows and offer copy_rows), "direct" (claim reads-before-writes) or None.
    """

    def __init__(self, kv: FakeKV, dtype: torch.dtype, coded_bytes_per_token: int | None = None,
                 in_place: str | None = "scratch"):
        self.kv = kv
        self.shape = (kv.L, kv.H, kv.D)
        self.dtype = dtype
        self.esize = torch.empty(0, dtype=dtype).element_size()
        self.row_bytes = kv.H * kv.D * self.esize
        slot = 2 * kv.L * self.row_bytes
        self.coded_bytes_per_token = max(24, coded_bytes_per_token or slot // 8)
        self.in_place = in_place
        self.encode_reads_before_writes = in_place == "direct"
        self.EncodeJob = EncodeJob
        self.DecodeJob = DecodeJob
        self.jit_compiles = 0
        self.calls = {"encode": 0, "decode_begin": 0, "decode_layers": 0, "copy_rows": 0}
        if in_place != "scratch":
            self.copy_rows = None

    # ------------------------------------------------------------------ contract
    def blob_layout(self, n_tokens: int, n_head: int, n_tail: int) -> FakeLayout:
        n_coded = n_tokens - n_head - n_tail
        nbytes = (n_head + n_tail) * 2 * self.kv.L * self.row_bytes + n_coded * self.coded_bytes_per_token
        return FakeLayout(n_tokens, n_head, n_tail, n_coded, nbytes, self.row_bytes)

    def pool_rows(self, k_buffers, v_buffers, scratch_rows: int = 0) -> FakePoolRows:
        buffers = list(k_buffers) + list(v_buffers)
        views = [b.view(torch.uint8).view(b.shape[0], -1) for b in buffers]
        rows = scratch_rows if self.in_place == "scratch" else 0
        scratch = torch.zeros(rows, self.row_bytes, dtype=torch.uint8) if rows else None
        return FakePoolRows(buffers, views, self.row_bytes, int(buffers[0].shape[0]), scratch, rows)

    def warmup(self, pool) -> int:
        return 0

    def _addr(self, pool: FakePoolRows, addr: int):
        nb = len(pool.buffers)
        if addr >= pool.n_pool_rows:
            return pool.scratch[addr - pool.n_pool_rows]
        return pool.views[addr % nb][addr // nb]

    def _write_rows(self, pool, rows: torch.Tensor, payload: bytes) -> None:
        rb = pool.row_bytes
        data = torch.frombuffer(bytearray(payload.ljust(len(rows.tolist()) * rb, b"\0")), dtype=torch.uint8)
        for i, a in enumerate(rows.tolist()):
            self._addr(pool, a).copy_(data[i * rb:(i + 1) * rb])

    def _read_rows(self, pool, rows: torch.Tensor, nbytes: int) -> bytes:
        return b"".join(bytes(self._addr(pool, a).numpy().tobytes()) for a in rows.tolist())[:nbytes]

    def _gather(self, pool, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.kv.L
        idx = slots.tolist()
        k = torch.stack([pool.buffers[l][idx] for l in range(L)], 1).float()
        v = torch.stack([pool.buffers[L + l][idx] for l in range(L)], 1).float()
        return k, v

    def encode(self, pool, jobs):
        with audit.exempt():
            faults.hit("codec.encode")
            self.calls["encode"] += 1
            payloads = []
            for job in jobs:  # every read first ...
                payloads.append(self._payload(pool, job))
            crcs = []
            for job, payload in zip(jobs, payloads):  # ... then every write
                self._write_rows(pool, job.dst_rows, payload)
                crcs.append(zlib.crc32(payload))
                if job.crc_out is not None:
                    job.crc_out[0] = crcs[-1]
            return FakeEncodeBatch(torch.tensor(crcs, dtype=torch.int64), payloads)

    def _payload(self, pool, job) -> bytes:
        n = job.src_slots.numel()
        lay = self.blob_layout(n, job.n_head, job.n_tail)
        k, v = self._gather(pool, job.src_slots)
        out = bytearray()
        L = self.kv.L
        for i in list(range(lay.n_head)) + list(range(n - lay.n_tail, n)):
            for l in range(L):
                out += pool.views[l][int(job.src_slots[i])].numpy().tobytes()
            for l in range(L):
                out += pool.views[L + l][int(job.src_slots[i])].numpy().tobytes()
        for i in range(lay.n_head, n - lay.n_tail):
            token, pos = float(k[i, 0, 0, 0]), float(k[i, 0, 0, 1])
            check = float(k[i, ..., :-1].double().sum() + v[i, ..., :-1].double().sum())
            rec = struct.pack("<ddd", token, pos, check)
            out += rec.ljust(self.coded_bytes_per_token, b"\0")
        assert len(out) == lay.nbytes
        return bytes(out)

    def decode_begin(self, pool, jobs):
        with audit.exempt():
            faults.hit("codec.decode_begin")
            self.calls["decode_begin"] += 1
            batch = FakeDecodeBatch(list(jobs), pool)
            for job in jobs:
                batch.rows.append(self._parse(pool, job))
            return batch

    def _parse(self, pool, job):
        lay = job.layout
        payload = self._read_rows(pool, job.src_rows, lay.nbytes)
        L, H, D = self.shape
        rb = pool.row_bytes
        a, b = job.token_range
        ks, vs = [], []
        exact_bytes = (lay.n_head + lay.n_tail) * 2 * L * rb
        for t in range(a, b):
            if t < lay.n_head or t >= lay.n_tokens - lay.n_tail:
                e = t if t < lay.n_head else lay.n_head + t - (lay.n_tokens - lay.n_tail)
                base = e * 2 * L * rb
                raw = torch.frombuffer(bytearray(payload[base:base + 2 * L * rb]), dtype=self.dtype)
                raw = raw.view(2, L, H, D).float()
                ks.append(raw[0])
                vs.append(raw[1])
                continue
            c = t - lay.n_head
            off = exact_bytes + c * self.coded_bytes_per_token
            token, pos, check = struct.unpack("<ddd", payload[off:off + 24])
            ok = math.isfinite(token) and math.isfinite(pos) and token == int(token) and pos == int(pos) \
                and 0 <= token < 1e6 and 0 <= pos < 1e7 and pos == job.start_pos + t
            if ok:
                k, v = self.kv.rows(int(token), int(pos))
                k = k.clone()
                v = v.clone()
                ok = abs(float(k[..., :-1].double().sum() + v[..., :-1].double().sum()) - check) < 1e-6
            if not ok:
                k = torch.full((L, H, D), float("nan"))
                v = torch.full((L, H, D), float("nan"))
            else:
                k[..., -1] += 1.0
                v[..., -1] += 1.0
            ks.append(k)
            vs.append(v)
        if not ks:
            e = torch.empty(0, L, H, D)
            return e, e.clone()
        return torch.stack(ks), torch.stack(vs)

    def decode_layers(self, batch, layers) -> None:
        with audit.exempt():
            faults.hit("codec.decode_layers")
            self.calls["decode_layers"] += 1
            L = self.kv.L
            for job, (k, v) in zip(batch.jobs, batch.rows):
                idx = job.dst_slots.tolist()
                for l in layers:
                    batch.pool.buffers[l][idx] = k[:, l].to(self.dtype)
                    batch.pool.buffers[L + l][idx] = v[:, l].to(self.dtype)
                batch.layers_done.update(layers)

    def copy_rows(self, pool, src_rows, dst_rows) -> None:
        with audit.exempt():
            self.calls["copy_rows"] += 1
            data = [self._addr(pool, a).clone() for a in src_rows.tolist()]
            for a, d in zip(dst_rows.tolist(), data):
                self._addr(pool, a).copy_(d)
