"""eval/conversations.py: MT-bench and ShareGPT loaders, round-robin order."""

from __future__ import annotations

import json

import pytest

from kvtc_sglang.eval.conversations import (
    Conversation, interleaved, load_mt_bench, load_sharegpt, read_mt_bench, read_sharegpt)


@pytest.fixture
def mt_bench(tmp_path):
    path = tmp_path / "question.jsonl"
    rows = [{"question_id": 81, "turns": ["a1", "a2"]}, {"question_id": 82, "turns": ["b1", "b2", "b3"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


@pytest.fixture
def sharegpt(tmp_path):
    path = tmp_path / "sharegpt.json"
    data = [{"id": "x", "conversations": [{"from": "human", "value": "h1"}, {"from": "gpt", "value": "g1"},
                                          {"from": "human", "value": "h2"}, {"from": "gpt", "value": "g2"},
                                          {"from": "human", "value": "h3"}]},
            {"conversations": [{"from": "user", "value": "u1"}, {"from": "human", "value": "u2"},
                               {"from": "assistant", "value": "a2"}]}]
    path.write_text(json.dumps(data))
    return path


def test_mt_bench_questions_become_conversations_without_answers(mt_bench):
    convs = read_mt_bench(mt_bench)
    assert [c.name for c in convs] == ["mt_bench-81", "mt_bench-82"]
    assert convs[1].user_turns == ["b1", "b2", "b3"] and convs[1].recorded_answers == [None] * 3
    assert [c.user_turns for c in load_mt_bench(mt_bench, 1, turns=1)] == [["a1"]]


def test_sharegpt_pairs_each_human_turn_with_the_answer_after_it(sharegpt):
    first, second = read_sharegpt(sharegpt)
    assert first.name == "sharegpt-x" and first.user_turns == ["h1", "h2", "h3"]
    assert first.recorded_answers == ["g1", "g2", None]
    # two human turns in a row: the answer belongs to the later one; the id falls back to the position
    assert second.name == "sharegpt-1" and second.user_turns == ["u1", "u2"]
    assert second.recorded_answers == [None, "a2"]
    (limited,) = load_sharegpt(sharegpt, 1, turns=2)
    assert limited.user_turns == ["h1", "h2"] and limited.recorded_answers == ["g1", "g2"]


def test_turn_limit_applies_while_reading(sharegpt):
    # with one turn, the second conversation keeps u1 and the answer after u2 lands on it (u2 is not read)
    _, second = read_sharegpt(sharegpt, turns=1)
    assert second.user_turns == ["u1"] and second.recorded_answers == ["a2"]


def test_interleaved_is_round_robin_by_turn():
    convs = [Conversation("a", ["1", "2", "3"]), Conversation("b", ["1"]), Conversation("c", ["1", "2"])]
    assert interleaved(convs) == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]
    assert interleaved([]) == []


def test_answers_must_match_turns():
    with pytest.raises(ValueError, match="2 user turns, 1 answers"):
        Conversation("bad", ["1", "2"], ["x"])
