"""Building the tiered tree cache: from SGLang's build context (the server) or from parts (tests, CPU runs).

    build_tree_cache(ctx, options)   what the ``kvtc`` radix-cache backend returns for SGLang's
                                     ``TreeCacheBuildContext``: the startup checks against the live pool, then the
                                     capture cache or this rank's ``KVTCRadixCache``;
    kvtc_cache_for_rank(ctx, ...)    load the rank's artifact (``DIR/tp{N}-rank{r}`` under TP), register the layer
                                     counter (CUDA) and build the cache;
    make_kvtc_cache(params, ...)     the one constructor both paths end in: check the artifact against the pool,
                                     make the batched pool codec on the pool's device, build the cache, warm the
                                     codec's kernels up.

The cache only ever sees the pool codec (``codec.interfaces.BatchedCodec``); which implementation is chosen here.
Blobs live in the pool's own slots: nothing is carved out of the pool (``--kvtc-store-budget`` is an optional cap).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kvtc_sglang import sglang_compat as compat
from kvtc_sglang.cache.options import KVTCOptions
from kvtc_sglang.cache.radix_cache import KVTCRadixCache
from kvtc_sglang.cache.startup_checks import attention_tp, check_build_context
from kvtc_sglang.codec.artifact import CalibrationArtifact, check_artifact_matches, load_artifact, rank_artifact_path
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.dispatch import make_batched_codec

logger = logging.getLogger(__name__)


def make_kvtc_cache(params: Any, artifact: CalibrationArtifact, options: KVTCOptions, *,
                    host_budget_bytes: int | None = None, tp_group: Any = None, tp_size: int = 1, tp_rank: int = 0,
                    reference: bool | None = None, layer_counter: Any = None, transfer_mode: str = "auto",
                    stats_interval_s: float | None = None, metric_labels: dict[str, str] | None = None,
                    warmup: bool = True) -> KVTCRadixCache:
    """A ``KVTCRadixCache`` over the KV pool of ``params`` (SGLang's ``CacheInitParams``).

    Args:
        artifact: the calibration of this rank's KV heads; checked against the pool (layers, heads, head_dim, TP).
        options: the tier's options (ratio, sink/window tokens, optional blob cap, host spill, ...).
        host_budget_bytes: bytes of the host spill tier; None reads ``options.host_spill``.
        tp_group, tp_size, tp_rank: the TP layout (the group ranks agree through; see ``KVTCRadixCache``).
        reference: True = the codec's PyTorch route, False = Triton kernels, None = the codec's own choice (Triton
            on CUDA unless KVTC_REFERENCE=1).
        layer_counter: SGLang's LayerDoneCounter registered on the pool (CUDA), for the layer-wise decode.
        transfer_mode: "auto", or "deferred" (CPU tests).
        warmup: compile every kernel variant now (``jit_compiles`` counts them).

    Raises:
        CalibrationMismatchError: the artifact does not fit the pool, naming the command that makes one that does.
    """
    pool = compat.kv_pool_of(params.token_to_kv_pool_allocator)
    check_artifact_matches(artifact, num_layers=len(pool.k_buffer), num_kv_heads=int(pool.head_num),
                           head_dim=int(pool.head_dim), tp_size=tp_size, tp_rank=tp_rank)
    device = pool.k_buffer[0].device
    store_dtype = pool.k_buffer[0].dtype
    kv_dtype = pool.dtype if store_dtype == torch.uint8 else None
    codec = make_batched_codec(KVTCCodec(artifact, int(options.ratio), device=device, entropy="none"), store_dtype,
                               kv_dtype, reference=reference)
    cache = KVTCRadixCache(params, codec, options, tp_group=tp_group, host_budget_bytes=host_budget_bytes,
                           layer_counter=layer_counter, transfer_mode=transfer_mode,
                           stats_interval_s=stats_interval_s, metric_labels=metric_labels)
    if warmup:
        compiles = codec.warmup(cache.pool_rows)
        logger.info("KVTC: codec warm-up compiled %d kernel variants", compiles)
    return cache


def kvtc_cache_for_rank(ctx: Any, options: KVTCOptions) -> KVTCRadixCache:
    """This rank's ``KVTCRadixCache`` for SGLang's ``TreeCacheBuildContext``: load the rank's artifact, register a
    LayerDoneCounter on the pool and the TP worker (CUDA), build the cache. Raises CalibrationMismatchError when the
    artifact does not fit the pool."""
    params = ctx.params
    tp_size = attention_tp(ctx.server_args)
    tp_rank = int(ctx.tp_rank) % tp_size
    artifact = load_artifact(rank_artifact_path(options.calibration, tp_size, tp_rank))
    pool = compat.kv_pool_of(params.token_to_kv_pool_allocator)
    counter = None
    if pool.k_buffer[0].device.type == "cuda":
        counter = compat.LayerDoneCounter(len(pool.k_buffer))
        compat.register_layer_counter(pool, getattr(ctx, "tp_worker", None), counter)
    group = params.tp_cache_group if params.tp_cache_group is not None else ctx.tp_group
    return make_kvtc_cache(params, artifact, options, tp_group=group, tp_size=tp_size, tp_rank=tp_rank,
                           layer_counter=counter,
                           metric_labels={"cache_type": KVTCRadixCache.__name__, "tp_rank": str(ctx.tp_rank)})


def build_tree_cache(ctx: Any, options: KVTCOptions) -> Any:
    """The tree cache of backend ``kvtc``: refuse unsupported models/caches and a card that does not fit the live
    pool, then build the capture cache (``--kvtc-capture-dir``) or this rank's ``KVTCRadixCache``.

    Raises KVTCStartupError / CalibrationModelMismatch / CalibrationMismatchError naming the fix.
    """
    card = check_build_context(ctx, options)
    if options.capturing:
        from kvtc_sglang.cache.capture import KVCaptureRadixCache

        return KVCaptureRadixCache.from_build_context(ctx, options)
    logger.info("KVTC: TP rank %d uses calibration card %s, plan %s; blobs live in the KV pool's slots (cap: %s)",
                ctx.tp_rank, card.path, card.plan_key(options.ratio), options.store_budget or "none")
    return kvtc_cache_for_rank(ctx, options)
