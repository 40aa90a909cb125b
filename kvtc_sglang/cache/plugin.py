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
* always: three scheduler hooks that drive the tier's asynchronous work, each a no-op unless the scheduler's tree
  cache is a ``KVTCRadixCache`` (plugins load before ServerArgs exists, so they cannot be registered conditionally):
  an AFTER hook on ``Scheduler.run_batch`` records an event on the forward stream after every launch (the tier's
  side streams order their KV reads and writes after it); a BEFORE hook on ``Scheduler._get_new_batch_prefill_raw``
  runs ``tree_cache.step()`` once per iteration (acknowledgements, compression ahead of eviction); an AFTER hook on
  the same method launches the layer-wise decode of the load-backs when a prefill batch formed and sets the batch's
  ``hicache_consumer_index`` (SGLang sets it only under --enable-hierarchical-cache). No SGLang source patch.

The pool is sized exactly as without the tier: blobs live in the pool's own slots, ``--kvtc-store-budget`` is only an
optional cap on them.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from kvtc_sglang import sglang_compat as compat
from kvtc_sglang.cache.options import ENTROPY_CHOICES, KV_COMPRESS_CHOICES, VERIFY_CHOICES, KVTCOptions
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
        (compat.TARGET_RUN_BATCH, _after_run_batch_hook, compat.HookType.AFTER),
        (compat.TARGET_FORM_PREFILL_BATCH, _before_prefill_batch_hook, compat.HookType.BEFORE),
        (compat.TARGET_FORM_PREFILL_BATCH, _after_prefill_batch_hook, compat.HookType.AFTER)]
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
    ``cache.factory.build_tree_cache``.

    The factory (the cache class, sglang's tree) is imported here, when a scheduler builds its cache, not when the
    plugin registers in the launcher."""
    from kvtc_sglang.cache import factory

    options = KVTCOptions.from_server_args(ctx.server_args)
    return factory.build_tree_cache(ctx, options)


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
                       help="Compressed KV tier: 'kvtc' keeps cold prefix-cache nodes as KVTC blobs in the KV "
                            "pool's own slots and restores them on a prefix hit; 'none' (default) is the plain radix "
                            "cache.")
    group.add_argument("--kvtc-calibration", type=str, default=d.calibration, metavar="PATH",
                       help="KVTC calibration artifact of the model (directory holding card.json). Make one with "
                            "`kvtc-sglang calibrate --model <model-path> --out <dir>`.")
    group.add_argument("--kvtc-ratio", type=float, default=d.ratio, metavar="RATIO",
                       help="Target compression ratio; one of the bit plans of the calibration card (default 16).")
    group.add_argument("--kvtc-store-budget", type=str, default=d.store_budget, metavar="SIZE",
                       help="Optional cap on the KV-pool memory compressed blobs may hold: bytes ('2GiB', '512MB', "
                            "'1073741824') or a fraction of the KV pool memory in (0, 1). Default: no cap (blobs "
                            "live in the pool's own slots as the workload needs them).")
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
    group.add_argument("--kvtc-stats-interval", type=float, default=d.stats_interval_s, metavar="SECONDS",
                       help=f"Seconds between two KVTC stats log lines and sglang:kvtc_* gauge refreshes "
                            f"(default {d.stats_interval_s:g}).")
    group.add_argument("--kvtc-compress-ahead-watermark", type=float, default=d.compress_ahead_watermark,
                       metavar="FRACTION",
                       help=f"KV-pool occupancy from which finished requests' prefixes are compressed ahead of "
                            f"eviction on a side stream (0 = always, 1 = only at eviction; default "
                            f"{d.compress_ahead_watermark:g}).")
    group.add_argument("--kvtc-compress-ahead-tokens", type=int, default=d.compress_ahead_tokens, metavar="N",
                       help=f"Most tokens compressed ahead per scheduler step (default {d.compress_ahead_tokens}).")
    group.add_argument("--kvtc-verify", type=str, choices=VERIFY_CHOICES, default=d.verify,
                       help="'device' (default): blobs in pool slots are not re-checked before a load-back (they never "
                            "leave HBM); host copies are CRC-checked. 'always': check every blob's CRC-32 before its "
                            "load-back (one host sync per load-back; for debugging).")
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
# Scheduler hooks (no-ops unless the scheduler's tree cache is a KVTCRadixCache)
# ---------------------------------------------------------------------------------------------------------------------

def _kvtc_cache(scheduler: Any) -> Any:
    cache = getattr(scheduler, "tree_cache", None)
    return cache if getattr(cache, "is_kvtc_tier", False) else None


def _after_run_batch_hook(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER ``Scheduler.run_batch``: an event on the forward stream after the launch; the tier's side streams wait
    on it before touching KV slots (CUDA-graph decode writes included)."""
    cache = _kvtc_cache(scheduler)
    if cache is not None and cache.transfer.cuda:
        import torch

        stream = compat.scheduler_forward_stream(scheduler) or torch.cuda.current_stream()
        event = torch.cuda.Event()
        event.record(stream)
        cache.on_forward_launched(event)
    return result


def _before_prefill_batch_hook(scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE ``Scheduler._get_new_batch_prefill_raw``: the tier's once-per-iteration poll/launch point."""
    cache = _kvtc_cache(scheduler)
    if cache is not None:
        cache.step()
    return None


def _after_prefill_batch_hook(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER ``Scheduler._get_new_batch_prefill_raw``: when a prefill batch formed, launch the layer-wise decode of
    the pending load-backs and hand the batch the consumer index its attention layers wait on."""
    cache = _kvtc_cache(scheduler)
    if cache is None or not isinstance(result, tuple) or not result or result[0] is None:
        return result
    batch = result[0]
    index = cache.start_loading(getattr(batch, "reqs", None))
    if index >= 0:
        batch.hicache_consumer_index = index
    return result
