"""The rate-distortion protocol on a tiny random Llama: exact methods score Δppl = 0 with a zero-width interval,
lossy ones a positive Δppl whose bootstrap interval holds it; masks restrict what is scored; ratio accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtc_sglang.eval.baselines import BASELINES
from kvtc_sglang.eval.rate_distortion import Method, baseline_method, evaluate_methods, paired_delta_ci

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PREFIX, SCORE = 48, 16


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"
    return model


def _windows(n, masked_every=1):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 97, (PREFIX + SCORE,), generator=g)
        mask = torch.zeros(PREFIX + SCORE, dtype=torch.bool)
        mask[::masked_every] = True
        out.append((ids, mask))
    return out


def _identity(k, v, lo, hi):
    tok = k[0].numel() * 4
    return k, v, float((hi - lo) * tok), float(k.shape[0] * tok)


def _noise(scale):
    def fn(k, v, lo, hi):
        g = torch.Generator().manual_seed(2)
        kd, vd = k.clone(), v.clone()
        kd[lo:hi] += (scale * torch.randn(kd[lo:hi].shape, generator=g)).to(kd.dtype)
        vd[lo:hi] += (scale * torch.randn(vd[lo:hi].shape, generator=g)).to(vd.dtype)
        tok = k[0].numel() * 4
        return kd, vd, (hi - lo) * tok / 8.0, (hi - lo) * tok / 8.0 + (k.shape[0] - (hi - lo)) * tok

    return fn


def test_exact_method_has_zero_delta_and_full_agreement(tiny_llama):
    rows = evaluate_methods(tiny_llama, _windows(6), [Method("exact", 1.0, _identity)], prefix=PREFIX, score=SCORE,
                            sinks=4, window=8, progress=False)
    base, exact = rows
    assert base["method"] == "uncompressed" and exact["delta_ppl_pct"] == pytest.approx(0.0, abs=1e-9)
    assert exact["delta_ppl_ci95"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert exact["top1_agreement"] == 1.0 and exact["realized_ratio"] == pytest.approx(1.0)
    assert base["tokens_scored"] == 6 * SCORE and base["windows"] == 6


def test_lossy_method_raises_ppl_and_its_interval_holds_it(tiny_llama):
    rows = evaluate_methods(tiny_llama, _windows(8), [Method("noise", 8.0, _noise(2.0))], prefix=PREFIX, score=SCORE,
                            sinks=4, window=8, progress=False)
    r = rows[1]
    lo, hi = r["delta_ppl_ci95"]
    assert lo <= r["delta_ppl_pct"] <= hi and hi > lo
    assert r["top1_agreement"] < 1.0
    assert r["realized_ratio"] == pytest.approx(8.0)
    # effective: (48 tokens raw) / (36 coded / 8 + 12 exact)
    assert r["effective_ratio"] == pytest.approx(48 / (36 / 8 + 12))


def test_mask_restricts_scored_tokens(tiny_llama):
    rows = evaluate_methods(tiny_llama, _windows(3, masked_every=4), [baseline_method(BASELINES[0])], prefix=PREFIX,
                            score=SCORE, sinks=4, window=8, progress=False)
    assert rows[0]["tokens_scored"] == 3 * SCORE // 4
    assert rows[1]["method"] == "fp8_e4m3" and rows[1]["realized_ratio"] == pytest.approx(2.0)


def test_window_range_is_checked(tiny_llama):
    with pytest.raises(ValueError, match="leaves no tokens"):
        evaluate_methods(tiny_llama, _windows(1), [], prefix=PREFIX, score=SCORE, sinks=4, window=PREFIX, progress=False)


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    n = np.full(64, 100.0)
    base = rng.normal(300, 30, 64)
    same = paired_delta_ci(base, base, n)
    assert same == (0.0, 0.0)
    shifted = base + 1.0 + rng.normal(0, 0.5, 64)  # +0.01 nats per token: Δppl ≈ +1.005%
    lo, hi = paired_delta_ci(shifted, base, n)
    assert lo < 100 * np.expm1(0.01) < hi and hi - lo < 0.5  # SE 0.5/100/8 nats: width ~0.25%
    lo4, hi4 = paired_delta_ci(shifted[:8], base[:8], n[:8])
    assert hi4 - lo4 > hi - lo  # fewer windows, wider interval
