"""KV-cache quantization baselines a serving user would otherwise pick, as fake-quantizers.

Each baseline maps a run of tokens' K/V ([n, L, H, D], keys post-RoPE as a pool stores them) to
their dequantized values and reports its storage cost in bits per element, so accuracy and ratio
are compared at equal footing with KVTC:

    fp8_e4m3     cast to float8 e4m3 (per-tensor scale so the largest magnitude fits, as
                 SGLang's --kv-cache-dtype fp8_e4m3 with a calibrated scale)        8 bits
    int4_g32     per token, groups of 32 consecutive features of one head, asymmetric
                 min/max 4-bit with fp16 scale and zero point                        4 + 32/32 = 5 bits
    kivi2        KIVI-style 2-bit: keys per channel (groups of 32 tokens share a
                 channel's min/max), values per token (groups of 32 features), fp16
                 scale/zero                                                          2 + 32/32 = 3 bits
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

FP8_MAX = 448.0


def _minmax_quant(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Asymmetric min/max fake quantization along `dim` with fp16 scale and zero point."""
    lo = x.amin(dim=dim, keepdim=True).half().float()
    hi = x.amax(dim=dim, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((x - lo) / safe).clamp(0, levels)
    return torch.where(scale > 0, q * scale + lo, lo.expand_as(x))


def fp8_e4m3(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for x in (k, v):
        xf = x.float()
        scale = max(1.0, float(xf.abs().max()) / FP8_MAX)
        out.append(((xf / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype))
    return out[0], out[1]


def int4_g32(k: torch.Tensor, v: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    out = []
    for x in (k, v):
        n, L, H, D = x.shape
        g = min(group, D)
        xf = x.float().reshape(n, L, H, D // g, g)
        out.append(_minmax_quant(xf, 4, -1).reshape(n, L, H, D).to(x.dtype))
    return out[0], out[1]


def kivi2(k: torch.Tensor, v: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    n, L, H, D = k.shape
    kf = k.float()
    kq = torch.empty_like(kf)
    for s in range(0, n, group):  # keys: per channel, over groups of tokens
        kq[s : s + group] = _minmax_quant(kf[s : s + group], 2, 0)
    g = min(group, D)
    vq = _minmax_quant(v.float().reshape(n, L, H, D // g, g), 2, -1).reshape(n, L, H, D)
    return kq.to(k.dtype), vq.to(v.dtype)


@dataclass(frozen=True)
class Baseline:
    name: str
    bits_per_element: float
    fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    @property
    def ratio(self) -> float:
        """Compression ratio vs 16-bit KV."""
        return 16.0 / self.bits_per_element


BASELINES = (
    Baseline("fp8_e4m3", 8.0, fp8_e4m3),
    Baseline("int4_g32", 5.0, int4_g32),
    Baseline("kivi2", 3.0, kivi2),
)
