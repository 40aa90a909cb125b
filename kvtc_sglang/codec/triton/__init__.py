"""Triton kernels of the KVTC codec (GPU, or the CPU interpreter with TRITON_INTERPRET=1).

Thin kernels, one operation each, with a PyTorch reference of the same signature in `reference.py`;
`KVTC_REFERENCE=1` (or `reference=True` on any call) routes everything to the references.

    rows.gather_exact / scatter_exact   exact (sink/window) rows, pool <-> payload
    rows.gather_features                pool rows -> RoPE undone, mean removed features [m, p]
    gemm.project                        features @ (scale * basis) -> coefficients (fp16 tensor cores)
    quant.group_params / pack           per token per group fp16 shift/scale, bit packing
    quant.unpack_dequantize             section bytes -> coefficients (fp16)
    gemm.reconstruct                    coefficients @ (basis / scale).T + mean -> RoPE -> pool rows
    pool_codec.TritonPoolCodec          the per-node pool codec (same interface and blobs as ReferencePoolCodec)
    payload_rows                        the batched pool codec's kernels (batched.BatchedPoolCodec): payload
                                        bytes read and written in KV-pool rows, CRC-32, row copies

Importing this package does not import Triton (the kernel modules do, on first use of the names
below), so the CPU interpreter can still be switched on by setting TRITON_INTERPRET=1 before that.
"""

from kvtc_sglang.codec.triton.common import PoolView, pool_view, use_reference

__all__ = ["DecodeJob", "PoolView", "TritonPoolCodec", "pool_view", "use_reference"]


def __getattr__(name):
    if name in ("TritonPoolCodec", "DecodeJob"):
        from kvtc_sglang.codec.triton import pool_codec

        return getattr(pool_codec, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
