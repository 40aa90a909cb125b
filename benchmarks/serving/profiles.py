"""Profiles: which configurations, workloads, working-set multiples, rates and repeats one command runs, and the
plan of server runs (configs interleaved in random order, one server at a time).

* ``h200-first-slice``: one H200 within ~40 minutes of box time: radix, fp8, hicache2, kvtc16 on workload (a) at
  x in {1.5, 2.5, 3.5} and 0.7 x radix's saturation rate, one repeat, 20 s warm-up + 75 s windows, the break-even
  probe per config. Fewer than 1,000 returning turns per point: its p99s are flagged unreliable.
* ``h200-slice``: one H200 within ~20 minutes of box time: radix, kvtc16, hicache2 and fp8, in that order (a run cut
  short keeps the decisive pair), on workload (a) at x in {1, 2.5}, 15 s warm-up + 45 s windows, the break-even probe
  at 4,096 tokens.
  A few hundred returning turns per point: CIs are wide and p99s unreliable.
* ``h200-full``: the sweep: every config (plus the flashinfer table), every workload, x in {1, 1.5, 2, 2.5, 3, 3.5,
  4, 6} at 0.7 x saturation, rates 0.5/0.7/0.9 x saturation at x in {1.5, 2.5, 4}, 3 repeats, 60 s warm-up +
  300 s windows (>= 1,000 returning turns per point at the rates seen on an H200); many hours of box time.
* ``ci``: tiny sizes for the fake server in the tests (every config, workload and plot, in seconds).

Rates are fractions of radix's saturation rate, measured per workload by the saturation probe (closed loop at
``max_parallel``, no pacing) on the first radix server of the run and kept in ``saturation.json``.

The H200 profiles: bf16 budget 65,536 slots (8 GiB of Llama-3.1-8B KV; hicache8's host pool then takes 64 GiB of
pinned host memory), attention backend triton (the offline box's SGLang kit has no FlashAttention-3, SGLang's Hopper
default, and SGLang's FP4 KV cache needs triton there), CUDA graphs on up to batch 32.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from .model import ModelInfo
from .workloads import (ChatSegments, Trace, chat_over_documents, cyclic, long_doc_qa, multiturn,
                        shared_prefix_groups_for)


@dataclass(frozen=True)
class WorkloadPlan:
    """Parameters of one workload's generator and where it is measured: every x of ``xs`` at ``main_fraction`` of
    the saturation rate, and every fraction of ``rate_fractions`` at each x of ``rate_xs``."""

    params: dict
    xs: tuple[float, ...]
    main_fraction: float = 0.7
    rate_xs: tuple[float, ...] = ()
    rate_fractions: tuple[float, ...] = ()
    saturation_x: float = 2.5

    def points(self) -> list[tuple[float, float]]:
        pts = [(x, self.main_fraction) for x in self.xs]
        pts += [(x, f) for x in self.rate_xs for f in self.rate_fractions if (x, f) not in pts]
        return pts


@dataclass(frozen=True)
class Profile:
    name: str
    budget_tokens: int
    configs: tuple[str, ...]
    workloads: dict[str, WorkloadPlan]
    warmup_s: float
    measure_s: float
    repeats: int = 1
    page_size: int = 64
    attention_backend: str = "triton"
    common_args: tuple[str, ...] = ()
    in_flight_fraction: float = 0.4
    max_parallel_cap: int = 64
    saturation_window: tuple[float, float] = (20.0, 60.0)
    probe_requests: int = 4000
    breakeven_lengths: tuple[int, ...] = (512, 2048, 8192)
    decisive_x: float = 2.5
    poll_s: float = 5.0
    stats_pause_s: float = 1.5
    request_timeout_s: float = 600.0
    seed: int = 0
    shuffle_configs: bool = True
    extra: dict = field(default_factory=dict)


_MT_H200 = dict(request_length=2048, sub_question_length=256, output_length=64, num_rounds=6, stagger_start=True)
_GSP_H200 = dict(prompts_per_group=16, system_prompt_len=4096, question_len=256, output_len=64, zipf_alpha=1.2)
_DOCS_H200 = dict(doc_tokens=2048, rounds=4, output_len=64, think_mean_s=5.0)
_LDQA_H200 = dict(doc_tokens=16384, question_tokens=64, output_len=64, repeat_mode="random")
_CYC_H200 = dict(history_tokens=2048, rounds=3, question_tokens=128, output_len=64, system_tokens=1024)
_H200_COMMON = ("--load-format", "dummy", "--mem-fraction-static", "0.85", "--cuda-graph-max-bs", "32")

PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("h200-first-slice", budget_tokens=65536, configs=("radix", "fp8", "hicache2", "kvtc16"),
            workloads={"multiturn": WorkloadPlan(_MT_H200, xs=(1.5, 2.5, 3.5))}, warmup_s=20.0, measure_s=75.0,
            common_args=_H200_COMMON, max_parallel_cap=32, saturation_window=(15.0, 40.0),
            breakeven_lengths=(1024, 4096, 16384)),
    Profile("h200-slice", budget_tokens=65536, configs=("radix", "kvtc16", "hicache2", "fp8"),
            workloads={"multiturn": WorkloadPlan(_MT_H200, xs=(1.0, 2.5))}, warmup_s=15.0, measure_s=45.0,
            common_args=_H200_COMMON, max_parallel_cap=32, saturation_window=(10.0, 30.0),
            breakeven_lengths=(4096,), shuffle_configs=False),
    Profile("h200-full", budget_tokens=65536,
            configs=("radix", "fp8", "fp4", "hicache2", "hicache8", "kvtc8", "kvtc16", "kvtc32", "unlimited",
                     "radix@flashinfer", "kvtc16@flashinfer"),
            workloads={
                "multiturn": WorkloadPlan(_MT_H200, xs=(1, 1.5, 2, 2.5, 3, 3.5, 4, 6), rate_xs=(1.5, 2.5, 4),
                                          rate_fractions=(0.5, 0.7, 0.9)),
                "shared-prefix": WorkloadPlan(_GSP_H200, xs=(1.5, 2.5, 4)),
                "chat-docs": WorkloadPlan(_DOCS_H200, xs=(1.5, 2.5, 4)),
                "long-doc-qa": WorkloadPlan(_LDQA_H200, xs=(1.5, 2.5, 4)),
                "cyclic": WorkloadPlan(_CYC_H200, xs=(2.5,)),
            }, warmup_s=60.0, measure_s=300.0, repeats=3, common_args=_H200_COMMON, max_parallel_cap=32,
            breakeven_lengths=(512, 1024, 2048, 4096, 8192, 16384, 32768)),
    Profile("ci", budget_tokens=2048,
            configs=("radix", "fp8", "fp4", "hicache2", "kvtc16", "unlimited"),
            workloads={
                "multiturn": WorkloadPlan(dict(request_length=96, sub_question_length=16, output_length=4,
                                               num_rounds=4, nominal_latency_s=0.05), xs=(1.5, 3.0),
                                          rate_xs=(1.5,), rate_fractions=(0.9,), saturation_x=1.5),
                "shared-prefix": WorkloadPlan(dict(prompts_per_group=4, system_prompt_len=64, question_len=8,
                                                   output_len=4, zipf_alpha=1.2), xs=(1.5,)),
                "chat-docs": WorkloadPlan(dict(doc_tokens=96, rounds=3, output_len=4, think_mean_s=0.02,
                                               nominal_latency_s=0.05), xs=(1.5,)),
                "long-doc-qa": WorkloadPlan(dict(doc_tokens=256, question_tokens=8, output_len=4, repeat_mode="random"),
                                             xs=(1.5,)),
                "cyclic": WorkloadPlan(dict(history_tokens=64, rounds=3, question_tokens=8, output_len=4,
                                            system_tokens=16), xs=(3.0,)),
            }, warmup_s=0.15, measure_s=0.45, repeats=1, page_size=16, in_flight_fraction=0.4,
            max_parallel_cap=8, saturation_window=(0.1, 0.5), probe_requests=300, breakeven_lengths=(64, 256),
            decisive_x=1.5, poll_s=0.3, stats_pause_s=0.05, request_timeout_s=30.0),
)}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}")
    return PROFILES[name]


@dataclass(frozen=True)
class Point:
    workload: str
    x: float
    rate_fraction: float
    repeat: int
    seed: int


@dataclass(frozen=True)
class ServerRun:
    """One server start: a config, a repeat, and its points in the order they run."""

    config: str
    repeat: int
    points: tuple[Point, ...]


def plan_runs(profile: Profile, configs: list[str] | None = None) -> list[ServerRun]:
    """Every (config, repeat) server run with its points. Repeat r runs the configs in a random order (seeded by the
    profile's seed and r; the profile's order when ``shuffle_configs`` is off), except that the first run of all is
    radix's when a saturation probe is needed (radix sets the rates); points within a run are shuffled too. Each
    repeat draws new trace seeds."""
    names = list(configs or profile.configs)
    runs: list[ServerRun] = []
    for rep in range(profile.repeats):
        rng = random.Random(f"{profile.seed}:order:{rep}")
        order = names[:]
        if profile.shuffle_configs:
            rng.shuffle(order)
        if rep == 0 and "radix" in order:
            order.remove("radix")
            order.insert(0, "radix")
        for config in order:
            pts = [Point(w, x, f, rep, profile.seed + 1000 * rep)
                   for w, plan in profile.workloads.items() for x, f in plan.points()]
            rng.shuffle(pts)
            runs.append(ServerRun(config, rep, tuple(pts)))
    return runs


def max_parallel_for(profile: Profile, mean_request_tokens: float) -> int:
    """Requests in flight such that their KV (prompt + output) stays within ``in_flight_fraction`` of the bf16
    budget: the pool is then mostly cache, not running requests (capped at ``max_parallel_cap``)."""
    n = math.floor(profile.in_flight_fraction * profile.budget_tokens / max(1.0, mean_request_tokens))
    return max(1, min(profile.max_parallel_cap, n))


def build_trace(profile: Profile, workload: str, *, x: float, rate: float, seed: int, model: ModelInfo,
                duration_s: float | None = None, num_requests: int | None = None,
                text: tuple[ChatSegments, list[list[int]], list[str]] | None = None) -> Trace:
    """The trace of one point of ``workload`` (not shared-prefix: that one runs through bench_serving).
    ``text``: (segments, documents, questions) for chat-docs / long-doc-qa (``text.chat_text_sources``)."""
    p = dict(profile.workloads[workload].params)
    common = dict(vocab_size=model.vocab_size, seed=seed, x=x, budget_tokens=profile.budget_tokens)
    if workload == "multiturn":
        return multiturn(**common, **p, request_rate=rate, duration_s=duration_s, num_requests=num_requests)
    if workload == "chat-docs":
        if text is None:
            raise ValueError("chat-docs needs text sources (segments, documents, questions)")
        segments, documents, questions = text
        rounds = p.pop("rounds")
        p.pop("doc_tokens", None)
        sessions = None if num_requests is None else max(1, num_requests // rounds)
        return chat_over_documents(**common, segments=segments, documents=documents, questions=questions,
                                   rounds=rounds, session_rate=rate / rounds, duration_s=duration_s,
                                   num_sessions=sessions, **p)
    if workload == "long-doc-qa":
        docs = text[1] if text is not None else None
        return long_doc_qa(**common, **p, request_rate=rate, duration_s=duration_s, num_requests=num_requests,
                           documents=docs)
    if workload == "cyclic":
        return cyclic(**common, **p, request_rate=rate)
    raise ValueError(f"no trace generator for workload {workload!r}")


def gsp_groups(profile: Profile, x: float) -> int:
    p = profile.workloads["shared-prefix"].params
    return shared_prefix_groups_for(x, profile.budget_tokens, prompts_per_group=p["prompts_per_group"],
                                    system_prompt_len=p["system_prompt_len"], question_len=p["question_len"],
                                    output_len=p["output_len"])


def with_overrides(profile: Profile, **kw) -> Profile:
    """``profile`` with the given fields replaced (None values ignored)."""
    return replace(profile, **{k: v for k, v in kw.items() if v is not None})
