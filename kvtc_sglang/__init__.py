"""kvtc-sglang: a compressed KV-cache tier for SGLang's radix cache.

Subpackages:
    kvtc_sglang.codec   -- KV Cache Transform Coding (independent of SGLang): RoPE undo/redo,
                           PCA calibration, DP bit allocation, quantize/pack, entropy stage,
                           self-describing blobs, Triton kernels.
    kvtc_sglang.cache   -- the SGLang side: tiered radix cache, compressed store, plugin, factory.
    kvtc_sglang.models  -- the real model used for calibration/evaluation: loading, geometry, KV capture,
                           calibration driver.
    kvtc_sglang.eval    -- accuracy protocol, baselines, the CPU serving simulation, conversations, provenance.
    kvtc_sglang.commands -- the `kvtc-sglang` subcommands (nothing in the library imports them).
    kvtc_sglang.testing -- synthetic fixtures for tests and benchmarks.

Layers (tests/test_layers.py): codec <- cache <- commands; models and eval beside the cache; only
kvtc_sglang.sglang_compat imports sglang.
"""

__version__ = "0.1.0"
