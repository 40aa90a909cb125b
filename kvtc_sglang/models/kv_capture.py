"""The KV cache of a real transformers model: architecture facts, capture, and continuation from it.

``capture_kv`` runs one prefill and returns the cache the model itself built (keys post-RoPE, exactly
what SGLang's KV pool would hold), optionally with the pre-RoPE keys recorded inside the model.
``cache_from_kv`` + ``forward_with_cache`` put (possibly compressed-then-decoded) keys/values back
and continue the sequence, which is how accuracy is scored.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.rope import RopeConfig, hf_config_dict
from kvtc_sglang.models.geometry import geometry_from_dict, model_geometry


@dataclass(frozen=True)
class ModelKVSpec:
    """Shape and RoPE facts of a model's KV cache, plus an architecture fingerprint.

    Attributes:
        name: a label (model path or name); not part of the fingerprint.
        num_layers: L.
        num_kv_heads: H (all KV heads of the model, before any tensor-parallel split).
        head_dim: D.
        rope: the model's RoPE parameters.
        fingerprint: sha256 hex of the canonical JSON of model_type, num_layers, num_attention_heads,
            num_kv_heads, head_dim, hidden_size, vocab_size and ``rope.to_dict()``; equal for a GGUF-loaded
            model, its converted HF folder and SGLang's ``model_config.hf_config``.
    """

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig
    fingerprint: str

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_kv_heads, self.head_dim) <= 0:
            raise ValueError(f"num_layers, num_kv_heads, head_dim must be > 0, got "
                             f"{self.num_layers}, {self.num_kv_heads}, {self.head_dim}")
        if self.rope.head_dim != self.head_dim:
            raise ValueError(f"rope.head_dim {self.rope.head_dim} != head_dim {self.head_dim}")
        if len(self.fingerprint) != 64 or any(c not in "0123456789abcdef" for c in self.fingerprint):
            raise ValueError(f"fingerprint must be 64 lowercase hex digits, got {self.fingerprint!r}")

    @property
    def p(self) -> int:
        """Features per token and tensor kind: L * H * D."""
        return self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config: Any, *, name: str | None = None) -> "ModelKVSpec":
        """Build from a transformers config object or a config.json dict."""
        d = hf_config_dict(config)
        rope = RopeConfig.from_hf_config(d)
        geometry = geometry_from_dict(d)
        facts = {
            "model_type": d.get("model_type"),
            "num_layers": geometry.num_layers,
            "num_attention_heads": int(d["num_attention_heads"]),
            "num_kv_heads": geometry.num_kv_heads,
            "head_dim": geometry.head_dim,
            "hidden_size": int(d["hidden_size"]),
            "vocab_size": int(d["vocab_size"]),
            "rope": rope.to_dict(),
        }
        canonical = json.dumps(facts, sort_keys=True, separators=(",", ":"))
        return cls(
            name=name or d.get("_name_or_path") or str(d.get("model_type") or "model"),
            num_layers=facts["num_layers"],
            num_kv_heads=facts["num_kv_heads"],
            head_dim=facts["head_dim"],
            rope=rope,
            fingerprint=hashlib.sha256(canonical.encode()).hexdigest(),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "rope": self.rope.to_dict(), "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelKVSpec":
        return cls(name=d["name"], num_layers=int(d["num_layers"]), num_kv_heads=int(d["num_kv_heads"]),
                   head_dim=int(d["head_dim"]), rope=RopeConfig.from_dict(d["rope"]), fingerprint=d["fingerprint"])


@dataclass(frozen=True)
class CapturedKV:
    """One sequence's KV cache as the model built it.

    Attributes:
        k: post-RoPE keys, shape [n, L, H, D], float32.
        v: values, shape [n, L, H, D], float32.
        k_pre: pre-RoPE keys recorded inside the model, shape [n, L, H, D], float32; None unless requested.
        positions: shape [n], int64: 0 .. n-1.
        last_logits: the logits after the last token, shape [vocab], float32.
    """

    k: torch.Tensor
    v: torch.Tensor
    k_pre: torch.Tensor | None
    positions: torch.Tensor
    last_logits: torch.Tensor


def _attention_modules(model: Any) -> list[Any]:
    layers = model.get_decoder().layers
    return [layer.self_attn for layer in layers]


def weights_digest(model: Any) -> str:
    """Short sha256 (16 hex digits) over layer 0's k_proj and v_proj weights as float32 bytes.

    Two models with the same architecture fingerprint but different weights (another checkpoint,
    another quantization or dtype) get different digests.
    """
    attn = _attention_modules(model)[0]
    h = hashlib.sha256()
    for proj in (attn.k_proj, attn.v_proj):
        h.update(proj.weight.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _as_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """[n] or [1, n] integer ids -> [1, n] int64."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise ShapeError(f"input_ids must be an int64 tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
    if input_ids.dim() == 2 and input_ids.shape[0] == 1:
        input_ids = input_ids[0]
    if input_ids.dim() != 1 or input_ids.shape[0] == 0:
        raise ShapeError(f"input_ids must be [n] or [1, n] with n > 0 (one sequence), got {tuple(input_ids.shape)}")
    return input_ids.to(torch.int64)[None, :]


