"""The work items of the batched pool codec (`batched.BatchedPoolCodec`): what the cache hands in, what it gets back.

Every tensor here is on the pool's device; every int is a host value the caller already knows (the codec
never reads a device tensor to learn a size). The caller keeps job tensors alive (or `record_stream`s
them) until the kernels that use them have run: the codec only queues work on the current stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvtc_sglang.codec.payload_layout import BlobLayout


@dataclass
class EncodeJob:
    """Compress one run of tokens from pool slots into blob rows.

    Attributes:
        src_slots: [n] int64: the pool slot of each token, positions start_pos .. start_pos + n - 1.
        start_pos: absolute position of the first token (RoPE is undone at each token's position).
        n_head, n_tail: leading (sink) / trailing (window) tokens stored exact.
        dst_rows: [layout.n_rows] int64: row address (`pool_rows.PoolRows`) of each blob row; pool rows
            (`pool.rows_of_slots(blob_slots, n_rows)`) or scratch rows (`pool.scratch_addresses`). The
            payload bytes are written there directly; bytes past layout.nbytes in the last row are untouched.
        crc_out: optional [1] int64 tensor that receives the zlib CRC-32 of the payload (0 .. 2^32 - 1).
            The CRCs of all jobs are also in `EncodeBatch.crc`.
    """

    src_slots: torch.Tensor
    start_pos: int
    n_head: int
    n_tail: int
    dst_rows: torch.Tensor
    crc_out: torch.Tensor | None = None


@dataclass
class DecodeJob:
    """Restore tokens [a, b) of a blob from its rows into pool slots.

    Attributes:
        src_rows: [layout.n_rows] int64 row addresses of the blob (as given to its EncodeJob).
        layout: the blob's BlobLayout (kept on the host since the encode: no header is read on the device).
        start_pos: absolute position of the blob's first token.
        token_range: (a, b), 0 <= a <= b <= layout.n_tokens: the blob's tokens to restore.
        dst_slots: [b - a] int64 pool slots receiving tokens a .. b - 1 (all layers, K and V).
    """

    src_rows: torch.Tensor
    layout: BlobLayout
    start_pos: int
    token_range: tuple[int, int]
    dst_slots: torch.Tensor


@dataclass
class EncodeBatch:
    """What `encode` queued (all of it runs on the stream that was current at the call).

    Attributes:
        layouts: the BlobLayout of each job, in job order (host).
        crc: [n_jobs] int64 device tensor: zlib CRC-32 of each job's payload, valid once the queued kernels ran.
        launches: kernel launches queued (independent of the number of jobs).
        keep_alive: device tensors the queued kernels read that the codec allocated for this batch; they come
            from the current stream's caching-allocator pool, so nothing is needed while that stream is used
            (a caller that frees them from another stream records that stream on them).
    """

    layouts: tuple[BlobLayout, ...]
    crc: torch.Tensor
    launches: int
    keep_alive: tuple = field(default_factory=tuple, repr=False)


@dataclass
class DecodeBatch:
    """A batch of decodes begun by `decode_begin`; `decode_layers` writes its layers.

    Attributes:
        jobs: the DecodeJobs, in order.
        n_layers: L. layers_done: layers written so far (host bookkeeping).
        launches: kernel launches queued so far (unpack + every decode_layers call).
    The batch holds the codec's decode workspace until every layer has been written or `close()` is
    called; a `decode_begin` on the same stream before then gets a workspace of its own.
    """

    jobs: tuple[DecodeJob, ...]
    n_layers: int
    layers_done: set = field(default_factory=set)
    launches: int = 0
    empty: bool = False  # no token to write: decode_layers is a no-op
    state: object = field(default=None, repr=False)

    @property
    def complete(self) -> bool:
        return len(self.layers_done) == self.n_layers

    def close(self) -> None:
        """Release the workspace early (the layers not yet written will not be)."""
        if self.state is not None:
            self.state.release()
            self.state = None
