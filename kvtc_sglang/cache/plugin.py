"""SGLang plugin entry point: ``[project.entry-points."sglang.srt.plugins"] kvtc = kvtc_sglang.cache.plugin:register``.

SGLang's ``load_plugins()`` calls ``register()`` in the launcher (before argument parsing), in ``Engine.__init__`` and
first thing in every scheduler process, then applies the registered hooks. ``register()``:

* registers the radix-cache backend ``"kvtc"`` (``build_tree_cache``), selected by ``--kv-compress kvtc``;
* without the in-tree patch: adds the ``--kv-compress``/``--kvtc-*`` flags to ``ServerArgs.add_cli_args`` (AFTER
  hook) and carries them through ``ServerArgs.from_cli_args`` (AROUND hook), which keeps only dataclass fields: the
  hook sets ``radix_cache_backend="kvtc"`` on the namespace before the ServerArgs is built and attaches the option
  values as instance attributes afterwards (through ``ServerArgs.override``, the audited post-resolution mutation
  point). Instance attributes live in ``__dict__``, so they survive the pickling that ships ServerArgs to the
  scheduler processes;
* with the in-tree patch (``kvtc-sglang patch apply``; ServerArgs then declares ``kv_compress`` etc. as fields): adds
  no flags and only validates/selects, in an AFTER hook on ``ServerArgs.__post_init__`` (covers the CLI and
  ``sglang.Engine(kv_compress="kvtc", ...)``);
* always: an AROUND hook on ``KVCacheConfigurator.config_from_budget`` that, for servers with ``--kv-compress kvtc``
  (it passes every other call through untouched), shrinks the KV pool by the compressed store's budget so total GPU
  memory is unchanged, and records the reserved bytes per TP rank (``reserved_store_bytes``). Plugins load before
  ServerArgs exists, so this hook cannot be registered conditionally; its gate is ``server_args.kv_compress``.
"""

from __future__ import annotations

import argparse
import logging
import math
from fractions import Fraction
from typing import Any

from kvtc_sglang import sglang_compat as compat
from kvtc_sglang.cache.options import ENTROPY_CHOICES, KV_COMPRESS_CHOICES, KVTCOptions, is_fraction, parse_bytes
from kvtc_sglang.cache.startup_checks import (
    BACKEND_NAME,
    attention_tp,
    check_option_conflicts,
    check_server_args,
    require_calibration,
)

logger = logging.getLogger(__name__)

SOURCE = "kvtc-sglang plugin"
CLI_GROUP_TITLE = "KVTC compressed KV tier (kvtc-sglang)"


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------

def register() -> None:
    """Register the ``kvtc`` radix-cache backend and the plugin's hooks. Idempotent.

    Raises SGLangVersionError for an sglang other than 0.5.17 (SGLang logs it and starts without the plugin).
    """
    compat.check_sglang_version()
    _register_backend()
    hooks: list[tuple[str, Any, Any]] = [
        (compat.TARGET_CONFIG_FROM_BUDGET, _config_from_budget_hook, compat.HookType.AROUND)]
    if compat.server_args_has_field("kv_compress"):
        hooks.append((compat.TARGET_POST_INIT, _post_init_hook, compat.HookType.AFTER))
    else:
        hooks.append((compat.TARGET_ADD_CLI_ARGS, _add_cli_args_hook, compat.HookType.AFTER))
        hooks.append((compat.TARGET_FROM_CLI_ARGS, _from_cli_args_hook, compat.HookType.AROUND))
    for target, hook, hook_type in hooks:
        if not compat.hook_is_registered(target, hook):
            compat.HookRegistry.register(target, hook, hook_type)


def _register_backend() -> None:
    existing = compat.get_radix_cache_factory(BACKEND_NAME)
    if existing is build_tree_cache:
        return
    if existing is not None:
        raise RuntimeError(f"radix cache backend {BACKEND_NAME!r} is already registered by "
                           f"{getattr(existing, '__module__', '?')}.{getattr(existing, '__qualname__', existing)}; "
                           "uninstall the other plugin that claims it")
    compat.register_radix_cache_backend(BACKEND_NAME, build_tree_cache)


def build_tree_cache(ctx: Any) -> Any:
    """Radix-cache factory of backend ``kvtc`` (``ctx``: SGLang's ``TreeCacheBuildContext``):
    ``cache.factory.build_tree_cache`` with the store bytes the pool-sizing hook reserved for this rank.

    The factory (the cache class, sglang's tree) is imported here, when a scheduler builds its cache, not when the
    plugin registers in the launcher."""
    from kvtc_sglang.cache import factory

    options = KVTCOptions.from_server_args(ctx.server_args)
    return factory.build_tree_cache(ctx, options, reserved_store_bytes=reserved_store_bytes(ctx.tp_rank))


# ---------------------------------------------------------------------------------------------------------------------
# CLI flags and ServerArgs
# ---------------------------------------------------------------------------------------------------------------------

