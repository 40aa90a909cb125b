"""Rotary position embedding (RoPE): undo it on stored keys, redo it after decoding.

SGLang's KV pool (and a transformers KV cache) hold keys AFTER RoPE; KVTC projects keys BEFORE RoPE,
so the codec undoes the rotation at each token's absolute position before the PCA transform and
re-applies it after reconstruction. This module is the PyTorch reference of that math.

The formula (per token at position ``t``, per rotated pair ``i`` in ``0 .. R/2-1``, ``R = rotary_dim``)::

    angle_i = t * inv_freq[i]                  (float32, exactly as transformers / SGLang compute it)
    apply:  a' = a * cos(angle_i) - b * sin(angle_i)
            b' = b * cos(angle_i) + a * sin(angle_i)      (then both times ``attention_scaling``)
    undo:   a  = a' * cos(angle_i) + b' * sin(angle_i)
            b  = b' * cos(angle_i) - a' * sin(angle_i)    (after dividing by ``attention_scaling``)

i.e. apply rotates each pair by +angle, undo rotates by -angle (its exact inverse in exact arithmetic).
Which dims form pair ``i``:
    "neox"  (rotate-half; HF Llama, SGLang ``is_neox_style=True``):  (x[i], x[i + R/2])
    "gptj"  (interleaved; SGLang ``is_neox_style=False``):           (x[2i], x[2i + 1])
Dims ``R .. D-1`` (partial rotary) pass through unchanged. ``attention_scaling`` is 1 except for YaRN,
whose cos/sin tables are multiplied by its attention factor in both transformers and SGLang.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from kvtc_sglang.codec.defaults import DEFAULT_ROPE_THETA
from kvtc_sglang.codec.errors import ShapeError

STYLES = ("neox", "gptj")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

_SEQ_DEPENDENT = {
    "dynamic": "dynamic NTK scaling recomputes the frequencies from the current sequence length",
    "longrope": "LongRoPE switches between short and long factors with the sequence length",
}

# Keys kept in a normalized scaling dict, per rope_type (anything else is dropped).
_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "truncate",
        "mscale",
        "mscale_all_dim",
        "attention_factor",
        "attn_factor",
        "extrapolation_factor",
    ),
}
_REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_attention_scaling(s: Mapping[str, Any]) -> float:
    """YaRN's cos/sin multiplier, refusing configs on which transformers and SGLang disagree."""
    factor = float(s["factor"])
    mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
    if mscale is not None and mscale_all_dim is not None:
        if not (mscale and mscale_all_dim):
            raise ValueError("yarn scaling with mscale or mscale_all_dim equal to 0 is read differently by "
                             "transformers and SGLang; refusing it")
        derived = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim))
    else:
        derived = _yarn_mscale(factor)
    sglang = derived * float(s.get("attn_factor", 1.0))  # SGLang reads attn_factor, ignores attention_factor
    hf = float(s["attention_factor"]) if s.get("attention_factor") is not None else derived
    if not math.isclose(sglang, hf, rel_tol=1e-9, abs_tol=0.0):
        raise ValueError(f"yarn scaling {dict(s)} gives attention factor {hf} in transformers but {sglang} in "
                         "SGLang; refusing an ambiguous config")
    return hf


