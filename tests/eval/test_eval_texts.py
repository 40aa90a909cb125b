"""The evaluation texts with SmolLM2's real tokenizer and chat template: chat masks cover exactly the assistant
turns, windows are evenly spaced and disjoint, code text is pinned to its sglang version, the chat history
protocol scores only the answer and an exact method changes nothing."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from kvtc_sglang.eval import eval_texts
from kvtc_sglang.eval.eval_texts import EvalText, render_conversation, text_windows

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("one_torch_thread")]

CONV = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And times 3?"}, {"role": "assistant", "content": "Twelve, since 4 x 3 = 12."}]


def test_chat_mask_is_exactly_the_assistant_turns(smollm2):
    _, tok = smollm2
    ids, mask = render_conversation(tok, CONV)
    assert ids.numel() == mask.numel() and mask.any() and not mask.all()
    # the masked tokens, run by run, decode to each answer plus its end-of-turn marker
    runs, cur = [], []
    for t, m in zip(ids.tolist(), mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tok.decode(r) for r in runs] == ["It is 4.<|im_end|>", "Twelve, since 4 x 3 = 12.<|im_end|>"]
    assert tok.decode(ids).startswith("<|im_start|>system")  # the template's own system prompt


def test_windows_are_disjoint_evenly_spaced_and_counted():
    text = EvalText("t", torch.arange(1000), torch.ones(1000, dtype=torch.bool))
    wins = text_windows(text, 4, 100)
    assert [int(w[0][0]) for w in wins] == [0, 250, 500, 750] and all(w[0].numel() == 100 for w in wins)
    with pytest.raises(ValueError, match="fewer than 11 windows"):
        text_windows(text, 11, 100)


def test_code_text_refuses_another_sglang(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.5.99" if name == "sglang" else real(name))
    with pytest.raises(RuntimeError, match="sglang 0.5.99 is installed"):
        eval_texts.code_source()


def test_chat_text_scores_only_assistant_tokens(smollm2):
    _, tok = smollm2
    text = eval_texts.chat_text(tok)
    assert 0.3 < float(text.scored.float().mean()) < 0.95
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert not text.scored[text.ids == im_start].any()


def test_history_protocol_scores_answers_and_exact_is_free(smollm2):
    from kvtc_sglang.eval.chat_history import evaluate_history, returning_turns
    from kvtc_sglang.eval.rate_distortion import Method

    model, tok = smollm2
    turns = returning_turns(tok, [CONV])
    assert len(turns) == 1
    t = turns[0]
    assert tok.decode(t.ids[t.scored]) == "Twelve, since 4 x 3 = 12.<|im_end|>"
    assert tok.decode(t.ids[: t.history]).endswith("It is 4.<|im_end|>\n")

    def exact(k, v, lo, hi):
        tok16 = k[0].numel() * 4
        return k, v, float((hi - lo) * tok16), float(k.shape[0] * tok16)

    rows = evaluate_history(model, turns, [Method("exact", 1.0, exact)], [0, 8], progress=False, bootstrap=50)
    assert [r["window"] for r in rows] == [None, 0, 8]
    assert all(r["delta_ppl_pct"] == pytest.approx(0.0, abs=1e-9) and r["top1_agreement"] == 1.0 for r in rows)
    assert rows[0]["tokens_scored"] == int(t.scored.sum())


def test_kvtc_method_keeps_exact_rows_and_counts_coded_bytes(smollm2, smollm2_calibration):
    from kvtc_sglang.codec.artifact import load_artifact
    from kvtc_sglang.eval.rate_distortion import kvtc_method, split_plan_method
    from kvtc_sglang.models.kv_capture import capture_kv

    model, tok = smollm2
    art = load_artifact(smollm2_calibration)
    text = eval_texts.prose_text(tok)
    cap = capture_kv(model, text.ids[1000:1096])
    k, v = cap.k.to(torch.bfloat16), cap.v.to(torch.bfloat16)
    lo, hi = 4, 80
    raw = (hi - lo) * k[0].numel() * 4
    for method in (kvtc_method(art, 32), split_plan_method(art, 8, 16, 32)):
        kd, vd, coded, total = method.fn(k, v, lo, hi)
        assert torch.equal(kd[:lo], k[:lo]) and torch.equal(vd[hi:], v[hi:])
        assert not torch.equal(kd[lo:hi], k[lo:hi])
        assert total - coded == (k.shape[0] - (hi - lo)) * k[0].numel() * 4
        ratio = raw / coded
        assert 0.6 * 32 < ratio < 2 * 32 if method.variant == "" else 8 < ratio < 32
    err32 = (kvtc_method(art, 32).fn(k, v, lo, hi)[0] - k).float().pow(2).sum()
    err8 = (kvtc_method(art, 8).fn(k, v, lo, hi)[0] - k).float().pow(2).sum()
    assert err8 < err32
