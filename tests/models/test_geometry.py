"""models/geometry.py: the one reader of a model's KV geometry (stdlib only)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvtc_sglang.codec.defaults import DEFAULT_ROPE_THETA
from kvtc_sglang.models.geometry import ModelConfigError, ModelGeometry, geometry_from_dict, model_geometry

LLAMA = {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
         "hidden_size": 4096, "rope_theta": 500000.0, "_name_or_path": "llama"}


def test_defaults_follow_transformers():
    g = geometry_from_dict({"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 64})
    assert g.kv_shape == (2, 4, 16)  # KV heads default to the attention heads, head_dim to hidden / heads
    assert g.rope_theta == DEFAULT_ROPE_THETA and g.rope_style is None
    assert geometry_from_dict({**LLAMA, "num_key_value_heads": None}).num_kv_heads == 32
    assert geometry_from_dict({**LLAMA, "head_dim": 128}).head_dim == 128


def test_sources_agree(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    from_dir, from_file, from_dict = (model_geometry(tmp_path), model_geometry(tmp_path / "config.json"),
                                      model_geometry(LLAMA))
    assert from_dir.kv_shape == from_file.kv_shape == from_dict.kv_shape == (32, 8, 128)
    assert from_dict.rope_theta == 500000.0 and from_dict.name == "llama"
    assert model_geometry(from_dict) is from_dict
    assert from_dict.kv_heads_per_rank(2) == 4 and from_dict.kv_heads_per_rank(16) == 1


def test_multimodal_configs_read_their_text_part_and_transformers5_rope():
    g = model_geometry({"model_type": "vlm", "text_config": {**LLAMA, "rope_parameters": {"rope_theta": 1e6}}})
    assert g.kv_shape == (32, 8, 128) and g.rope_theta == 1e6
    assert model_geometry({**LLAMA, "rope_is_neox_style": False}).rope_style == "gptj"


def test_a_transformers_config_reads_like_its_dict():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**{k: v for k, v in LLAMA.items() if not k.startswith("_")})
    assert model_geometry(config).kv_shape == (32, 8, 128)


def test_unreadable_configs_raise_model_config_error(tmp_path):
    with pytest.raises(ModelConfigError, match="no config.json"):
        model_geometry(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ModelConfigError, match="cannot read"):
        model_geometry(tmp_path)
    with pytest.raises(ModelConfigError, match="lacks num_hidden_layers"):
        geometry_from_dict({"num_attention_heads": 4, "hidden_size": 64})
    with pytest.raises(TypeError):
        model_geometry(3)
    assert isinstance(ModelGeometry("m", 1, 1, 1), ModelGeometry)


def test_light_modules_do_not_import_torch():
    code = ("import sys; import kvtc_sglang.models.geometry, kvtc_sglang.cache.options, kvtc_sglang.codec.defaults; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
