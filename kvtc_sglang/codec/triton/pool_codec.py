"""`TritonPoolCodec`: the pool-facing codec on the Triton kernels (plan once, run per token run).

Same interface (`codec.interfaces.PoolCodec`) and blob bytes as `codec.pool_codec.ReferencePoolCodec`: a blob made by
either decodes with the other. Plan (constructor): device tables for every feature block of K and V
(`tables.KindTables`). Run: `encode_slots` gathers, transforms, quantizes and packs straight from the
pool's per-layer buffers; `decode_into` (all layers) or `begin_decode` + `decode_layer_into` (one layer
at a time, for overlap with the forward pass) write straight into pool rows. All kernels run on the
caller's current CUDA stream and never synchronize; only the blob framing touches the host (header,
chunk table, CRC-32, entropy-stage sizes).

Encode data flow per token chunk and kind: pool rows -> gather_features ([m, p] fp16, RoPE undone,
mean removed) -> per block: project ([m, r] fp32) -> group_params + pack (section planes). Decode per
kind and block: unpack_dequantize ([m, r] fp16) -> reconstruct (GEMM, + mean, RoPE, cast, scatter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtc_sglang.codec import blob as blobfmt
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.entropy import DEFAULT_CHUNK_BYTES, EntropyCoderId
from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.kinds import Kind
from kvtc_sglang.codec.payload_layout import PayloadLayout, Rows
from kvtc_sglang.codec.triton.common import (
    PoolView,
    check_tensor,
    kernels_usable,
    pool_view,
    round_up,
    use_reference,
)
from kvtc_sglang.codec.triton.gemm import project, reconstruct
from kvtc_sglang.codec.triton.quant import group_params, pack, unpack_dequantize
from kvtc_sglang.codec.triton.rows import gather_exact, gather_features, scatter_exact
from kvtc_sglang.codec.triton.tables import KindTables, RopeTables, rope_tables

ROW_PAD = 128  # token padding of scratch buffers (the GEMMs' M tile)


@dataclass
class DecodeJob:
    """A verified, inflated and dequantized blob waiting to be written into pool rows.

    Made by `TritonPoolCodec.begin_decode`; `decode_layer_into` writes one layer of it. Rows:
    exact head rows [head_row0, +n_head) go to slots[head_idx0:], exact tail rows [tail_row0, +n_tail)
    to slots[tail_idx0:], coded tokens (n_coded) to slots[coded_idx0:].
    """

    header: blobfmt.BlobHeader
    slots: torch.Tensor
    token_range: tuple[int, int]
    payload: torch.Tensor
    exact: torch.Tensor | None
    head: Rows  # exact head rows (row0, n_rows, idx0)
    tail: Rows  # exact tail rows
    coded_idx0: int
    n_coded: int
    coeffs: dict  # (kind, block index) -> [m_pad, width] dequantized coefficients
    rope: RopeTables | None


class TritonPoolCodec:
    """Pool codec for one calibration artifact and target ratio, on Triton kernels.

    Args:
        codec: the reference KVTCCodec (artifact, ratio, device, entropy coder, chunk size); its
            matrices back the PyTorch route and its header/entropy code frames the blobs.
        kv_dtype: the logical fp8 dtype of uint8 (fp8-storage) pools, else None.
        reference: True routes every kernel to its PyTorch reference; None reads KVTC_REFERENCE and
            also picks the reference when the codec's device cannot run Triton kernels.
        chunk_tokens: encode works through the coded tokens in chunks of this many (bounds scratch:
            chunk_tokens * p * 2 bytes of features plus chunk_tokens * r * 4 of coefficients).
    """

    def __init__(self, codec: KVTCCodec, kv_dtype: torch.dtype | None = None, *, reference: bool | None = None,
                 chunk_tokens: int = 4096):
        self.codec = codec
        self.kv_dtype = kv_dtype
        self.device = codec.device
        self.reference = use_reference(reference) or not kernels_usable(self.device)
        self.chunk_tokens = round_up(max(int(chunk_tokens), 1), ROW_PAD)
        self.shape = codec.shape
        self.p = codec.p
        self.rope = codec.rope
        if self.rope.head_dim != self.shape[2]:
            raise ShapeError(f"RoPE head_dim {self.rope.head_dim} != pool head_dim {self.shape[2]}")
        art = codec.artifact
        self.kinds = [
            KindTables.build(kind, codec.kinds[kind.key], [(b.layer_start, b.layer_end) for b in art.blocks[kind.key]])
            for kind in Kind
        ]

    @classmethod
    def from_artifact(cls, artifact, ratio: int, device, *, entropy="auto", kv_dtype=None, reference=None,
                      chunk_bytes: int = DEFAULT_CHUNK_BYTES, chunk_tokens: int = 4096) -> "TritonPoolCodec":
        codec = KVTCCodec(artifact, ratio, device, entropy=entropy, chunk_bytes=chunk_bytes)
        return cls(codec, kv_dtype, reference=reference, chunk_tokens=chunk_tokens)

    # ------------------------------------------------------------------ checks
    def _pool(self, k_buffers, v_buffers, slots: torch.Tensor) -> PoolView:
        L, H, D = self.shape
        if len(k_buffers) != L or len(v_buffers) != L:
            raise ShapeError(f"pool has {len(k_buffers)}/{len(v_buffers)} layers, calibration {L}")
        if tuple(k_buffers[0].shape[1:]) != (H, D):
            raise ShapeError(f"pool rows are {tuple(k_buffers[0].shape[1:])}, calibration [{H}, {D}]")
        if k_buffers[0].device != self.device:
            raise ShapeError(f"pool is on {k_buffers[0].device}, codec on {self.device}")
        check_tensor("slots", slots, dtype=torch.int64, dim=1, device=self.device)
        if k_buffers[0].dtype == torch.uint8 and self.kv_dtype is None:
            raise ShapeError("uint8 pool rows need kv_dtype (the pool's fp8 dtype)")
        return pool_view(k_buffers, v_buffers, kv_dtype=self.kv_dtype)

    # ------------------------------------------------------------------ encode
    def encode_payload(self, k_buffers, v_buffers, slots: torch.Tensor, start_pos: int, n_head: int,
                       n_tail: int) -> torch.Tensor:
        """The raw payload (exact rows, K section, V section) of the tokens at `slots`; no entropy stage.

        Args:
            k_buffers, v_buffers: L per-layer buffers [num_slots, H, D] (bf16/fp16/fp32, or uint8 fp8).
            slots: shape [n], int64, on the codec's device: pool slot of each token, positions start_pos ...
            n_head, n_tail: leading/trailing tokens stored exact.
        Returns: 1-D uint8 tensor of raw_size bytes on the codec's device (asynchronous).
        """
        pool = self._pool(k_buffers, v_buffers, slots)
        n = slots.numel()
        if n_head < 0 or n_tail < 0 or n_head + n_tail > n:
            raise ShapeError(f"exact counts {n_head}+{n_tail} do not fit a run of {n} tokens")
        m = n - n_head - n_tail
        layout = self.codec.payload_layout(n_head, n_tail, m, pool.store_dtype)
        payload = torch.empty(layout.raw_size, dtype=torch.uint8, device=self.device)
        ref = self.reference
        exact = layout.exact_rows(payload, self.shape)
        if exact is not None:
            gather_exact(pool, slots, 0, n_head, exact, 0, reference=ref)
            gather_exact(pool, slots, n - n_tail, n_tail, exact, n_head, reference=ref)
        if m == 0:
            return payload
        sections = self._sections(payload, layout)
        positions = torch.arange(start_pos + n_head, start_pos + n_head + m, device=self.device)
        chunk = min(self.chunk_tokens, round_up(m, ROW_PAD))
        feats = torch.empty(chunk, self.p, dtype=torch.float32 if ref else torch.float16, device=self.device)
        coeffs = {}
        for c0 in range(0, m, chunk):
            mc = min(chunk, m - c0)
            mpad = round_up(mc, ROW_PAD)
            rope = rope_tables(self.rope, positions[c0 : c0 + mc], inverse=True)
            for kt in self.kinds:
                gather_features(pool, kt.kind, slots, n_head + c0, mc, rope if kt.kind == Kind.K else None, kt.mean,
                                feats[:mpad], reference=ref)
                for bt, sec in zip(kt.blocks, sections[kt.kind]):
                    buf = coeffs.get(bt.r_enc)
                    if buf is None:
                        buf = coeffs[bt.r_enc] = torch.empty(chunk, bt.r_enc, dtype=torch.float32, device=self.device)
                    params = torch.empty(2, bt.n_groups, mc, dtype=torch.float32, device=self.device)
                    project(feats[:mpad, bt.offset : bt.offset + bt.p], bt, buf[:mpad], mc, reference=ref)
                    group_params(buf, bt, sec, m, c0, mc, params, reference=ref)
                    pack(buf, bt, params, sec, m, c0, mc, reference=ref)
        return payload

    def _sections(self, payload: torch.Tensor, layout: PayloadLayout) -> list[list[torch.Tensor]]:
        """Each kind's section of ``payload``, split into its blocks' parts (block-major, as KindCoder writes it)."""
        out, m = [], layout.n_coded
        for kt in self.kinds:
            secs, off = [], layout.section_offset(kt.kind)
            for bt in kt.blocks:
                secs.append(payload[off : off + m * bt.bytes_per_token])
                off += m * bt.bytes_per_token
            out.append(secs)
        return out

    def encode_slots(self, k_buffers, v_buffers, slots: torch.Tensor, start_pos: int, n_head: int,
                     n_tail: int) -> torch.Tensor:
        """Compress the KV rows at `slots` (token positions start_pos ..) into a blob (1-D uint8).

        Same arguments and blob format as `ReferencePoolCodec.encode_slots`.
        """
        payload = self.encode_payload(k_buffers, v_buffers, slots, start_pos, n_head, n_tail)
        return self.frame(payload, k_buffers[0].dtype, slots.numel(), start_pos, n_head, n_tail)

    def frame(self, payload: torch.Tensor, store_dtype: torch.dtype, n: int, start_pos: int, n_head: int,
              n_tail: int) -> torch.Tensor:
        """Entropy stage + header (+ chunk table) + CRC-32 around a raw payload (KVTCCodec.frame)."""
        return self.codec.frame(payload, store_dtype, n, start_pos, n_head, n_tail)

    # ------------------------------------------------------------------ decode
    def begin_decode(self, blob: torch.Tensor, slots: torch.Tensor, *, token_range: tuple[int, int] | None = None,
                     expected_tokens: int | None = None, expected_start: int | None = None,
                     store_dtype: torch.dtype | None = None) -> DecodeJob:
        """Verify and inflate a blob and dequantize its coded tokens; nothing is written to the pool yet.

        Raises BlobFormatError (bad blob) or ShapeError (slots/token range/dtype mismatch) here, before
        any pool row is written. `store_dtype`, when given, is checked against the blob's exact rows.
        """
        blob = blob.to(self.device)
        h = self.codec.read_header(blob, expected_tokens, expected_start)
        return self.begin_decode_payload(self.codec.payload(blob, h), h, slots, token_range=token_range,
                                         store_dtype=store_dtype)

    def begin_decode_payload(self, payload: torch.Tensor, h: blobfmt.BlobHeader, slots: torch.Tensor, *,
                             token_range: tuple[int, int] | None = None,
                             store_dtype: torch.dtype | None = None) -> DecodeJob:
        """`begin_decode` after the entropy stage: `payload` is the raw payload described by header `h`."""
        a, b = token_range if token_range is not None else (0, h.n_tokens)
        if not (0 <= a <= b <= h.n_tokens):
            raise ShapeError(f"token range [{a}, {b}) outside a run of {h.n_tokens} tokens")
        check_tensor("slots", slots, dtype=torch.int64, dim=1, device=self.device)
        if slots.numel() != b - a:
            raise ShapeError(f"{b - a} decoded tokens for {slots.numel()} slots")
        exact_dtype = blobfmt.EXACT_DTYPE_FROM_CODE[h.exact_dtype]
        if store_dtype is not None and exact_dtype == torch.uint8 and store_dtype != torch.uint8:
            raise ShapeError(f"exact rows are fp8 bytes; cannot write them into a {store_dtype} pool")
        layout = self.codec.header_layout(h)
        m = h.n_coded
        exact = layout.exact_rows(payload, self.shape)
        head, tail, coded = layout.token_rows(a, b)
        n_coded, row0 = coded.n_rows, coded.row0
        coeffs, rope = {}, None
        if n_coded:
            mpad = round_up(n_coded, ROW_PAD)
            for kt, secs in zip(self.kinds, self._sections(payload, layout)):
                for bt, sec in zip(kt.blocks, secs):
                    width = bt.rank if self.reference else bt.r_dec
                    dtype = torch.float32 if self.reference else torch.float16
                    buf = torch.empty(mpad, width, dtype=dtype, device=self.device)
                    unpack_dequantize(sec, bt, m, row0, n_coded, buf, reference=self.reference)
                    coeffs[kt.kind, bt.index] = buf
            first = h.start_pos + h.n_head + row0
            positions = torch.arange(first, first + n_coded, device=self.device)
            rope = rope_tables(self.rope, positions, inverse=False)
        return DecodeJob(h, slots, (a, b), payload, exact, head, tail, coded.idx0, n_coded, coeffs, rope)

    def _write(self, job: DecodeJob, pool: PoolView, layers: tuple[int, int]) -> None:
        ref = self.reference
        if job.exact is not None:
            for row0, n_rows, idx0 in (job.head, job.tail):
                scatter_exact(job.exact, row0, n_rows, pool, job.slots, idx0, layers, reference=ref)
        if not job.n_coded:
            return
        lo, hi = layers
        for kt in self.kinds:
            for bt in kt.blocks:
                a, b = max(lo, bt.layer_start), min(hi, bt.layer_end)
                if a < b:
                    reconstruct(job.coeffs[kt.kind, bt.index], bt, job.rope if kt.kind == Kind.K else None, pool,
                                kt.kind, job.slots, job.coded_idx0, job.n_coded, (a, b), reference=ref)

    def decode_layer_into(self, job: DecodeJob, layer: int, k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> None:
        """Write layer `layer` of a begun decode into that layer's K and V buffers ([num_slots, H, D])."""
        L, H, D = self.shape
        if not 0 <= layer < L:
            raise ShapeError(f"layer {layer} outside [0, {L})")
        if tuple(k_buffer.shape[1:]) != (H, D) or k_buffer.device != self.device:
            raise ShapeError(f"layer buffers are {tuple(k_buffer.shape[1:])} on {k_buffer.device}, need [{H}, {D}] on {self.device}")
        if k_buffer.dtype == torch.uint8 and self.kv_dtype is None:
            raise ShapeError("uint8 pool rows need kv_dtype (the pool's fp8 dtype)")
        if job.exact is not None and job.exact.dtype == torch.uint8 and k_buffer.dtype != torch.uint8:
            raise ShapeError(f"exact rows are fp8 bytes; cannot write them into a {k_buffer.dtype} pool")
        pool = pool_view([k_buffer], [v_buffer], layer0=layer, kv_dtype=self.kv_dtype)
        self._write(job, pool, (layer, layer + 1))

    def decode_into(self, blob: torch.Tensor, k_buffers, v_buffers, slots: torch.Tensor, *,
                    token_range: tuple[int, int] | None = None, expected_tokens: int | None = None,
                    expected_start: int | None = None) -> None:
        """Decode the blob's tokens (or token_range of them) into pool rows `slots`, all layers.

        Same arguments as `ReferencePoolCodec.decode_into`; raises BlobFormatError/ShapeError before writing anything.
        """
        pool = self._pool(k_buffers, v_buffers, slots)
        job = self.begin_decode(blob, slots, token_range=token_range, expected_tokens=expected_tokens,
                                expected_start=expected_start, store_dtype=pool.store_dtype)
        self._write(job, pool, (0, self.shape[0]))

    def decode_payload_into(self, payload: torch.Tensor, header: blobfmt.BlobHeader, k_buffers, v_buffers,
                            slots: torch.Tensor, *, token_range: tuple[int, int] | None = None) -> None:
        """`decode_into` from a raw payload and its header (no CRC check, no entropy stage)."""
        pool = self._pool(k_buffers, v_buffers, slots)
        job = self.begin_decode_payload(payload, header, slots, token_range=token_range, store_dtype=pool.store_dtype)
        self._write(job, pool, (0, self.shape[0]))

    def payload_header(self, payload: torch.Tensor, store_dtype: torch.dtype, n: int, start_pos: int, n_head: int,
                       n_tail: int) -> blobfmt.BlobHeader:
        """The header `frame` would write for a payload (for decode_payload_into without framing)."""
        c = self.codec
        return c.header(store_dtype, EntropyCoderId.NONE, n, start_pos, n_head, n_tail, payload.numel(),
                        -(-payload.numel() // c.chunk_bytes), data_size=payload.numel())
