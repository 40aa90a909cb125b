"""The SGLang plugin: entry point, CLI flags, ServerArgs carriage, startup checks, factory, memory equalization.

ServerArgs is built on this CPU-only machine with ``--device cpu`` (the narrowest switch: sglang 0.5.17's
``__post_init__`` otherwise probes for an accelerator and fails), from a temporary model folder holding only a
Llama-style ``config.json`` (SmolLM2-135M geometry: 30 layers, 3 KV heads, head_dim 64).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytestmark = pytest.mark.sglang

from kvtc_sglang import sglang_compat as compat  # noqa: E402  (imports sglang lazily)

import torch  # noqa: E402

from kvtc_sglang.cache import plugin  # noqa: E402
from kvtc_sglang.cache.options import KVTCOptions, is_fraction, parse_bytes  # noqa: E402
from kvtc_sglang.cache.startup_checks import (  # noqa: E402
    CalibrationModelMismatch,
    KVTCStartupError,
    check_build_context,
    check_server_args,
    require_calibration,
    validate_calibration_for_model,
)
from kvtc_sglang.codec.artifact import rank_artifact_path, read_card_summary  # noqa: E402
from kvtc_sglang.codec.errors import CalibrationCardError  # noqa: E402
from kvtc_sglang.models.geometry import model_geometry  # noqa: E402

FLAGS = ["--kv-compress", "--kvtc-calibration", "--kvtc-ratio", "--kvtc-store-budget", "--kvtc-host-spill",
         "--kvtc-sink-tokens", "--kvtc-window-tokens", "--kvtc-entropy", "--kvtc-min-compress-tokens"]
MODEL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
         "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30,
         "head_dim": 64, "rope_theta": 100000.0, "max_position_embeddings": 8192, "vocab_size": 49152,
         "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": True}


def make_card(directory: Path, **model_overrides) -> Path:
    """A real (small) artifact in ``directory`` for the test model (30 layers, 3 KV heads, head_dim 64, plans
    8/16/32/64), with the card's model facts (and tp_size / tp_rank) overridden."""
    from kvtc_sglang.testing.synthetic import save_synthetic_card

    model = {"fingerprint": "test", "num_layers": 30, "num_kv_heads": 3, "head_dim": 64,
             "rope": {"theta": 100000.0, "style": "neox"}}
    top = {k: model_overrides.pop(k) for k in ("tp_size", "tp_rank") if k in model_overrides}
    model.update(model_overrides)
    return save_synthetic_card(directory, num_layers=model["num_layers"], num_kv_heads=model["num_kv_heads"],
                               head_dim=model["head_dim"], model=model, **top)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model")
    (path / "config.json").write_text(json.dumps(MODEL))
    return path


@pytest.fixture(scope="module")
def card_dir(tmp_path_factory) -> Path:
    return make_card(tmp_path_factory.mktemp("card"))


@pytest.fixture(scope="module")
def registered():
    """The plugin registered and its hooks applied, as load_plugins() does."""
    plugin.register()
    compat.HookRegistry.apply_hooks()
    return compat.ServerArgs


def build_server_args(model_dir: Path, *argv: str):
    """Parse argv with sglang's own parser, then ServerArgs.from_cli_args (what prepare_server_args does)."""
    parser = argparse.ArgumentParser(prog="sglang serve")
    compat.ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", str(model_dir), "--device", "cpu", *argv])
    return compat.ServerArgs.from_cli_args(args)


# ---------------------------------------------------------------------------------------------------------------------
# Entry point and CLI
# ---------------------------------------------------------------------------------------------------------------------

def test_entry_point_resolves_to_register():
    eps = [ep for ep in importlib.metadata.entry_points(group="sglang.srt.plugins") if ep.name == "kvtc"]
    assert len(eps) == 1, "install the project: pip install --no-deps -e ."
    assert eps[0].value == "kvtc_sglang.cache.plugin:register"
    assert eps[0].load() is plugin.register


