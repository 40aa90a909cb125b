"""Startup integrity: the card's model identity against the served model, the whole artifact verified in the
launcher, and the memory the tier needs besides the pool (host spill, blob cap).

Models: two tiny random Llamas of one architecture (same config, same tokenizer, seeds 0 and 1), saved as folders
SGLang reads; a card is calibrated from model A. Model B is the "same-shape wrong model": every shape check passes,
only its weights differ. The scheduler side sees a stand-in with the layout of SGLang's loaded model (fused
``qkv_proj`` per attention layer, sharded by TP rank as QKVParallelLinear shards it).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import types
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.sglang

from kvtc_sglang import sglang_compat as compat  # noqa: E402
from kvtc_sglang.cache import plugin  # noqa: E402
from kvtc_sglang.cache.options import KVTCOptions  # noqa: E402
from kvtc_sglang.cache.startup_checks import (  # noqa: E402
    CalibrationModelMismatch,
    KVTCStartupError,
    check_build_context,
    check_host_spill_fits,
    check_host_spill_pinnable,
    check_server_args,
    schedulers_on_this_machine,
)
from kvtc_sglang.codec.artifact import CARD_NAME, TENSORS_NAME  # noqa: E402
from kvtc_sglang.codec.calibrate import CalibrationSettings  # noqa: E402
from kvtc_sglang.codec.errors import CalibrationMismatchError  # noqa: E402
from kvtc_sglang.models.calibration import calibrate_model  # noqa: E402
from kvtc_sglang.testing.tiny_models import (  # noqa: E402
    WORDS,
    Fp8LinearMethod,
    save_tiny_model,
    sglang_like_model,
    tiny_llama,
    tiny_llama_config,
    tiny_tokenizer,
)

L, H, D = 2, 2, 16


@pytest.fixture(scope="module")
def registered():
    plugin.register()
    compat.HookRegistry.apply_hooks()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Models A and B (folders), card A (TP 1) and card A at TP 2, calibrated on random words."""
    base = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer()
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    corpus = base / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text(" ".join(rng.choice(WORDS) for _ in range(2000)))
    settings = CalibrationSettings(seq_len=64, max_tokens=512, dp_samples=128, ratios=(4, 8), progress=False)
    ns = types.SimpleNamespace(a=a, b=b, tok=tok, base=base,
                               dir_a=save_tiny_model(a, tok, base / "model_a"),
                               dir_b=save_tiny_model(b, tok, base / "model_b"))
    calibrate_model(a, tok, [corpus], settings, base / "card_a", model_name=str(ns.dir_a), weighting="none")
    calibrate_model(a, tok, [corpus], settings, base / "card_a_tp2", model_name=str(ns.dir_a), tp_size=2,
                    weighting="none")
    ns.card_a, ns.card_a_tp2 = base / "card_a", base / "card_a_tp2"
    return ns


def server_args(model_dir: Path, card: Path, *argv: str):
    parser = argparse.ArgumentParser()
    compat.ServerArgs.add_cli_args(parser)
    args = parser.parse_args(["--model-path", str(model_dir), "--device", "cpu", "--kv-compress", "kvtc",
                              "--kvtc-calibration", str(card), "--kvtc-ratio", "8", *argv])
    return compat.ServerArgs.from_cli_args(args)


def build_context(sa, model, *, tp_rank: int = 0, heads: int = H, page_size: int = 1):
    from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator, TokenToKVPoolAllocator

    pool = compat.MHATokenToKVPool(size=64, page_size=page_size, dtype=torch.bfloat16, head_num=heads, head_dim=D,
                                   layer_num=L, device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    if page_size == 1:
        allocator = TokenToKVPoolAllocator(size=64, dtype=torch.bfloat16, device="cpu", kvcache=pool,
                                           need_sort=False)
    else:
        allocator = PagedTokenToKVPoolAllocator(size=64, page_size=page_size, dtype=torch.bfloat16, device="cpu",
                                                kvcache=pool, need_sort=False)
    params = compat.CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator,
                                    page_size=page_size)
    return compat.TreeCacheBuildContext(
        server_args=sa, params=params, is_hybrid_swa=False, is_hybrid_ssm=False, enable_hierarchical_cache=False,
        disable_radix_cache=False, effective_chunked_prefill_size=None,
        tp_worker=types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model)),
        model_config=sa.model_config if getattr(sa, "model_config", None) is not None else None,
        tp_size=sa.tp_size, tp_rank=tp_rank, tp_group=None)