def _normalize_scaling(scaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Validate an HF-style ``rope_scaling``/``rope_parameters`` dict; None for plain RoPE."""
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise ValueError(f"RoPE scaling must be None or a dict, got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in _SEQ_DEPENDENT:
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported: {_SEQ_DEPENDENT[rope_type]}, so a stored "
                         "key's rotation is not a function of its position alone and cannot be undone exactly")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"RoPE scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return None
    missing = [k for k in _REQUIRED_KEYS[rope_type] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"RoPE scaling {rope_type!r} needs {missing} (got {dict(scaling)})")
    out: dict[str, Any] = {"rope_type": rope_type}
    for key in _SCALING_KEYS[rope_type]:
        if scaling.get(key) is not None:
            value = scaling[key]
            out[key] = bool(value) if key == "truncate" else (
                int(value) if key == "original_max_position_embeddings" else float(value))
    if float(out["factor"]) <= 0:
        raise ValueError(f"RoPE scaling factor must be > 0, got {out['factor']}")
    if rope_type == "llama3" and out["high_freq_factor"] < out["low_freq_factor"]:
        raise ValueError("llama3 RoPE scaling needs high_freq_factor >= low_freq_factor")
    if rope_type == "yarn":
        if out.get("extrapolation_factor", 1.0) != 1.0:
            raise ValueError("yarn extrapolation_factor != 1 is SGLang-only (transformers ignores it); refusing it")
        _yarn_attention_scaling(out)
    return out


@dataclass(frozen=True)
class RopeConfig:
    """Position-independent RoPE parameters of a model (everything needed to undo/redo it on keys).

    Attributes:
        head_dim: D, the size of one head's key vector.
        rotary_dim: R, the leading dims that rotate (even, <= head_dim; < head_dim for partial rotary).
        theta: the RoPE base (``rope_theta``).
        style: "neox" (rotate-half pairs (i, i + R/2)) or "gptj" (interleaved pairs (2i, 2i + 1)).
        scaling: None, or a normalized HF-style dict with ``rope_type`` in {"linear", "llama3", "yarn"}.
        max_position_embeddings: the model's context length (informational; None if unknown).
    """

    head_dim: int
    rotary_dim: int
    theta: float
    style: str = "neox"
    scaling: dict[str, Any] | None = None
    max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        if int(self.head_dim) <= 0:
            raise ValueError(f"head_dim must be > 0, got {self.head_dim}")
        if int(self.rotary_dim) <= 0 or int(self.rotary_dim) % 2 or int(self.rotary_dim) > int(self.head_dim):
            raise ValueError(f"rotary_dim must be even and in [2, head_dim={self.head_dim}], got {self.rotary_dim}")
        if not float(self.theta) > 0:
            raise ValueError(f"theta must be > 0, got {self.theta}")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        object.__setattr__(self, "head_dim", int(self.head_dim))
        object.__setattr__(self, "rotary_dim", int(self.rotary_dim))
        object.__setattr__(self, "theta", float(self.theta))
        object.__setattr__(self, "scaling", _normalize_scaling(self.scaling))
        if self.max_position_embeddings is not None:
            object.__setattr__(self, "max_position_embeddings", int(self.max_position_embeddings))

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def rope_type(self) -> str:
        return "default" if self.scaling is None else self.scaling["rope_type"]

    @property
    def attention_scaling(self) -> float:
        """Multiplier folded into cos/sin (YaRN's attention factor; 1.0 otherwise)."""
        return _yarn_attention_scaling(self.scaling) if self.rope_type == "yarn" else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``RopeConfig.from_dict(cfg.to_dict()) == cfg``."""
        return {
            "head_dim": self.head_dim,
            "rotary_dim": self.rotary_dim,
            "theta": self.theta,
            "style": self.style,
            "scaling": None if self.scaling is None else dict(self.scaling),
            "max_position_embeddings": self.max_position_embeddings,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RopeConfig":
        unknown = set(d) - {"head_dim", "rotary_dim", "theta", "style", "scaling", "max_position_embeddings"}
        if unknown:
            raise ValueError(f"unknown RopeConfig fields {sorted(unknown)}")
        return cls(**dict(d))

    @classmethod
    def from_hf_config(cls, config: Any, *, style: str = "neox") -> "RopeConfig":
        """Read RoPE settings from a transformers config object or a config.json dict.

        Handles transformers 5 (``rope_parameters`` holding ``rope_theta``, ``rope_type`` and scaling keys)
        and the legacy layout (top-level ``rope_theta`` plus ``rope_scaling``), ``partial_rotary_factor``
        (in either place), and ``head_dim`` (or ``hidden_size // num_attention_heads``). HF configs carry no
        pair-layout flag; Llama-family models are "neox", pass ``style="gptj"`` for interleaved models.
        """
        d = hf_config_dict(config)
        head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
        params = d.get("rope_parameters")
        if isinstance(params, Mapping) and params and all(isinstance(v, Mapping) for v in params.values()):
            raise ValueError(f"per-layer-type RoPE parameters ({sorted(params)}) are not supported")
        params = dict(params or {})
        legacy = d.get("rope_scaling")
        if isinstance(legacy, Mapping):
            params = {**dict(legacy), **params}
        theta = params.get("rope_theta", d.get("rope_theta"))
        theta = DEFAULT_ROPE_THETA if theta is None else theta
        partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor")) or 1.0
        return cls(
            head_dim=head_dim,
            rotary_dim=int(head_dim * float(partial)),
            theta=theta,
            style=style,
            scaling=params if params.get("rope_type", params.get("type", "default")) != "default" else None,
            max_position_embeddings=d.get("max_position_embeddings"),
        )


def hf_config_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a transformers config (text part of a multimodal one) or a config.json dict."""
    d = dict(config) if isinstance(config, Mapping) else config.to_dict()
    if "num_attention_heads" not in d and isinstance(d.get("text_config"), Mapping):
        d = dict(d["text_config"])
    for key in ("hidden_size", "num_attention_heads"):
        if key not in d:
            raise ValueError(f"model config has no {key!r}; is it a decoder-only transformer config?")
    return d


def rope_inv_freq(cfg: RopeConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies of the rotated pairs, with scaling applied as transformers/SGLang do.

    Returns: shape [rotary_dim // 2], dtype float32. ``angle_i = position * inv_freq[i]``.
    """
    dim = cfg.rotary_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    pos_freqs = cfg.theta ** exponent
    inv_freq = 1.0 / pos_freqs
    s = cfg.scaling
    if s is None:
        return inv_freq
    factor = s["factor"]
    if s["rope_type"] == "linear":
        return inv_freq / factor
    if s["rope_type"] == "llama3":
        old_len = s["original_max_position_embeddings"]
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low) if high != low else torch.zeros_like(inv_freq)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(wavelen < old_len / high, inv_freq,
                           torch.where(wavelen > old_len / low, inv_freq / factor, smoothed))
    # yarn: blend interpolated (1 / (factor * pos_freq)) and extrapolated frequencies with a linear ramp
    beta_fast, beta_slow = s.get("beta_fast") or 32.0, s.get("beta_slow") or 1.0
    orig = s["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(cfg.theta))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - lo) / (hi - lo), 0, 1)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + inv_freq * extrapolation


def _check(k: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig) -> None:
    if not isinstance(k, torch.Tensor) or not k.is_floating_point():
        raise ShapeError(f"keys must be a floating-point tensor, got {getattr(k, 'dtype', type(k))}")
    if k.dim() < 2 or k.shape[-1] != cfg.head_dim:
        raise ShapeError(f"keys must be [n, ..., head_dim={cfg.head_dim}], got {tuple(k.shape)}")
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int64, torch.int32):
        raise ShapeError(f"positions must be an int64 tensor, got {getattr(positions, 'dtype', type(positions))}")
    if positions.dim() != 1 or positions.shape[0] != k.shape[0]:
        raise ShapeError(f"positions must be [n={k.shape[0]}], got {tuple(positions.shape)}")
    if positions.device != k.device:
        raise ShapeError(f"positions on {positions.device} but keys on {k.device}")


def _rotate(k: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig, inverse: bool) -> torch.Tensor:
    _check(k, positions, cfg)
    half, rdim = cfg.rotary_dim // 2, cfg.rotary_dim
    angle = positions.to(torch.float32)[:, None] * rope_inv_freq(cfg, k.device)[None, :]  # [n, R/2]
    cos, sin = angle.cos(), angle.sin()
    scale = cfg.attention_scaling
    if scale != 1.0 and not inverse:
        cos, sin = cos * scale, sin * scale
    bshape = (k.shape[0],) + (1,) * (k.dim() - 2) + (half,)
    cos, sin = cos.reshape(bshape), sin.reshape(bshape)
    x = k.to(torch.float32)
    if scale != 1.0 and inverse:
        x = x / scale
    if cfg.style == "neox":
        a, b = x[..., :half], x[..., half:rdim]
    else:
        a, b = x[..., 0:rdim:2], x[..., 1:rdim:2]
    if inverse:
        a2, b2 = a * cos + b * sin, b * cos - a * sin
    else:
        a2, b2 = a * cos - b * sin, b * cos + a * sin
    rotated = torch.cat((a2, b2), dim=-1) if cfg.style == "neox" else torch.stack((a2, b2), dim=-1).flatten(-2)
    out = torch.cat((rotated, x[..., rdim:]), dim=-1) if rdim < cfg.head_dim else rotated
    return out.to(k.dtype)


def apply_rope(k: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """Rotate pre-RoPE keys to their positions (what the model does before writing its KV cache).

    Args:
        k: shape [n, ..., D] (e.g. [n, L, H, D] or [n, H, D]), any float dtype.
        positions: shape [n], dtype int64, same device as ``k``: each token's absolute position.
        cfg: the model's RoPE parameters; ``cfg.head_dim == D``.
    Returns: shape [n, ..., D], dtype of ``k``; computed in float32.
    Raises: ShapeError on a wrong dtype, last dim, positions length or device.
    """
    return _rotate(k, positions, cfg, inverse=False)


def undo_rope(k: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig) -> torch.Tensor:
    """Rotate post-RoPE keys back to position 0 (the inverse of ``apply_rope``).

    Args/Returns/Raises: as ``apply_rope``.
    """
    return _rotate(k, positions, cfg, inverse=True)