def test_launch_server_help_lists_every_flag_in_a_group():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in FLAGS:
        assert flag in out.stdout, flag
    assert plugin.CLI_GROUP_TITLE in out.stdout


SPAWN_SCRIPT = """
import multiprocessing, sys


def scheduler(server_args, queue):
    # What sglang's run_scheduler_process does first: load plugins, then use the pickled ServerArgs.
    from sglang.srt.plugins import load_plugins
    from sglang.srt.mem_cache.registry import get_radix_cache_factory
    from kvtc_sglang.cache.options import KVTCOptions

    load_plugins()
    factory = get_radix_cache_factory(server_args.radix_cache_backend)
    queue.put((getattr(factory, "__qualname__", None), KVTCOptions.from_server_args(server_args)))


if __name__ == "__main__":
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()  # what launch_server does before parsing
    server_args = prepare_server_args(sys.argv[1:])
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=scheduler, args=(server_args, queue))
    process.start()
    print(repr(queue.get(timeout=240)))
    process.join()
"""


def test_launcher_flags_reach_a_spawned_scheduler_process(model_dir, card_dir, tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(SPAWN_SCRIPT)
    out = subprocess.run([sys.executable, str(script), "--model-path", str(model_dir), "--device", "cpu",
                          "--kv-compress", "kvtc", "--kvtc-calibration", str(card_dir), "--kvtc-ratio", "32",
                          "--kvtc-window-tokens", "256"], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    expected = KVTCOptions(kv_compress="kvtc", calibration=str(card_dir), ratio=32.0, window_tokens=256)
    assert out.stdout.strip().splitlines()[-1] == repr(("build_tree_cache", expected))


def test_register_twice_is_a_no_op(registered):
    plugin.register()
    plugin.register()
    assert compat.get_radix_cache_factory("kvtc") is plugin.build_tree_cache
    for target, hook in ((compat.TARGET_ADD_CLI_ARGS, plugin._add_cli_args_hook),
                         (compat.TARGET_FROM_CLI_ARGS, plugin._from_cli_args_hook),
                         (compat.TARGET_RUN_BATCH, plugin._after_run_batch_hook),
                         (compat.TARGET_FORM_PREFILL_BATCH, plugin._before_prefill_batch_hook),
                         (compat.TARGET_FORM_PREFILL_BATCH, plugin._after_prefill_batch_hook)):
        hooks = [h for _t, h, _s in compat.HookRegistry._hooks[target] if h is hook]
        assert len(hooks) == 1, target


def test_backend_name_claimed_by_someone_else_is_refused(monkeypatch):
    from sglang.srt.mem_cache import registry

    monkeypatch.setitem(registry._RADIX_CACHE_REGISTRY, "kvtc", lambda ctx: None)
    with pytest.raises(RuntimeError, match="already registered"):
        plugin.register()


def test_add_cli_flags_skips_a_parser_that_has_them():
    parser = argparse.ArgumentParser()
    plugin.add_cli_flags(parser)
    plugin.add_cli_flags(parser)  # a patched ServerArgs already declares --kv-compress: no duplicate-flag error
    args = parser.parse_args([])
    assert KVTCOptions.from_server_args(args) == KVTCOptions()


# ---------------------------------------------------------------------------------------------------------------------
# ServerArgs carriage
# ---------------------------------------------------------------------------------------------------------------------

def test_cli_selects_backend_and_carries_options(registered, model_dir, card_dir):
    sa = build_server_args(model_dir, "--kv-compress", "kvtc", "--kvtc-calibration", str(card_dir),
                           "--kvtc-ratio", "8", "--kvtc-store-budget", "1GiB", "--kvtc-host-spill", "64MiB",
                           "--kvtc-sink-tokens", "8", "--kvtc-window-tokens", "64", "--kvtc-entropy", "deflate",
                           "--kvtc-min-compress-tokens", "512")
    assert sa.radix_cache_backend == "kvtc"
    expected = KVTCOptions(kv_compress="kvtc", calibration=str(card_dir), ratio=8.0, store_budget="1GiB",
                           host_spill="64MiB", sink_tokens=8, window_tokens=64, entropy="deflate",
                           min_compress_tokens=512)
    assert KVTCOptions.from_server_args(sa) == expected
    # Pickled to the scheduler processes: the plain attributes travel in __dict__.
    clone = pickle.loads(pickle.dumps(sa))
    assert clone.radix_cache_backend == "kvtc"
    assert KVTCOptions.from_server_args(clone) == expected


def test_cli_without_kv_compress_leaves_server_args_alone(registered, model_dir):
    sa = build_server_args(model_dir)
    assert sa.radix_cache_backend is None
    assert not hasattr(sa, "kv_compress")
    assert not KVTCOptions.from_server_args(sa).enabled


def test_missing_calibration_names_the_calibrate_command(registered, model_dir, tmp_path):
    with pytest.raises(CalibrationCardError, match=r"kvtc-sglang calibrate --model .* --out <dir>"):
        build_server_args(model_dir, "--kv-compress", "kvtc")
    with pytest.raises(CalibrationCardError, match=r"kvtc-sglang calibrate --model"):
        build_server_args(model_dir, "--kv-compress", "kvtc", "--kvtc-calibration", str(tmp_path / "nowhere"))


def test_unreadable_card_names_the_calibrate_command(registered, model_dir, tmp_path):
    (tmp_path / "card.json").write_text("{not json")
    with pytest.raises(CalibrationCardError, match="not valid JSON.*kvtc-sglang calibrate"):
        build_server_args(model_dir, "--kv-compress", "kvtc", "--kvtc-calibration", str(tmp_path))


@pytest.mark.parametrize("argv, fix", [
    (["--disable-radix-cache"], "remove --disable-radix-cache"),
    (["--enable-hierarchical-cache"], "--enable-hierarchical-cache"),
    (["--radix-cache-backend", "flexkv"], "--radix-cache-backend flexkv"),
    (["--enable-lmcache"], "--enable-lmcache"),
    (["--speculative-algorithm", "EAGLE"], "speculative"),
    (["--kv-cache-dtype", "fp4_e2m1"], "--kv-cache-dtype fp4_e2m1"),
    (["--page-size", "3"], "--page-size 1 or a power of two"),
    (["--kvtc-window-tokens", "-1"], "--kvtc-window-tokens must be >= 0"),
    (["--kvtc-store-budget", "1.5"], "must be in \\(0, 1\\)"),
])
def test_conflicting_flags_fail_at_startup_naming_the_fix(registered, model_dir, card_dir, argv, fix):
    with pytest.raises(ValueError, match=fix):
        build_server_args(model_dir, "--kv-compress", "kvtc", "--kvtc-calibration", str(card_dir), *argv)


def test_page_size_power_of_two_is_accepted(registered, model_dir, card_dir):
    sa = build_server_args(model_dir, "--kv-compress", "kvtc", "--kvtc-calibration", str(card_dir),
                           "--page-size", "16")
    assert sa.page_size == 16 and sa.radix_cache_backend == "kvtc"


def test_mismatched_card_fails_at_startup(registered, model_dir, tmp_path):
    bad = make_card(tmp_path / "card", num_kv_heads=4)
    with pytest.raises(CalibrationModelMismatch, match=r"num_kv_heads per TP rank is 4 in the card but 3") as info:
        build_server_args(model_dir, "--kv-compress", "kvtc", "--kvtc-calibration", str(bad))
    assert f"kvtc-sglang calibrate --model {model_dir}" in str(info.value)


def test_ratio_without_a_plan_fails_at_startup(registered, model_dir, card_dir):
    with pytest.raises(CalibrationModelMismatch, match=r"--kvtc-ratio 12 has no bit plan .*plans: 8, 16, 32, 64"):
        build_server_args(model_dir, "--kv-compress", "kvtc", "--kvtc-calibration", str(card_dir),
                          "--kvtc-ratio", "12")


# ---------------------------------------------------------------------------------------------------------------------
# Calibration card vs model
# ---------------------------------------------------------------------------------------------------------------------

def test_matching_card_validates_from_dir_card_file_dict_and_model_config(model_dir, card_dir):
    card = validate_calibration_for_model(card_dir, model_dir, ratio=16)
    assert (card.num_layers, card.num_kv_heads_per_rank, card.head_dim) == (30, 3, 64)
    assert card.plan_key(16) == "16"
    validate_calibration_for_model(card_dir / "card.json", model_dir / "config.json")
    validate_calibration_for_model(card_dir, dict(MODEL))
    from transformers import LlamaConfig

    validate_calibration_for_model(card_dir, LlamaConfig(**{k: v for k, v in MODEL.items() if k != "architectures"}))


@pytest.mark.parametrize("override, what", [
    ({"num_layers": 24}, "num_layers is 24 in the card but 30"),
    ({"num_kv_heads": 4}, "num_kv_heads per TP rank is 4 in the card but 3"),
    ({"head_dim": 128}, "head_dim is 128 in the card but 64"),
    ({"rope": {"theta": 10000.0, "style": "neox"}}, "RoPE theta is 10000.0 in the card but 100000.0"),
    ({"tp_size": 2, "tp_rank": 1}, "tp_size \\(KV-head shards\\) is 2 in the card but 1"),
])
def test_mismatched_card_names_both_values_and_the_fix(model_dir, tmp_path, override, what):
    bad = make_card(tmp_path / "card", **override)
    with pytest.raises(CalibrationModelMismatch, match=what) as info:
        validate_calibration_for_model(bad, model_dir)
    assert "kvtc-sglang calibrate --model" in str(info.value)


def test_rope_style_from_the_loaded_model_is_compared(model_dir, card_dir):
    with pytest.raises(CalibrationModelMismatch, match="RoPE style is neox in the card but gptj"):
        validate_calibration_for_model(card_dir, model_dir, rope_style="gptj")


def test_tensor_parallel_cards_compare_heads_per_rank(tmp_path):
    config = dict(MODEL, num_key_value_heads=8, num_attention_heads=32)
    card = make_card(tmp_path / "tp2", num_kv_heads=8, tp_size=2, tp_rank=1)
    assert validate_calibration_for_model(card, config, tp_size=2, tp_rank=1).num_kv_heads_per_rank == 4
    with pytest.raises(CalibrationModelMismatch, match="tp_rank is 1 in the card but 0"):
        validate_calibration_for_model(card, config, tp_size=2, tp_rank=0)


def test_each_tensor_parallel_rank_reads_its_own_folder(tmp_path, registered):
    """One --kvtc-calibration for all ranks: rank r loads DIR/tp2-rank{r} (what calibrate --tp-size 2 writes)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(dict(MODEL, num_key_value_heads=6, num_attention_heads=12)))
    art = tmp_path / "art"
    for rank in range(2):
        make_card(art / f"tp2-rank{rank}", num_kv_heads=6, tp_size=2, tp_rank=rank)
    assert rank_artifact_path(art, 2, 1) == art / "tp2-rank1"
    assert rank_artifact_path(art, 1, 0) == art  # single-rank artifacts are the folder itself
    options = KVTCOptions(kv_compress="kvtc", calibration=str(art))
    assert require_calibration(options, tp_size=2) == [art / "tp2-rank0" / "card.json", art / "tp2-rank1" / "card.json"]
    server_args = build_server_args(model, "--tp-size", "2", "--kv-compress", "kvtc", "--kvtc-calibration", str(art))
    assert check_server_args(server_args, options).tp_rank == 0
    for rank in range(2):  # the pool of build_context holds 3 heads: 6 KV heads over 2 ranks
        card = check_build_context(build_context(server_args, tp_rank=rank), options)
        assert (card.tp_size, card.tp_rank, card.path.parent.name) == (2, rank, f"tp2-rank{rank}")
    # A rank folder given directly is checked against the rank that loads it.
    with pytest.raises(CalibrationModelMismatch, match="tp_rank is 1 in the card but 0"):
        validate_calibration_for_model(rank_artifact_path(art / "tp2-rank1", 2, 0), model, tp_size=2, tp_rank=0)
    # A missing rank is refused at launch, naming the rank and the command that makes all of them.
    (art / "tp2-rank1" / "card.json").unlink()
    with pytest.raises(CalibrationCardError, match=r"TP rank 1 of 2 .*--tp-size 2"):
        require_calibration(options, tp_size=2)
    with pytest.raises(CalibrationCardError, match="TP rank 1 of 2"):
        build_server_args(model, "--tp-size", "2", "--kv-compress", "kvtc", "--kvtc-calibration", str(art))


@pytest.mark.parametrize("card_text, what", [
    ("[]", "not a JSON object"),
    ('{"model": {}, "plans": {"16": {}}, "format_version": 1}', "model.num_layers"),
    ('{"model": {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8}, "format_version": 1}', "plans"),
    ('{"model": {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8}, "plans": {"fast": {}}, "format_version": 1}',
     "not a compression ratio"),
    ('{"model": {"num_layers": 1, "num_kv_heads": 1, "head_dim": 8, "rope": {"style": "x"}}, "plans": {"8": {}}, '
     '"format_version": 1}', "rope.style"),
])
def test_malformed_cards_are_rejected_with_the_fix(tmp_path, card_text, what):
    (tmp_path / "card.json").write_text(card_text)
    with pytest.raises(CalibrationCardError, match=what) as info:
        read_card_summary(tmp_path)
    assert "kvtc-sglang calibrate" in str(info.value)


def test_model_geometry_reads_transformers5_rope_parameters():
    config = {k: v for k, v in MODEL.items() if k != "rope_theta"}
    config["rope_parameters"] = {"rope_theta": 500000.0, "rope_type": "default"}
    geometry = model_geometry(config)
    assert geometry.rope_theta == 500000.0 and geometry.head_dim == 64 and geometry.num_kv_heads == 3


# ---------------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------------

def test_option_defaults_are_valid():
    options = KVTCOptions().validate()
    assert (options.kv_compress, options.ratio, options.store_budget, options.host_spill) == ("none", 16.0, None, "0")
    assert options.store_cap_bytes(1 << 30) is None
    assert (options.stats_interval_s, options.verify, options.compress_ahead_watermark) == (30.0, "device", 0.75)
    assert (options.sink_tokens, options.window_tokens, options.entropy, options.min_compress_tokens) == (
        4, 0, "auto", 32)
    assert (options.capture_dir, options.capture_tokens, options.capturing) == (None, 65536, False)


def test_from_server_args_coerces_python_values():
    sa = types.SimpleNamespace(kv_compress="KVTC", kvtc_ratio=32, kvtc_store_budget=1 << 30, kvtc_host_spill=0,
                               kvtc_sink_tokens=2.0)
    options = KVTCOptions.from_server_args(sa).validate()
    assert (options.kv_compress, options.ratio, options.store_budget, options.host_spill, options.sink_tokens) == (
        "kvtc", 32.0, str(1 << 30), "0", 2)
    assert KVTCOptions.from_values(store_budget=0.25).store_budget == "0.25"
    with pytest.raises(ValueError, match="--kvtc-sink-tokens"):
        KVTCOptions.from_values(sink_tokens=2.5)
    with pytest.raises(ValueError, match="unknown KVTC option"):
        KVTCOptions.from_values(bogus=1)


@pytest.mark.parametrize("fields, message", [
    ({"kv_compress": "zip"}, "--kv-compress must be one of"),
    ({"entropy": "zstd"}, "--kvtc-entropy must be one of"),
    ({"ratio": 0.0}, "--kvtc-ratio must be a positive number"),
    ({"ratio": -16.0}, "--kvtc-ratio must be a positive number"),
    ({"ratio": math.nan}, "--kvtc-ratio must be a positive number"),
    ({"sink_tokens": -1}, "--kvtc-sink-tokens must be >= 0"),
    ({"window_tokens": -5}, "--kvtc-window-tokens must be >= 0"),
    ({"min_compress_tokens": 0}, "--kvtc-min-compress-tokens must be >= 1"),
    ({"store_budget": "1.0"}, "must be in \\(0, 1\\)"),
    ({"store_budget": "0.0"}, "must be in \\(0, 1\\)"),
    ({"store_budget": "0"}, "must be positive"),
    ({"verify": "sometimes"}, "--kvtc-verify must be one of"),
    ({"stats_interval_s": 0.0}, "--kvtc-stats-interval must be a positive"),
    ({"compress_ahead_watermark": 1.5}, "--kvtc-compress-ahead-watermark must be in"),
    ({"compress_ahead_tokens": -1}, "--kvtc-compress-ahead-tokens must be >= 0"),
    ({"store_budget": "-1GiB"}, "is not a size"),
    ({"store_budget": "2 GB/s"}, "is not a size"),
    ({"store_budget": "2GX"}, "unknown unit"),
    ({"host_spill": "0.5"}, "not a fraction"),
    ({"host_spill": "-3"}, "is not a size"),
    ({"calibration": "  "}, "--kvtc-calibration must be a path"),
])
def test_validate_rejects_bad_values_with_the_flag_name(fields, message):
    with pytest.raises(ValueError, match=message):
        KVTCOptions(**fields).validate()


@pytest.mark.parametrize("text, total, expected", [
    ("1073741824", None, 1 << 30),
    ("2GiB", None, 2 << 30),
    ("512MB", None, 512_000_000),
    ("1.5GiB", None, 3 << 29),
    (" 4 KiB ", None, 4096),
    ("7b", None, 7),
    ("0.25", 1000, 250),
    (".5", 999, 499),
])
def test_parse_bytes(text, total, expected):
    assert parse_bytes(text, total) == expected


def test_parse_bytes_needs_the_total_for_a_fraction():
    assert is_fraction("0.25") and not is_fraction("25") and not is_fraction("2.5GiB")
    with pytest.raises(ValueError, match="not known"):
        parse_bytes("0.25")
    with pytest.raises(ValueError, match="not a fraction"):
        parse_bytes("0.25", 100, allow_fraction=False)


# ---------------------------------------------------------------------------------------------------------------------
# The store cap, unsupported pool features, the scheduler hooks
# ---------------------------------------------------------------------------------------------------------------------

def test_store_budget_is_an_optional_cap():
    assert KVTCOptions(store_budget="none").validate().store_cap_bytes(1000) is None
    assert KVTCOptions(store_budget="0.25").validate().store_cap_bytes(1000) == 250
    assert KVTCOptions(store_budget="1KiB").validate().store_cap_bytes() == 1024
    assert not hasattr(plugin, "store_bytes_for") and not hasattr(compat, "TARGET_CONFIG_FROM_BUDGET")


@pytest.mark.parametrize("argv, flag", [
    (["--enable-memory-saver"], "--enable-memory-saver"),
    (["--disaggregation-mode", "decode"], "--disaggregation-mode decode"),
])
def test_features_that_move_pool_memory_are_refused_at_startup(registered, model_dir, card_dir, argv, flag):
    with pytest.raises(KVTCStartupError, match=f"cannot run with {flag}"):
        build_server_args(model_dir, "--kv-compress", "kvtc", "--kvtc-calibration", str(card_dir), *argv)


def test_unified_memory_and_post_capture_sizing_are_refused(monkeypatch):
    args = types.SimpleNamespace(enable_unified_memory=True)
    assert [f for f, _ in compat.unsupported_pool_features(args)] == ["--enable-unified-memory"]
    monkeypatch.setenv("SGLANG_ENABLE_POST_CAPTURE_KV_SIZING", "1")
    flags = [f for f, _ in compat.unsupported_pool_features(types.SimpleNamespace())]
    assert flags == ["SGLANG_ENABLE_POST_CAPTURE_KV_SIZING=1"]
    assert compat.pool_is_post_capture(types.SimpleNamespace(post_capture_active=True))


def test_new_flags_reach_the_options(registered, model_dir, card_dir):
    sa = build_server_args(model_dir, "--kv-compress", "kvtc", "--kvtc-calibration", str(card_dir),
                           "--kvtc-stats-interval", "5", "--kvtc-verify", "always", "--kvtc-store-budget", "2GiB",
                           "--kvtc-compress-ahead-watermark", "0.5")
    options = KVTCOptions.from_server_args(sa)
    assert (options.stats_interval_s, options.verify, options.store_budget, options.compress_ahead_watermark) == (
        5.0, "always", "2GiB", 0.5)


class _HookCache:
    is_kvtc_tier = True

    def __init__(self):
        self.calls = []
        self.transfer = types.SimpleNamespace(cuda=False)

    def step(self):
        self.calls.append("step")

    def start_loading(self, reqs):
        self.calls.append(("start_loading", reqs))
        return 2


def test_scheduler_hooks_drive_a_kvtc_cache_and_leave_others_alone():
    cache = _HookCache()
    sched = types.SimpleNamespace(tree_cache=cache)
    assert plugin._before_prefill_batch_hook(sched, None, None) is None
    batch = types.SimpleNamespace(reqs=["r"], hicache_consumer_index=-1)
    result = (batch, "running")
    assert plugin._after_prefill_batch_hook(result, sched, None, None) is result
    assert batch.hicache_consumer_index == 2 and cache.calls == ["step", ("start_loading", ["r"])]
    assert plugin._after_prefill_batch_hook((None, "running"), sched) == (None, "running")
    assert plugin._after_run_batch_hook("out", sched, batch) == "out"  # CPU: no event to record
    plain = types.SimpleNamespace(tree_cache=object())
    assert plugin._before_prefill_batch_hook(plain) is None
    assert plugin._after_prefill_batch_hook(result, plain) is result


# ---------------------------------------------------------------------------------------------------------------------
# The radix-cache factory
# ---------------------------------------------------------------------------------------------------------------------

def build_context(server_args, pool=None, **overrides):
    """A TreeCacheBuildContext over a small CPU KV pool with the model's geometry."""
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator

    if pool is None:
        pool = compat.MHATokenToKVPool(size=64, page_size=1, dtype=torch.bfloat16, head_num=3, head_dim=64,
                                       layer_num=30, device="cpu", enable_memory_saver=False,
                                       enable_alt_stream=False)
    allocator = TokenToKVPoolAllocator(size=64, dtype=torch.bfloat16, device="cpu", kvcache=pool, need_sort=False)
    params = compat.CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator,
                                    page_size=1)
    fields = dict(server_args=server_args, params=params, is_hybrid_swa=False, is_hybrid_ssm=False,
                  enable_hierarchical_cache=False, disable_radix_cache=False, effective_chunked_prefill_size=None,
                  tp_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=None)),
                  model_config=server_args.model_config, tp_size=1, tp_rank=0, tp_group=None)
    fields.update(overrides)
    return compat.TreeCacheBuildContext(**fields)


