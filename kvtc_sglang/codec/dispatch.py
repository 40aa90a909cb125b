"""Choosing a pool codec: the fused Triton kernels where they run, the PyTorch reference elsewhere.

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