def scheduler_check(sa, model, **kwargs):
    ctx = build_context(sa, model, **kwargs)
    if ctx.model_config is None:  # no ModelConfig cached on ServerArgs: SGLang's scheduler has one
        from sglang.srt.configs.model_config import ModelConfig

        ctx.model_config = ModelConfig.from_server_args(sa)
    return check_build_context(ctx, KVTCOptions.from_server_args(sa))


def edit_card(directory: Path, edit) -> None:
    card = json.loads((directory / CARD_NAME).read_text())
    edit(card)
    (directory / CARD_NAME).write_text(json.dumps(card))


def copy_artifact(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# The model's identity
# ---------------------------------------------------------------------------------------------------------------------

def test_calibration_records_the_models_identity(tiny):
    card = json.loads((tiny.card_a / CARD_NAME).read_text())
    model = card["model"]
    assert len(model["tokenizer_digest"]) == 16 and len(model["fingerprint"]) == 64
    sig = model["weights_signature"]
    assert sig["first_head"] == 0 and len(sig["k"]) == len(sig["v"]) == H
    for rank in range(2):  # every rank's card records the whole model's heads
        tp_card = json.loads((tiny.card_a_tp2 / f"tp2-rank{rank}" / CARD_NAME).read_text())
        assert tp_card["model"]["weights_signature"] == sig


def test_a_same_shape_card_of_another_model_is_refused_at_startup(registered, tiny):
    """Model B has model A's config and tokenizer (the launcher cannot tell them apart) and other weights: the
    scheduler's weights check refuses card A, naming the command that makes B's card."""
    sa = server_args(tiny.dir_b, tiny.card_a)  # launcher: fingerprint and tokenizer match
    with pytest.raises(CalibrationModelMismatch) as info:
        scheduler_check(sa, sglang_like_model(tiny.b))
    message = str(info.value)
    assert "was made for another model" in message and "weights" in message
    assert f"kvtc-sglang calibrate --model {tiny.dir_b} --out <dir>" in message


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_card_of_the_served_weights_is_accepted_in_any_float_dtype(registered, tiny, dtype):
    sa = server_args(tiny.dir_a, tiny.card_a)
    card = scheduler_check(sa, sglang_like_model(tiny.a, dtype=dtype))
    assert card.plan_key(8) == "8"


def test_each_tensor_parallel_rank_checks_its_own_kv_heads(registered, tiny):
    sa = server_args(tiny.dir_a, tiny.card_a_tp2, "--tp-size", "2")
    for rank in range(2):
        card = scheduler_check(sa, sglang_like_model(tiny.a, tp_size=2, tp_rank=rank), tp_rank=rank, heads=1)
        assert card.tp_rank == rank
    # Rank 1 holding rank 0's heads (or model B's) is not the model its card was made for.
    swapped = sglang_like_model(tiny.a, tp_size=2, tp_rank=0)
    for qkv in (m for m in swapped.modules() if hasattr(m, "num_kv_heads")):
        qkv.tp_rank = 1
    with pytest.raises(CalibrationModelMismatch, match="weights"):
        scheduler_check(sa, swapped, tp_rank=1, heads=1)
    with pytest.raises(CalibrationModelMismatch, match="weights"):
        scheduler_check(sa, sglang_like_model(tiny.b, tp_size=2, tp_rank=1), tp_rank=1, heads=1)


def test_another_architecture_with_the_same_kv_shapes_is_refused_in_the_launcher(registered, tiny, tmp_path):
    """Same L, H, D and RoPE (every shape check passes), another hidden size and vocabulary: the fingerprint of the
    config differs, and the launcher refuses before any model loads."""
    other = tmp_path / "model_c"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(tiny_llama_config(hidden_size=96, vocab_size=100)))
    with pytest.raises(CalibrationModelMismatch, match=r"architecture fingerprint.*hidden_size 96, vocab_size 100") \
            as info:
        server_args(other, tiny.card_a)
    assert f"kvtc-sglang calibrate --model {other} --out <dir>" in str(info.value)