@pytest.fixture
def kvtc_server_args(registered, model_dir, card_dir):
    return build_server_args(model_dir, "--kv-compress", "kvtc", "--kvtc-calibration", str(card_dir))


def test_factory_is_reached_through_sglangs_routing(kvtc_server_args, monkeypatch):
    from sglang.srt.mem_cache.registry import create_tree_cache

    from kvtc_sglang.cache import factory

    built = []

    def fake_cache_for_rank(ctx, options):
        built.append((ctx, options))
        return "the cache"

    monkeypatch.setattr(factory, "kvtc_cache_for_rank", fake_cache_for_rank)
    ctx = build_context(kvtc_server_args)
    assert create_tree_cache(ctx) == "the cache"
    assert built == [(ctx, KVTCOptions.from_server_args(kvtc_server_args))]


@pytest.mark.parametrize("override, message", [
    ({"is_hybrid_swa": True}, "sliding-window"),
    ({"is_hybrid_ssm": True}, "Mamba"),
    ({"is_dsa": True}, "DSA"),
    ({"enable_hierarchical_cache": True}, "--enable-hierarchical-cache"),
    ({"disable_radix_cache": True}, "radix cache is disabled"),
])
def test_factory_refuses_unsupported_models_and_caches(kvtc_server_args, override, message):
    with pytest.raises(KVTCStartupError, match=message):
        plugin.build_tree_cache(build_context(kvtc_server_args, **override))


