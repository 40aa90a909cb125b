"""Workload traces: pure functions from parameters (and a seed) to a reusable ``Trace``.

The same trace drives a live server (``driver.drive``) and a CPU replay of the cache classes
(``benchmarks/cache_replay.py``), so both see exactly the same requests in the same planned order.

API
---
``Trace.requests`` is a tuple of ``TraceRequest`` sorted by planned arrival:

* ``index``: position in the trace; ``user``: conversation (or document / prefix group) id; ``turn``: 1-based turn
  of that user; ``returning``: the request reuses a prefix an earlier request of the trace created (a conversation's
  turn >= 2, a document asked again, a prefix group seen before) -- the requests whose TTFT the suite reports.
* ``arrival_s``: planned send time from the start. A live driver never sends a request before its ``history``
  request finished plus ``think_s``; a replay without a server takes requests in trace order.
* The prompt: ``history`` is the index of an earlier request this one continues (a chat turn) or None.
  ``Trace.prompt(req, prompts, answers)`` = ``prompts[history] + answers[history] + new_ids`` for a continued
  conversation and ``prefix_ids + new_ids`` otherwise (``prefix_ids``: a shared system prompt, a document, a
  group's prefix; the same tuple object for every request sharing it). ``answers[i]`` are request i's output ids:
  the server's real answer live, ``Trace.placeholder_answer(req)`` (deterministic ids, ``output_len`` of them) in a
  replay. Both have ``output_len`` tokens (the suite sends ``ignore_eos``), so the prompts' lengths and shared
  prefixes are identical live and in the replay.
* ``output_len``: max_new_tokens; ``text``: the user text behind ``new_ids`` for real-text workloads, else None.
* ``Trace.params``: the generator's arguments plus ``working_set_tokens`` (F) and ``working_set_x`` (F / budget).
* ``Trace.to_jsonl(path)`` / ``Trace.from_jsonl(path)``: the trace on disk (one header line, one line per request).

Working set. F is the number of distinct tokens a cache must hold so that every returning request hits: for chat
workloads the active conversations at their final length (last prompt + answer) plus shared prefixes once; for
document and prefix workloads every document / group prefix with its questions and answers. The x of a trace is
F / (the bf16 KV budget in token slots); generators pick the number of users (documents, groups) for a requested x.
Conversations at earlier turns hold less: ``multiturn`` also records ``steady_footprint_x``, the active
conversations' mean size over the budget (finished conversations still cached until evicted come on top).

Generators (one per workload of the suite):

(a) ``multiturn``: SGLang ``benchmark/hicache/bench_multiturn.py``'s shape: first turn ``request_length`` tokens,
    later turns ``sub_question_length`` new tokens, ``output_length`` answers, ``num_rounds`` turns, open-loop
    Poisson (or uniform) ticks at ``request_rate``; at each tick a client is drawn from a ready queue (random or
    fifo); a client re-enters the queue ``nominal_latency_s + think`` after its tick; a finished conversation is
    replaced by a new one, so ``num_clients`` conversations stay active and ≥ 1,000 returning turns fit in one run.
(b) ``shared_prefix``: the structure of ``sglang.bench_serving --dataset-name generated-shared-prefix``
    (groups of prompts sharing a system prompt, uniform or Zipf group popularity, shuffled): the live run uses the
    upstream tool itself (``gsp.py``); this trace lets the replay see the same shape.
(c) ``chat_over_documents``: real text: each user owns a document cut from WikiText-2 test and asks MT-Bench
    questions about it; sessions start at Poisson times, turns follow exponential think time.
(d) ``long_doc_qa``: documents of 8K-32K tokens; each request asks a random document a short question.
(e) ``cyclic``: every user's turn t before any user's turn t+1 (the largest reuse distance: an LRU smaller than one
    cycle never hits); kept only to measure overhead when nothing is reusable.
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .model import pseudo_tokens

WORKLOADS = ("multiturn", "shared-prefix", "chat-docs", "long-doc-qa", "cyclic")


@dataclass(frozen=True)
class TraceRequest:
    index: int
    user: int
    turn: int
    arrival_s: float
    new_ids: tuple[int, ...]
    output_len: int
    returning: bool
    history: int | None = None
    prefix_ids: tuple[int, ...] = ()
    think_s: float = 0.0
    text: str | None = None


@dataclass(frozen=True)
class Trace:
    workload: str
    requests: tuple[TraceRequest, ...]
    vocab_size: int
    seed: int
    params: dict = field(default_factory=dict)

    def prompt(self, req: TraceRequest, prompts: Mapping[int, Sequence[int]],
               answers: Mapping[int, Sequence[int]]) -> list[int]:
        """Token ids of ``req``'s prompt, given the prompts and answers of the requests it continues."""
        if req.history is None:
            return [*req.prefix_ids, *req.new_ids]
        return [*prompts[req.history], *answers[req.history], *req.new_ids]

    def placeholder_answer(self, req: TraceRequest) -> list[int]:
        """Deterministic stand-in answer of ``output_len`` ids (what a replay without a model appends)."""
        return pseudo_tokens(req.output_len, f"{self.seed}:answer:{self.workload}:{req.index}", self.vocab_size)

    def replay_prompts(self) -> list[list[int]]:
        """Every request's prompt with placeholder answers (what a CPU replay sends), in trace order."""
        prompts: dict[int, list[int]] = {}
        answers: dict[int, list[int]] = {}
        for r in self.requests:
            prompts[r.index] = self.prompt(r, prompts, answers)
            answers[r.index] = self.placeholder_answer(r)
        return [prompts[r.index] for r in self.requests]

    def prompt_lengths(self) -> list[int]:
        """Prompt length of every request (answers of ``output_len`` tokens), without building the ids."""
        lengths: dict[int, int] = {}
        for r in self.requests:
            base = len(r.prefix_ids) if r.history is None else lengths[r.history] + self.requests[r.history].output_len
            lengths[r.index] = base + len(r.new_ids)
        return [lengths[r.index] for r in self.requests]

    @property
    def working_set_tokens(self) -> int:
        return int(self.params["working_set_tokens"])

    def to_jsonl(self, path: str | Path) -> None:
        head = {"workload": self.workload, "vocab_size": self.vocab_size, "seed": self.seed, "params": self.params}
        lines = [json.dumps(head)]
        prefixes: dict[int, int] = {}  # id(prefix tuple) -> index of the first request carrying it
        for r in self.requests:
            d = dataclasses.asdict(r)
            if r.prefix_ids:
                first = prefixes.setdefault(id(r.prefix_ids), r.index)
                if first != r.index:
                    d["prefix_ids"] = {"same_as": first}
            lines.append(json.dumps(d))
        Path(path).write_text("\n".join(lines) + "\n")

    @classmethod
    def from_jsonl(cls, path: str | Path) -> "Trace":
        lines = Path(path).read_text().splitlines()
        head = json.loads(lines[0])
        reqs: list[TraceRequest] = []
        for line in lines[1:]:
            d = json.loads(line)
            p = d["prefix_ids"]
            d["prefix_ids"] = reqs[p["same_as"]].prefix_ids if isinstance(p, dict) else tuple(p)
            d["new_ids"] = tuple(d["new_ids"])
            reqs.append(TraceRequest(**d))
        return cls(head["workload"], tuple(reqs), head["vocab_size"], head["seed"], head["params"])


