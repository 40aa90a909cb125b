"""A model's KV geometry read from its configuration: layers, KV heads, head_dim, RoPE base and style.

Stdlib only (the launcher-side startup checks run before torch or transformers are imported). The one reader of
these facts: the startup checks (card vs model), the KV capture (cache shapes) and the calibration (the card's
model facts) all go through ``model_geometry``.

Sources: a model folder or its ``config.json``, an HF config dict (``config.json`` contents) or ``PretrainedConfig``
(its text part for a multimodal model), or an SGLang ``ModelConfig``.

Conventions (those of transformers and SGLang): ``num_key_value_heads`` defaults to ``num_attention_heads``,
``head_dim`` to ``hidden_size // num_attention_heads``, the RoPE base to ``DEFAULT_ROPE_THETA``; HF configs rarely
state the RoPE pair layout (``rope_style`` is then None: the loaded model says).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kvtc_sglang.codec.defaults import DEFAULT_ROPE_THETA


class ModelConfigError(ValueError):
    """A model configuration cannot be read or lacks a KV-geometry fact."""


@dataclass(frozen=True)
class ModelGeometry:
    """What a calibration card must agree with: the model's KV layout and RoPE.

    Attributes:
        name: the model path or architecture (for messages).
        num_layers: L, attention layers holding KV.
        num_kv_heads: total KV heads of the model (all TP ranks).
        head_dim: D.
        rope_theta: RoPE base, or None if unknown.
        rope_style: "neox"/"gptj", or None if unknown (HF configs rarely say; the loaded model does).
    """

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float | None = None
    rope_style: str | None = None

    def kv_heads_per_rank(self, tp_size: int) -> int:
        """KV heads one of ``tp_size`` ranks holds: ``max(1, num_kv_heads // tp_size)`` (SGLang's
        ``ModelConfig.get_num_kv_heads``)."""
        return max(1, self.num_kv_heads // tp_size)

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(L, H, D) of one token's K (or V) rows, all KV heads."""
        return self.num_layers, self.num_kv_heads, self.head_dim


def text_config_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a model config: a ``config.json`` dict or a transformers ``PretrainedConfig``; the decoder's
    text part of a multimodal one."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    d = dict(config) if isinstance(config, Mapping) else config.to_dict()
    if "num_hidden_layers" not in d and "num_attention_heads" not in d and isinstance(d.get("text_config"), Mapping):
        d = dict(d["text_config"])
    return d


def geometry_from_dict(d: Mapping[str, Any], *, name: str = "model") -> ModelGeometry:
    """ModelGeometry of an HF config dict (see the module docstring for the defaults). ModelConfigError if it lacks
    the layer count, the heads or the head size."""
    if "num_hidden_layers" not in d and isinstance(d.get("text_config"), Mapping):
        d = d["text_config"]
    layers = d.get("num_hidden_layers", d.get("n_layer", d.get("num_layers")))
    heads = d.get("num_attention_heads", d.get("n_head"))
    kv_heads = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim")
    if head_dim is None and d.get("hidden_size") and heads:
        head_dim = int(d["hidden_size"]) // int(heads)
    missing = [k for k, v in (("num_hidden_layers", layers), ("num_key_value_heads", kv_heads),
                              ("head_dim", head_dim)) if not v]
    if missing:
        raise ModelConfigError(f"the model config of {name} lacks {', '.join(missing)}; cannot check the KVTC "
                               "calibration against it")
    params = d.get("rope_parameters")
    theta = params.get("rope_theta") if isinstance(params, Mapping) else None
    if theta is None:
        theta = d.get("rope_theta")
    if theta is None:
        theta = DEFAULT_ROPE_THETA
    style = None
    if "rope_is_neox_style" in d:
        style = "neox" if d["rope_is_neox_style"] else "gptj"
    return ModelGeometry(name=name, num_layers=int(layers), num_kv_heads=int(kv_heads), head_dim=int(head_dim),
                         rope_theta=float(theta), rope_style=style)


def model_geometry(source: Any) -> ModelGeometry:
    """Read a ModelGeometry from a model directory / ``config.json`` path, an HF config dict or ``PretrainedConfig``,
    an SGLang ``ModelConfig``, or a ModelGeometry (returned as is). ModelConfigError if a config cannot be read."""
    if isinstance(source, ModelGeometry):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        config_path = path / "config.json" if path.is_dir() else path
        if not config_path.is_file():
            raise ModelConfigError(f"cannot check the KVTC calibration against the model: no config.json at {path}")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelConfigError(f"cannot read the model config {config_path}: {exc}") from exc
        return geometry_from_dict(config, name=str(path))
    if hasattr(source, "hf_text_config") and hasattr(source, "get_total_num_kv_heads"):  # SGLang's ModelConfig
        text = source.hf_text_config
        d = text.to_dict() if hasattr(text, "to_dict") else dict(vars(text))
        name = getattr(source, "model_path", None) or type(source).__name__
        base = geometry_from_dict(d, name=str(name))
        return ModelGeometry(name=base.name, num_layers=int(source.num_hidden_layers),
                             num_kv_heads=int(source.get_total_num_kv_heads()), head_dim=int(source.head_dim),
                             rope_theta=base.rope_theta, rope_style=base.rope_style)
    if isinstance(source, Mapping):
        return geometry_from_dict(dict(source), name=str(source.get("_name_or_path") or "model"))
    if hasattr(source, "to_dict"):  # a transformers PretrainedConfig
        name = getattr(source, "_name_or_path", None) or type(source).__name__
        return geometry_from_dict(text_config_dict(source), name=str(name))
    raise TypeError(f"cannot read a model geometry from {type(source).__name__}: pass a model directory, a "
                    "config.json path, an HF config (dict or PretrainedConfig) or an SGLang ModelConfig")