def test_factory_refuses_an_mla_pool(kvtc_server_args):
    mla = compat.MLATokenToKVPool(size=64, page_size=1, dtype=torch.bfloat16, kv_lora_rank=32, qk_rope_head_dim=16,
                                  layer_num=30, device="cpu", enable_memory_saver=False)
    with pytest.raises(KVTCStartupError, match="MLA pool"):
        plugin.build_tree_cache(build_context(kvtc_server_args, pool=mla))


def test_factory_checks_the_card_against_the_live_pool_and_rope(kvtc_server_args):
    card = check_build_context(build_context(kvtc_server_args), KVTCOptions.from_server_args(kvtc_server_args))
    assert card.plan_key(16) == "16"
    wide = compat.MHATokenToKVPool(size=64, page_size=1, dtype=torch.bfloat16, head_num=4, head_dim=64,
                                   layer_num=30, device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    with pytest.raises(CalibrationModelMismatch, match="num_kv_heads per TP rank is 3 in the card but 4"):
        plugin.build_tree_cache(build_context(kvtc_server_args, pool=wide))
    rotary = types.SimpleNamespace(base=100000.0, is_neox_style=False)
    model = types.SimpleNamespace(modules=lambda: iter([object(), rotary]))
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model))
    with pytest.raises(CalibrationModelMismatch, match="RoPE style is neox in the card but gptj"):
        plugin.build_tree_cache(build_context(kvtc_server_args, tp_worker=worker))


