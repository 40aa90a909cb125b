"""Calibration corpora: chat files are rendered with the model's own chat template; bad chat files are refused."""

from __future__ import annotations

import json

import pytest

from kvtc_sglang.models.calibration import CalibrationInputError, default_corpus_paths, render_chat_corpus, tokenize_corpus

@pytest.mark.model
def test_chat_corpus_is_rendered_with_the_template(smollm2, tmp_path):
    _, tok = smollm2
    f = tmp_path / "chat.json"
    f.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "Hi there"},
                                                          {"from": "gpt", "value": "Hello!"}]},
                             {"id": "b", "conversations": [{"from": "human", "value": "Bye"}]}]))
    text = render_chat_corpus(tok, f)
    assert text.count("<|im_start|>user\n") == 2 and "<|im_start|>assistant\nHello!<|im_end|>" in text
    ids = tokenize_corpus(tok, [f])[0]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert int((ids == im_start).sum()) == text.count("<|im_start|>")  # role markers are single special tokens


@pytest.mark.model
def test_bad_chat_corpus_is_refused(smollm2, tmp_path):
    _, tok = smollm2
    f = tmp_path / "chat.json"
    f.write_text(json.dumps([{"turns": ["no conversations key"]}]))
    with pytest.raises(CalibrationInputError, match="not a ShareGPT-format"):
        tokenize_corpus(tok, [f])


def test_default_corpus_files_exist():
    assert all(p.is_file() for p in default_corpus_paths())


def test_cached_default_artifact_from_another_corpus_is_recalibrated(tmp_path, monkeypatch):
    from tests.codec.codec_setup import make_artifact

    from kvtc_sglang.models import calibration

    monkeypatch.setenv("KVTC_CACHE_DIR", str(tmp_path))
    out = calibration.default_artifact_dir("model.gguf")
    names = [p.name for p in default_corpus_paths()]
    stale = make_artifact()
    stale.calibration["corpus"] = ["old_corpus.txt"]
    stale.save(out)
    calls = []

    def fake_calibrate_model(model, tokenizer, corpus, settings, out_dir, **kw):
        calls.append([p.name for p in corpus])
        art = make_artifact(seed=1)
        art.calibration["corpus"] = [p.name for p in corpus]
        return [art.save(out_dir)]

    monkeypatch.setattr(calibration, "calibrate_model", fake_calibrate_model)
    art = calibration.ensure_artifact(None, None, None, "model.gguf", quiet=True)
    assert calls == [names] and art.calibration["corpus"] == names
    again = calibration.ensure_artifact(None, None, None, "model.gguf", quiet=True)
    assert len(calls) == 1 and again.artifact_id() == art.artifact_id()