def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """Add the ``--kv-compress``/``--kvtc-*`` flags in their own help group (no-op if the parser has them)."""
    if compat.parser_has_flag(parser, "--kv-compress"):
        return
    d = KVTCOptions()
    group = parser.add_argument_group(
        CLI_GROUP_TITLE,
        "Compress cold radix-cache nodes in GPU memory with KV Cache Transform Coding instead of evicting them.")
    group.add_argument("--kv-compress", type=str, choices=KV_COMPRESS_CHOICES, default=d.kv_compress,
                       help="Compressed KV tier: 'kvtc' keeps cold prefix-cache nodes as KVTC blobs in a GPU "
                            "store and restores them on a prefix hit; 'none' (default) is the plain radix cache.")
    group.add_argument("--kvtc-calibration", type=str, default=d.calibration, metavar="PATH",
                       help="KVTC calibration artifact of the model (directory holding card.json). Make one with "
                            "`kvtc-sglang calibrate --model <model-path> --out <dir>`.")
    group.add_argument("--kvtc-ratio", type=float, default=d.ratio, metavar="RATIO",
                       help="Target compression ratio; one of the bit plans of the calibration card (default 16).")
    group.add_argument("--kvtc-store-budget", type=str, default=d.store_budget, metavar="SIZE",
                       help="Compressed store size, taken out of the KV pool memory: bytes ('2GiB', '512MB', "
                            "'1073741824') or a fraction of the KV memory in (0, 1) (default '0.25').")
    group.add_argument("--kvtc-host-spill", type=str, default=d.host_spill, metavar="BYTES",
                       help="Pinned host memory for blobs pushed out of the GPU store, in bytes ('8GiB'); "
                            "'0' (default) drops them instead.")
    group.add_argument("--kvtc-sink-tokens", type=int, default=d.sink_tokens, metavar="N",
                       help=f"Leading tokens of every sequence kept exact (attention sinks; default {d.sink_tokens}).")
    group.add_argument("--kvtc-window-tokens", type=int, default=d.window_tokens, metavar="N",
                       help=f"Most recent tokens of a cached sequence kept exact (default {d.window_tokens}).")
    group.add_argument("--kvtc-entropy", type=str, choices=ENTROPY_CHOICES, default=d.entropy,
                       help="Lossless stage after quantization: 'auto' (default: none on GPU, where it costs more "
                            "time than it saves memory; DEFLATE on CPU), 'deflate', 'gdeflate', 'ans' or 'none'.")
    group.add_argument("--kvtc-min-compress-tokens", type=int, default=d.min_compress_tokens, metavar="N",
                       help=f"Smallest run of compressible tokens turned into a blob; shorter runs are evicted "
                            f"(default {d.min_compress_tokens}).")
    group.add_argument("--kvtc-capture-dir", type=str, default=d.capture_dir, metavar="DIR",
                       help="Calibration capture mode: write the K/V rows of finished requests to DIR (no "
                            "compression, no calibration needed), then run `kvtc-sglang calibrate --kv-dumps DIR`.")
    group.add_argument("--kvtc-capture-tokens", type=int, default=d.capture_tokens, metavar="N",
                       help=f"Tokens to capture per TP rank in capture mode (default {d.capture_tokens}).")


def finalize_server_args(server_args: Any, options: KVTCOptions) -> None:
    """Validate a built ServerArgs for the compressed tier and select radix cache backend ``kvtc``.

    Raises KVTCStartupError / CalibrationCardError / CalibrationModelMismatch (all ValueError) naming the fix.
    """
    check_server_args(server_args, options)
    if options.enabled and getattr(server_args, "radix_cache_backend", None) != BACKEND_NAME:
        compat.set_server_args_fields(server_args, SOURCE, radix_cache_backend=BACKEND_NAME)


def _add_cli_args_hook(_result: Any, parser: argparse.ArgumentParser) -> None:
    add_cli_flags(parser)


def _from_cli_args_hook(original: Any, cls: type, args: argparse.Namespace) -> Any:
    # With the in-tree patch the options are dataclass fields and flow through; __post_init__'s hook checks them.
    if compat.server_args_has_field("kv_compress"):
        return original(cls, args)
    options = KVTCOptions.from_server_args(args)
    options.validate()
    if not options.enabled:
        server_args = original(cls, args)
        check_server_args(server_args, options)
        return server_args
    # Fail fast on conflicting flags and a missing card, then let ServerArgs' own resolution see the backend.
    check_option_conflicts(args, options)
    if not options.capturing:
        require_calibration(options, getattr(args, "model_path", None), attention_tp(args))
    args = argparse.Namespace(**vars(args))
    args.radix_cache_backend = BACKEND_NAME
    server_args = original(cls, args)
    compat.set_server_args_fields(server_args, SOURCE, **options.to_server_args_attrs())
    finalize_server_args(server_args, options)
    return server_args


def _post_init_hook(_result: Any, server_args: Any) -> None:
    finalize_server_args(server_args, KVTCOptions.from_server_args(server_args))


# ---------------------------------------------------------------------------------------------------------------------
# Memory equalization
# ---------------------------------------------------------------------------------------------------------------------