def test_another_tokenizer_is_refused_in_the_launcher(registered, tiny, tmp_path):
    shuffled = list(WORDS)
    random.Random(3).shuffle(shuffled)
    folder = save_tiny_model(tiny.a, tiny_tokenizer(tuple(shuffled)), tmp_path / "model_a_other_tokenizer")
    with pytest.raises(CalibrationModelMismatch, match="tokenizer: the card's tokenizer digest is"):
        server_args(folder, tiny.card_a)


def test_fields_that_cannot_be_compared_are_logged_with_the_reason(registered, tiny, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="kvtc_sglang.cache.startup_checks")
    # A folder without tokenizer files: the tokenizer cannot be loaded here.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny.dir_a / "config.json").read_text())
    sa = server_args(bare, tiny.card_a)
    assert "tokenizer of calibration card" in caplog.text and "cannot be loaded here" in caplog.text
    caplog.clear()
    # Dummy weights: random, nothing to compare.
    sa = server_args(tiny.dir_b, tiny.card_a, "--load-format", "dummy")
    scheduler_check(sa, sglang_like_model(tiny.b))
    assert "weights of calibration card" in caplog.text and "--load-format dummy" in caplog.text
    caplog.clear()
    # Quantized projection weights.
    quantized = sglang_like_model(tiny.b)
    for qkv in (m for m in quantized.modules() if hasattr(m, "num_kv_heads")):
        qkv.quant_method = Fp8LinearMethod()
    scheduler_check(server_args(tiny.dir_b, tiny.card_a), quantized)
    assert "quantized (Fp8LinearMethod" in caplog.text
    caplog.clear()
    # A card without the fields (an older card, or one made from captured KV).
    old = copy_artifact(tiny.card_a, tmp_path / "old_card")
    edit_card(old, lambda c: [c["model"].pop(k) for k in ("tokenizer_digest", "weights_signature")])
    sa = server_args(tiny.dir_b, old)
    scheduler_check(sa, sglang_like_model(tiny.b))
    assert "records no tokenizer digest" in caplog.text and "has no weights_signature" in caplog.text
    kvtc_lines = [r.getMessage() for r in caplog.records if r.name == "kvtc_sglang.cache.startup_checks"]
    assert len(kvtc_lines) == 2  # one line per field not compared
    assert all("not compared with the served model" in line for line in kvtc_lines)


def test_a_capture_records_the_weights_signature_for_calibration_from_dumps(registered, tiny, tmp_path):
    from kvtc_sglang.cache.capture import write_weights_identity
    from kvtc_sglang.models.calibration import _dump_identity

    sa = server_args(tiny.dir_a, tiny.card_a)
    rank_dir = tmp_path / "tp1-rank0"
    rank_dir.mkdir()
    write_weights_identity(build_context(sa, sglang_like_model(tiny.a, dtype=torch.bfloat16)), rank_dir)
    facts = _dump_identity(rank_dir, tiny.dir_a)
    card = json.loads((tiny.card_a / CARD_NAME).read_text())["model"]
    assert facts["tokenizer_digest"] == card["tokenizer_digest"]
    from kvtc_sglang.models.identity import signature_difference

    assert signature_difference(card["weights_signature"], facts["weights_signature"]) < 0.01


# ---------------------------------------------------------------------------------------------------------------------
# The whole artifact, in the launcher
# ---------------------------------------------------------------------------------------------------------------------

def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_launcher_refuses_a_corrupted_tensor_file_of_any_rank(registered, tiny, tmp_path):
    art = copy_artifact(tiny.card_a_tp2, tmp_path / "art")
    _flip_byte(art / "tp2-rank1" / TENSORS_NAME, 1000)
    with pytest.raises(CalibrationMismatchError, match=r"tp2-rank1/tensors.pt do not match the card's sha256"):
        server_args(tiny.dir_a, art, "--tp-size", "2")
    path = art / "tp2-rank0" / TENSORS_NAME
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CalibrationMismatchError, match=r"tp2-rank0/tensors.pt hold \d+ bytes, the card records"):
        server_args(tiny.dir_a, art, "--tp-size", "2")


