"""Choosing a pool codec: the fused Triton kernels where they run, the PyTorch reference elsewhere.

    make_pool_codec     the per-node codec (encode_slots / decode_into: a node <-> a framed blob)
    make_batched_codec  the compressed tier's codec contract (codec.triton.batched.BatchedPoolCodec, protocol
                        codec.interfaces.BatchedCodec): batched encode into pool rows, layer-wise batched decode

The one codec module that reaches into ``codec.triton`` (lazily, so importing the codec never imports Triton).
"""

from __future__ import annotations

import torch

from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.interfaces import PoolCodec
from kvtc_sglang.codec.pool_codec import ReferencePoolCodec


def make_pool_codec(codec: KVTCCodec, kv_dtype: torch.dtype | None = None) -> PoolCodec:
    """The pool codec for the codec's device: ``TritonPoolCodec`` on CUDA (unless KVTC_REFERENCE=1 routes everything
    to the PyTorch references), ``ReferencePoolCodec`` everywhere else. ``kv_dtype``: the logical fp8 dtype of a
    uint8 (fp8-storage) pool, else None."""
    if codec.device.type == "cuda":
        from kvtc_sglang.codec.triton.common import use_reference

        if not use_reference(None):
            from kvtc_sglang.codec.triton.pool_codec import TritonPoolCodec

            return TritonPoolCodec(codec, kv_dtype=kv_dtype)
    return ReferencePoolCodec(codec, kv_dtype=kv_dtype)


def make_batched_codec(codec: KVTCCodec, store_dtype: torch.dtype, kv_dtype: torch.dtype | None = None, *,
                       reference: bool | None = None, chunk_tokens: int = 4096, decode_chunk_tokens: int = 8192):
    """The batched pool codec (``BatchedCodec``) of one pool dtype: Triton kernels where they run (CUDA, or the CPU
    interpreter), unless ``reference`` / KVTC_REFERENCE=1 asks for the PyTorch route, which runs everywhere.

    store_dtype: the pool buffers' dtype (bf16/fp16/fp32, or uint8 for fp8 storage with ``kv_dtype`` its fp8 dtype).
    """
    from kvtc_sglang.codec.triton.batched import BatchedPoolCodec

    return BatchedPoolCodec(codec, store_dtype, kv_dtype, reference=reference, chunk_tokens=chunk_tokens,
                            decode_chunk_tokens=decode_chunk_tokens)
