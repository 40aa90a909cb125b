"""`BatchedPoolCodec`: the pool codec contract of the compressed tier (plan once, encode/decode batches).

Contract (the cache calls exactly these; everything runs on the caller's current stream and never makes the
host wait for the device: no `.item()`, `.cpu()`, `.tolist()`, `bool()` of a device tensor, `nonzero`, or
pageable host-to-device copy anywhere on these paths):

    codec = make_batched_codec(kvtc_codec, store_dtype, kv_dtype=None, reference=None)   # codec.dispatch
                                                  (= BatchedPoolCodec(...); the cache imports only codec.dispatch)
    codec.shape                                   -> (L, H, D)
    codec.blob_layout(n_tokens, n_head, n_tail)   -> BlobLayout   host arithmetic only (payload_layout.py)
    pool = codec.pool_rows(k_buffers, v_buffers, scratch_rows=0)
                                                  -> PoolRows     once per pool: checks, offset table
    batch = codec.encode(pool, [EncodeJob, ...])  -> EncodeBatch  payload bytes written into the jobs'
                                                                  dst_rows; CRC-32 of each payload on the device
    dbatch = codec.decode_begin(pool, [DecodeJob, ...]) -> DecodeBatch   unpack + dequantize all jobs
    codec.decode_layers(dbatch, range(lo, hi))    -> None         layers [lo, hi) of every job: reconstruct
                                                                  (GEMM, RoPE, cast) + exact rows, into dst_slots
    codec.copy_rows(pool, src_rows, dst_rows)     -> None         move blob rows (scratch -> a node's own slots)
    codec.read_payload(pool, rows, layout)        -> Tensor       payload bytes, contiguous (host spill: D2H it)
    codec.write_payload(pool, payload, rows, layout) -> None      contiguous payload -> blob rows (promotion)
    codec.blob_header(layout, start_pos, payload_crc, token_ids) -> bytes   framed blob = header + payload (v2)
    codec.parse_blob(host_blob, expected_start=, expected_token_ids=) -> (layout, start_pos, payload view)
    codec.warmup(pool)                            -> int          compile every kernel variant now; returns the
                                                                  compiles it caused
    jit_compiles()                                -> int          (module function) kernel compiles so far

Launches: encode queues one launch per (kernel, kind, block) for all jobs of the batch -- exact-row gather,
feature gather, projection, group parameters (one per group-size class of the plan), packing -- per chunk
of `chunk_tokens` coded tokens, plus one CRC launch; decode_begin one unpack per (kind, block); each
decode_layers call one reconstruct per (kind, block) overlapping the layers and one exact-row scatter. The
count depends on the plan and the batch's total tokens (chunks), never on the number of jobs. Host work
per batch: O(jobs) Python to build the job table, one pinned non-blocking copy, a constant number of
tensor ops (concatenating the jobs' slot/row tensors, per-row index tables).

Workspaces (features, coefficients, parameters) are allocated on first use per (purpose, stream) at
`chunk_tokens` / `decode_chunk_tokens` rows and reused; larger batches are processed in chunks (a decode
batch larger than `decode_chunk_tokens` coded tokens unpacks again in each `decode_layers` call). A
DecodeBatch owns its workspace until all its layers are written (or `close()`); another decode_begin on
the same stream before that gets a fresh workspace. Encode and decode use separate workspaces, so they
may run on two streams at once.

Integrity: `EncodeBatch.crc[j]` (and `job.crc_out`) is zlib.crc32 of job j's payload bytes, computed on
the device after the payload is written; `crc32.crc32_host(bytes)` checks it on the host. Decode does not
check it (blobs that stay in HBM are not re-checked per load; the tier checks CRCs where blobs cross to the
host); `payload_crc(pool, rows, layout)` recomputes it on the device when a caller wants to.

Routes: `reference=True` (or env KVTC_REFERENCE=1, or a device Triton cannot run on) runs the PyTorch
route (`batched_reference.py`, what CPU servers and tests run); otherwise the Triton kernels
(`triton/payload_rows.py` plus the shared GEMM/feature kernels). Both write identical payload layouts;
bytes agree exactly where the arithmetic is exact (exact rows, layout, packing of equal coefficients),
and the kernels' fp16 tensor-core GEMMs otherwise move a few coefficients by one quantization step (see
tests/codec/test_batched_codec.py).

fp8 pools (uint8 storage) are supported: give `store_dtype=torch.uint8` and `kv_dtype` the fp8 dtype.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch

from kvtc_sglang.codec import batch_plan as bp
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.jobs import DecodeBatch, DecodeJob, EncodeBatch, EncodeJob
from kvtc_sglang.codec.launches import LAUNCHES, jit_compiles  # noqa: F401 (jit_compiles re-exported)
from kvtc_sglang.codec.payload_layout import BlobLayout, payload_layout
from kvtc_sglang.codec.triton.pool_rows import PoolRows, make_pool_rows
from kvtc_sglang.codec.triton.common import kernels_usable, round_up, use_reference
from kvtc_sglang.codec.triton.tables import KindTables, rope_tables

ROW_PAD = 128  # token padding of workspaces (the GEMMs' M tile)
MAX_JOBS = 1 << 16  # jobs of one batch (the kernels' job search covers this many)


def _stream_key(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return None


@dataclass
class _EncodeWorkspace:
    feats: torch.Tensor  # [C, p]
    coeffs: dict  # r_enc -> [C, r_enc] float32
    params: torch.Tensor  # [2, G_max, C] float32


@dataclass
class _DecodeWorkspace:
    coeffs: dict  # (kind, block) -> [C, width]
    busy: bool = False


@dataclass
class _DecodeState:
    plan: bp.DecodePlan
    ws: _DecodeWorkspace
    staging: object
    unpacked: bool  # coefficients of all rows are in the workspace (batch fits it)
    rope_all: object
    owner: "BatchedPoolCodec" = field(repr=False, default=None)

    def release(self) -> None:
        self.ws.busy = False


class BatchedPoolCodec:
    """The batched, row-addressed pool codec for one calibration artifact, target ratio and pool dtype.

    Args:
        codec: the reference KVTCCodec (artifact, ratio, device); its matrices and plan are used.
        store_dtype: dtype of the pool buffers (bf16/fp16/fp32, or uint8 for fp8 storage).
        kv_dtype: the fp8 dtype of uint8 storage, else None.
        reference: True = PyTorch route, False = Triton kernels, None = env KVTC_REFERENCE (and the
            PyTorch route on devices Triton cannot run on).
        chunk_tokens: coded tokens per encode chunk (workspace rows).
        decode_chunk_tokens: coded tokens a decode batch unpacks once (workspace rows).
    """

    def __init__(self, codec: KVTCCodec, store_dtype: torch.dtype, kv_dtype: torch.dtype | None = None, *,
                 reference: bool | None = None, chunk_tokens: int = 4096, decode_chunk_tokens: int = 8192):
        self.codec = codec
        self.device = codec.device
        self.shape = codec.shape
        self.p = codec.p
        self.rope = codec.rope
        self.store_dtype = store_dtype
        self.kv_dtype = kv_dtype
        if store_dtype == torch.uint8 and kv_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ShapeError(f"uint8 (fp8-storage) pools need kv_dtype float8_e4m3fn or float8_e5m2, got {kv_dtype}")
        if store_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
            raise ShapeError(f"unsupported pool dtype {store_dtype}")
        self.esize = torch.empty(0, dtype=store_dtype).element_size()
        L, H, D = self.shape
        self.row_bytes = H * D * self.esize
        self.reference = use_reference(reference) or not kernels_usable(self.device)
        self.chunk_tokens = round_up(max(int(chunk_tokens), 1), ROW_PAD)
        self.decode_chunk_tokens = round_up(max(int(decode_chunk_tokens), 1), ROW_PAD)
        art = codec.artifact
        self.kinds = [KindTables.build(i, codec.kinds[k], [(b.layer_start, b.layer_end) for b in art.blocks[k]])
                      for i, k in enumerate(("k", "v"))]
        self.bytes_per_token = {k: tuple(bt.bytes_per_token for bt in kt.blocks)
                                for k, kt in zip(("k", "v"), self.kinds)}
        # section index of (kind, block) in payload order (K blocks then V blocks)
        self.section_of, s = {}, 0
        for kt in self.kinds:
            for bt in kt.blocks:
                self.section_of[kt.kind, bt.index] = s
                s += 1
        if self.reference:
            from kvtc_sglang.codec.triton import batched_reference as ops
        else:
            from kvtc_sglang.codec.triton import payload_rows as ops
        self.ops = ops
        self._enc_ws: dict = {}
        self._dec_ws: dict = {}
        self._layouts: dict = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plan
    def blob_layout(self, n_tokens: int, n_head: int, n_tail: int) -> BlobLayout:
        """The payload layout of a run (host arithmetic only; cached)."""
        key = (int(n_tokens), int(n_head), int(n_tail))
        lay = self._layouts.get(key)
        if lay is None:
            lay = payload_layout(*key, n_layers=self.shape[0], row_bytes=self.row_bytes, esize=self.esize,
                                 bytes_per_token=self.bytes_per_token)
            if len(self._layouts) < 65536:
                self._layouts[key] = lay
        return lay

    def pool_rows(self, k_buffers, v_buffers, *, scratch_rows: int = 0) -> PoolRows:
        """Plan a pool (once): check its buffers against this codec and build its row space.

        scratch_rows: rows of a scratch area for encodes that cannot write into pool rows (in-place
        compression of a node into its own slots encodes into scratch, then `copy_rows`). At least the rows
        `warmup` needs are always planned.
        """
        pool = make_pool_rows(k_buffers, v_buffers, kv_dtype=self.kv_dtype,
                              scratch_rows=max(int(scratch_rows), self._warmup_rows()), shape=self.shape)
        if pool.store_dtype != self.store_dtype:
            raise ShapeError(f"pool dtype {pool.store_dtype}, codec planned for {self.store_dtype}")
        if pool.device != self.device:
            raise ShapeError(f"pool is on {pool.device}, codec on {self.device}")
        return pool

    def _check_pool(self, pool: PoolRows) -> None:
        if not isinstance(pool, PoolRows) or pool.store_dtype != self.store_dtype or pool.device != self.device \
                or (pool.n_layers, pool.n_heads, pool.head_dim) != tuple(self.shape):
            raise ShapeError("pool was not planned by this codec's pool_rows")

    # ------------------------------------------------------------------ workspaces
    def _encode_ws(self) -> _EncodeWorkspace:
        key = _stream_key(self.device)
        ws = self._enc_ws.get(key)
        if ws is None:
            C, dev = self.chunk_tokens, self.device
            fdt = torch.float32 if self.reference else torch.float16
            coeffs = {}
            for kt in self.kinds:
                for bt in kt.blocks:
                    if bt.r_enc not in coeffs:
                        coeffs[bt.r_enc] = torch.empty(C, bt.r_enc, dtype=torch.float32, device=dev)
            g = max(bt.n_groups for kt in self.kinds for bt in kt.blocks)
            ws = self._enc_ws[key] = _EncodeWorkspace(torch.empty(C, self.p, dtype=fdt, device=dev), coeffs,
                                                      torch.empty(2, max(g, 1), C, dtype=torch.float32, device=dev))
        return ws

    def _decode_ws(self) -> _DecodeWorkspace:
        key = _stream_key(self.device)
        with self._lock:
            ws = self._dec_ws.get(key)
            if ws is not None and not ws.busy:
                ws.busy = True
                return ws
        C, dev = self.decode_chunk_tokens, self.device
        dt = torch.float32 if self.reference else torch.float16
        coeffs = {(kt.kind, bt.index): torch.empty(C, bt.rank if self.reference else bt.r_dec, dtype=dt, device=dev)
                  for kt in self.kinds for bt in kt.blocks}
        ws = _DecodeWorkspace(coeffs, busy=True)
        with self._lock:
            if key not in self._dec_ws:
                self._dec_ws[key] = ws  # the first one is kept for reuse; later ones live with their batch
        return ws

    # ------------------------------------------------------------------ encode
    def _check_encode(self, pool: PoolRows, jobs: Sequence[EncodeJob]) -> list[BlobLayout]:
        self._check_pool(pool)
        if len(jobs) > MAX_JOBS:
            raise ShapeError(f"{len(jobs)} jobs in one batch; at most {MAX_JOBS}")
        layouts = []
        for i, job in enumerate(jobs):
            s, r = job.src_slots, job.dst_rows
            if s.dtype != torch.int64 or s.dim() != 1 or s.device != self.device:
                raise ShapeError(f"job {i}: src_slots must be a 1-D int64 tensor on {self.device}")
            if r.dtype != torch.int64 or r.dim() != 1 or r.device != self.device:
                raise ShapeError(f"job {i}: dst_rows must be a 1-D int64 tensor on {self.device}")
            lay = self.blob_layout(s.numel(), job.n_head, job.n_tail)
            if r.numel() != lay.n_rows:
                raise ShapeError(f"job {i}: {r.numel()} dst rows for a payload of {lay.n_rows} rows")
            if job.start_pos < 0 or job.start_pos + lay.n_tokens > (1 << 31) - 1:
                raise ShapeError(f"job {i}: start position {job.start_pos} out of range")
            c = job.crc_out
            if c is not None and (c.dtype != torch.int64 or c.numel() != 1 or c.device != self.device):
                raise ShapeError(f"job {i}: crc_out must be a one-element int64 tensor on {self.device}")
            layouts.append(lay)
        return layouts

    def encode(self, pool: PoolRows, jobs: Sequence[EncodeJob]) -> EncodeBatch:
        """Compress every job's tokens into its blob rows (one batch; see the module docstring).

        Raises ShapeError (before queuing anything) when a job does not fit its layout or the pool.
        """
        layouts = self._check_encode(pool, jobs)
        plan = bp.plan_encode(jobs, layouts, pool.crc_segment, self.device)
        ops = self.ops
        start = LAUNCHES.total
        st = ops.begin_encode(pool, plan)
        ops.encode_exact(pool, plan, st)
        M = plan.n_rows
        if M:
            ws = self._encode_ws()
            C = self.chunk_tokens
            for c0 in range(0, M, C):
                mc = min(C, M - c0)
                mpad = round_up(mc, ROW_PAD)
                rope = rope_tables(self.rope, plan.row_pos[c0 : c0 + mc], inverse=True)
                for kt in self.kinds:
                    feats = ws.feats[:mpad]
                    ops.gather_features(pool.view, kt.kind, plan.row_slot, c0, mc, rope if kt.kind == 0 else None,
                                        kt.mean, feats)
                    for bt in kt.blocks:
                        coeffs = ws.coeffs[bt.r_enc][:mpad]
                        ops.project(feats[:, bt.offset : bt.offset + bt.p], bt, coeffs, mc)
                        ops.quantize(pool, plan, st, bt, self.section_of[kt.kind, bt.index], coeffs, ws.params, c0, mc)
        ops.finish_encode(pool, plan, st)
        crc = ops.crc(pool, plan, st)
        outs = [job.crc_out for job in jobs if job.crc_out is not None]
        if outs:
            idx = [i for i, job in enumerate(jobs) if job.crc_out is not None]
            src = crc[:, None].unbind(0)
            torch._foreach_copy_(outs, [src[i] for i in idx])
        return EncodeBatch(tuple(layouts), crc, LAUNCHES.total - start, plan.tensors)

    # ------------------------------------------------------------------ decode
    def _check_decode(self, pool: PoolRows, jobs: Sequence[DecodeJob]):
        self._check_pool(pool)
        if len(jobs) > MAX_JOBS:
            raise ShapeError(f"{len(jobs)} jobs in one batch; at most {MAX_JOBS}")
        ranges = []
        for i, job in enumerate(jobs):
            lay = job.layout
            want = self.blob_layout(lay.n_tokens, lay.n_head, lay.n_tail)
            if lay != want:
                raise ShapeError(f"job {i}: blob layout does not match this codec's plan and pool dtype")
            a, b = job.token_range
            tr = lay.clip_range(int(a), int(b))
            s, r = job.dst_slots, job.src_rows
            if s.dtype != torch.int64 or s.dim() != 1 or s.device != self.device or s.numel() != b - a:
                raise ShapeError(f"job {i}: dst_slots must be [{b - a}] int64 on {self.device}")
            if r.dtype != torch.int64 or r.dim() != 1 or r.device != self.device or r.numel() != lay.n_rows:
                raise ShapeError(f"job {i}: src_rows must be [{lay.n_rows}] int64 on {self.device}")
            if job.start_pos < 0 or job.start_pos + lay.n_tokens > (1 << 31) - 1:
                raise ShapeError(f"job {i}: start position {job.start_pos} out of range")
            ranges.append(tr)
        return ranges

    def decode_begin(self, pool: PoolRows, jobs: Sequence[DecodeJob]) -> DecodeBatch:
        """Unpack and dequantize the coded tokens of every job (nothing is written to the pool yet).

        Raises ShapeError (before queuing anything) on a job that does not fit the codec or the pool.
        """
        ranges = self._check_decode(pool, jobs)
        plan = bp.plan_decode(jobs, ranges, self.device)
        start = LAUNCHES.total
        st = self.ops.begin_decode(pool, plan)
        ws = self._decode_ws()
        M = plan.n_rows
        unpacked = M <= self.decode_chunk_tokens
        rope_all = None
        if M and unpacked:
            self._unpack(pool, plan, st, ws, 0, M, None)
            rope_all = rope_tables(self.rope, plan.row_pos, inverse=False)
        state = _DecodeState(plan, ws, st, unpacked, rope_all, self)
        state.pool = pool
        batch = DecodeBatch(tuple(jobs), self.shape[0], state=state)
        batch.launches = LAUNCHES.total - start
        if not plan.n_rows and not plan.n_exact:  # nothing to write: decode_layers calls are no-ops
            batch.layers_done.update(range(self.shape[0]))
            batch.empty = True
            batch.close()
        return batch

    def _unpack(self, pool, plan, st, ws, c0: int, n: int, layers) -> None:
        for kt in self.kinds:
            for bt in kt.blocks:
                if layers is not None and (bt.layer_end <= layers[0] or layers[1] <= bt.layer_start):
                    continue
                out = ws.coeffs[kt.kind, bt.index][: round_up(n, ROW_PAD)]
                self.ops.unpack(pool, plan, st, bt, self.section_of[kt.kind, bt.index], c0, n, out)

    def decode_layers(self, batch: DecodeBatch, layers: range) -> None:
        """Write layers `layers` (a contiguous range) of every job of the batch into its dst_slots.

        Coded tokens: one reconstruct launch per (kind, block) overlapping the layers, all jobs; exact tokens:
        one row-scatter launch. Layers may be written in any order, each once.
        """
        st = batch.state
        if st is None:
            if batch.empty:
                return
            raise ShapeError("decode batch is closed (all layers written, or close() was called)")
        L = self.shape[0]
        lo, hi = (layers.start, layers.stop) if isinstance(layers, range) else tuple(layers)
        if isinstance(layers, range) and layers.step != 1:
            raise ShapeError("decode_layers takes a contiguous range of layers")
        if not (0 <= lo < hi <= L):
            raise ShapeError(f"layers [{lo}, {hi}) outside [0, {L})")
        start = LAUNCHES.total
        plan, pool, ops = st.plan, st.pool, self.ops
        M = plan.n_rows
        chunks = [(0, M)] if st.unpacked else [(c0, min(self.decode_chunk_tokens, M - c0))
                                               for c0 in range(0, M, self.decode_chunk_tokens)]
        for c0, n in chunks if M else ():
            if st.unpacked:
                rope = st.rope_all
            else:
                self._unpack(pool, plan, st.staging, st.ws, c0, n, (lo, hi))
                rope = rope_tables(self.rope, plan.row_pos[c0 : c0 + n], inverse=False)
            for kt in self.kinds:
                for bt in kt.blocks:
                    a, b = max(lo, bt.layer_start), min(hi, bt.layer_end)
                    if a >= b:
                        continue
                    coeffs = st.ws.coeffs[kt.kind, bt.index][: round_up(n, ROW_PAD)]
                    ops.reconstruct(coeffs, bt, rope if kt.kind == 0 else None, pool.view, kt.kind, plan.row_slot,
                                    c0, n, (a, b))
        ops.decode_exact(pool, plan, st.staging, (lo, hi))
        batch.layers_done.update(range(lo, hi))
        batch.launches += LAUNCHES.total - start
        if batch.complete:
            batch.close()

    # ------------------------------------------------------------------ rows
    def copy_rows(self, pool: PoolRows, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
        """Copy blob rows src_rows[i] -> dst_rows[i] ([R] int64 row addresses each; one launch).

        The destination rows must be distinct and must not overlap the source rows still to be read.
        """
        self._check_pool(pool)
        if src_rows.shape != dst_rows.shape or src_rows.dim() != 1 or src_rows.dtype != torch.int64:
            raise ShapeError("copy_rows takes two 1-D int64 tensors of equal length")
        if src_rows.numel():
            self.ops.copy_rows(pool, src_rows, dst_rows)

    def payload_crc(self, pool: PoolRows, rows: torch.Tensor, layout: BlobLayout) -> torch.Tensor:
        """zlib CRC-32 of a stored payload, recomputed on the device: [1] int64 (no host sync)."""
        self._check_pool(pool)
        if rows.dtype != torch.int64 or rows.dim() != 1 or rows.numel() != layout.n_rows:
            raise ShapeError(f"rows must be [{layout.n_rows}] int64")
        plan = bp.plan_crc([rows], [layout], pool.crc_segment, self.device)
        return self.ops.crc(pool, plan, self.ops.begin_encode(pool, plan))

    # ------------------------------------------------------------------ blobs leaving the device
    def read_payload(self, pool: PoolRows, rows: torch.Tensor, layout: BlobLayout,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """The payload stored in `rows` as one contiguous 1-D uint8 device tensor (one launch, no host sync);
        `out` ([layout.nbytes] uint8 on the pool's device) is filled when given. For a host spill: copy it to
        pinned memory (non_blocking) and put `blob_header(...)` in front of it."""
        self._check_pool(pool)
        if rows.dtype != torch.int64 or rows.dim() != 1 or rows.numel() != layout.n_rows:
            raise ShapeError(f"rows must be [{layout.n_rows}] int64")
        if out is None:
            out = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        elif out.dtype != torch.uint8 or out.dim() != 1 or out.numel() != layout.nbytes or out.device != self.device:
            raise ShapeError(f"out must be [{layout.nbytes}] uint8 on {self.device}")
        if layout.nbytes:
            self.ops.rows_to_flat(pool, rows, out)
        return out

    def write_payload(self, pool: PoolRows, payload: torch.Tensor, rows: torch.Tensor, layout: BlobLayout) -> None:
        """Store a payload (1-D uint8 device tensor of layout.nbytes, e.g. a promoted host blob's data after its
        H2D copy) into blob rows (one launch)."""
        self._check_pool(pool)
        if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != layout.nbytes \
                or payload.device != self.device:
            raise ShapeError(f"payload must be [{layout.nbytes}] uint8 on {self.device}")
        if rows.dtype != torch.int64 or rows.dim() != 1 or rows.numel() != layout.n_rows:
            raise ShapeError(f"rows must be [{layout.n_rows}] int64")
        if layout.nbytes:
            self.ops.flat_to_rows(pool, payload, rows)

    def blob_header(self, layout: BlobLayout, start_pos: int, payload_crc: int, token_ids=None) -> bytes:
        """Header bytes (format v2) of the framed blob = these bytes + the payload (host arithmetic only).

        payload_crc: the payload's zlib CRC-32 (EncodeBatch.crc, read at the ack); the blob's CRC is derived from it.
        """
        from kvtc_sglang.codec import blob as blobfmt

        if token_ids is not None and len(token_ids) != layout.n_tokens:
            raise ShapeError(f"{len(token_ids)} token ids for a run of {layout.n_tokens} tokens")
        h = self.codec.header(self.store_dtype, 0, layout.n_tokens, start_pos, layout.n_head, layout.n_tail,
                              layout.nbytes, token_ids=token_ids)
        return blobfmt.header_bytes(h, int(payload_crc))

    def parse_blob(self, blob: torch.Tensor, *, expected_start: int | None = None, expected_token_ids=None):
        """Check a framed host blob (1-D uint8 CPU tensor) and locate its payload: (layout, start_pos, payload view).

        Verifies on the host (zlib): CRC-32, format version, this codec's artifact, plan and pool dtype, the
        payload size, and the caller's start position and token ids when given. Raises BlobFormatError.
        """
        from kvtc_sglang.codec import blob as blobfmt
        from kvtc_sglang.codec.errors import BlobFormatError

        if blob.device.type != "cpu":
            raise ShapeError("parse_blob checks host blobs; copy a device blob to the host first")
        h = self.codec.read_header(blob, expected_start=expected_start, expected_token_ids=expected_token_ids)
        if h.coder != 0:
            raise BlobFormatError("the device tier stores uncoded payloads; decode entropy-coded blobs with KVTCCodec")
        if blobfmt.EXACT_DTYPE_FROM_CODE[h.exact_dtype] != self.store_dtype:
            raise BlobFormatError(f"blob rows are {blobfmt.EXACT_DTYPE_FROM_CODE[h.exact_dtype]}, the pool "
                                  f"{self.store_dtype}")
        layout = self.blob_layout(h.n_tokens, h.n_head, h.n_tail)
        if layout.nbytes != h.raw_size:
            raise BlobFormatError(f"blob payload is {h.raw_size} bytes, {layout.nbytes} expected")
        return layout, h.start_pos, blob[h.data_offset :]

    # ------------------------------------------------------------------ warm-up
    def _warmup_layout(self) -> BlobLayout:
        return self.blob_layout(5, 1, 1)

    def _warmup_rows(self) -> int:
        return self._warmup_layout().n_rows

    def warmup(self, pool: PoolRows) -> int:
        """Run every kernel variant this pool will use once, so serving never compiles; returns the compiles.

        Writes only the scratch rows it planned and slot 0 (SGLang's reserved padding slot) of every buffer.
        """
        self._check_pool(pool)
        before = jit_compiles()
        lay = self._warmup_layout()
        dev = self.device
        zero = torch.zeros(lay.n_tokens, dtype=torch.int64, device=dev)
        rows = pool.scratch_addresses(0, lay.n_rows)
        crc = torch.zeros(1, dtype=torch.int64, device=dev)
        self.encode(pool, [EncodeJob(zero, 0, lay.n_head, lay.n_tail, rows, crc)])
        batch = self.decode_begin(pool, [DecodeJob(rows, lay, 0, (0, lay.n_tokens), zero)])
        self.decode_layers(batch, range(0, self.shape[0]))
        self.copy_rows(pool, rows[:1], rows[:1])
        flat = self.read_payload(pool, rows, lay)
        self.write_payload(pool, flat, rows, lay)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return jit_compiles() - before
