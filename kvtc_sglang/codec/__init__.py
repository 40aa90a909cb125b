"""KV Cache Transform Coding (KVTC), independent of SGLang.

Dimension glossary (used in every docstring of this package):
    L   transformer layers
    H   KV heads held by this rank
    D   head_dim
    p   features per token and per tensor kind (K or V): p = L * H * D, ordered [layer][head][dim]
        -- the row order of the SGLang pool's per-layer buffers flattened and concatenated
    r   PCA rank kept (the largest rank any bit plan uses)
    n   tokens
    G   quantization groups of a plan

Pipeline (per tensor kind K or V, per token):
    x [p] (keys with RoPE undone) -> d = (x - mu) @ basis [r] -> per-group min/max quantization with a
    16-bit shift and 16-bit scale per token per group -> bit packing -> DEFLATE (optional).
Decoding inverts each step; keys get RoPE re-applied at their absolute positions.

Entry points: `codec.KVTCCodec` (reference codec: tokens <-> framed blob), `dispatch.make_batched_codec` ->
`triton.batched.BatchedPoolCodec` (the pool codec contract of the compressed tier, protocol
`interfaces.BatchedCodec`: batched encode into KV-pool rows, layer-wise batched decode, CRC-32
on the device, no host syncs; PyTorch and Triton routes), `payload_layout.BlobLayout` (where each payload byte
lives), `triton.pool_rows.PoolRows` (a pool as an addressable row space), `jobs` (the work items).
"""
