"""Calibration artifacts (codec/artifact.py): save/load round trips, the card reader, and every mismatch named."""

from __future__ import annotations

import json

import pytest
import torch

from kvtc_sglang.codec.artifact import (
    CARD_NAME,
    TENSORS_NAME,
    CalibrationArtifact,
    check_artifact_matches,
    load_artifact,
    read_card,
)
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.errors import CalibrationMismatchError
from tests.codec.codec_setup import D, H, L, P, kv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_artifact_save_load_round_trip(art, tmp_path):
    card_file = art.save(tmp_path)
    assert card_file == tmp_path / CARD_NAME and (tmp_path / TENSORS_NAME).is_file()
    back = load_artifact(tmp_path)
    assert back.artifact_id() == art.artifact_id() and back.fingerprint16 == art.fingerprint16
    assert back.p == art.p == P and back.model == art.model
    for kind in ("k", "v"):
        for a, b in zip(art.blocks[kind], back.blocks[kind]):
            assert (a.layer_start, a.layer_end, a.offset, a.p) == (b.layer_start, b.layer_end, b.offset, b.p)
            assert torch.equal(a.basis, b.basis) and torch.equal(a.mean, b.mean) and torch.equal(a.scale, b.scale)
    for r in art.plans:
        for kind in ("k", "v"):
            got, want = back.plan(r).for_kind(kind), art.plan(r).for_kind(kind)
            assert [(pl.groups, pl.p, pl.target_ratio) for pl in got] == [(pl.groups, pl.p, pl.target_ratio) for pl in want]
    # a blob made with the saved artifact decodes with the loaded one, identically
    k, v = kv(9)
    blob = KVTCCodec(art, 4).encode(k, v, 0, 1, 2)
    a, b = KVTCCodec(art, 4).decode(blob), KVTCCodec(back, 4).decode(blob)
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    card = json.loads(card_file.read_text())
    assert card["tensors"]["file"] == TENSORS_NAME and card["tensors"]["bytes"] == (tmp_path / TENSORS_NAME).stat().st_size
    # both files are plain files readable like any other the user writes (a server may run as another user)
    assert (tmp_path / TENSORS_NAME).stat().st_mode & 0o777 == card_file.stat().st_mode & 0o777
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_tensors_raise_calibration_mismatch(art, tmp_path):
    art.save(tmp_path)
    (tmp_path / TENSORS_NAME).unlink()
    with pytest.raises(CalibrationMismatchError, match="missing.*kvtc-sglang calibrate"):
        load_artifact(tmp_path)


def test_stale_tensors_raise_calibration_mismatch(art, tmp_path):
    art.save(tmp_path)
    t = torch.load(tmp_path / TENSORS_NAME)
    t["k.0.mean"] = t["k.0.mean"] + 1
    torch.save(t, tmp_path / TENSORS_NAME)
    with pytest.raises(CalibrationMismatchError, match="sha256"):
        load_artifact(tmp_path)


@pytest.mark.parametrize("version", [0, 2, None])
def test_card_format_version_mismatch_raises(art, tmp_path, version):
    card_file = art.save(tmp_path)
    card = json.loads(card_file.read_text())
    card["format_version"] = version
    card_file.write_text(json.dumps(card))
    with pytest.raises(CalibrationMismatchError, match="format version"):
        load_artifact(tmp_path)


def test_missing_or_unreadable_card_raises(tmp_path):
    with pytest.raises(CalibrationMismatchError, match="no calibration card"):
        read_card(tmp_path)
    (tmp_path / CARD_NAME).write_text("{not json")
    with pytest.raises(CalibrationMismatchError, match="not valid JSON"):
        read_card(tmp_path)


def test_card_plan_needing_more_rank_than_the_basis_raises(art, tmp_path):
    card_file = art.save(tmp_path)
    card = json.loads(card_file.read_text())
    card["kinds"]["v"]["blocks"][1]["rank"] = 16
    t = torch.load(tmp_path / TENSORS_NAME)
    t["v.1.basis"] = t["v.1.basis"][:, :16].contiguous()
    torch.save(t, tmp_path / TENSORS_NAME)
    card["tensors"]["sha256"] = None
    card_file.write_text(json.dumps(card))
    with pytest.raises(CalibrationMismatchError, match="needs rank 32"):
        load_artifact(tmp_path)


def test_missing_ratio_raises(art):
    with pytest.raises(CalibrationMismatchError, match=r"no plan for ratio 8; available: \[4, 16\]"):
        KVTCCodec(art, 8)


def test_check_artifact_matches_names_every_difference(art):
    fp = art.model["fingerprint"]
    check_artifact_matches(art, num_layers=L, num_kv_heads=H, head_dim=D, fingerprint=fp)
    with pytest.raises(CalibrationMismatchError) as exc:
        check_artifact_matches(art, num_layers=30, num_kv_heads=3, head_dim=64, fingerprint="cd" * 32, tp_size=2, tp_rank=1)
    msg = str(exc.value)
    for name in ("num_layers: model 30, calibration 2", "num_kv_heads", "head_dim", "tp_size", "tp_rank", "fingerprint",
                 "kvtc-sglang calibrate"):
        assert name in msg, msg
    with pytest.raises(CalibrationMismatchError, match="head_dim: model 8"):
        check_artifact_matches(art, num_layers=L, num_kv_heads=H, head_dim=8)


def test_tp_rank_artifact_counts_its_own_heads(art):
    tp = CalibrationArtifact(model={**{k: v for k, v in art.model.items() if k != "num_kv_heads_per_rank"}, "num_kv_heads": 4},
                             blocks=art.blocks, plans=art.plans, tp_size=2, tp_rank=1)
    assert tp.num_kv_heads == 2 and tp.p == P
    check_artifact_matches(tp, num_layers=L, num_kv_heads=2, head_dim=D, tp_size=2, tp_rank=1)
    assert tp.artifact_id() != art.artifact_id()
