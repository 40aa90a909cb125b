"""KV-pool-facing codec: compress rows of a paged KV pool, decode blobs straight into pool rows.

The pool is given as two lists of per-layer buffers, `k_buffers[l]` and `v_buffers[l]`, each
[num_slots, H, D] (SGLang's MHATokenToKVPool layout, NHD, one row per token slot), plus int64 slot
indices. fp8 pools store uint8 bytes: pass `kv_dtype` (the logical fp8 dtype) so coded rows are
converted with a plain cast (SGLang's default per-tensor scale of 1.0); exact rows are copied as
bytes in every case.

`ReferencePoolCodec` is the reference implementation of the `codec.interfaces.PoolCodec` protocol
(gather -> KVTCCodec -> scatter); `TritonPoolCodec` (kvtc_sglang/codec/triton/) is the fused one,
`codec.dispatch.make_pool_codec` picks between them.
"""

from __future__ import annotations

import torch

from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.errors import ShapeError


def gather_rows(buffers: list[torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
    """[L] x [num_slots, H, D] buffers, slots [n] -> [n, L, H, D] (buffer dtype)."""
    return torch.stack([b[slots] for b in buffers], dim=1)


def scatter_rows(buffers: list[torch.Tensor], slots: torch.Tensor, rows: torch.Tensor) -> None:
    """rows [n, L, H, D] (buffer dtype) -> buffers[l][slots] for every layer l."""
    for layer, b in enumerate(buffers):
        b[slots] = rows[:, layer]


class ReferencePoolCodec:
    """Reference pool codec around a KVTCCodec (all layers of this rank's heads); a ``PoolCodec``."""

    def __init__(self, codec: KVTCCodec, kv_dtype: torch.dtype | None = None):
        self.codec = codec
        self.kv_dtype = kv_dtype
        self.shape = codec.shape

    def _check(self, k_buffers, v_buffers, slots):
        L, H, D = self.codec.shape
        if len(k_buffers) != L or len(v_buffers) != L:
            raise ShapeError(f"pool has {len(k_buffers)}/{len(v_buffers)} layers, calibration {L}")
        if tuple(k_buffers[0].shape[1:]) != (H, D):
            raise ShapeError(f"pool rows are {tuple(k_buffers[0].shape[1:])}, calibration [{H}, {D}]")
        if slots.dtype != torch.int64 or slots.dim() != 1:
            raise ShapeError(f"slots must be a 1-D int64 tensor, got {slots.dtype} {tuple(slots.shape)}")

    def _logical(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.dtype == torch.uint8 and self.kv_dtype is not None:
            return rows.view(self.kv_dtype).float()
        return rows

    def encode_slots(self, k_buffers, v_buffers, slots: torch.Tensor, start_pos: int, n_head: int, n_tail: int) -> torch.Tensor:
        """Compress the KV rows at `slots` (token positions start_pos ..) into a blob (1-D uint8)."""
        self._check(k_buffers, v_buffers, slots)
        k = gather_rows(k_buffers, slots)
        v = gather_rows(v_buffers, slots)
        if k.dtype == torch.uint8:
            if self.kv_dtype is None:
                raise ShapeError("uint8 pool rows need kv_dtype (the pool's fp8 dtype)")
            # exact rows keep their bytes; coded rows go through the float path
            return self.codec.encode(k, v, start_pos, n_head, n_tail, coded_view=self.kv_dtype)
        return self.codec.encode(k, v, start_pos, n_head, n_tail)

    def decode_into(
        self,
        blob: torch.Tensor,
        k_buffers,
        v_buffers,
        slots: torch.Tensor,
        *,
        token_range: tuple[int, int] | None = None,
        expected_tokens: int | None = None,
        expected_start: int | None = None,
    ) -> None:
        """Decode the blob's tokens (or token_range of them) into pool rows `slots`, all layers.

        Raises BlobFormatError before writing anything if the blob fails its checks.
        """
        self._check(k_buffers, v_buffers, slots)
        store_dtype = k_buffers[0].dtype
        out_dtype = self.kv_dtype if store_dtype == torch.uint8 else store_dtype
        dec = self.codec.decode(blob, expected_tokens=expected_tokens, expected_start=expected_start,
                                token_range=token_range, out_dtype=out_dtype)
        if dec.k.shape[0] != slots.numel():
            raise ShapeError(f"{dec.k.shape[0]} decoded tokens for {slots.numel()} slots")
        k, v = dec.k, dec.v
        if store_dtype == torch.uint8:
            k, v = k.view(torch.uint8), v.view(torch.uint8)
        scatter_rows(k_buffers, slots, k)
        scatter_rows(v_buffers, slots, v)
