"""Startup checks of the compressed KV tier: option conflicts, the calibration card, and card-vs-model fit.

Run twice: in the launcher process right after ServerArgs is built (``check_server_args``: fails before any GPU
work), and in every scheduler process when the tree cache is built (``check_build_context``: the loaded model and
the real KV pool are known there, so layer/head/head_dim/RoPE are compared against what the pool actually holds).

The card is read by ``codec.artifact.read_card_summary`` (the one card reader) and the model's geometry by
``models.geometry.model_geometry``.

Integrity (see ``models.identity`` for the three identities and why the weights are compared as a numeric sketch):

* launcher, before the model loads: every TP rank's whole artifact is loaded and checked (``verify_artifacts``: the
  card's fields, the tensor file's size and sha256 from the card, the tensors loadable, shaped as the card says and
  finite); the card's architecture fingerprint is compared with the model's config and its tokenizer digest with the
  tokenizer SGLang will load (``check_launcher_identity``); ``--kvtc-host-spill`` is compared with the memory this
  machine has available (``check_host_spill_fits``);
* each scheduler rank, after the model loaded: the fingerprint again (from SGLang's ``hf_config``), and the weights
  signature of the rank's KV heads of layer 0 (``check_served_weights``); a blob cap smaller than one pool page is
  refused and pinned host memory for the spill is probed (``check_store_cap``, ``check_host_spill_pinnable``).

A field that cannot be compared (the card lacks it, the tokenizer cannot be loaded, ``--load-format dummy``,
quantized weights) is logged in one line with the exact reason; a field that differs refuses startup with
``CalibrationModelMismatch`` naming ``kvtc-sglang calibrate --model ... --out ...``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable

from kvtc_sglang.cache.options import SERVER_ARGS_ATTRS, KVTCOptions, parse_bytes
from kvtc_sglang.codec.artifact import (
    CARD_NAME,
    CardSummary,
    calibrate_hint,
    card_model_identity,
    card_path as artifact_card_path,
    load_artifact,
    read_card,
    rank_artifact_path,
    rank_dir_name,
    read_card_summary,
)
from kvtc_sglang.codec.errors import CalibrationCardError, CalibrationMismatchError
from kvtc_sglang.models.geometry import ModelConfigError, ModelGeometry, model_geometry
from kvtc_sglang.models.identity import (
    IdentityCheck,
    architecture_fingerprint,
    compare_weights,
    tokenizer_digest,
    weights_signature,
)

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
    from kvtc_sglang import sglang_compat as compat

    for flag, reason in compat.unsupported_pool_features(server_args):
        raise KVTCStartupError(f"{with_kvtc} keeps compressed blobs inside the KV pool's own slots and cannot run "
                               f"with {flag}: {reason}. Remove {flag} (or drop --kv-compress kvtc)")


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
    verify_artifacts(card_paths, model_path)
    check_launcher_identity(card_paths, server_args, model_source)
    check_host_spill_fits(options, server_args)
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
    if compat.pool_is_post_capture(pool):
        raise KVTCStartupError("the KV pool is VMM-backed and resized after CUDA-graph capture "
                               "(SGLANG_ENABLE_POST_CAPTURE_KV_SIZING): the compressed KV tier keeps blobs in pool "
                               "slots and accounts against the pool size it was built with; unset that variable")
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
    card = validate_calibration_for_model(
        rank_artifact_path(options.calibration, tp, tp_rank), geometry, tp_size=tp, tp_rank=tp_rank, ratio=options.ratio,
        rope_style=live_rope["style"] if live_rope else None, rope_theta=live_rope["theta"] if live_rope else None,
        model_path=model_path)
    check_served_weights(card.path, ctx)
    check_store_cap(options, *pool_page_bytes(pool, params.page_size))
    check_host_spill_pinnable(options)
    return card


# ---------------------------------------------------------------------------------------------------------------------
# Integrity: the whole artifact, and the card's model identity vs the served model
# ---------------------------------------------------------------------------------------------------------------------

def verify_artifacts(card_paths: list[Path], model_path: str | None = None) -> None:
    """Load and check every rank's whole artifact (``codec.artifact.load_artifact``: card fields, tensor file size and
    sha256 from the card, tensors present, shaped and finite); the tensors are dropped again. Raises
    CalibrationCardError / CalibrationMismatchError naming the calibrate command."""
    for path in card_paths:
        load_artifact(path, model_path=model_path)
        logger.info("KVTC: calibration artifact %s verified (tensor file size and sha256 match the card, tensors "
                    "finite)", Path(path).parent if Path(path).name == CARD_NAME else path)


def _hf_config_of(model_source: Any) -> Any:
    """The HF config (dict or PretrainedConfig) behind a model source, or None: SGLang's ModelConfig (``hf_config``),
    a model folder / config.json path, a config dict or object."""
    if model_source is None or isinstance(model_source, ModelGeometry):
        return None
    if hasattr(model_source, "hf_config"):
        return model_source.hf_config
    if isinstance(model_source, (str, Path)):
        path = Path(model_source).expanduser()
        config = path / "config.json" if path.is_dir() else path
        try:
            return json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
    return model_source


def fingerprint_check(card_fingerprint: str | None, model_source: Any) -> IdentityCheck:
    """The card's architecture fingerprint vs the one of ``model_source``'s config."""
    name = "architecture fingerprint"
    if card_fingerprint is None:
        return IdentityCheck.skipped(name, "the card records no architecture fingerprint (64 hex digits)")
    config = _hf_config_of(model_source)
    if config is None:
        return IdentityCheck.skipped(name, "the model's config is not readable here")
    try:
        served = architecture_fingerprint(config)
    except (KeyError, ValueError, TypeError) as exc:
        return IdentityCheck.skipped(name, f"the model's config lacks a fact the fingerprint needs ({exc})")
    facts = ""
    try:
        from kvtc_sglang.codec.rope import hf_config_dict

        d = hf_config_dict(config)
        facts = (f" (the served model: model_type {d.get('model_type')}, hidden_size {d.get('hidden_size')}, "
                 f"vocab_size {d.get('vocab_size')}, {d.get('num_attention_heads')} attention heads)")
    except (ValueError, TypeError, AttributeError):
        pass
    return IdentityCheck(name, served == card_fingerprint,
                         f"the card's architecture fingerprint is {card_fingerprint[:16]}..., the served model's "
                         f"config gives {served[:16]}...: another model type, hidden size, vocabulary size, attention "
                         f"head count or RoPE configuration{facts}")


def tokenizer_check(card_digest: str | None, load_tokenizer: Callable[[], Any]) -> IdentityCheck:
    """The card's tokenizer digest vs the digest of ``load_tokenizer()`` (the tokenizer SGLang serves with)."""
    name = "tokenizer"
    if card_digest is None:
        return IdentityCheck.skipped(name, "the card records no tokenizer digest (made from captured KV without "
                                           "the tokenizer's files, or by an older kvtc-sglang)")
    try:
        tokenizer = load_tokenizer()
    except Exception as exc:  # noqa: BLE001 - any loader failure means "not comparable", SGLang reports its own
        return IdentityCheck.skipped(name, f"the served tokenizer cannot be loaded here ({type(exc).__name__}: "
                                           f"{str(exc)[:200]})")
    if tokenizer is None:
        return IdentityCheck.skipped(name, "the server runs with --skip-tokenizer-init")
    try:
        served = tokenizer_digest(tokenizer)
    except ValueError as exc:
        return IdentityCheck.skipped(name, str(exc))
    return IdentityCheck(name, served == card_digest,
                         f"the card's tokenizer digest is {card_digest}, the served tokenizer's vocabulary gives "
                         f"{served}")


