"""Models known by name (``--model smollm2-135m``, ``--model qwen2.5-coder-0.5b``) and where their files come from.

A name resolves to the model's GGUF file, which ``smollm2.load_model`` converts once to a cached HF folder; any
other ``--model`` value is taken as a GGUF file or HF folder path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

DEFAULT_MODEL = "smollm2-135m"


def _smollm2() -> Path:
    from kvtc_sglang.models.smollm2 import smollm2_gguf_path

    return smollm2_gguf_path()


def _qwen() -> Path:
    from kvtc_sglang.models.qwen2_5 import qwen_gguf_path

    return qwen_gguf_path()


MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2,
    "qwen2.5-coder-0.5b": _qwen,
}


def model_path(model: str | None) -> Path:
    """The file or folder a ``--model`` value names: a registered name, or a path (default: SmolLM2-135M)."""
    if model is None or model in MODELS:
        return MODELS[model or DEFAULT_MODEL]()
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"--model {model!r} is neither a known model ({', '.join(MODELS)}) nor an existing path")
    return path


def model_label(model: str | None) -> str:
    """The name rows and artifact folders use: the registered name, or the path's stem."""
    if model is None or model in MODELS:
        return model or DEFAULT_MODEL
    return Path(model).stem
