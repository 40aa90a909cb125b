"""serve_agreement: kvtc vs plain radix answers on the same multi-turn chats, against the fake server."""

from __future__ import annotations

import json
import time

import pytest

from benchmarks import serve_agreement as sa
from fake_sglang import FakeSGLang
from bench_helpers import model_dir


@pytest.fixture
def fake():
    servers = []

    def make(**kw):
        s = FakeSGLang(**kw)
        url = s.start()
        servers.append(s)
        return s, url

    yield make
    for s in servers:
        s.stop()


# --- serve_agreement.py: kvtc vs radix answers, by URL -------------------------------------------------------------

Q, O, USERS, TURNS, POOL = 16, 8, 4, 3, 100  # turn 1 fits the pool (4 x 23 tokens), turn 2 overflows it


@pytest.fixture
def no_flush_wait(monkeypatch):
    """serve_agreement.main waits 2 s after /flush_cache; skip that wait (only in that module)."""
    import types

    monkeypatch.setattr(sa, "time", types.SimpleNamespace(time=time.time, perf_counter=time.perf_counter,
                                                          sleep=lambda s: None))


def _agreement(ref_url, test_url, model, out, tag="t"):
    """serve_agreement.main by URL on random-id turns (ids from ``token_id_range`` of the model's vocab)."""
    rc = sa.main(["--ref-url", ref_url, "--test-url", test_url, "--model-path", str(model), "--tokenizer", "none",
                  "--question-tokens", str(Q), "--users", str(USERS), "--turns", str(TURNS), "--output-len", str(O),
                  "--request-timeout", "30", "--tag", tag, "--out-dir", str(out)])
    return rc, json.loads((out / f"serving_agreement_{tag}.json").read_text())


def _check_history(server, ref_answer):
    """Every user's next prompt is its previous prompt + the reference answer + Q new ids (round-robin order)."""
    prompts = [r["input_ids"] for r in server.received]
    assert len(prompts) == USERS * TURNS
    for u in range(USERS):
        mine = prompts[u::USERS]
        assert len(mine[0]) == Q
        for a, b in zip(mine, mine[1:]):
            assert b[:len(a) + O] == a + ref_answer(len(a)) and len(b) == len(a) + O + Q
    assert len({tuple(p[:Q]) for p in prompts[:USERS]}) == USERS  # users' first turns differ


def test_agreement_identical_servers_agree_on_every_turn_and_restored_rows_are_counted(fake, tmp_path, no_flush_wait):
    ref, ref_url = fake(pool_tokens=100000, tier="radix")
    test, test_url = fake(pool_tokens=POOL, tier="kvtc")
    out = tmp_path / "res"
    rc, rep = _agreement(ref_url, test_url, model_dir(tmp_path, vocab_size=32000), out, tag="same")
    assert rc == 0 and rep["request_errors"] == 0
    assert (out / "serving_agreement_same.md").is_file() and not (out / "serving_agreement.json").exists()
    rows = rep["rows"]
    assert len(rows) == USERS * TURNS
    assert [(r["user"], r["turn"]) for r in rows] == [(u, t) for t in range(1, TURNS + 1) for u in range(USERS)]
    for r in rows:
        assert r["prompt_tokens"] == r["turn"] * Q + (r["turn"] - 1) * O  # history carries the reference answer
        assert r["identical"] and r["first_divergence"] == O and r["output_tokens"] == O
        assert r["agreement_before_divergence"] == 1.0 and r["mean_abs_logprob_diff"] == 0.0
    # both servers got the same prompts; each turn extends the last by the reference answer
    assert [r["input_ids"] for r in ref.received] == [r["input_ids"] for r in test.received]
    assert all(r["return_logprob"] and not r["stream"] and r["sampling_params"] == {"temperature": 0.0,
                                                                                    "max_new_tokens": O}
               for r in ref.received + test.received)
    _check_history(ref, lambda n: ref.answer_ids(n, O))
    restored = [r for r in rows if r["test_restored"] > 0]
    assert restored and all(r["turn"] > 1 for r in restored)  # users evicted from the small pool came back
    # ... while a returning user still in the pool hit the device tier only
    assert any(r["turn"] > 1 and r["test_cached"] > 0 and r["test_restored"] == 0 for r in rows)
    assert all(r["test_cached"] >= r["test_restored"] for r in rows)
    assert all(r["ref_cached"] > 0 for r in rows if r["turn"] > 1)  # the big radix pool kept everyone
    s = rep["summary"]
    assert s["first_turns"]["requests"] == USERS and s["returning_turns"]["requests"] == USERS * (TURNS - 1)
    assert s["returning_with_restore"]["requests"] == len(restored)
    assert s["returning_with_restore"]["restored_tokens"] == sum(r["test_restored"] for r in restored)
    for part in s.values():
        assert part["identical_rate"] == 1.0 and part["agreement_before_divergence"] == 1.0
    assert test.flushes == 1 and ref.flushes == 0  # only the test server is flushed at the end
    assert rep["after_flush"]["flush_ok"] and rep["after_flush"]["kvtc"]["realized_ratio"] == 9.5
    assert "| returning_with_restore |" in (out / "serving_agreement_same.md").read_text()