# ---------------------------------------------------------------------------------------------------------------------
# Arrival processes
# ---------------------------------------------------------------------------------------------------------------------

def _gap(rng: random.Random, rate: float, distribution: str) -> float:
    if not math.isfinite(rate) or rate <= 0:
        return 0.0
    return rng.expovariate(rate) if distribution == "poisson" else 1.0 / rate


def _requests_for(rate: float, duration_s: float | None, num_requests: int | None) -> int:
    if num_requests is not None:
        return num_requests
    if duration_s is None or not math.isfinite(rate):
        raise ValueError("give num_requests, or a finite rate and duration_s")
    return max(1, math.ceil(rate * duration_s))


def _finish(workload: str, reqs: list[dict], vocab: int, seed: int, params: dict, ws: int,
            budget: int | None) -> Trace:
    reqs.sort(key=lambda d: (d["arrival_s"], d["index"]))
    remap = {d["index"]: i for i, d in enumerate(reqs)}
    out = [TraceRequest(**{**d, "index": remap[d["index"]],
                           "history": None if d.get("history") is None else remap[d["history"]]}) for d in reqs]
    params = {**params, "working_set_tokens": ws,
              "working_set_x": round(ws / budget, 4) if budget else None, "requests": len(out)}
    return Trace(workload, tuple(out), vocab, seed, params)


