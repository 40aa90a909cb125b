"""A quick real calibration of SmolLM2-135M (session fixture ``smollm2_calibration``): the card documents what it
should, the artifact loads back, every plan respects its bit budget, and the codec on real KV of held-out text
(WikiText-2) reconstructs with the error the plans predict, exact rows bit-exact, 8x better than 32x."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from kvtc_sglang.codec.artifact import CARD_FORMAT_VERSION, check_artifact_matches, load_artifact
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.dp import budget_bits_for_ratio
from kvtc_sglang.codec.rope import RopeConfig, undo_rope
from kvtc_sglang.models.calibration import DEFAULT_CORPUS

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_torch_thread")]

L, H, D = 30, 3, 64
P = L * H * D
RATIOS = (8, 32)
N_TOKENS = 512
WIKITEXT = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "wikitext2_test.txt"


@pytest.fixture(scope="module")
def card(smollm2_calibration):
    return json.loads((smollm2_calibration / "card.json").read_text())


@pytest.fixture(scope="module")
def artifact(smollm2_calibration):
    return load_artifact(smollm2_calibration)


@pytest.fixture(scope="module")
def spec(smollm2):
    from kvtc_sglang.models.kv_capture import ModelKVSpec

    return ModelKVSpec.from_hf_config(smollm2[0].config)


@pytest.fixture(scope="module")
def heldout_kv(smollm2):
    """Real KV ([n, L, H, D] float32, keys post-RoPE) of the first 512 tokens of WikiText-2 (not in the corpus)."""
    from kvtc_sglang.models.kv_capture import capture_kv

    model, tokenizer = smollm2
    text = WIKITEXT.read_text(encoding="utf-8")[:20000]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:N_TOKENS]
    assert ids.numel() == N_TOKENS
    cap = capture_kv(model, ids)
    return cap.k, cap.v


@pytest.fixture(scope="module")
def calibration_window_kv(smollm2, card):
    """Real KV of the first calibration window (the same 512 tokens of the default corpus the fixture used)."""
    from kvtc_sglang.codec.calibrate import windows_from_ids
    from kvtc_sglang.models.calibration import default_corpus_paths, tokenize_corpus
    from kvtc_sglang.models.kv_capture import capture_kv

    model, tokenizer = smollm2
    c = card["calibration"]
    streams = tokenize_corpus(tokenizer, default_corpus_paths())
    windows = windows_from_ids(streams, c["seq_len"], c["windows"] * c["seq_len"], c["seed"])
    cap = capture_kv(model, windows[0])
    return cap.k, cap.v


@pytest.fixture(scope="module")
def round_trips(artifact, heldout_kv):
    """{ratio: (blob, decoded)} of the held-out run, stored the way the tiered cache stores the end of a sequence."""
    k, v = heldout_kv
    nh, nt = artifact.exact_policy.counts(0, N_TOKENS, at_sequence_end=True)
    out = {}
    for ratio in RATIOS:
        codec = KVTCCodec(artifact, ratio, entropy="deflate")
        blob = codec.encode(k, v, 0, nh, nt)
        out[ratio] = (blob, codec.decode(blob, expected_tokens=N_TOKENS, expected_start=0))
    return nh, nt, out


def _weighted_sq_error(artifact, kind: str, x: torch.Tensor, x_hat: torch.Tensor) -> list[float]:
    """Per block: mean over tokens of the summed squared error of the scaled features, the DP's objective."""
    out = []
    for b in artifact.blocks[kind]:
        sl = slice(b.offset, b.offset + b.p)
        out.append(float((((x_hat[:, sl] - x[:, sl]) * b.scale_or_ones()) ** 2).sum(-1).double().mean()))
    return out


# --- the card -------------------------------------------------------------------------------------------------------