def test_agreement_answers_that_diverge_after_a_restore(fake, tmp_path, no_flush_wait):
    ref, ref_url = fake(pool_tokens=100000, tier="radix")
    test, test_url = fake(pool_tokens=POOL, tier="kvtc", diverge_on_restore_at=2)
    out = tmp_path / "res"
    rc, rep = _agreement(ref_url, test_url, model_dir(tmp_path, vocab_size=32000), out, tag="div")
    assert rc == 0 and rep["request_errors"] == 0
    rows = rep["rows"]
    restored = [r for r in rows if r["test_restored"] > 0]
    device_only = [r for r in rows if r["turn"] > 1 and r["test_cached"] > 0 and r["test_restored"] == 0]
    assert restored and device_only  # only the restored ones diverge
    for r in rows:
        if r["test_restored"] > 0:
            assert not r["identical"] and r["first_divergence"] == 2
            assert r["agreement_before_divergence"] == pytest.approx(2 / O)
        else:
            assert r["identical"] and r["first_divergence"] == O
        assert r["mean_abs_logprob_diff"] == 0.0  # the tokens before the divergence agree
    assert all(r["identical"] for r in rows if r["turn"] == 1)
    s = rep["summary"]
    assert s["first_turns"]["identical_rate"] == 1.0
    assert s["returning_with_restore"]["identical_rate"] == 0.0
    assert s["returning_with_restore"]["agreement_before_divergence"] == pytest.approx(2 / O)
    assert s["returning_turns"]["identical_rate"] == pytest.approx(
        1 - len(restored) / s["returning_turns"]["requests"])
    # the next turn carries the reference answer, not the diverged one
    assert [r["input_ids"] for r in ref.received] == [r["input_ids"] for r in test.received]
    _check_history(ref, lambda n: ref.answer_ids(n, O))


def test_agreement_request_errors_give_exit_code_1(fake, tmp_path, no_flush_wait):
    ref, ref_url = fake(pool_tokens=100000, tier="radix")
    test, test_url = fake(pool_tokens=POOL, tier="kvtc", fail_over=Q)  # every returning turn fails on the test server
    out = tmp_path / "res"
    rc, rep = _agreement(ref_url, test_url, model_dir(tmp_path, vocab_size=32000), out, tag="err")
    assert rc == 1
    assert rep["request_errors"] == USERS * (TURNS - 1)
    assert [(r["user"], r["turn"]) for r in rep["rows"]] == [(u, 1) for u in range(USERS)]
    assert all(r["identical"] for r in rep["rows"])
    assert rep["summary"]["returning_turns"] == {"requests": 0}
    # a failed turn adds no answer to the history: the next prompt only grows by the question
    lens = [len(r["input_ids"]) for r in test.received]
    assert lens == [Q] * USERS + [2 * Q + O] * USERS + [3 * Q + O] * USERS
    assert f"Request errors: {USERS * (TURNS - 1)}." in (out / "serving_agreement_err.md").read_text()