def served_weights_signature(model: Any) -> dict[str, Any] | str:
    """``weights_signature`` of the KV heads this rank holds of layer 0 in a loaded model, or why there is none."""
    from kvtc_sglang import sglang_compat as compat

    weights = compat.layer0_kv_weights(model)
    if isinstance(weights, str):
        return weights
    try:
        return weights_signature(weights["k"], weights["v"], weights["head_dim"], first_head=weights["first_head"])
    except ValueError as exc:
        return f"layer 0's key/value projection weights cannot be sketched ({exc})"


def _enforce(checks: list[IdentityCheck], card_file: Path, model_name: str, model_path: str | None) -> None:
    """Raise CalibrationModelMismatch on the first differing field; log one line per field that was not compared."""
    for check in checks:
        if check.matches is False:
            raise CalibrationModelMismatch(
                f"KVTC calibration card {card_file} was made for another model than {model_name} ({check.field}: "
                f"{check.detail}). A card of another model with the same shapes would silently degrade every "
                f"restored prefix. Make a card for this model with `{calibrate_hint(model_path)}`")
    for check in checks:
        if check.matches is None:
            logger.warning("KVTC: %s of calibration card %s not compared with the served model: %s",
                           check.field, card_file, check.detail)


def check_launcher_identity(card_paths: list[Path], server_args: Any, model_source: Any,
                            load_tokenizer: Callable[[], Any] | None = None) -> list[IdentityCheck]:
    """Launcher side, before the model loads: each rank's card's architecture fingerprint vs the model's config, and
    its tokenizer digest vs the tokenizer SGLang will load (loaded once, only when a card records a digest).

    ``load_tokenizer`` defaults to ``sglang_compat.served_tokenizer(server_args)``. Returns the checks of the last card
    (for tests); raises CalibrationModelMismatch naming the calibrate command when a field differs."""
    from kvtc_sglang import sglang_compat as compat

    model_path = getattr(server_args, "model_path", None)
    loader = load_tokenizer or (lambda: compat.served_tokenizer(server_args))
    cache: dict[str, Any] = {}

    def once() -> Any:
        if "tokenizer" not in cache:
            try:
                cache["tokenizer"] = loader()
            except Exception as exc:  # noqa: BLE001 - reported by tokenizer_check
                cache["tokenizer"] = exc
        if isinstance(cache["tokenizer"], Exception):
            raise cache["tokenizer"]
        return cache["tokenizer"]

    checks: list[IdentityCheck] = []
    for path in card_paths:
        card_file = artifact_card_path(path)
        identity = card_model_identity(read_card(card_file, model_path=model_path), card_file, model_path=model_path)
        if model_source is None:
            fingerprint = IdentityCheck.skipped("architecture fingerprint", "the model's config is not available to "
                                                "the launcher; each scheduler rank compares it after loading")
        else:
            fingerprint = fingerprint_check(identity.fingerprint, model_source)
        checks = [fingerprint, tokenizer_check(identity.tokenizer_digest, once)]
        _enforce(checks, card_file, str(model_path), model_path)
    return checks


