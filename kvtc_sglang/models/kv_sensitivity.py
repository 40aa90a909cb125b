"""Loss sensitivity of a model's KV cache: per-feature diagonal (empirical) Fisher information.

For a window of tokens, the next-token loss is back-propagated to every cached key and value. The
squared gradient, averaged over tokens, estimates how much the loss grows per unit of squared
error in each feature (second-order expansion: E[dloss] ~ 1/2 sum_i F_i e_i^2). Calibration uses it
to weight features, so PCA and the bit allocation minimize an estimate of the loss increase rather
than raw squared error, and so keys and values are measured in the same unit.

Key gradients are rotated back to pre-RoPE coordinates (RoPE is orthogonal, so the gradient with
respect to pre-RoPE keys is the inverse rotation of the post-RoPE gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvtc_sglang.codec.rope import RopeConfig, undo_rope


@dataclass(frozen=True)
class KVGradients:
    """k, v: [n, L, H, D] float32 post-RoPE keys and values; gk, gv: gradients of the summed
    next-token NLL with respect to them (same shape)."""

    k: torch.Tensor
    v: torch.Tensor
    gk: torch.Tensor
    gv: torch.Tensor


def kv_gradients(model: Any, input_ids: torch.Tensor) -> KVGradients:
    """Prefill one window with autograd and back-propagate its next-token NLL to the KV cache.

    input_ids: [n] int64. Costs about three forward passes.
    """
    from transformers import DynamicCache

    ids = input_ids.reshape(1, -1).to(model.device)
    cache = DynamicCache(config=model.config)
    with torch.enable_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        layers = out.past_key_values.layers
        for layer in layers:
            layer.keys.retain_grad()
            layer.values.retain_grad()
        loss = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:], reduction="sum")
        loss.backward()
    k = torch.stack([la.keys[0].detach().transpose(0, 1) for la in layers], 1).float()
    v = torch.stack([la.values[0].detach().transpose(0, 1) for la in layers], 1).float()
    gk = torch.stack([la.keys.grad[0].transpose(0, 1) for la in layers], 1).float()
    gv = torch.stack([la.values.grad[0].transpose(0, 1) for la in layers], 1).float()
    model.zero_grad(set_to_none=True)
    return KVGradients(k, v, gk, gv)


class FisherAccumulator:
    """Running mean of squared gradients per feature, keys in pre-RoPE coordinates.

    Tokens at positions < skip_tokens (attention sinks, stored exact) are left out.
    """

    def __init__(self, rope: RopeConfig, skip_tokens: int = 0):
        self.rope = rope
        self.skip = skip_tokens
        self.sum_k: torch.Tensor | None = None
        self.sum_v: torch.Tensor | None = None
        self.n = 0

    def update(self, g: KVGradients) -> None:
        n = g.gk.shape[0]
        pos = torch.arange(n, device=g.gk.device)
        gk = undo_rope(g.gk, pos, self.rope)[self.skip :].reshape(n - self.skip, -1)
        gv = g.gv[self.skip :].reshape(n - self.skip, -1)
        sk, sv = (gk.double() ** 2).sum(0).cpu(), (gv.double() ** 2).sum(0).cpu()
        self.sum_k = sk if self.sum_k is None else self.sum_k + sk
        self.sum_v = sv if self.sum_v is None else self.sum_v + sv
        self.n += n - self.skip

    def fisher(self) -> dict[str, torch.Tensor]:
        """{"k": [p] float64, "v": [p] float64} mean squared gradient per feature."""
        return {"k": self.sum_k / self.n, "v": self.sum_v / self.n}
