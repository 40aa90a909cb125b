"""kvtc-sglang: a compressed KV-cache tier for SGLang's radix cache.

Subpackages:
    kvtc_sglang.codec   -- KV Cache Transform Coding (independent of SGLang): RoPE undo/redo,
                           PCA calibration, DP bit allocation, quantize/pack, entropy stage,
                           self-describing blobs, Triton kernels.
    kvtc_sglang.cache   -- the SGLang side: tiered radix cache, compressed store, plugin.
    kvtc_sglang.models  -- loading the real model used for calibration/evaluation, KV capture.
"""

__version__ = "0.1.0"
