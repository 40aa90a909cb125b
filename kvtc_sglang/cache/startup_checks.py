"""Startup checks of the compressed KV tier: option conflicts, the calibration card, and card-vs-model fit.

Run twice: in the launcher process right after ServerArgs is built (``check_server_args``: fails before any GPU
work), and in every scheduler process when the tree cache is built (``check_build_context``: the loaded model and
the real KV pool are known there, so layer/head/head_dim/RoPE are compared against what the pool actually holds).

The card is read by ``codec.artifact.read_card_summary`` (the one card reader; no tensors are loaded here) and the
model's geometry by ``models.geometry.model_geometry``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from kvtc_sglang.cache.options import SERVER_ARGS_ATTRS, KVTCOptions
from kvtc_sglang.codec.artifact import (
    CARD_NAME,
    CardSummary,
    calibrate_hint,
    card_path as artifact_card_path,
    rank_artifact_path,
    rank_dir_name,
    read_card_summary,
)
from kvtc_sglang.codec.errors import CalibrationCardError, CalibrationMismatchError
from kvtc_sglang.models.geometry import ModelConfigError, ModelGeometry, model_geometry

logger = logging.getLogger(__name__)

# KVTCOptions field -> CLI flag
SERVER_FLAG = {name: "--" + attr.replace("_", "-") for name, attr in SERVER_ARGS_ATTRS.items()}
BACKEND_NAME = "kvtc"
# kv_cache_dtype values whose pools are not the plain MHATokenToKVPool (FP4/MXFP8 pools carry scale buffers).
UNSUPPORTED_KV_DTYPES = ("fp4_e2m1", "nvfp4", "fp4_mx_block16", "mxfp8")


class KVTCStartupError(ValueError):
    """The server cannot start with the compressed KV tier as configured; the message says what to change."""


class CalibrationModelMismatch(CalibrationMismatchError, KVTCStartupError):
    """The calibration card was made for a different model, TP layout or set of ratios."""


# ---------------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------------

def _model_geometry(model_config_or_path: Any) -> ModelGeometry:
    """``models.geometry.model_geometry``; KVTCStartupError when a config cannot be read."""
    try:
        return model_geometry(model_config_or_path)
    except ModelConfigError as exc:
        raise KVTCStartupError(str(exc)) from exc


# ---------------------------------------------------------------------------------------------------------------------
# Card vs model
# ---------------------------------------------------------------------------------------------------------------------

def validate_calibration_for_model(card_path: str | Path, model_config_or_path: Any, *, tp_size: int = 1,
                                   tp_rank: int | None = None, ratio: float | None = None,
                                   rope_style: str | None = None, rope_theta: float | None = None,
                                   model_path: str | None = None) -> CardSummary:
    """Check that a calibration card fits a model; return the parsed card.

    Args:
        card_path: the artifact directory holding ``card.json``, or the card file.
        model_config_or_path: anything ``model_geometry`` reads (model dir, config.json, HF config, ModelConfig).
        tp_size: number of KV-head shards (attention TP size) the server runs with.
        tp_rank: this rank's shard index; checked against the card's ``tp_rank`` when given and tp_size > 1.
        ratio: the requested --kvtc-ratio; the card must have a plan for it.
        rope_style, rope_theta: RoPE read from the loaded model; they take precedence over the config's values.
        model_path: shown in the calibrate command of error messages.

    Raises:
        CalibrationCardError: the card is missing or unreadable.
        CalibrationModelMismatch: layers, KV heads per rank, head_dim, RoPE theta/style, TP layout or ratio differ;
            the message names both values and the command that makes a fitting card.
    """
    geometry = _model_geometry(model_config_or_path)
    model_path = model_path or geometry.name
    card = read_card_summary(card_path, model_path=model_path)
    hint = calibrate_hint(model_path)

    def mismatch(what: str, card_value: Any, model_value: Any, extra: str = "") -> CalibrationModelMismatch:
        return CalibrationModelMismatch(
            f"KVTC calibration card {card.path} does not fit the model {geometry.name}: {what} is {card_value} in "
            f"the card but {model_value} for the model{extra}. Make a card for this model"
            f"{f' at tp_size {tp_size}' if tp_size > 1 else ''} with `{hint}`")

    if card.tp_size != tp_size:
        raise mismatch("tp_size (KV-head shards)", card.tp_size, tp_size)
    if card.num_layers != geometry.num_layers:
        raise mismatch("num_layers", card.num_layers, geometry.num_layers)
    model_heads = geometry.kv_heads_per_rank(tp_size)
    if card.num_kv_heads_per_rank != model_heads:
        raise mismatch("num_kv_heads per TP rank", card.num_kv_heads_per_rank, model_heads,
                       f" ({geometry.num_kv_heads} KV heads / tp_size {tp_size})")
    if card.head_dim != geometry.head_dim:
        raise mismatch("head_dim", card.head_dim, geometry.head_dim)
    theta = rope_theta if rope_theta is not None else geometry.rope_theta
    if card.rope_theta is not None and theta is not None and not math.isclose(card.rope_theta, theta, rel_tol=1e-6):
        raise mismatch("RoPE theta", card.rope_theta, theta)
    style = rope_style if rope_style is not None else geometry.rope_style
    if card.rope_style is not None and style is not None and card.rope_style != style:
        raise mismatch("RoPE style", card.rope_style, style)
    if tp_rank is not None and tp_size > 1 and card.tp_rank != tp_rank:
        raise mismatch("tp_rank", card.tp_rank, tp_rank, " (each rank needs the card calibrated for its heads)")
    if ratio is not None and card.plan_key(ratio) is None:
        available = ", ".join(f"{r:g}" for r in card.ratios)
        raise CalibrationModelMismatch(
            f"--kvtc-ratio {ratio:g} has no bit plan in KVTC calibration card {card.path} (plans: {available}). "
            f"Pick one of those, or make a card that has a plan for {ratio:g}x with `{hint}`")
    return card


# ---------------------------------------------------------------------------------------------------------------------
# Server arguments (launcher process)
# ---------------------------------------------------------------------------------------------------------------------

def attention_tp(server_args: Any) -> int:
    """Number of KV-head shards: tp_size, divided by dp_size under --enable-dp-attention."""
    tp = int(getattr(server_args, "tp_size", 1) or 1)
    if getattr(server_args, "enable_dp_attention", False):
        tp = max(1, tp // int(getattr(server_args, "dp_size", 1) or 1))
    return tp


def is_supported_page_size(page_size: int | None) -> bool:
    """Page sizes the compressed tier supports: 1 and powers of two (None = sglang's default, 1)."""
    return page_size is None or (isinstance(page_size, int) and page_size >= 1 and page_size & (page_size - 1) == 0)


def check_option_conflicts(server_args: Any, options: KVTCOptions) -> None:
    """Refuse SGLang settings the compressed tier cannot run with; KVTCStartupError names the flag to change.

    Reads attributes with defaults, so it works on a ServerArgs and on an argparse namespace before ServerArgs exists.
    """
    if not options.enabled:
        return
    get = lambda name, default=None: getattr(server_args, name, default)  # noqa: E731
    with_kvtc = "--kv-compress kvtc"
    if get("disable_radix_cache", False):
        raise KVTCStartupError(f"{with_kvtc} compresses prefix-cache nodes and needs the radix cache: remove "
                               "--disable-radix-cache (or drop --kv-compress kvtc)")
    if get("enable_hierarchical_cache", False):
        raise KVTCStartupError(f"{with_kvtc} cannot be combined with --enable-hierarchical-cache (HiCache is a "
                               "different tiered cache): remove one of them")
    backend = get("radix_cache_backend")
    if backend not in (None, "", BACKEND_NAME):
        raise KVTCStartupError(f"{with_kvtc} selects --radix-cache-backend {BACKEND_NAME}, but "
                               f"--radix-cache-backend {backend} was given: remove it")
    if get("enable_lmcache", False):
        raise KVTCStartupError(f"{with_kvtc} cannot be combined with --enable-lmcache: remove one of them")
    if get("enable_flexkv", False):
        raise KVTCStartupError(f"{with_kvtc} cannot be combined with --enable-flexkv: remove one of them")
    if get("speculative_algorithm") is not None:
        raise KVTCStartupError(f"{with_kvtc} does not support speculative decoding yet (EAGLE keeps bigram radix keys "
                               f"and a draft KV pool the tier does not restore): remove --speculative-algorithm "
                               f"{get('speculative_algorithm')}")
    if int(get("pp_size", 1) or 1) > 1:
        raise KVTCStartupError(f"{with_kvtc} needs every layer's KV on one rank; pipeline parallelism "
                               f"(--pp-size {get('pp_size')}) is not supported")
    if int(get("dcp_size", 1) or 1) > 1:
        raise KVTCStartupError(f"{with_kvtc} does not support decode context parallelism "
                               f"(--dcp-size {get('dcp_size')})")
    if get("kv_cache_dtype") in UNSUPPORTED_KV_DTYPES:
        raise KVTCStartupError(f"{with_kvtc} supports bf16/fp16/fp8 KV caches; --kv-cache-dtype "
                               f"{get('kv_cache_dtype')} uses a block-scaled pool it cannot restore into")
    page_size = get("page_size")
    if not is_supported_page_size(page_size):
        raise KVTCStartupError(f"{with_kvtc} supports --page-size 1 or a power of two, got {page_size}")


def require_calibration(options: KVTCOptions, model_path: str | None = None, tp_size: int = 1) -> list[Path]:
    """The card path of every TP rank (``rank_artifact_path`` of ``--kvtc-calibration``), rank 0 first;
    CalibrationCardError (naming the calibrate command) if not given or a rank's card is not found."""
    if options.calibration is None:
        raise CalibrationCardError(
            f"--kv-compress kvtc needs a calibration artifact for the model: make one with "
            f"`{calibrate_hint(model_path)}` and pass --kvtc-calibration <dir>")
    paths = []
    for rank in range(max(1, int(tp_size))):
        path = artifact_card_path(rank_artifact_path(options.calibration, tp_size, rank))
        if path.is_file():
            paths.append(path)
        else:
            where = f" for TP rank {rank} of {tp_size} (expected {CARD_NAME} in {rank_dir_name(tp_size, rank)}/ " \
                    f"there, or in the directory itself)" if tp_size > 1 else \
                    f" (expected a directory holding {CARD_NAME}, or the card file)"
            raise CalibrationCardError(
                f"--kvtc-calibration {options.calibration}: no KVTC calibration card there{where}. Make one with "
                f"`{calibrate_hint(model_path)}{f' --tp-size {tp_size}' if tp_size > 1 else ''}`")
    return paths


def check_server_args(server_args: Any, options: KVTCOptions) -> CardSummary | None:
    """All launcher-side checks on a built ServerArgs; returns the parsed card (None when the tier is off).

    The card is compared against the model when its geometry is known here: the ModelConfig that ServerArgs'
    resolution cached on ``server_args.model_config``, else ``<model_path>/config.json`` for a local model. Otherwise
    (a hub id not yet downloaded) the comparison happens in each scheduler process (``check_build_context``).
    """
    options.validate()
    if not options.enabled:
        if getattr(server_args, "radix_cache_backend", None) == BACKEND_NAME:
            raise KVTCStartupError(f"--radix-cache-backend {BACKEND_NAME} is selected by --kv-compress kvtc (which "
                                   "also reads the --kvtc-* options): use --kv-compress kvtc instead")
        ignored = [SERVER_FLAG[name] for name in options.non_default_fields()]
        if ignored:
            logger.warning("%s given without --kv-compress kvtc; ignored", ", ".join(ignored))
        return None
    check_option_conflicts(server_args, options)
    model_path = getattr(server_args, "model_path", None)
    if options.capturing:
        logger.info("KVTC calibration capture: K/V rows of finished requests go to %s (up to %d tokens per rank)",
                    options.capture_dir, options.capture_tokens)
        return None
    tp = attention_tp(server_args)
    card_paths = require_calibration(options, model_path, tp)
    model_source: Any = getattr(server_args, "model_config", None)
    if model_source is None and model_path and (Path(model_path) / "config.json").is_file():
        model_source = model_path
    cards = []
    for rank, path in enumerate(card_paths):
        if model_source is None:
            card = read_card_summary(path, model_path=model_path)
            if card.plan_key(options.ratio) is None:
                raise CalibrationModelMismatch(
                    f"--kvtc-ratio {options.ratio:g} has no bit plan in KVTC calibration card {card.path} (plans: "
                    f"{', '.join(f'{r:g}' for r in card.ratios)})")
            logger.info("KVTC calibration card %s read; it is checked against the model when the model loads",
                        card.path)
        else:
            card = validate_calibration_for_model(path, model_source, tp_size=tp, tp_rank=rank if tp > 1 else None,
                                                  ratio=options.ratio, model_path=model_path)
        cards.append(card)
    return cards[0]




# ---------------------------------------------------------------------------------------------------------------------
# Tree-cache build context (scheduler process)
# ---------------------------------------------------------------------------------------------------------------------

def check_build_context(ctx: Any, options: KVTCOptions) -> CardSummary | None:
    """Refuse model/cache situations the compressed tier cannot serve, then check the card against the real pool.

    ``ctx`` is SGLang's ``TreeCacheBuildContext``. Raises KVTCStartupError / CalibrationModelMismatch.
    """
    from kvtc_sglang import sglang_compat as compat

    options.validate()
    if not options.enabled:
        raise KVTCStartupError("the 'kvtc' radix cache backend was selected without --kv-compress kvtc")
    model_path = getattr(ctx.server_args, "model_path", None)
    if not options.capturing:
        require_calibration(options, model_path, attention_tp(ctx.server_args))
    if ctx.disable_radix_cache:
        raise KVTCStartupError("the radix cache is disabled for this model/server (--disable-radix-cache, or a "
                               "multimodal model on the Transformers backend); the compressed KV tier needs it")
    if ctx.is_hybrid_swa:
        raise KVTCStartupError("hybrid sliding-window-attention models (separate full/SWA KV pools) are not "
                               "supported by the compressed KV tier; drop --kv-compress kvtc")
    if ctx.is_hybrid_ssm:
        raise KVTCStartupError("hybrid Mamba/linear-attention models are not supported by the compressed KV tier; "
                               "drop --kv-compress kvtc")
    if getattr(ctx, "is_dsa", False):
        raise KVTCStartupError("DeepSeek sparse-attention (DSA) models use an MLA+indexer pool the compressed KV "
                               "tier does not support; drop --kv-compress kvtc")
    if ctx.enable_hierarchical_cache:
        raise KVTCStartupError("--kv-compress kvtc cannot be combined with --enable-hierarchical-cache")
    params = ctx.params
    if getattr(params, "is_eagle", False):
        raise KVTCStartupError("--kv-compress kvtc does not support EAGLE speculative decoding (bigram radix keys)")
    if not is_supported_page_size(params.page_size):
        raise KVTCStartupError(f"--kv-compress kvtc supports page size 1 or a power of two, got {params.page_size}")
    check_option_conflicts(ctx.server_args, options)

    pool = compat.kv_pool_of(params.token_to_kv_pool_allocator)
    mha = compat.MHATokenToKVPool
    if type(pool) is not mha:
        family = "an MLA pool (compressed latent KV)" if isinstance(pool, compat.MLATokenToKVPool) else \
            f"a {type(pool).__name__}"
        raise KVTCStartupError(f"the compressed KV tier works on SGLang's MHATokenToKVPool; this model/server uses "
                               f"{family}. Drop --kv-compress kvtc")
    layout = getattr(pool, "kv_cache_layout", "nhd")
    if layout != "nhd":
        raise KVTCStartupError(f"the compressed KV tier needs the NHD pool layout, this pool is {layout!r} (unset "
                               "SGLANG_USE_HND_KVCACHE / SGLANG_AITER_KV_CACHE_LAYOUT)")
    if pool.v_head_dim != pool.head_dim:
        raise KVTCStartupError(f"the compressed KV tier needs equal key/value head dims, the pool has "
                               f"{pool.head_dim}/{pool.v_head_dim}")

    if options.capturing:
        return None
    model_config = ctx.model_config
    geometry = _model_geometry(model_config)
    if pool.layer_num != geometry.num_layers:
        raise KVTCStartupError(f"the KV pool of this rank holds {pool.layer_num} of {geometry.num_layers} layers; "
                               "the compressed KV tier needs all layers on every rank")
    tp = attention_tp(ctx.server_args)
    if geometry.kv_heads_per_rank(tp) != pool.head_num:
        # The pool is the ground truth for what the codec reads; describe the model by it.
        geometry = ModelGeometry(name=geometry.name, num_layers=geometry.num_layers,
                                 num_kv_heads=pool.head_num * tp, head_dim=geometry.head_dim,
                                 rope_theta=geometry.rope_theta, rope_style=geometry.rope_style)
    live_rope = compat.rope_of_model(getattr(getattr(ctx.tp_worker, "model_runner", None), "model", None))
    tp_rank = int(ctx.tp_rank) % tp
    return validate_calibration_for_model(
        rank_artifact_path(options.calibration, tp, tp_rank), geometry, tp_size=tp, tp_rank=tp_rank, ratio=options.ratio,
        rope_style=live_rope["style"] if live_rope else None, rope_theta=live_rope["theta"] if live_rope else None,
        model_path=model_path)