def check_served_weights(card_path: str | Path, ctx: Any) -> list[IdentityCheck]:
    """Scheduler side, after the model loaded (``ctx``: TreeCacheBuildContext): the card's architecture fingerprint
    vs SGLang's ``hf_config`` and its weights signature vs the rank's KV heads of layer 0 of the loaded weights.
    ``--load-format dummy`` (random weights) is not compared, with a log line. Raises CalibrationModelMismatch."""
    server_args = ctx.server_args
    model_path = getattr(server_args, "model_path", None)
    card_file = artifact_card_path(card_path)
    identity = card_model_identity(read_card(card_file, model_path=model_path), card_file, model_path=model_path)
    fingerprint = fingerprint_check(identity.fingerprint, ctx.model_config)
    load_format = str(getattr(server_args, "load_format", "auto") or "auto")
    if identity.weights_signature is None:
        live: dict[str, Any] | str = "(not computed)"
    elif load_format == "dummy":
        live = "the server loads random weights (--load-format dummy)"
    else:
        live = served_weights_signature(getattr(getattr(ctx.tp_worker, "model_runner", None), "model", None))
    checks = [fingerprint, compare_weights(identity.weights_signature, live)]
    _enforce(checks, card_file, str(model_path), model_path)
    return checks


# ---------------------------------------------------------------------------------------------------------------------
# Memory the tier needs besides the pool: host spill, blob cap
# ---------------------------------------------------------------------------------------------------------------------