def test_card_documents_model_layout_and_policy(card, spec, smollm2_calibration):
    assert card["format_version"] == CARD_FORMAT_VERSION == 1
    m = card["model"]
    assert m["fingerprint"] == spec.fingerprint and len(m["fingerprint"]) == 64
    assert (m["num_layers"], m["num_kv_heads"], m["num_kv_heads_per_rank"], m["head_dim"]) == (L, H, H, D)
    assert RopeConfig.from_dict(m["rope"]) == spec.rope and m["rope"]["theta"] > 0
    assert isinstance(m["weights_digest"], str) and len(m["weights_digest"]) == 16
    assert (card["tp_size"], card["tp_rank"], card["p"]) == (1, 0, P)
    assert (card["sink_tokens"], card["window_tokens"]) == (4, 128)
    q = card["quantizer"]
    assert q["group_sizes"] == [1, 16, 64, 256, 1024] and q["bits"] == [0, 2, 4, 8]
    assert q["overhead_bits_per_group"] == 32 and q["group_alignment"] == 16
    for kind in ("k", "v"):
        assert card["kinds"][kind]["rope_undone"] == (kind == "k")
        blocks = card["kinds"][kind]["blocks"]
        assert [b["layers"] for b in blocks] == [[0, 10], [10, 20], [20, 30]]
        assert [b["offset"] for b in blocks] == [0, 1920, 3840] and all(b["p"] == 1920 for b in blocks)
        assert all(1 <= b["rank"] <= b["p"] for b in blocks)
    assert sorted(card["plans"]) == ["32", "8"]
    for r, pd in card["plans"].items():
        assert len(pd["k"]) == len(pd["v"]) == 3
        assert pd["bits_per_token"] == sum(d["bits_per_token"] for d in pd["k"] + pd["v"])
        assert pd["nominal_ratio"] == pytest.approx(32 * P / pd["bits_per_token"], rel=1e-4)
        for d in pd["k"] + pd["v"]:
            assert {"p", "target_ratio", "rank", "bits_per_token", "nominal_ratio", "expected_mse", "runs"} <= set(d)
    c = card["calibration"]
    assert (c["windows"], c["seq_len"], c["tokens"], c["dp_samples"]) == (4, 512, 4 * (512 - 4), 1024)
    assert (c["layer_blocks"], c["weighting"], c["joint_kv_budget"], c["ratios"]) == (3, "fisher", True, [8, 32])
    assert c["corpus"] == list(DEFAULT_CORPUS)
    tensors = smollm2_calibration / card["tensors"]["file"]
    assert card["tensors"]["sha256"] == hashlib.sha256(tensors.read_bytes()).hexdigest()
    assert card["tensors"]["bytes"] == tensors.stat().st_size
    assert len(card["artifact_id"]) == 64


def test_artifact_loads_back_to_the_same_card(card, artifact, spec):
    again = json.loads(json.dumps(artifact.card(card["tensors"]["sha256"], card["tensors"]["bytes"])))
    assert again == card
    check_artifact_matches(artifact, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
                           head_dim=spec.head_dim, fingerprint=spec.fingerprint)
    t = artifact.tensors()
    for kind in ("k", "v"):
        for i, b in enumerate(artifact.blocks[kind]):
            assert t[f"{kind}.{i}.basis"].dtype == torch.float16 and t[f"{kind}.{i}.basis"].shape == (1920, b.basis.shape[1])
            assert t[f"{kind}.{i}.mean"].dtype == t[f"{kind}.{i}.scale"].dtype == torch.float32
            assert bool((t[f"{kind}.{i}.scale"] > 0).all())
            gram = b.basis.float().T @ b.basis.float()  # orthonormal columns, up to float16 rounding
            assert float((gram - torch.eye(gram.shape[0])).abs().max()) < 5e-3


def test_plans_respect_the_joint_bit_budget(artifact):
    """Fisher weighting puts K and V errors in one unit, so calibrate() splits 2 * 16p/CR bits per token jointly
    across K and V (and across blocks): the K + V total is within 2B, either kind alone may exceed B."""
    assert artifact.calibration["joint_kv_budget"] is True
    totals = {}
    for ratio in RATIOS:
        rp = artifact.plan(ratio)
        budget = budget_bits_for_ratio(P, ratio)
        assert rp.bits_per_token <= 2 * budget
        assert rp.bits_per_token >= 0.97 * 2 * budget  # the DP spends (nearly) all of it
        for pl in rp.k + rp.v:
            assert pl.p == 1920 and pl.target_ratio == ratio and pl.expected_mse >= 0
            assert all(g.size in (1, 16, 64, 256, 1024) and g.start % min(g.size, 16) == 0 for g in pl.groups)
        totals[ratio] = sum(pl.expected_mse for pl in rp.k + rp.v)
    assert artifact.plan(8).bits_per_token > artifact.plan(32).bits_per_token
    assert totals[8] < totals[32]


