"""eval/baselines.py: the FP8 / int4-g32 / KIVI-2 fake quantizers and the bits per element they are charged."""

from __future__ import annotations

import pytest
import torch

from kvtc_sglang.eval.baselines import BASELINES, FP8_MAX, fp8_e4m3, int4_g32, kivi2

N, L, H, D = 64, 2, 2, 64


def _kv(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(N, L, H, D, generator=g) * torch.linspace(0.1, 5.0, D)  # channels of very different ranges
    v = torch.randn(N, L, H, D, generator=g)
    return k.to(torch.bfloat16), v.to(torch.bfloat16)


def test_bits_per_element_and_ratios():
    """Storage charged: payload bits plus one fp16 scale and one fp16 zero point per group of 32 (32 / 32 bits)."""
    by_name = {b.name: b for b in BASELINES}
    assert by_name["fp8_e4m3"].bits_per_element == 8.0 and by_name["fp8_e4m3"].ratio == 2.0
    assert by_name["int4_g32"].bits_per_element == 4 + 2 * 16 / 32 and by_name["int4_g32"].ratio == 16 / 5
    assert by_name["kivi2"].bits_per_element == 2 + 2 * 16 / 32 and by_name["kivi2"].ratio == 16 / 3


@pytest.mark.parametrize("fn, levels", [(int4_g32, 15), (kivi2, 3)])
def test_quantizers_keep_shape_dtype_and_use_at_most_their_levels(fn, levels):
    k, v = _kv()
    kq, vq = fn(k, v)
    assert kq.shape == k.shape and vq.dtype == v.dtype
    # values per token: at most 2^bits distinct values in every group of 32 features
    groups = vq.float().reshape(N, L, H, D // 32, 32)
    distinct = max(len(torch.unique(g)) for g in groups.reshape(-1, 32))
    assert distinct <= levels + 1


def test_errors_are_within_half_a_step():
    k, v = _kv(1)
    _, vq = int4_g32(k, v)
    vg = v.float().reshape(N, L, H, D // 32, 32)
    step = (vg.amax(-1, keepdim=True) - vg.amin(-1, keepdim=True)) / 15
    err = (vq.float().reshape(vg.shape) - vg).abs()
    assert bool((err <= step / 2 * 1.01 + 2e-2 * vg.abs()).all())  # fp16 scale/zero and bf16 output rounding
    kq, _ = kivi2(k, v)  # keys per channel over 32-token groups: small channels keep small errors
    kerr = (kq.float() - k.float()).abs().reshape(2, 32, L, H, D).amax(1)
    kstep = (k.float().reshape(2, 32, L, H, D).amax(1) - k.float().reshape(2, 32, L, H, D).amin(1)) / 3
    assert bool((kerr <= kstep / 2 * 1.01 + 2e-2 * k.float().abs().amax()).all())


def test_fp8_scales_only_when_the_range_exceeds_fp8():
    k, v = _kv()
    kq, vq = fp8_e4m3(k, v)
    assert torch.allclose(vq.float(), v.float(), rtol=2 ** -3, atol=2 ** -9)
    big = k.float() * 1000
    bq, _ = fp8_e4m3(big, v)
    assert torch.isfinite(bq).all() and bq.abs().max() <= big.abs().max() * 1.07
    assert float(big.abs().max()) > FP8_MAX