def available_host_memory() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def schedulers_on_this_machine(server_args: Any) -> int:
    """Scheduler processes this machine runs (each holds its own host spill): tp x pp (x dp without DP attention)
    over nnodes."""
    get = lambda name: int(getattr(server_args, name, 1) or 1)  # noqa: E731
    ranks = get("tp_size") * get("pp_size")
    if not getattr(server_args, "enable_dp_attention", False):
        ranks *= get("dp_size")
    return max(1, ranks // get("nnodes"))


def check_host_spill_fits(options: KVTCOptions, server_args: Any, available: int | None = None) -> None:
    """Refuse a ``--kvtc-host-spill`` whose pinned memory, for every scheduler of this machine, exceeds the memory
    available now (``available``: bytes, default ``available_host_memory()``; not checked when unknown)."""
    spill = parse_bytes(options.host_spill, what="--kvtc-host-spill", allow_fraction=False)
    if spill == 0:
        return
    available = available_host_memory() if available is None else available
    if available is None:
        logger.warning("KVTC: --kvtc-host-spill %s is not compared with the machine's memory: /proc/meminfo has no "
                       "MemAvailable", options.host_spill)
        return
    ranks = schedulers_on_this_machine(server_args)
    if spill * ranks > available:
        each = f" for each of the {ranks} scheduler processes on this machine" if ranks > 1 else ""
        raise KVTCStartupError(
            f"--kvtc-host-spill {options.host_spill} ({spill} bytes{each}) needs {spill * ranks} bytes of pinned host "
            f"memory, more than the {available} bytes this machine has available (MemAvailable). Give a smaller "
            f"--kvtc-host-spill, or 0 to drop blobs instead of spilling them")


def _pin_probe(nbytes: int) -> None:
    import torch

    torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


PIN_PROBE_BYTES = 64 << 20


def check_host_spill_pinnable(options: KVTCOptions, *, cuda: bool | None = None,
                              pin: Callable[[int], None] = _pin_probe) -> None:
    """With CUDA and a host spill, pin a probe buffer (``min(spill, 64 MiB)``) now, so that a system that cannot pin
    memory (locked-memory limit, no driver) fails at startup with the flag to change, not at the first spill."""
    spill = parse_bytes(options.host_spill, what="--kvtc-host-spill", allow_fraction=False)
    if spill == 0:
        return
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return
    try:
        pin(min(spill, PIN_PROBE_BYTES))
    except (RuntimeError, MemoryError) as exc:
        raise KVTCStartupError(
            f"--kvtc-host-spill {options.host_spill} needs pinned host memory, but pinning "
            f"{min(spill, PIN_PROBE_BYTES)} bytes failed ({type(exc).__name__}: {str(exc)[:200]}). Raise the locked-memory limit (ulimit -l) or "
            f"give --kvtc-host-spill 0") from exc


def pool_page_bytes(pool: Any, page_size: int) -> tuple[int, int]:
    """``(page_bytes, pool_bytes)`` of an MHATokenToKVPool: one page of slots (all layers, K and V) and the whole
    pool, as the blobs stored in its slots use them."""
    slot = 0
    for buffers in (pool.k_buffer, pool.v_buffer):
        for b in buffers:
            slot += int(b[0].numel()) * int(b.element_size())
    return slot * max(1, int(page_size)), slot * int(pool.size)


def check_store_cap(options: KVTCOptions, page_bytes: int, pool_bytes: int) -> None:
    """Refuse a ``--kvtc-store-budget`` (the cap on the pool memory blobs may hold) smaller than one pool page: no
    blob could ever be stored, which would silently turn compression off."""
    budget = options.store_budget
    if budget is None or str(budget).strip().lower() in ("", "none", "off"):
        return
    cap = parse_bytes(str(budget), pool_bytes, what="--kvtc-store-budget")
    if cap < page_bytes:
        raise KVTCStartupError(
            f"--kvtc-store-budget {budget} allows blobs {cap} bytes of the KV pool, less than one page of it "
            f"({page_bytes} bytes: page size x all layers' K and V rows); no blob could be stored and compression "
            f"would silently be off. Give at least {page_bytes} bytes, a larger fraction, or drop the flag")