def _users_for(x: float | None, budget: int | None, per_user: int, shared: int, given: int | None) -> int:
    if given is not None:
        return given
    if x is None or not budget:
        raise ValueError("give the number of users, or a working-set multiple x and the KV budget")
    return max(1, round((x * budget - shared) / per_user))


# ---------------------------------------------------------------------------------------------------------------------
# (a) multi-turn chat, open-loop arrivals, random ready queue
# ---------------------------------------------------------------------------------------------------------------------

def multiturn(*, vocab_size: int, seed: int = 0, x: float | None = None, budget_tokens: int | None = None,
              num_clients: int | None = None, request_length: int = 2048, sub_question_length: int = 256,
              output_length: int = 128, num_rounds: int = 8, request_rate: float = 1.0,
              distribution: str = "poisson", ready_queue_policy: str = "random", duration_s: float | None = None,
              num_requests: int | None = None, nominal_latency_s: float = 1.0, think_mean_s: float = 0.0,
              system_tokens: int = 0, stagger_start: bool = True) -> Trace:
    """(a): see the module docstring. ``num_clients`` (active conversations) follows from ``x`` when not given.

    ``stagger_start``: the first ``num_clients`` conversations start at a random turn k of ``num_rounds`` (their
    first request carries a synthetic history of k-1 turns as new tokens), so the cache's footprint is at steady
    state after one request per client instead of after a whole conversation (upstream starts every client at
    turn 1; the warm-up then has to last a conversation)."""
    per_conv = request_length + (num_rounds - 1) * sub_question_length + num_rounds * output_length
    clients = _users_for(x, budget_tokens, per_conv, system_tokens, num_clients)
    n = _requests_for(request_rate, duration_s, num_requests)
    rng = random.Random(f"{seed}:multiturn")
    system = tuple(pseudo_tokens(system_tokens, f"{seed}:mt:system", vocab_size))
    ready = list(range(clients))  # conversation ids ready to speak
    busy: list[tuple[float, int]] = []  # (ready again at, conversation)
    turn_of: dict[int, int] = {c: rng.randrange(num_rounds) for c in range(clients)} if stagger_start else {}
    started: set[int] = set()
    think_of: dict[int, float] = {}  # the think time drawn when a conversation's previous turn was scheduled
    last_req: dict[int, int] = {}
    next_conv = clients
    reqs: list[dict] = []
    t = 0.0
    while len(reqs) < n:
        t += _gap(rng, request_rate, distribution)
        while busy and (busy[0][0] <= t or not ready):
            at, c = heapq.heappop(busy)
            t = max(t, at)
            ready.append(c)
        c = ready.pop(rng.randrange(len(ready)) if ready_queue_policy == "random" else 0)
        turn = turn_of.get(c, 0) + 1
        turn_of[c] = turn
        first = c not in started
        started.add(c)
        n_new = request_length + (turn - 1) * (output_length + sub_question_length) if first else sub_question_length
        new = pseudo_tokens(n_new, f"{seed}:mt:{c}:{turn}", vocab_size)
        think = think_of.pop(c, 0.0)
        reqs.append({"index": len(reqs), "user": c, "turn": turn, "arrival_s": round(t, 6), "new_ids": tuple(new),
                     "output_len": output_length, "returning": not first,
                     "history": None if first else last_req[c], "prefix_ids": system if first else (),
                     "think_s": round(think, 6)})
        last_req[c] = len(reqs) - 1
        if turn < num_rounds:
            think_of[c] = rng.expovariate(1.0 / think_mean_s) if think_mean_s > 0 else 0.0
            heapq.heappush(busy, (t + nominal_latency_s + think_of[c], c))
        else:
            ready.append(next_conv)
            next_conv += 1
    params = dict(num_clients=clients, request_length=request_length, sub_question_length=sub_question_length,
                  output_length=output_length, num_rounds=num_rounds, request_rate=request_rate,
                  distribution=distribution, ready_queue_policy=ready_queue_policy,
                  nominal_latency_s=nominal_latency_s, think_mean_s=think_mean_s, system_tokens=system_tokens,
                  stagger_start=stagger_start, conversations=next_conv,
                  # what the active conversations hold on average (each at a uniformly drawn turn), over the budget
                  steady_footprint_x=(round(clients * (request_length + output_length + (num_rounds - 1) / 2
                                                       * (sub_question_length + output_length)) / budget_tokens, 4)
                                      if budget_tokens else None))
    return _finish("multiturn", reqs, vocab_size, seed, params, system_tokens + clients * per_conv, budget_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# (b) shared prefixes (the structure of bench_serving's generated-shared-prefix dataset)
# ---------------------------------------------------------------------------------------------------------------------

def shared_prefix_groups_for(x: float, budget_tokens: int, *, prompts_per_group: int, system_prompt_len: int,
                             question_len: int, output_len: int) -> int:
    per_group = system_prompt_len + prompts_per_group * (question_len + output_len)
    return _users_for(x, budget_tokens, per_group, 0, None)


def shared_prefix(*, vocab_size: int, seed: int = 0, x: float | None = None, budget_tokens: int | None = None,
                  num_groups: int | None = None, prompts_per_group: int = 16, system_prompt_len: int = 4096,
                  question_len: int = 256, output_len: int = 128, zipf_alpha: float | None = None,
                  request_rate: float = math.inf) -> Trace:
    """(b): ``num_groups`` x ``prompts_per_group`` requests (group prefix + a unique question), shuffled; with
    ``zipf_alpha`` the group of each request is drawn with probability ~ 1/rank^alpha instead."""
    groups = num_groups if num_groups is not None else shared_prefix_groups_for(
        x, budget_tokens, prompts_per_group=prompts_per_group, system_prompt_len=system_prompt_len,
        question_len=question_len, output_len=output_len)
    rng = random.Random(f"{seed}:gsp")
    prefixes = [tuple(pseudo_tokens(system_prompt_len, f"{seed}:gsp:{g}", vocab_size)) for g in range(groups)]
    total = groups * prompts_per_group
    if zipf_alpha is None:
        order = [g for g in range(groups) for _ in range(prompts_per_group)]
        rng.shuffle(order)
    else:
        weights = [1.0 / (k + 1) ** zipf_alpha for k in range(groups)]
        order = rng.choices(range(groups), weights=weights, k=total)
    seen: dict[int, int] = {}
    reqs, t = [], 0.0
    for i, g in enumerate(order):
        t += _gap(rng, request_rate, "poisson")
        seen[g] = seen.get(g, 0) + 1
        reqs.append({"index": i, "user": g, "turn": seen[g], "arrival_s": round(t, 6), "returning": seen[g] > 1,
                     "new_ids": tuple(pseudo_tokens(question_len, f"{seed}:gsp:q:{i}", vocab_size)),
                     "output_len": output_len, "prefix_ids": prefixes[g]})
    params = dict(num_groups=groups, prompts_per_group=prompts_per_group, system_prompt_len=system_prompt_len,
                  question_len=question_len, output_len=output_len, zipf_alpha=zipf_alpha, request_rate=request_rate)
    ws = sum(system_prompt_len + seen[g] * (question_len + output_len) for g in seen)
    return _finish("shared-prefix", reqs, vocab_size, seed, params, ws, budget_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# (c) real text: MT-Bench questions over per-user documents; (d) long-document QA; shared segment builders
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatSegments:
    """How chat text becomes token ids. A first turn is ``opening(system) + document ids + question(text)``
    (``opening``: the rendered system turn and the user header; ``question``: the rest of the user message, the
    end of the turn and the assistant header); a later turn appends ``follow_up(text)`` after the answer (end of the
    assistant turn, the next user message, the assistant header). ``text.ChatTokenizer`` renders a model's chat
    template; ``pseudo_chat_segments`` stands in without a tokenizer (about len(text)/4 deterministic ids)."""

    opening: Callable[[str], list[int]]
    question: Callable[[str], list[int]]
    follow_up: Callable[[str], list[int]]


def pseudo_chat_segments(vocab_size: int, seed: int = 0) -> ChatSegments:
    def enc(text: str) -> list[int]:
        return pseudo_tokens(max(1, len(text) // 4), f"{seed}:text:{text}", vocab_size) if text else []

    return ChatSegments(opening=enc, question=enc, follow_up=enc)


def chat_over_documents(*, segments: ChatSegments, documents: Sequence[Sequence[int]],
                        questions: Sequence[str], vocab_size: int, seed: int = 0, x: float | None = None,
                        budget_tokens: int | None = None, num_users: int | None = None, system_text: str = "",
                        rounds: int = 4, output_len: int = 128, session_rate: float = 1.0, think_mean_s: float = 5.0,
                        duration_s: float | None = None, num_sessions: int | None = None,
                        nominal_latency_s: float = 1.0) -> Trace:
    """(c): user u owns ``documents[u % len(documents)]`` (token ids, already cut to size). A session is ``rounds``
    turns: the first puts the document before a question, the next ones ask the following questions (``questions``
    in order: MT-Bench's two turns of an entry, then the next entry's). Sessions start at Poisson times
    (``session_rate`` per second) on a random idle user; a session's turns follow exponential think time; a user's
    later sessions reuse the (system + document) prefix of its first one."""
    doc_len = sum(len(d) for d in documents) / max(1, len(documents))
    sample = list(questions[:16]) or [""]
    q_tokens = sum(len(segments.follow_up(q)) for q in sample) / len(sample)
    opening = tuple(segments.opening(system_text))
    per_user = int(doc_len + rounds * (q_tokens + output_len))
    users = _users_for(x, budget_tokens, per_user, len(opening), num_users)
    n_sessions = num_sessions if num_sessions is not None else _requests_for(session_rate, duration_s, None)
    rng = random.Random(f"{seed}:chat-docs")
    idle_at = [0.0] * users
    sessions_of = [0] * users
    prefix_of: dict[int, tuple[int, ...]] = {}
    reqs: list[dict] = []
    t = 0.0
    for s in range(n_sessions):
        t += _gap(rng, session_rate, "poisson")
        free = [u for u in range(users) if idle_at[u] <= t] or [min(range(users), key=idle_at.__getitem__)]
        u = rng.choice(free)
        t_u = max(t, idle_at[u])
        sessions_of[u] += 1
        prefix = prefix_of.setdefault(u, opening + tuple(documents[u % len(documents)]))
        prev = None
        for k in range(rounds):
            q = questions[(s * rounds + k) % len(questions)]
            think = rng.expovariate(1.0 / think_mean_s) if k and think_mean_s > 0 else 0.0
            t_u += think + (nominal_latency_s if k else 0.0)
            req = {"index": len(reqs), "user": u, "turn": k + 1, "arrival_s": round(t_u, 6),
                   "output_len": output_len, "text": q, "think_s": round(think, 6)}
            if k == 0:
                req.update(new_ids=tuple(segments.question(q)), returning=sessions_of[u] > 1, prefix_ids=prefix)
            else:
                req.update(new_ids=tuple(segments.follow_up(q)), returning=True, history=prev)
            reqs.append(req)
            prev = len(reqs) - 1
        idle_at[u] = t_u + nominal_latency_s
    params = dict(num_users=users, documents=len(documents), document_tokens=round(doc_len), rounds=rounds,
                  output_len=output_len, session_rate=session_rate, think_mean_s=think_mean_s,
                  system_tokens=len(opening), sessions=n_sessions)
    return _finish("chat-docs", reqs, vocab_size, seed, params, len(opening) + users * per_user, budget_tokens)


def long_doc_qa(*, vocab_size: int, seed: int = 0, x: float | None = None, budget_tokens: int | None = None,
                num_docs: int | None = None, doc_tokens: int = 16384, question_tokens: int = 64, output_len: int = 64,
                request_rate: float = 1.0, duration_s: float | None = None, num_requests: int | None = None,
                repeat_mode: str = "random", documents: Sequence[Sequence[int]] | None = None) -> Trace:
    """(d): ``num_docs`` documents of ``doc_tokens`` (pseudo ids, or ``documents`` cut from real text); each request
    is one document + a fresh question. ``repeat_mode`` random: each request asks a uniformly drawn document (as
    LMCache's long-doc-qa ``random``); tile: documents in turn (the longest reuse distance)."""
    per_doc = doc_tokens + question_tokens + output_len
    docs = _users_for(x, budget_tokens, per_doc, 0, num_docs)
    n = _requests_for(request_rate, duration_s, num_requests)
    if repeat_mode not in ("random", "tile"):
        raise ValueError(f"repeat_mode must be random or tile, got {repeat_mode!r}")
    rng = random.Random(f"{seed}:ldqa")
    texts = [tuple(documents[d % len(documents)][:doc_tokens]) if documents else
             tuple(pseudo_tokens(doc_tokens, f"{seed}:ldqa:doc:{d}", vocab_size)) for d in range(docs)]
    asked = [0] * docs
    reqs, t = [], 0.0
    for i in range(n):
        t += _gap(rng, request_rate, "poisson")
        d = rng.randrange(docs) if repeat_mode == "random" else i % docs
        asked[d] += 1
        reqs.append({"index": i, "user": d, "turn": asked[d], "arrival_s": round(t, 6), "returning": asked[d] > 1,
                     "new_ids": tuple(pseudo_tokens(question_tokens, f"{seed}:ldqa:q:{i}", vocab_size)),
                     "output_len": output_len, "prefix_ids": texts[d]})
    params = dict(num_docs=docs, doc_tokens=doc_tokens, question_tokens=question_tokens, output_len=output_len,
                  request_rate=request_rate, repeat_mode=repeat_mode, real_text=documents is not None)
    return _finish("long-doc-qa", reqs, vocab_size, seed, params, docs * per_doc, budget_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# (e) cyclic: the adversarial round-robin (overhead when nothing is reusable)
# ---------------------------------------------------------------------------------------------------------------------

def cyclic(*, vocab_size: int, seed: int = 0, x: float | None = None, budget_tokens: int | None = None,
           num_users: int | None = None, history_tokens: int = 2048, rounds: int = 3, question_tokens: int = 128,
           output_len: int = 64, system_tokens: int = 0, request_rate: float = math.inf) -> Trace:
    """(e): user u's first prompt is a shared system prompt + ``history_tokens`` of its own + a question; later turns
    add ``question_tokens``; every user's turn t comes before any user's turn t+1."""
    per_user = history_tokens + rounds * (question_tokens + output_len)
    users = _users_for(x, budget_tokens, per_user, system_tokens, num_users)
    rng = random.Random(f"{seed}:cyclic")
    system = tuple(pseudo_tokens(system_tokens, f"{seed}:cy:system", vocab_size))
    reqs, last, t = [], {}, 0.0
    for turn in range(1, rounds + 1):
        for u in range(users):
            t += _gap(rng, request_rate, "poisson")
            new = pseudo_tokens((history_tokens if turn == 1 else 0) + question_tokens, f"{seed}:cy:{u}:{turn}",
                                vocab_size)
            reqs.append({"index": len(reqs), "user": u, "turn": turn, "arrival_s": round(t, 6),
                         "new_ids": tuple(new), "output_len": output_len, "returning": turn > 1,
                         "history": last.get(u), "prefix_ids": system if turn == 1 else ()})
            last[u] = len(reqs) - 1
    params = dict(num_users=users, history_tokens=history_tokens, rounds=rounds, question_tokens=question_tokens,
                  output_len=output_len, system_tokens=system_tokens, request_rate=request_rate)
    return _finish("cyclic", reqs, vocab_size, seed, params, system_tokens + users * per_user, budget_tokens)
