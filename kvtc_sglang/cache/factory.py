"""Building the tiered tree cache: from SGLang's build context (the server) or from parts (tests, CPU runs).

    build_tree_cache(ctx, options)   what the ``kvtc`` radix-cache backend returns for SGLang's
                                     ``TreeCacheBuildContext``: the startup checks against the live pool, then the
                                     capture cache or this rank's ``KVTCRadixCache``;
    kvtc_cache_for_rank(ctx, ...)    load the rank's artifact (``DIR/tp{N}-rank{r}`` under TP) and build the cache;
    make_kvtc_cache(params, ...)     the one constructor both paths end in: check the artifact against the pool,
                                     make the codec on the pool's device, pick the pool codec, size the store.

The cache only ever sees a ``codec.interfaces.PoolCodec``; which implementation is chosen here.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kvtc_sglang import sglang_compat as compat
from kvtc_sglang.cache.options import KVTCOptions, parse_bytes
from kvtc_sglang.cache.radix_cache import KVTCRadixCache
from kvtc_sglang.cache.startup_checks import attention_tp, check_build_context
from kvtc_sglang.codec.artifact import CalibrationArtifact, check_artifact_matches, load_artifact, rank_artifact_path
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.dispatch import make_pool_codec
from kvtc_sglang.codec.pool_codec import ReferencePoolCodec

logger = logging.getLogger(__name__)


def make_kvtc_cache(params: Any, artifact: CalibrationArtifact, options: KVTCOptions, *,
                    store_bytes: int | None = None, host_budget_bytes: int | None = None, tp_group: Any = None,
                    tp_size: int = 1, tp_rank: int = 0, reference: bool = False, stats_interval_s: float = 30.0,
                    metric_labels: dict[str, str] | None = None) -> KVTCRadixCache:
    """A ``KVTCRadixCache`` over the KV pool of ``params`` (sglang's ``CacheInitParams``).

    Args:
        artifact: the calibration of this rank's KV heads; checked against the pool (layers, heads, head_dim, TP).
        options: the tier's options (ratio, entropy, store budget, sink/window tokens, ...).
        store_bytes: device bytes of the compressed store; None takes ``options.store_budget`` of the pool as
            built (bytes, or a fraction of the pool's bytes), on top of the pool.
        host_budget_bytes: bytes of the host tier; None reads ``options.host_spill``.
        tp_group, tp_size, tp_rank: the TP layout (the group ranks agree through; see ``KVTCRadixCache``).
        reference: True always uses the PyTorch ``ReferencePoolCodec``; False picks the fused Triton codec on CUDA.
        stats_interval_s, metric_labels: the stats log interval and the Prometheus labels.

    Raises:
        CalibrationMismatchError: the artifact does not fit the pool, naming the command that makes one that does.
    """
    pool = compat.kv_pool_of(params.token_to_kv_pool_allocator)
    check_artifact_matches(artifact, num_layers=len(pool.k_buffer), num_kv_heads=int(pool.head_num),
                           head_dim=int(pool.head_dim), tp_size=tp_size, tp_rank=tp_rank)
    codec = KVTCCodec(artifact, int(options.ratio), device=pool.k_buffer[0].device, entropy=options.entropy)
    kv_dtype = pool.dtype if pool.k_buffer[0].dtype == torch.uint8 else None
    pool_codec = ReferencePoolCodec(codec, kv_dtype) if reference else make_pool_codec(codec, kv_dtype)
    if store_bytes is None:
        store_bytes = parse_bytes(options.store_budget, int(sum(pool.get_kv_size_bytes())), what="--kvtc-store-budget")
    return KVTCRadixCache(params, pool_codec, options, store_bytes, host_budget_bytes=host_budget_bytes,
                          tp_group=tp_group, stats_interval_s=stats_interval_s, metric_labels=metric_labels)


def store_budget_bytes(ctx: Any, options: KVTCOptions, reserved_bytes: int | None) -> int:
    """The compressed store's byte budget for the rank building its tree cache (``ctx``: TreeCacheBuildContext).

    ``reserved_bytes``: what the pool-sizing hook carved out of this rank's KV pool. None (no sizing pass ran in
    this process: a pool built by hand, e.g. on CPU): the budget is computed from the pool as built,
    ``parse_bytes(store_budget, pool bytes)``, and is extra memory on top of the pool.
    """
    if reserved_bytes is not None:
        return reserved_bytes
    pool = compat.kv_pool_of(ctx.params.token_to_kv_pool_allocator)
    pool_bytes = sum(pool.get_kv_size_bytes())
    budget = parse_bytes(options.store_budget, pool_bytes, what="--kvtc-store-budget")
    logger.warning("KVTC: the KV pool was not sized by the kvtc hook; the %d-byte compressed store comes on top of "
                   "the %d-byte pool", budget, pool_bytes)
    return budget


def kvtc_cache_for_rank(ctx: Any, options: KVTCOptions, store_bytes: int) -> KVTCRadixCache:
    """This rank's ``KVTCRadixCache`` for sglang's ``TreeCacheBuildContext``: load the rank's artifact, build the
    cache with a ``store_bytes`` store. Raises CalibrationMismatchError when the artifact does not fit the pool."""
    params = ctx.params
    tp_size = attention_tp(ctx.server_args)
    tp_rank = int(ctx.tp_rank) % tp_size
    artifact = load_artifact(rank_artifact_path(options.calibration, tp_size, tp_rank))
    group = params.tp_cache_group if params.tp_cache_group is not None else ctx.tp_group
    return make_kvtc_cache(params, artifact, options, store_bytes=store_bytes, tp_group=group, tp_size=tp_size,
                           tp_rank=tp_rank,
                           metric_labels={"cache_type": KVTCRadixCache.__name__, "tp_rank": str(ctx.tp_rank)})


def build_tree_cache(ctx: Any, options: KVTCOptions, *, reserved_store_bytes: int | None = None) -> Any:
    """The tree cache of backend ``kvtc``: refuse unsupported models/caches and a card that does not fit the live
    pool, then build the capture cache (``--kvtc-capture-dir``) or this rank's ``KVTCRadixCache``.

    ``reserved_store_bytes``: the bytes the pool-sizing hook carved out of this rank's pool (None: it did not run).
    Raises KVTCStartupError / CalibrationModelMismatch / CalibrationMismatchError naming the fix.
    """
    card = check_build_context(ctx, options)
    if options.capturing:
        from kvtc_sglang.cache.capture import KVCaptureRadixCache

        return KVCaptureRadixCache.from_build_context(ctx, options)
    logger.info("KVTC: TP rank %d uses calibration card %s, plan %s; %s bytes reserved for the compressed store",
                ctx.tp_rank, card.path, card.plan_key(options.ratio), reserved_store_bytes)
    return kvtc_cache_for_rank(ctx, options, store_budget_bytes(ctx, options, reserved_store_bytes))