def capture_kv(model: Any, input_ids: torch.Tensor, *, capture_pre_rope: bool = False) -> CapturedKV:
    """Prefill one sequence and return the KV cache the model built.

    Pre-RoPE keys (``capture_pre_rope=True``) are recorded by a forward hook on the module whose output
    feeds the rotary embedding: ``self_attn.k_norm`` when the model has qk-norm, else ``self_attn.k_proj``.

    Args:
        model: a transformers decoder-only model (``model.get_decoder().layers[i].self_attn``).
        input_ids: shape [n] or [1, n], dtype int64.
        capture_pre_rope: also record the pre-RoPE keys.
    Returns: CapturedKV with [n, L, H, D] float32 tensors on the model's device.
    """
    ids = _as_ids(input_ids).to(model.device)
    n = ids.shape[1]
    num_kv = model_geometry(model.config).num_kv_heads
    pre: dict[int, torch.Tensor] = {}
    hooks = []
    if capture_pre_rope:
        for idx, attn in enumerate(_attention_modules(model)):
            source = attn.k_norm if getattr(attn, "k_norm", None) is not None else attn.k_proj

            def record(_module, _inputs, output, idx=idx):
                pre[idx] = output.detach().reshape(n, num_kv, -1).float()

            hooks.append(source.register_forward_hook(record))
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    layers = out.past_key_values.layers
    if any(layer.keys.shape[-2] != n for layer in layers):
        raise ValueError("the model's cache kept fewer than n tokens on some layer (sliding-window attention); "
                         "capture_kv needs full-attention layers")
    k = torch.stack([layer.keys[0].transpose(0, 1) for layer in layers], dim=1).float()
    v = torch.stack([layer.values[0].transpose(0, 1) for layer in layers], dim=1).float()
    k_pre = torch.stack([pre[i] for i in range(len(layers))], dim=1) if capture_pre_rope else None
    positions = torch.arange(n, dtype=torch.int64, device=k.device)
    return CapturedKV(k=k, v=v, k_pre=k_pre, positions=positions, last_logits=out.logits[0, -1].float())


def cache_from_kv(k: torch.Tensor, v: torch.Tensor, config: Any, *, dtype: torch.dtype | None = None):
    """A transformers DynamicCache holding the given keys (post-RoPE) and values.

    Args:
        k: shape [n, L, H, D], float dtype, post-RoPE keys at positions 0 .. n-1.
        v: shape [n, L, H, D], same dtype and device as ``k``.
        config: the model's transformers config (L, H, D are checked against it).
        dtype: cache dtype; default the config's dtype (the model's parameter dtype).
    Returns: a DynamicCache whose layer i holds [1, H, n, D] tensors (the model's layout) on ``k.device``.
    """
    from transformers import DynamicCache

    want = model_geometry(config).kv_shape
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 4 or tuple(t.shape[1:]) != want:
            raise ShapeError(f"{name} must be a float [n, L, H, D] = [n, {want[0]}, {want[1]}, {want[2]}] tensor, "
                             f"got {getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    if k.shape != v.shape or k.device != v.device:
        raise ShapeError(f"k {tuple(k.shape)} on {k.device} and v {tuple(v.shape)} on {v.device} must match")
    if dtype is None:
        dtype = getattr(config, "dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)
    cache = DynamicCache(config=config)
    for layer in range(want[0]):
        cache.update(k[:, layer].transpose(0, 1)[None].to(dtype).contiguous(),
                     v[:, layer].transpose(0, 1)[None].to(dtype).contiguous(), layer)
    return cache


def forward_with_cache(model: Any, cache: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Continue a sequence from a KV cache; the new tokens take positions cache_len .. cache_len+n_new-1.

    The cache is extended in place with the new tokens' keys/values.

    Args:
        model: the model the cache belongs to.
        cache: a DynamicCache (e.g. from ``cache_from_kv``).
        input_ids: shape [n_new] or [1, n_new], dtype int64.
    Returns: logits, shape [n_new, vocab], float32: row j predicts the token after input_ids[j].
    """
    ids = _as_ids(input_ids).to(model.device)
    with torch.inference_mode():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    return out.logits[0].float()