# ---------------------------------------------------------------------------------------------------------------------
# sglang_compat
# ---------------------------------------------------------------------------------------------------------------------

def test_every_compat_symbol_resolves():
    for name in compat._SYMBOLS:
        assert getattr(compat, name) is not None, name
    with pytest.raises(AttributeError):
        compat.NotAnSGLangSymbol  # noqa: B018


def test_version_check_accepts_0_5_17_only():
    assert compat.check_sglang_version() == compat.SUPPORTED_SGLANG_VERSION
    with pytest.raises(compat.SGLangVersionError, match=r"supports sglang==0\.5\.17 only, but found sglang 0\.5\.19"):
        compat.check_sglang_version("0.5.19")


def test_version_is_read_from_files_of_a_site_packages_folder(tmp_path):
    assert compat.sglang_version_in(compat.installed_sglang_site_packages()) == compat.SUPPORTED_SGLANG_VERSION
    (tmp_path / "sglang").mkdir()
    assert compat.sglang_version_in(tmp_path) is None
    (tmp_path / "sglang" / "_version.py").write_text(
        "version: str\n__version__: str\n__version__ = version = '0.5.17'\n")
    assert compat.sglang_version_in(tmp_path) == "0.5.17"


def test_kvtc_backend_without_kv_compress_is_refused(registered, model_dir):
    with pytest.raises(KVTCStartupError, match="use --kv-compress kvtc instead"):
        build_server_args(model_dir, "--radix-cache-backend", "kvtc")
