"""Calibration artifacts (codec/artifact.py): save/load round trips, the card reader, and every mismatch named."""

from __future__ import annotations

import hashlib
import json
import math
import time

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


def tensor_entry(directory) -> dict:
    """The card's ``tensors`` entry for the tensor file as it is now in ``directory``."""
    data = (directory / TENSORS_NAME).read_bytes()
    return {"file": TENSORS_NAME, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


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
    card["tensors"] = tensor_entry(tmp_path)
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


# ---------------------------------------------------------------------------------------------------------------------
# Hostile and damaged artifacts: typed errors naming the fix, never a raw exception
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def saved(art, tmp_path):
    art.save(tmp_path)
    return tmp_path


def edit_card(directory, edit) -> None:
    card = json.loads((directory / CARD_NAME).read_text())
    edit(card)
    (directory / CARD_NAME).write_text(json.dumps(card))


@pytest.mark.parametrize("edit, what", [
    (lambda c: c.pop("kinds"), "'kinds' object"),
    (lambda c: c.pop("tensors"), "'tensors' object"),
    (lambda c: c["tensors"].pop("sha256"), "tensors.sha256=None"),
    (lambda c: c["tensors"].update(bytes="12"), "tensors.bytes='12'"),
    (lambda c: c["tensors"].update(file="../../etc/passwd"), "not a file name inside the artifact directory"),
    (lambda c: c["kinds"]["k"]["blocks"][0].pop("p"), r"kinds.k.blocks\[0\].p=None"),
    (lambda c: c["kinds"]["k"]["blocks"][0].update(offset=7), "does not continue the blocks before it"),
    (lambda c: c["kinds"]["v"]["blocks"].pop(), "cover layers"),
    (lambda c: c["kinds"]["v"].update(blocks="all"), "kinds.v.blocks is not a non-empty list"),
    (lambda c: c["plans"].update({"16x": c["plans"]["16"]}), "plan key '16x' is not an integer"),
    (lambda c: c["plans"]["16"]["k"].pop(), r"plans\['16'\].k is not a list of one plan per k block"),
    (lambda c: c["plans"]["16"]["k"][0].pop("runs"), "runs is not a list"),
    (lambda c: c["plans"]["16"]["k"][0]["runs"].append([0, 16, 8, 10 ** 15]), "count >= 1 and the groups within"),
    (lambda c: c["plans"]["16"]["k"][0]["runs"].append([0, 3, 8, 1]), "size must be one of"),
    (lambda c: c["plans"]["16"]["v"][0].update(target_ratio="fast"), "target_ratio='fast'"),
    (lambda c: c["quantizer"]["clip"]["k"].update({"big": 1.0}), "is not SIZExBITS"),
    (lambda c: c["quantizer"]["clip"]["k"].update({"16x2": "x"}), "invalid clip factor"),
    (lambda c: c.update(sink_tokens=-1), "sink_tokens=-1"),
    (lambda c: c.update(p=5), "p=5 but the blocks cover"),
    (lambda c: c["model"].update(num_layers="2"), "model.num_layers='2'"),
    (lambda c: c["model"].update(weights_signature=[1, 2]), "weights_signature is not a JSON object"),
    (lambda c: c.update(calibration=3), "calibration is not an object"),
])
def test_hand_edited_cards_raise_typed_errors_naming_the_fix(saved, edit, what):
    edit_card(saved, edit)
    with pytest.raises(CalibrationMismatchError, match=what) as exc:
        load_artifact(saved, model_path="/models/m")
    assert "kvtc-sglang calibrate --model /models/m" in str(exc.value)


@pytest.mark.parametrize("part", ["mean", "basis", "scale"])
@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_non_finite_tensors_are_refused(saved, part, bad_value):
    t = torch.load(saved / TENSORS_NAME)
    t[f"v.1.{part}"].view(-1)[3] = bad_value
    torch.save(t, saved / TENSORS_NAME)
    edit_card(saved, lambda c: c.update(tensors=tensor_entry(saved)))
    with pytest.raises(CalibrationMismatchError, match=f"v block 1 {part} holds 1 NaN/Inf values"):
        load_artifact(saved)


def test_truncated_tensors_are_refused_by_size_before_hashing(saved):
    data = (saved / TENSORS_NAME).read_bytes()
    (saved / TENSORS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationMismatchError, match=f"hold {len(data) // 2} bytes, the card records {len(data)}"):
        load_artifact(saved)


def test_unreadable_tensor_file_with_a_matching_card_is_refused(saved):
    (saved / TENSORS_NAME).write_bytes(b"PK\x03\x04 not really a zip" * 10)
    edit_card(saved, lambda c: c.update(tensors=tensor_entry(saved)))
    with pytest.raises(CalibrationMismatchError, match="cannot be read"):
        load_artifact(saved)
    torch.save({"k.0.mean": [1, 2]}, saved / TENSORS_NAME)
    edit_card(saved, lambda c: c.update(tensors=tensor_entry(saved)))
    with pytest.raises(CalibrationMismatchError, match="not a dict of named tensors"):
        load_artifact(saved)


def test_missing_and_non_float_tensors_are_refused(saved):
    t = torch.load(saved / TENSORS_NAME)
    basis = t.pop("k.0.basis")
    torch.save(t, saved / TENSORS_NAME)
    edit_card(saved, lambda c: c.update(tensors=tensor_entry(saved)))
    with pytest.raises(CalibrationMismatchError, match="k block 0 has no tensor k.0.basis"):
        load_artifact(saved)
    t["k.0.basis"] = (basis.float() * 100).to(torch.int16)
    torch.save(t, saved / TENSORS_NAME)
    edit_card(saved, lambda c: c.update(tensors=tensor_entry(saved)))
    with pytest.raises(CalibrationMismatchError, match="basis has dtype torch.int16"):
        load_artifact(saved)


def _mutations(card: dict):
    """(path, container, key) of every value in a card, for the fuzz test below."""
    stack = [((), card)]
    while stack:
        path, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            yield path + (key,), node, key
            stack.append((path + (key,), value))


JSON_VALUES = [None, True, -1, 0, 1, 2 ** 40, 0.5, -1e300, "x", "", [], {}, [0, 16, 8, 1], {"a": 1}]


def test_any_single_field_corruption_gives_a_typed_error_or_a_valid_artifact(saved):
    """Replace or delete each field of the card in turn (every value, at every depth): loading either succeeds or
    raises a CalibrationMismatchError (CalibrationCardError included), never anything else, and fast."""
    original = (saved / CARD_NAME).read_text()
    targets = list(_mutations(json.loads(original)))
    assert len(targets) > 100
    import random

    rng = random.Random(0)
    outcomes = {"ok": 0, "typed": 0}
    for i, (path, _node, _key) in enumerate(targets):
        card = json.loads(original)
        node = card
        for key in path[:-1]:
            node = node[key]
        if i % 3 == 0 and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = rng.choice(JSON_VALUES)
        (saved / CARD_NAME).write_text(json.dumps(card))
        start = time.perf_counter()
        try:
            load_artifact(saved)
            outcomes["ok"] += 1
        except CalibrationMismatchError:
            outcomes["typed"] += 1
        assert time.perf_counter() - start < 2.0, path
    assert outcomes["typed"] > 0
