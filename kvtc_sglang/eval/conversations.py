"""Multi-turn chat data sets as conversations: MT-bench questions and ShareGPT-format exchanges.

Stdlib only (the light benchmark clients use these loaders without importing torch).

Formats read:
    MT-bench (FastChat ``question.jsonl``): one JSON object per line, ``{"question_id": int, "turns": [str, ...]}``.
    ShareGPT: a JSON list of ``{"id": ..., "conversations": [{"from": "human" | "gpt", "value": str}, ...]}``
        ("user" / "assistant" are read as "human" / "gpt").

Turn indices are 0-based everywhere in this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

HUMAN_ROLES = ("human", "user")
ANSWER_ROLES = ("gpt", "assistant")


@dataclass
class Conversation:
    """One user's chat: the user turns in order, and the recorded assistant answer after each (None = none)."""

    name: str
    user_turns: list[str]
    recorded_answers: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.recorded_answers:
            self.recorded_answers = [None] * len(self.user_turns)
        if len(self.recorded_answers) != len(self.user_turns):
            raise ValueError(f"{self.name}: {len(self.user_turns)} user turns, {len(self.recorded_answers)} answers")


def read_mt_bench(path: str | Path, turns: int | None = None) -> list[Conversation]:
    """Every MT-bench question as a conversation without recorded answers (its first ``turns`` turns, or all)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            q = json.loads(line)
            out.append(Conversation(f"mt_bench-{q['question_id']}", list(q["turns"][:turns])))
    return out


def read_sharegpt(path: str | Path, turns: int | None = None) -> list[Conversation]:
    """Every ShareGPT conversation: its human turns (the first ``turns``, or all), each paired with the recorded
    answer that follows it (None when another human turn comes first)."""
    out = []
    for item in json.loads(Path(path).read_text(encoding="utf-8")):
        users: list[str] = []
        answers: list[str | None] = []
        for msg in item["conversations"]:
            if msg["from"] in HUMAN_ROLES and (turns is None or len(users) < turns):
                users.append(msg["value"])
                answers.append(None)
            elif msg["from"] in ANSWER_ROLES and users and answers[-1] is None and len(answers) == len(users):
                answers[-1] = msg["value"]
        out.append(Conversation(f"sharegpt-{item.get('id', len(out))}", users, answers))
    return out


def load_mt_bench(path: str | Path, count: int, turns: int = 2) -> list[Conversation]:
    """The first ``count`` MT-bench questions, at most ``turns`` turns each, without recorded answers."""
    return read_mt_bench(path, turns)[:count]


def load_sharegpt(path: str | Path, count: int, turns: int = 3) -> list[Conversation]:
    """The first ``count`` ShareGPT conversations, at most ``turns`` human turns each, with their recorded answers."""
    return read_sharegpt(path, turns)[:count]


def interleaved(conversations: Sequence[Conversation]) -> list[tuple[int, int]]:
    """(conversation index, turn index) in round-robin order: every user's turn 0, then every user's turn 1, ..."""
    rounds = max((len(c.user_turns) for c in conversations), default=0)
    return [(u, t) for t in range(rounds) for u, c in enumerate(conversations) if t < len(c.user_turns)]