# --- the codec on real held-out KV ----------------------------------------------------------------------------------

def test_exact_rows_are_bit_exact_on_real_kv(round_trips, heldout_kv):
    k, v = heldout_kv
    nh, nt, out = round_trips
    assert (nh, nt) == (4, 128)
    for ratio, (_, dec) in out.items():
        for got, want in ((dec.k, k), (dec.v, v)):
            assert torch.equal(got[:nh], want[:nh]) and torch.equal(got[N_TOKENS - nt :], want[N_TOKENS - nt :])


def _measured_vs_expected(artifact, k, v, start_pos, nh, nt, decoded_by_ratio):
    """{(ratio, kind): (measured, expected)} of the DP's objective: Fisher-scaled squared error summed over the
    features and averaged over the coded tokens (keys compared before RoPE, where the basis lives)."""
    n = k.shape[0]
    coded = slice(nh, n - nt)
    m = coded.stop - coded.start
    rope = RopeConfig.from_dict(artifact.model["rope"])
    pos = torch.arange(start_pos + nh, start_pos + n - nt)
    report = {}
    for ratio, dec in decoded_by_ratio.items():
        rp = artifact.plan(ratio)
        for kind, x, x_hat in (
            ("k", undo_rope(k[coded], pos, rope), undo_rope(dec.k[coded], pos, rope)),
            ("v", v[coded], dec.v[coded]),
        ):
            measured = sum(_weighted_sq_error(artifact, kind, x.reshape(m, P), x_hat.reshape(m, P)))
            report[(ratio, kind)] = (measured, sum(pl.expected_mse for pl in rp.for_kind(kind)))
    return report


def test_in_sample_error_equals_the_plans_expected_mse(artifact, calibration_window_kv):
    """On a calibration window (whose tokens fed the PCA and, in part, the DP sample), the codec's error is the
    DP's expected_mse: the codec quantizes exactly what the DP measured."""
    k, v = calibration_window_kv
    decoded = {}
    for ratio in RATIOS:
        codec = KVTCCodec(artifact, ratio, entropy="none")
        decoded[ratio] = codec.decode(codec.encode(k, v, 0, artifact.sink_tokens, 0))
    report = _measured_vs_expected(artifact, k, v, 0, artifact.sink_tokens, 0, decoded)
    for measured, expected in report.values():
        assert expected / 1.25 <= measured <= 1.25 * expected, report


def test_heldout_error_stays_within_the_quick_calibrations_generalization_gap(artifact, round_trips, heldout_kv):
    """On held-out text (WikiText-2 test, never part of the corpus) the error is larger than
    expected_mse, which is measured in-sample: with this 2k-token calibration (PCA of 1920-feature blocks from ~2k
    tokens) about 8-14x at 8x and 3-4x at 32x; 8k tokens bring it to ~3.5x and ~2.3x. Bounded here so a codec
    regression (or a broken basis) shows, while the 8x plan stays better than the 32x plan."""
    k, v = heldout_kv
    nh, nt, out = round_trips
    report = _measured_vs_expected(artifact, k, v, 0, nh, nt, {r: dec for r, (_, dec) in out.items()})
    for (ratio, kind), (measured, expected) in report.items():
        assert expected / 2 <= measured <= 25 * expected, report
        if ratio == 8:
            assert measured < report[(32, kind)][0], report


def test_real_kv_8x_beats_32x_and_ratios_are_realized(artifact, round_trips, heldout_kv):
    k, v = heldout_kv
    nh, nt, out = round_trips
    coded = slice(nh, N_TOKENS - nt)
    rel = {}
    for ratio, (_, dec) in out.items():
        for kind, x, x_hat in (("k", k, dec.k), ("v", v, dec.v)):
            rel[(ratio, kind)] = float((x_hat[coded] - x[coded]).norm() / x[coded].norm())
    for kind in ("k", "v"):
        assert rel[(8, kind)] < rel[(32, kind)] < 1.0, rel
    # the coded tokens alone: their 16-bit bytes over the blob (entropy framing included) reach the target ratio
    m = coded.stop - coded.start
    for ratio in RATIOS:
        blob = KVTCCodec(artifact, ratio, entropy="deflate").encode(k[coded], v[coded], nh)
        assert 2 * P * 2 * m / blob.numel() >= 0.95 * ratio
