"""Uniform asymmetric quantization with a 16-bit shift and scale per token per group.

The PyTorch reference of the codec's quantizer; Triton kernels implement the same arithmetic.

For a group of values x (one token, one group of PCA coefficients), b bits and a clip factor c:
    lo    = min(x)                                  (c = 0: plain min/max)
    hi    = max(x)
    lo    = max(lo, mean(x) - c * std(x))           (c > 0: the range is clipped to c standard
    hi    = min(hi, mean(x) + c * std(x))            deviations around the group mean)
    shift = fp16(lo)
    scale = fp16((hi - shift) / (2**b - 1)), rounded up to the next fp16 value if rounding to
            nearest fell below the exact quotient, so that hi stays inside the code range
    q     = clamp(round((x - shift) / scale), 0, 2**b - 1)            (q = 0 when scale == 0)
    x_hat = q * scale + shift                                          (fp32 arithmetic)

Decoding depends only on (shift, scale, q): the clip factor is an encoder choice. Min/max wastes
most of a coarse quantizer's levels on a group's two extremes (a 2-bit min/max step over 256
Gaussian values is ~1.9 sigma; the MSE-optimal uniform step is ~1.0 sigma), so calibration picks, per
(group size, bits), the clip factor that minimizes the measured error (see dp.fit_clip_factors).

The 8-bit type uses the same uniform rule as int2/int4 (256 levels), so every kept group is
described by one (shift, scale) pair regardless of its width.
"""

from __future__ import annotations

import torch

from kvtc_sglang.codec.errors import ShapeError

SUPPORTED_BITS = (2, 4, 8)
FP16_MAX = 65504.0


def _check_bits(bits) -> None:
    if isinstance(bits, torch.Tensor):
        if not bool(torch.isin(bits, torch.tensor(SUPPORTED_BITS, device=bits.device)).all()):
            raise ShapeError(f"quantizer supports {SUPPORTED_BITS} bits")
    elif bits not in SUPPORTED_BITS:
        raise ShapeError(f"quantizer supports {SUPPORTED_BITS} bits, got {bits}")


def _levels(bits) -> torch.Tensor | float:
    """2**bits - 1 as a float (int bits) or a float32 tensor (tensor bits)."""
    if isinstance(bits, torch.Tensor):
        return ((1 << bits.long()) - 1).float()
    return float((1 << bits) - 1)


def round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values (>= 0) to fp16, never below the input. Shape/dtype: same shape, fp16.

    Device ops only (no data-dependent branch, so no host sync on CUDA)."""
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def group_params(x: torch.Tensor, bits, clip=0.0, *, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift and scale of each group.

    Args:
        x: [..., s] float32, the last dim is one group.
        bits: 2, 4 or 8, or an int tensor broadcastable to x.shape[:-1].
        clip: clip factor c (0 = min/max), a float or a float tensor broadcastable to x.shape[:-1].
    Returns:
        (shift, scale): each [...] float16.
    check=False skips the bit-width check (callers whose plan was validated; checking a device tensor of
    bits reads it back to the host).
    """
    if check:
        _check_bits(bits)
    lo = x.amin(dim=-1)
    hi = x.amax(dim=-1)
    if isinstance(clip, torch.Tensor) or clip > 0:
        mean = x.mean(dim=-1)
        std = x.std(dim=-1, correction=0)
        c = (clip if isinstance(clip, torch.Tensor) else torch.tensor(float(clip))).to(x.device, torch.float32)
        c = c.expand_as(mean)
        on = c > 0
        lo = torch.where(on, torch.maximum(lo, mean - c * std), lo)
        hi = torch.where(on, torch.minimum(hi, mean + c * std), hi)
    shift = lo.to(torch.float16)
    # fp16 rounding of the shift may land above the true minimum; the clamp below absorbs it.
    span = (hi - shift.float()).clamp_min(0.0)
    scale = round_up_fp16(span / _levels(bits))
    return shift, scale


def quantize_groups(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, bits, *,
                    check: bool = True) -> torch.Tensor:
    """Symbols of x given its group parameters.

    Args:
        x: [..., s] float32; shift, scale: [...] float16; bits: int or int tensor like shift.
        check: as in `group_params`.
    Returns:
        [..., s] uint8 symbols in [0, 2**bits).
    """
    if check:
        _check_bits(bits)
    sc = scale.float().unsqueeze(-1)
    safe = torch.where(sc > 0, sc, torch.ones_like(sc))
    q = torch.round((x - shift.float().unsqueeze(-1)) / safe)
    q = torch.where(sc > 0, q, torch.zeros_like(q))
    top = _levels(bits)
    if isinstance(top, torch.Tensor):
        return torch.minimum(q.clamp_(min=0), top.unsqueeze(-1)).to(torch.uint8)
    return q.clamp_(0, top).to(torch.uint8)


def dequantize_groups(q: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_groups. q: [..., s] uint8; shift, scale: [...] float16 -> [..., s] float32."""
    return q.float() * scale.float().unsqueeze(-1) + shift.float().unsqueeze(-1)


def fake_quantize(x: torch.Tensor, bits: int, clip: float = 0.0) -> torch.Tensor:
    """quantize then dequantize each group of x ([..., s] float32); bits == 0 drops the group (zeros)."""
    if bits == 0:
        return torch.zeros_like(x)
    shift, scale = group_params(x, bits, clip)
    return dequantize_groups(quantize_groups(x, shift, scale, bits), shift, scale)