# TP rank -> bytes carved out of the KV pool for the compressed store, written by the pool-sizing hook in each
# scheduler process (one process per rank; the last sizing pass wins, i.e. the post-CUDA-graph resize when it runs).
_RESERVED_STORE_BYTES: dict[int, int] = {}


def store_bytes_for(options: KVTCOptions, pool_tokens_before: int, kv_bytes_per_token: int) -> tuple[int, int]:
    """Split a KV budget between the KV pool and the compressed store. Pure.

    Args:
        options: its ``store_budget`` is bytes ("2GiB") or a fraction f in (0, 1) of the KV memory ("0.25").
        pool_tokens_before: token slots the whole budget would buy (before page alignment), >= 0.
        kv_bytes_per_token: KV bytes of one token slot (all layers, K and V, this rank's heads), > 0.

    Returns:
        ``(pool_tokens_after, store_bytes)``. A fraction gives ``pool_tokens_after = floor(tokens * (1 - f))`` and the
        freed slots' bytes to the store; a byte size B gives the pool ``tokens - ceil(B / kv_bytes_per_token)`` and
        the store exactly B. Either way ``pool_tokens_after * kv_bytes_per_token + store_bytes`` never exceeds the
        original ``pool_tokens_before * kv_bytes_per_token``.

    Raises:
        ValueError: bad arguments, or a store budget that leaves the pool without a single token.
    """
    if isinstance(pool_tokens_before, bool) or not isinstance(pool_tokens_before, int) or pool_tokens_before < 0:
        raise ValueError(f"pool_tokens_before must be an integer >= 0, got {pool_tokens_before!r}")
    if isinstance(kv_bytes_per_token, bool) or not isinstance(kv_bytes_per_token, int) or kv_bytes_per_token <= 0:
        raise ValueError(f"kv_bytes_per_token must be an integer > 0, got {kv_bytes_per_token!r}")
    budget = options.store_budget
    total = pool_tokens_before * kv_bytes_per_token
    if is_fraction(budget):
        fraction = Fraction(budget.strip())
        if not 0 < fraction < 1:
            raise ValueError(f"--kvtc-store-budget={budget!r}: a fraction of the KV pool memory must be in (0, 1)")
        tokens_after = math.floor(pool_tokens_before * (1 - fraction))
        store_bytes = (pool_tokens_before - tokens_after) * kv_bytes_per_token
    else:
        store_bytes = parse_bytes(budget, what="--kvtc-store-budget")
        if store_bytes <= 0:
            raise ValueError(f"--kvtc-store-budget={budget!r}: the compressed store needs a positive size")
        tokens_after = pool_tokens_before - (store_bytes + kv_bytes_per_token - 1) // kv_bytes_per_token
    if tokens_after < 1:
        raise ValueError(
            f"--kvtc-store-budget={budget!r} leaves no KV pool: the KV memory is {total} bytes ({pool_tokens_before} "
            f"tokens of {kv_bytes_per_token} bytes). Give a smaller budget or raise --mem-fraction-static")
    return tokens_after, store_bytes


def record_reserved_store_bytes(tp_rank: int, store_bytes: int) -> None:
    """Record the compressed-store bytes carved out of TP rank ``tp_rank``'s KV pool."""
    if store_bytes < 0:
        raise ValueError(f"store_bytes must be >= 0, got {store_bytes}")
    _RESERVED_STORE_BYTES[int(tp_rank)] = int(store_bytes)


def reserved_store_bytes(tp_rank: int) -> int | None:
    """Bytes the pool-sizing hook reserved for TP rank ``tp_rank``'s store in this process; None if it did not run."""
    return _RESERVED_STORE_BYTES.get(int(tp_rank))


def _config_from_budget_hook(original: Any, configurator: Any, budget_bytes: int, *args: Any, **kwargs: Any) -> Any:
    """AROUND ``KVCacheConfigurator.config_from_budget``: give the pool (1 - f) of the budget, the store the rest."""
    options = KVTCOptions.from_server_args(configurator.server_args)
    if not options.enabled or configurator.is_draft_worker:
        return original(configurator, budget_bytes, *args, **kwargs)
    per_token = compat.kv_bytes_per_token(configurator)
    tokens_before = int(budget_bytes) // per_token
    # The store comes out of the pool the server would otherwise get: under --max-total-tokens N (or a
    # cap_tokens clamp) that is N slots, not the whole memory budget.
    for cap in (getattr(configurator.server_args, "max_total_tokens", None), kwargs.get("cap_tokens")):
        if cap is not None and int(cap) > 0:
            tokens_before = min(tokens_before, int(cap))
    tokens_after, store_bytes = store_bytes_for(options, tokens_before, per_token)
    config = original(configurator, tokens_after * per_token, *args, **kwargs)
    record_reserved_store_bytes(configurator.ps.tp_rank, store_bytes)
    logger.info("KVTC: KV budget %.3f GiB -> pool %d tokens (was %d) + compressed store %.3f GiB (%s)",
                int(budget_bytes) / 2 ** 30, config.max_total_num_tokens, tokens_before, store_bytes / 2 ** 30,
                options.store_budget)
    return config
