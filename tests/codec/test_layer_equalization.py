"""Per-layer energy equalization before PCA: rescaling accumulated statistics equals accumulating scaled data, the
factors equalize layer energies, and a calibration with it folds the factors into the artifact's feature scales
(so the codec, which only reads scales, needs nothing new) and reconstructs a low-energy layer better."""

from __future__ import annotations

import pytest
import torch

from kvtc_sglang.codec.calibrate import CalibrationSettings, calibrate, equalization_factors
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.pca import CovarianceAccumulator

pytestmark = pytest.mark.usefixtures("one_torch_thread")

L, H, D = 3, 1, 8
P = L * H * D
LAYER_STD = torch.tensor([10.0, 1.0, 0.1])  # layer 0 holds almost all the energy


def test_rescaled_statistics_equal_statistics_of_scaled_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g) * torch.arange(1, 7) + 3.0
    c = torch.rand(6, generator=g) + 0.5
    a, b = CovarianceAccumulator(6), CovarianceAccumulator(6)
    for chunk in x.split(100):
        a.update(chunk)
        b.update(chunk * c)
    a.rescale(c)
    assert torch.allclose(a.mean, b.mean, rtol=1e-5, atol=1e-5)
    assert torch.allclose(a.covariance(), b.covariance(), rtol=1e-4, atol=1e-4)
    assert torch.allclose(b.variances(), b.covariance().diagonal())


def test_factors_equalize_layer_energy_and_alpha_zero_is_identity():
    var = (LAYER_STD.repeat_interleave(H * D) ** 2).double()
    c = equalization_factors(var, L, 1.0)
    energy = (var.view(L, -1).sum(1) * c ** 2)
    assert torch.allclose(energy, energy.mean().expand(L))
    assert torch.equal(equalization_factors(var, L, 0.0), torch.ones(L, dtype=torch.float64))
    half = equalization_factors(var, L, 0.5)
    assert (half > 0).all() and half[0] < 1 < half[2]


def _kv_source(ids):
    g = torch.Generator().manual_seed(int(ids[0]))
    n = 64
    # low-rank structure per layer (4 directions), scaled per layer
    mix = torch.randn(4, H * D, generator=torch.Generator().manual_seed(7))
    z = torch.randn(n, L, 4, generator=g)
    x = (z @ mix).reshape(n, L, H, D) * LAYER_STD.view(1, L, 1, 1)
    x = x + 0.01 * torch.randn(n, L, H, D, generator=g)
    return x.clone(), x.clone()


FACTS = {"name": "synthetic", "fingerprint": "cd" * 32, "num_layers": L, "num_kv_heads": H, "head_dim": D,
         "rope": {"head_dim": D, "rotary_dim": D, "theta": 10000.0, "style": "neox", "scaling": None,
                  "max_position_embeddings": None}}


@pytest.fixture(scope="module")
def artifacts():
    windows = [torch.tensor([i] * 64) for i in range(16)]
    out = {}
    for alpha in (0.0, 1.0):
        s = CalibrationSettings(seq_len=64, max_tokens=1024, dp_samples=512, ratios=(4, 8), sink_tokens=0,
                                window_tokens=0, layer_equalization=alpha, progress=False)
        out[alpha] = calibrate(_kv_source, windows, FACTS, s)
    return out


def test_factors_are_folded_into_the_scales_and_recorded(artifacts):
    plain, eq = artifacts[0.0], artifacts[1.0]
    assert "layer_factors" not in plain.calibration and plain.calibration["layer_equalization"] == 0.0
    factors = torch.tensor(eq.calibration["layer_factors"]["v"])
    assert factors[0] < 1 < factors[2]
    scale = eq.blocks["v"][0].scale_or_ones().view(L, -1)
    assert torch.allclose(scale.mean(1), factors.float(), rtol=1e-4)


def test_equalized_basis_serves_the_quiet_layer(artifacts):
    k, v = _kv_source(torch.tensor([99]))
    k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)
    err = {}
    for alpha, art in artifacts.items():
        dec = KVTCCodec(art, 8, entropy="none").decode(KVTCCodec(art, 8, entropy="none").encode(k, v, 0))
        err[alpha] = ((dec.v.float() - v.float())[:, 2].pow(2).mean() / v.float()[:, 2].pow(2).mean()).item()
    assert err[1.0] < err[0.0]
