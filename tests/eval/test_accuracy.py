"""eval/accuracy.py: the ratio accounting behind the accuracy table (realized = the compressed tokens' 16-bit bytes
over what is stored for them; effective = the whole prefix's 16-bit bytes over what is stored for it, exact tokens
included), on a tiny random Llama so the protocol runs in a second."""

from __future__ import annotations

import pytest
import torch

from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.eval.accuracy import EvalSettings, evaluate
from kvtc_sglang.eval.baselines import BASELINES, Baseline
from kvtc_sglang.models.kv_capture import capture_kv
from kvtc_sglang.testing.synthetic import dp_like_plan, synthetic_artifact

L, H, D = 2, 2, 16
PREFIX, SCORE, SINKS, WINDOW = 24, 8, 2, 4


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=L,
                                      num_attention_heads=4, num_key_value_heads=H, max_position_embeddings=128,
                                      attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def run(tiny_llama):
    p = L * H * D
    art = synthetic_artifact(L, H, D, {8: [(dp_like_plan(p, 32, 8), dp_like_plan(p, 24, 8))]}, seed=1)
    g = torch.Generator().manual_seed(2)
    windows = [torch.randint(0, 97, (PREFIX + SCORE,), generator=g) for _ in range(3)]
    identity = Baseline("identity16", 16.0, lambda k, v: (k, v))
    settings = EvalSettings(windows=3, prefix=PREFIX, score=SCORE, sinks=SINKS, window=WINDOW, entropy="none",
                            baselines=(*BASELINES, identity), progress=False)
    rows = {r["method"]: r for r in evaluate(tiny_llama, windows, art, settings)}
    return art, windows, rows


def test_uncompressed_and_lossless_rows_are_exactly_one(run):
    _, _, rows = run
    for name in ("uncompressed", "identity16"):
        r = rows[name]
        assert (r["realized_ratio"], r["effective_ratio"], r["delta_ppl_pct"], r["top1_agreement"]) == (1, 1, 0, 1)


@pytest.mark.parametrize("baseline", BASELINES, ids=lambda b: b.name)
def test_baseline_ratios_charge_their_bits_on_the_compressed_tokens_only(run, baseline):
    _, _, rows = run
    r = rows[baseline.name]
    n_coded = PREFIX - SINKS - WINDOW
    assert r["realized_ratio"] == pytest.approx(16.0 / baseline.bits_per_element)
    assert r["effective_ratio"] == pytest.approx(PREFIX / (n_coded * baseline.bits_per_element / 16 + SINKS + WINDOW))
    assert r["target_ratio"] == pytest.approx(baseline.ratio)


def test_kvtc_ratios_are_bf16_bytes_over_blob_bytes(tiny_llama, run):
    art, windows, rows = run
    codec = KVTCCodec(art, 8, entropy="none")
    coded = total = 0
    for w in windows:
        cap = capture_kv(tiny_llama, w[:PREFIX])
        k, v = cap.k.to(torch.bfloat16), cap.v.to(torch.bfloat16)
        hi = PREFIX - WINDOW
        coded += codec.encode(k[SINKS:hi], v[SINKS:hi], SINKS, 0, 0).numel()
        total += codec.encode(k, v, 0, SINKS, WINDOW).numel()
    row_bytes = 2 * L * H * D * 2  # K and V of one token in 16 bits
    r = rows["kvtc"]
    assert r["realized_ratio"] == pytest.approx((PREFIX - SINKS - WINDOW) * row_bytes * len(windows) / coded)
    assert r["effective_ratio"] == pytest.approx(PREFIX * row_bytes * len(windows) / total)
    assert 1.0 < r["effective_ratio"] < r["realized_ratio"]  # the exact rows cost their full 16 bits
    assert r["windows"] == 3 and r["tokens_scored"] == 3 * SCORE and (r["sinks"], r["window"]) == (SINKS, WINDOW)


def test_a_prefix_without_compressible_tokens_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="leaves no tokens"):
        evaluate(tiny_llama, [], None, EvalSettings(prefix=8, sinks=4, window=4, baselines=(), progress=False))
