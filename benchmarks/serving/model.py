"""What the suite needs from a model folder's ``config.json`` (stdlib only: the client side never imports torch)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from kvtc_sglang.models.geometry import geometry_from_dict, text_config_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelInfo:
    """Geometry of one model (all TP ranks together)."""

    path: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str  # config dtype string, e.g. "bfloat16", "float32"
    has_tokenizer: bool
    max_context: int | None = None  # max_position_embeddings

    @property
    def label(self) -> str:
        return Path(self.path.rstrip("/")).name or self.path

    @property
    def kv_elements_per_token(self) -> int:
        """K and V elements of one token over all layers and KV heads (TP 1)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


def read_model_info(model_path: str | None) -> ModelInfo | None:
    """Geometry of a local model folder (config.json), or None when there is no such folder.

    Layers, KV heads and head_dim come from the library's one model-config reader (``models.geometry``, stdlib only).
    """
    if not model_path:
        return None
    folder = Path(model_path)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = text_config_dict(json.loads(cfg_path.read_text()))
    geo = geometry_from_dict(cfg, name=str(model_path))
    return ModelInfo(path=str(model_path), num_layers=geo.num_layers, num_kv_heads=geo.num_kv_heads,
                     head_dim=geo.head_dim, vocab_size=int(cfg.get("vocab_size") or 32000),
                     dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"),
                     has_tokenizer=any((folder / f).is_file() for f in TOKENIZER_FILES),
                     max_context=cfg.get("max_position_embeddings"))


def token_id_range(vocab_size: int) -> tuple[int, int]:
    """[low, high) of pseudo-random prompt token ids: clear of the low ids and the special tokens at the top."""
    return max(1, vocab_size // 64), max(2, vocab_size * 15 // 16)


def pseudo_tokens(n: int, key: str, vocab_size: int) -> list[int]:
    """``n`` deterministic pseudo-random token ids for ``key`` (same key -> same ids, in every process)."""
    low, high = token_id_range(vocab_size)
    rng = random.Random(key)  # str seeds hash with sha512: stable across processes
    return [rng.randrange(low, high) for _ in range(n)]
