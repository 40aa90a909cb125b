"""Send a ``workloads.Trace`` to a live server and record every request.

Each request is sent at its planned ``arrival_s``, never before the request it continues (``history``) has finished
plus its ``think_s``, and only while fewer than ``max_parallel`` requests are in flight (a client-side queue, as in
SGLang's ``bench_multiturn.py`` ``--max-parallel``). ``pace=False`` (a closed loop: the saturation probe) ignores the
planned times and sends the requests in trace order, each as soon as a slot is free and its history is done. A
prompt is built from the server's own earlier answers (``Trace.prompt``). Nothing is sent after the window ends;
requests in flight then finish. A request whose history failed or was not sent is skipped, as is one whose
prompt + output would exceed ``max_context``.

Records (one per sent request; times in seconds from the start): ``index``, ``user``, ``turn``, ``returning``,
``ok``, ``error``, ``prompt_tokens``, ``cached_tokens``, ``cached_device``, ``cached_host`` (restored from the lower
tier), ``ttft_s``, ``tpot_s``, ``latency_s``, ``output_tokens``, ``planned_s``, ``t_send_s`` (after the client
queue), ``t_end_s``, ``queue_s`` (send - planned: how far the client fell behind the plan), ``measured`` (sent
inside the window, after the warm-up).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

from .client import ServerClient
from .workloads import Trace, TraceRequest


@dataclass(frozen=True)
class Window:
    """Requests sent in [warmup_s, warmup_s + measure_s) are measured; none is sent after the end."""

    warmup_s: float
    measure_s: float

    @property
    def end_s(self) -> float:
        return self.warmup_s + self.measure_s


@dataclass
class DriveResult:
    """records: one per sent request; unsent: requests not sent because the window had closed; skipped: requests
    not sent because the request they continue failed or was not sent, or the prompt would not fit."""

    records: list[dict]
    unsent: int
    skipped: int
    wall_s: float

    @property
    def measured(self) -> list[dict]:
        return [r for r in self.records if r["measured"]]


async def drive(client: ServerClient, trace: Trace, *, max_parallel: int, window: Window | None = None,
                pace: bool = True, timeout_s: float = 600.0, max_context: int | None = None,
                on_done: Callable[[dict], None] | None = None) -> DriveResult:
    """Run ``trace`` against ``client`` (see the module docstring)."""
    children: dict[int, int] = {}
    for r in trace.requests:
        if r.history is not None:
            children[r.history] = children.get(r.history, 0) + 1
    prompts: dict[int, list[int]] = {}
    answers: dict[int, list[int]] = {}
    done = {r.index: asyncio.Event() for r in trace.requests}
    dispatched = {r.index: asyncio.Event() for r in trace.requests}  # closed loop: keeps the trace order
    sent_ok: dict[int, bool] = {}
    sem = asyncio.Semaphore(max_parallel)
    records: list[dict] = []
    skipped = unsent = 0
    t0 = time.perf_counter()
    end = window.end_s if window else None

    def closed() -> bool:
        return end is not None and time.perf_counter() - t0 >= end

    def release(h: int) -> None:  # drop a prompt and answer once every request continuing it has its prompt
        children[h] -= 1
        if children[h] == 0:
            prompts.pop(h, None)
            answers.pop(h, None)

    async def one(req: TraceRequest) -> None:
        nonlocal skipped, unsent
        try:
            if pace and end is not None and req.arrival_s >= end:
                unsent += 1
                return
            if pace:
                delay = t0 + req.arrival_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif req.index > 0:
                await dispatched[req.index - 1].wait()
            if req.history is not None:
                await done[req.history].wait()
                if not sent_ok.get(req.history):
                    skipped += 1
                    return
                if req.think_s > 0:
                    await asyncio.sleep(req.think_s)
            if closed():
                unsent += 1
                return
            await sem.acquire()
            dispatched[req.index].set()
            try:
                if closed():
                    unsent += 1
                    return
                prompt = trace.prompt(req, prompts, answers)
                if req.history is not None:
                    release(req.history)
                if max_context is not None and len(prompt) + req.output_len > max_context:
                    skipped += 1
                    return
                t_send = time.perf_counter()
                res = await client.generate(prompt, req.output_len, ignore_eos=True, timeout_s=timeout_s)
            finally:
                sem.release()
            if children.get(req.index):
                prompts[req.index], answers[req.index] = prompt, list(res.output_ids)
            sent_ok[req.index] = res.ok
            rec = {"index": req.index, "user": req.user, "turn": req.turn, "returning": req.returning,
                   "ok": res.ok, "error": res.error, "prompt_tokens": res.prompt_tokens,
                   "cached_tokens": res.cached_tokens, "cached_device": res.cached_device,
                   "cached_host": res.cached_host, "ttft_s": _r(res.ttft_s), "tpot_s": _r(res.tpot_s),
                   "latency_s": _r(res.latency_s), "output_tokens": res.output_tokens,
                   "planned_s": req.arrival_s, "t_send_s": _r(t_send - t0), "t_end_s": _r(res.t_end - t0),
                   "queue_s": _r(t_send - t0 - req.arrival_s) if pace else None,
                   "measured": window is None or window.warmup_s <= t_send - t0 < window.end_s}
            records.append(rec)
            if on_done is not None:
                on_done(rec)
        finally:
            dispatched[req.index].set()
            done[req.index].set()

    await asyncio.gather(*(one(r) for r in trace.requests))
    records.sort(key=lambda r: r["t_send_s"])
    return DriveResult(records, unsent, skipped, time.perf_counter() - t0)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)
