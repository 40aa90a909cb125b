"""What the tiered cache needs from a pool codec: the ``PoolCodec`` protocol.

A pool codec compresses rows of a paged KV pool into a blob and decodes a blob (or a token range of it) straight
back into pool rows. The pool is two lists of per-layer buffers, ``k_buffers[l]`` and ``v_buffers[l]``, each of
shape ``[num_slots, H, D]`` (SGLang's MHATokenToKVPool layout, one row per token slot), addressed by slot indices.

Implementations: ``codec.pool_codec.ReferencePoolCodec`` (PyTorch, any device) and
``codec.triton.pool_codec.TritonPoolCodec`` (fused kernels); ``codec.dispatch.make_pool_codec`` picks one. Both
write and read the same blob bytes.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class PoolCodec(Protocol):
    """Encode pool rows into a blob; decode a blob into pool rows.

    Attributes:
        shape: (L, H, D) of one token's K (and V) rows: the pool's layers, KV heads and head_dim.
    """

    shape: tuple[int, int, int]

    def encode_slots(self, k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor],
                     slots: torch.Tensor, start_pos: int, n_head: int, n_tail: int) -> torch.Tensor:
        """Compress the KV rows at ``slots`` into a blob.

        Args:
            k_buffers, v_buffers: L per-layer buffers, shape ``[num_slots, H, D]``, the pool dtype.
            slots: shape ``[n]``, dtype int64: the pool slot of each token, at positions ``start_pos ..``.
            n_head, n_tail: leading / trailing tokens stored as exact copies of their rows.
        Returns:
            The blob: shape ``[nbytes]``, dtype uint8, on the codec's device.
        """
        ...

    def decode_into(self, blob: torch.Tensor, k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor],
                    slots: torch.Tensor, *, token_range: tuple[int, int] | None = None,
                    expected_tokens: int | None = None, expected_start: int | None = None) -> None:
        """Decode the blob's tokens (or ``token_range`` [a, b) of them) into the rows at ``slots``, all layers.

        Raises BlobFormatError (the blob fails its checks, or differs from the caller's ``expected_tokens`` /
        ``expected_start``) or ShapeError before any row is written.
        """
        ...


@runtime_checkable
class BatchedCodec(Protocol):
    """The compressed tier's codec contract, implemented by ``codec.triton.batched.BatchedPoolCodec``
    (PyTorch route and Triton route): plan a pool once, then encode many nodes per call straight into KV-pool rows
    and decode many blobs per call, layer group by layer group, all on the caller's current stream and without any
    host read of device data. Types: ``payload_layout.BlobLayout``, ``pool_rows.PoolRows``, ``jobs.EncodeJob``,
    ``jobs.DecodeJob``, ``jobs.EncodeBatch``, ``jobs.DecodeBatch``; full semantics in ``codec/triton/batched.py``.
    Made by ``codec.dispatch.make_batched_codec`` (the cache's entry point).
    """

    shape: tuple[int, int, int]

    def blob_layout(self, n_tokens: int, n_head: int, n_tail: int): ...

    def pool_rows(self, k_buffers, v_buffers, *, scratch_rows: int = 0): ...

    def encode(self, pool, jobs): ...

    def decode_begin(self, pool, jobs): ...

    def decode_layers(self, batch, layers: range) -> None: ...

    def copy_rows(self, pool, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None: ...

    def warmup(self, pool) -> int: ...