def test_launcher_refuses_non_finite_tensors(registered, tiny, tmp_path):
    import hashlib

    art = copy_artifact(tiny.card_a, tmp_path / "art")
    t = torch.load(art / TENSORS_NAME, weights_only=True)
    t["k.0.basis"][5, 0] = float("nan")
    torch.save(t, art / TENSORS_NAME)
    data = (art / TENSORS_NAME).read_bytes()
    edit_card(art, lambda c: c["tensors"].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data)))
    with pytest.raises(CalibrationMismatchError, match="k block 0 basis holds 1 NaN/Inf values"):
        server_args(tiny.dir_a, art)


def test_launcher_refuses_a_hand_edited_card_with_a_typed_error(registered, tiny, tmp_path):
    art = copy_artifact(tiny.card_a, tmp_path / "art")
    edit_card(art, lambda c: c["kinds"]["v"]["blocks"][0].pop("rank"))
    with pytest.raises(CalibrationMismatchError, match=r"kinds.v.blocks\[0\].rank=None .*kvtc-sglang calibrate"):
        server_args(tiny.dir_a, art)


# ---------------------------------------------------------------------------------------------------------------------
# Host spill and the blob cap
# ---------------------------------------------------------------------------------------------------------------------

def test_host_spill_larger_than_the_available_memory_is_refused(registered, tiny):
    with pytest.raises(KVTCStartupError, match=r"--kvtc-host-spill 1000TiB .*more than the \d+ bytes this machine"):
        server_args(tiny.dir_a, tiny.card_a, "--kvtc-host-spill", "1000TiB")
    options = KVTCOptions(kv_compress="kvtc", host_spill="3GiB")
    four = types.SimpleNamespace(tp_size=4, pp_size=1, dp_size=1, nnodes=1)
    assert schedulers_on_this_machine(four) == 4
    check_host_spill_fits(options, four, available=13 << 30)
    with pytest.raises(KVTCStartupError, match="for each of the 4 scheduler processes on this machine"):
        check_host_spill_fits(options, four, available=11 << 30)
    check_host_spill_fits(KVTCOptions(kv_compress="kvtc"), four, available=0)  # no spill, nothing to check


def test_pinned_memory_failure_is_a_startup_error(tiny):
    options = KVTCOptions(kv_compress="kvtc", host_spill="1GiB")
    with pytest.raises(KVTCStartupError, match=r"pinning 67108864 bytes failed .*ulimit -l.*--kvtc-host-spill 0"):
        check_host_spill_pinnable(options, cuda=True)  # no NVIDIA driver here: torch cannot pin
    asked = []
    check_host_spill_pinnable(options, cuda=True, pin=asked.append)
    assert asked == [64 << 20]
    check_host_spill_pinnable(options, cuda=False, pin=lambda n: 1 / 0)  # no CUDA: nothing is pinned


@pytest.mark.parametrize("page_size, budget, refused", [
    (1, "100", True),                # one slot = 2 x 2 layers x 2 heads x 16 x 2 bytes = 256 bytes
    (1, "256", False),
    (16, "4000", True),              # one page of 16 slots = 4096 bytes
    (16, "4096", False),
    (16, "0.01", True),              # 1 % of a 64-slot pool = 163 bytes
    (16, "0.5", False),
])
def test_a_blob_cap_smaller_than_one_page_is_refused(registered, tiny, page_size, budget, refused):
    sa = server_args(tiny.dir_a, tiny.card_a, "--kvtc-store-budget", budget, "--page-size", str(page_size))
    model = sglang_like_model(tiny.a)
    if refused:
        with pytest.raises(KVTCStartupError, match=r"less than one page .*compression would silently be off"):
            scheduler_check(sa, model, page_size=page_size)
    else:
        scheduler_check(sa, model, page_size=page_size)


def test_launcher_checks_return_the_first_ranks_card(registered, tiny):
    sa = server_args(tiny.dir_a, tiny.card_a_tp2, "--tp-size", "2")
    card = check_server_args(sa, KVTCOptions.from_server_args(sa))
    assert (card.tp_size, card.tp_rank) == (2, 0)
