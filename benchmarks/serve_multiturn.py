#!/usr/bin/env python3
"""Multi-turn chat serving benchmark: returning-conversation TTFT, throughput and prefix hits of SGLang servers.

Either against one running server (one config label):
    python3 benchmarks/serve_multiturn.py --url http://127.0.0.1:30000 --workload synthetic --kv-budget-tokens N
or launching each config in turn (own log under --out-dir/logs, /health wait, whole process group stopped after):
    python3 benchmarks/serve_multiturn.py --configs kvtc,radix,hicache --model-path M \\
        --server-args "--load-format dummy --skip-tokenizer-init --attention-backend triton --disable-cuda-graph \\
                       --mem-fraction-static 0.8 --max-total-tokens 32768" \\
        --kvtc-args "--kvtc-calibration DIR" --workload synthetic --working-set-multipliers 2,4

Configs: radix (plain radix cache), kvtc (``--kv-compress kvtc`` + --kvtc-args), hicache
(``--enable-hierarchical-cache`` + --hicache-args, default ``--hicache-ratio 2``), and each as ``<name>-nopressure``
(without ``--max-total-tokens``: the same workload with the whole memory budget, to show overhead). Every config
gets the same --server-args; ``--max-total-tokens N`` there is the common KV budget (kvtc: pool + compressed store
of the same total bytes, see serving_common.py). ``--enable-metrics`` is added so ``/metrics`` can be read.

Workloads (--workload):
  mtbench    MT-Bench two-turn questions (benchmarks/data/mt_bench_question.jsonl), one user per question;
  sharegpt   recorded human turns of ShareGPT conversations (dialogstudio_sharegpt_original_example.json, then
             fastchat_dummy_conversation.json); assistant turns are the server's own answers;
  synthetic  a shared system prompt of S tokens, a per-user history of H tokens, R rounds of Q new tokens.
             Working set = S + U * (H + R * (Q + O)) tokens (O = --output-len); --working-set-multipliers m,...
             picks U so that it is m x the KV budget.
In every workload users speak in rounds: a user's turn t+1 is sent only after every other user's turn t was sent
(round-robin), so with more users than fit in the pool a returning user's prefix has been pushed out (radix:
evicted and recomputed; kvtc: compressed and decompressed; hicache: written to host memory and loaded back).
Prompts are token ids: with a tokenizer in the model folder the chat template renders real text (turn t+1 = prompt t
+ the server's output ids + the template's next-user segment); without one (dummy models) the ids are deterministic
pseudo-random tokens of about len(text)/4 per text. Greedy sampling, --output-len new tokens (ignore_eos for
synthetic and pseudo-token prompts). Warm-up requests (kernel compilation; optionally a pool fill that exercises
compression/load-back) are not measured; the prefix cache is flushed before each measured run.

Per request (--out-dir/serving_requests/*.jsonl): user, turn, prompt/cached (device, host-or-compressed) tokens,
TTFT, latency, output tokens. Per config and working set (rows of serving.json, merged by (config, model, workload,
working_set_tokens)): returning-turn (turn >= 2) TTFT p50/p99, first-turn TTFT p50, req/s, output tok/s, hit rates
(total, device, restored), cached tokens per GB of KV GPU memory, kvtc gauges, errors. Also serving.md and
serving_ttft_cdf.png / serving_throughput.png (matplotlib optional).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import serving_common as sc

from kvtc_sglang.eval.conversations import read_mt_bench, read_sharegpt

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
KEY = ("config", "model", "workload", "working_set_tokens")
# options whose default depends on --smoke (and, for users and system tokens, on the workload)
DEFAULTS = dict(history_tokens=2048, rounds=3, question_tokens=128, output_len=64, max_turns=4, warmup_requests=3,
                warmup_fill=1.25, metrics_interval=5.0)
SMOKE = dict(history_tokens=64, rounds=2, question_tokens=16, output_len=8, max_turns=3, warmup_requests=1,
             warmup_fill=0.0, metrics_interval=1.0)
USERS = {"mtbench": 80, "sharegpt": 40, "synthetic": 16}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sc.add_target_args(ap)
    wl = ap.add_argument_group("workload")
    wl.add_argument("--workload", choices=("mtbench", "sharegpt", "synthetic"), default="synthetic")
    wl.add_argument("--num-users", type=int, help="users (default: mtbench 80, sharegpt 40, synthetic 16)")
    wl.add_argument("--max-turns", type=int, help="most turns per ShareGPT user (default 4)")
    wl.add_argument("--max-turn-tokens", type=int, default=1024, help="longest human turn (tokens)")
    wl.add_argument("--system-tokens", type=int, help="shared system prompt tokens (synthetic default 1024, else 0)")
    wl.add_argument("--history-tokens", type=int, help="synthetic: per-user history tokens (default 2048)")
    wl.add_argument("--rounds", type=int, help="synthetic: turns per user (default 3)")
    wl.add_argument("--question-tokens", type=int, help="synthetic: new tokens per turn (default 128)")
    wl.add_argument("--working-set-multipliers", help="synthetic: comma list m; users chosen so the working set is "
                                                      "m x the KV budget (e.g. 1,2,4)")
    wl.add_argument("--output-len", type=int, help="new tokens per request (max_new_tokens; default 64)")
    wl.add_argument("--ignore-eos", choices=("auto", "on", "off"), default="auto",
                    help="auto: on for synthetic and pseudo-token prompts, off for tokenized chats")
    wl.add_argument("--tokenizer", default="auto", help="auto (the model folder's, if any), none, or a path")
    wl.add_argument("--seed", type=int, default=0)
    run = ap.add_argument_group("run")
    run.add_argument("--concurrency", type=int, default=8, help="users in flight")
    run.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: as "
                                                                          "fast as --concurrency allows)")
    run.add_argument("--out-dir", help="results folder (default benchmarks/results; --smoke: /tmp/kvtc_serving_smoke)")
    args = ap.parse_args(argv)
    sc.check_target_args(ap, args)
    for k, v in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.num_users is None:
        args.num_users = 6 if args.smoke else USERS[args.workload]
    if args.system_tokens is None:
        args.system_tokens = (32 if args.smoke else 1024) if args.workload == "synthetic" else 0
    args.out_dir = Path(args.out_dir or ("/tmp/kvtc_serving_smoke" if args.smoke else HERE / "results"))
    args.multipliers = None
    if args.working_set_multipliers:
        if args.workload != "synthetic":
            ap.error("--working-set-multipliers needs --workload synthetic (chat data sets have fixed sizes)")
        args.multipliers = [float(m) for m in args.working_set_multipliers.split(",") if m.strip()]
    if args.concurrency < 1 or args.num_users < 1:
        ap.error("--concurrency and --num-users must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Prompts: chat-template tokenization or pseudo-random tokens
# ---------------------------------------------------------------------------------------------------------------------

class ChatTokenizer:
    """A model's tokenizer turning chat turns into token-id segments.

    ``first_turn(system, user)`` is the whole rendered first prompt (with the generation prompt);
    ``next_turn(user)`` is what the template puts after an assistant message's content up to the next generation
    prompt (end-of-turn marker, the user message, the assistant header), so turn t+1 = prompt t + the server's
    output ids (a trailing stop token dropped) + ``next_turn``. Without a chat template a plain "User:/Assistant:"
    layout is used.
    """

    _MARK = "<<kvtc-benchmark-split>>"

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.templated = bool(getattr(self.tok, "chat_template", None))
        self.stop_ids = set(self.tok.all_special_ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.encode(text)
        return text if len(ids) <= max_tokens else self.tok.decode(ids[:max_tokens])

    def _render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def first_turn(self, system: str, user: str) -> list[int]:
        if not self.templated:
            return self.encode((system + "\n\n" if system else "") + f"User: {user}\n\nAssistant:")
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.encode(self._render(msgs))

    def next_turn(self, user: str) -> list[int]:
        if not self.templated:
            return self.encode(f"\n\nUser: {user}\n\nAssistant:")
        text = self._render([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": self._MARK},
                             {"role": "user", "content": user}])
        return self.encode(text[text.index(self._MARK) + len(self._MARK):])


def load_tokenizer(spec: str, model: sc.ModelInfo | None, model_path: str | None) -> ChatTokenizer | None:
    if spec == "none":
        return None
    path = model_path if spec == "auto" else spec
    if spec == "auto" and (model is None or not model.has_tokenizer):
        return None
    return ChatTokenizer(path)


def system_text(tok: ChatTokenizer, n_tokens: int) -> str:
    """About ``n_tokens`` tokens of real text (WikiText-2) as a shared system prompt."""
    if n_tokens <= 0:
        return ""
    text = (DATA / "wikitext2_test.txt").read_text()[: n_tokens * 8]
    return tok.tok.decode(tok.encode(text)[:n_tokens])


# ---------------------------------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class Workload:
    """Conversations as token-id segments: ``segments[u][t]`` is what user u's turn t+1 adds to the prompt."""

    name: str
    segments: list[list[list[int]]]
    output_len: int
    ignore_eos: bool
    stop_ids: set = field(default_factory=set)
    max_context: int | None = None
    params: dict = field(default_factory=dict)

    @property
    def users(self) -> int:
        return len(self.segments)

    @property
    def requests(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def shared_prefix_tokens(self) -> int:
        """Tokens at the start of every user's first prompt that are the same for all users."""
        firsts = [s[0] for s in self.segments if s]
        if len(firsts) < 2:
            return 0
        n = 0
        for column in zip(*firsts):
            if any(c != column[0] for c in column):
                break
            n += 1
        return n

    def working_set_tokens(self) -> int:
        """Distinct tokens the cache would hold at the end: the shared prefix once, then every user's prompts and
        answers (output length assumed = --output-len)."""
        shared = self.shared_prefix_tokens
        per_user = [sum(len(seg) for seg in s) + len(s) * self.output_len - shared for s in self.segments]
        return shared + sum(per_user)


def load_chats(workload: str, num_users: int, max_turns: int) -> list[list[str]]:
    """The human turns of ``num_users`` conversations of the data set."""
    if workload == "mtbench":
        chats = [c.user_turns for c in read_mt_bench(DATA / "mt_bench_question.jsonl", turns=2)]
    else:
        chats = []
        for name in ("dialogstudio_sharegpt_original_example.json", "fastchat_dummy_conversation.json"):
            chats += [c.user_turns for c in read_sharegpt(DATA / name, turns=max_turns) if c.user_turns]
    if num_users > len(chats):
        print(f"note: {workload} has {len(chats)} conversations; using all of them (asked for {num_users})")
    return chats[:num_users]


def build_chat_workload(args, tok: ChatTokenizer | None, vocab: int, max_context: int | None) -> Workload:
    chats = load_chats(args.workload, args.num_users, args.max_turns)
    segments = []
    if tok is not None:
        system = system_text(tok, args.system_tokens)
        for turns in chats:
            turns = [tok.truncate(t, args.max_turn_tokens) for t in turns]
            segments.append([tok.first_turn(system, turns[0])] + [tok.next_turn(t) for t in turns[1:]])
        stop_ids, ignore_eos = tok.stop_ids, args.ignore_eos == "on"
    else:
        system = sc.pseudo_tokens(args.system_tokens, f"{args.seed}:system", vocab)
        for u, turns in enumerate(chats):
            segs = []
            for t, text in enumerate(turns):
                n = min(args.max_turn_tokens, max(4, len(text) // 4))
                segs.append(sc.pseudo_tokens(n, f"{args.seed}:{args.workload}:{u}:{t}", vocab))
            segs[0] = system + segs[0]
            segments.append(segs)
        stop_ids, ignore_eos = set(), args.ignore_eos != "off"
    return Workload(args.workload, segments, args.output_len, ignore_eos, stop_ids, max_context,
                    params={"tokenizer": tok is not None, "system_tokens": args.system_tokens,
                            "max_turns": args.max_turns, "max_turn_tokens": args.max_turn_tokens})


def synthetic_per_user_tokens(history: int, rounds: int, question: int, output: int) -> int:
    return history + rounds * (question + output)


def synthetic_users_for(multiplier: float, budget_tokens: int, *, system: int, history: int, rounds: int,
                        question: int, output: int) -> int:
    """Users U with S + U * (H + R * (Q + O)) closest to ``multiplier`` x ``budget_tokens`` (at least 2)."""
    per_user = synthetic_per_user_tokens(history, rounds, question, output)
    return max(2, round((multiplier * budget_tokens - system) / per_user))


def build_synthetic(args, users: int, vocab: int, max_context: int | None) -> Workload:
    system = sc.pseudo_tokens(args.system_tokens, f"{args.seed}:syn:system", vocab)
    segments = []
    for u in range(users):
        history = sc.pseudo_tokens(args.history_tokens, f"{args.seed}:syn:history:{u}", vocab)
        qs = [sc.pseudo_tokens(args.question_tokens, f"{args.seed}:syn:q:{u}:{t}", vocab) for t in range(args.rounds)]
        segments.append([system + history + qs[0]] + qs[1:])
    return Workload("synthetic", segments, args.output_len, args.ignore_eos != "off", set(), max_context,
                    params={"system_tokens": args.system_tokens, "history_tokens": args.history_tokens,
                            "rounds": args.rounds, "question_tokens": args.question_tokens})


def dispatch_order(workload: Workload) -> list[tuple[int, int]]:
    """(user, turn) pairs, turn 1-based, in rounds: every user's turn t before any user's turn t+1."""
    most = max((len(s) for s in workload.segments), default=0)
    return [(u, t) for t in range(1, most + 1) for u in range(workload.users) if t <= len(workload.segments[u])]


# ---------------------------------------------------------------------------------------------------------------------
# Running conversations
# ---------------------------------------------------------------------------------------------------------------------

async def run_conversations(client: sc.ServerClient, workload: Workload, *, concurrency: int, request_rate: float,
                            seed: int, timeout_s: float, desc: str = "requests") -> tuple[list[dict], float, int]:
    """Send every turn in ``dispatch_order``: at most ``concurrency`` requests in flight, Poisson arrivals at
    ``request_rate`` per second (inf: no pacing), a user's next turn only after its previous one finished (it needs
    the answer). A user whose request failed, or whose next prompt would not fit the context, stops.

    Returns (records, seconds from the first dispatch to the last completion, skipped turns).
    """
    order = dispatch_order(workload)
    history: list[list[int]] = [[] for _ in range(workload.users)]
    stopped = [False] * workload.users
    done = {(u, t): asyncio.Event() for u, t in order}
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)
    records: list[dict] = []
    bar = sc.progress(len(order), desc)
    tasks = []
    skipped = 0
    t0 = time.perf_counter()
    next_arrival = t0

    async def send(idx: int, u: int, t: int, prompt: list[int]) -> None:
        try:
            res = await client.generate(prompt, workload.output_len, ignore_eos=workload.ignore_eos,
                                        timeout_s=timeout_s)
            records.append(sc.record_of(res, t0, user=u, turn=t, dispatch=idx))
            if res.ok:
                out = list(res.output_ids)
                if out and out[-1] in workload.stop_ids:
                    out = out[:-1]
                history[u] = prompt + out
            else:
                stopped[u] = True
                bar.set_postfix_str(f"error: {res.error[:60]}")
        finally:
            done[(u, t)].set()
            sem.release()
            bar.update(1)

    for idx, (u, t) in enumerate(order):
        if math.isfinite(request_rate) and request_rate > 0:
            next_arrival += rng.expovariate(request_rate)
            delay = next_arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        if t > 1:
            await done[(u, t - 1)].wait()
        prompt = (history[u] if t > 1 else []) + workload.segments[u][t - 1]
        too_long = workload.max_context is not None and len(prompt) + workload.output_len > workload.max_context
        if stopped[u] or too_long:
            stopped[u] = True
            skipped += 1
            done[(u, t)].set()
            bar.update(1)
            continue
        await sem.acquire()
        tasks.append(asyncio.get_running_loop().create_task(send(idx, u, t, prompt)))
    await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    bar.close()
    records.sort(key=lambda r: r["dispatch"])
    return records, duration, skipped


# ---------------------------------------------------------------------------------------------------------------------
# One server: warm-up, then one measured run per workload
# ---------------------------------------------------------------------------------------------------------------------

def make_workloads(args, budget: int | None, tok, vocab: int, max_context: int | None) -> list[tuple[float | None,
                                                                                                   Workload]]:
    if args.workload != "synthetic":
        return [(None, build_chat_workload(args, tok, vocab, max_context))]
    if not args.multipliers:
        return [(None, build_synthetic(args, args.num_users, vocab, max_context))]
    if not budget:
        raise ValueError("--working-set-multipliers needs a KV budget: --max-total-tokens in --server-args, "
                         "--kv-budget-tokens, or a server reporting max_total_num_tokens")
    out = []
    for m in args.multipliers:
        users = synthetic_users_for(m, budget, system=args.system_tokens, history=args.history_tokens,
                                    rounds=args.rounds, question=args.question_tokens, output=args.output_len)
        out.append((m, build_synthetic(args, users, vocab, max_context)))
    return out


async def measure(url: str, args, *, label: str | None, plan: sc.LaunchPlan | None, model: sc.ModelInfo | None,
                  tok, log=print) -> list[dict]:
    """Warm up the server at ``url``, then run each workload (cache flushed before each); one row per workload."""
    rows = []
    async with sc.ServerClient(url, args.request_timeout) as client:
        ctx = await sc.prepare_server(client, args, label=label, plan=plan, model=model, log=log)
        budget = ctx.budget_tokens
        workloads = make_workloads(args, budget, tok, ctx.vocab_size, ctx.max_context)
        for i, (mult, workload) in enumerate(workloads):
            if i > 0:
                await client.flush_cache()
            ws = workload.working_set_tokens()
            desc = f"{ctx.label} {workload.name} ws={ws}"
            log(f"[{desc}] {workload.users} users, {workload.requests} requests, working set {ws} tokens"
                + (f" ({ws / budget:.2f} x KV budget {budget})" if budget else ""))

            def run(workload=workload, desc=desc):
                return run_conversations(client, workload, concurrency=args.concurrency,
                                         request_rate=args.request_rate, seed=args.seed,
                                         timeout_s=args.request_timeout, desc=desc)

            (records, duration, skipped), mem = await sc.measured_run(client, ctx, args.metrics_interval, run)
            summary = sc.summarize(records, duration)
            row = {**ctx.base_row, "workload": workload.name, "working_set_tokens": ws,
                   "working_set_x": round(ws / budget, 3) if budget else None, "working_set_multiplier": mult,
                   "users": workload.users, "turns": max(len(s) for s in workload.segments),
                   "concurrency": args.concurrency,
                   "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
                   "output_len": workload.output_len, "ignore_eos": workload.ignore_eos,
                   "shared_prefix_tokens": workload.shared_prefix_tokens, "workload_params": workload.params,
                   "skipped_requests": skipped, **summary, **mem,
                   "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            write_requests(args.out_dir, row, records)
            rows.append(row)
            log(summary_line(row))
    return rows


def summary_line(r: dict) -> str:
    f = sc.fmt
    return (f"  {r['config']}: returning TTFT p50 {f(r['ttft_p50_ms'])} ms p99 {f(r['ttft_p99_ms'])} ms | first-turn "
            f"p50 {f(r['ttft_first_p50_ms'])} ms | {f(r['req_per_s'], 2)} req/s, {f(r['tok_per_s'])} out tok/s | "
            f"hit {f(r['hit_rate'])} (device {f(r['hit_rate_device'])}, restored {f(r['hit_rate_host'])}) | "
            f"cached tok/GB {f(r.get('cached_tokens_per_gb'))} | errors {r['errors']}")


def write_requests(out_dir: Path, row: dict, records: list[dict]) -> Path:
    folder = out_dir / "serving_requests"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{row['config']}__{row['model']}__{row['workload']}__{row['working_set_tokens']}.jsonl"
    path = folder / name.replace("/", "_")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------------

COLUMNS = [("config", "config"), ("model", "model"), ("workload", "workload"), ("working set", "working_set_tokens"),
           ("x budget", "working_set_x"), ("users", "users"), ("returning TTFT p50 ms", "ttft_p50_ms"),
           ("p99 ms", "ttft_p99_ms"), ("first-turn p50 ms", "ttft_first_p50_ms"), ("req/s", "req_per_s"),
           ("out tok/s", "tok_per_s"), ("hit rate", "hit_rate"), ("device", "hit_rate_device"),
           ("restored", "hit_rate_host"), ("cached tok/GB", "cached_tokens_per_gb"), ("errors", "errors"),
           ("gpu", "gpu"), ("commit", "commit")]
CONFIG_ORDER = {c: i for i, c in enumerate(["radix", "hicache", "kvtc", "radix-nopressure", "hicache-nopressure",
                                            "kvtc-nopressure"])}


def sort_key(r: dict):
    return (str(r.get("model")), str(r.get("workload")), r.get("working_set_tokens") or 0,
            CONFIG_ORDER.get(r.get("config"), 99), str(r.get("config")))


def write_markdown(rows: list[dict], path: Path) -> None:
    rows = sorted(rows, key=sort_key)
    notes = sorted({r.get("memory_note") for r in rows if r.get("memory_note")})
    text = ["# Multi-turn serving benchmark", "",
            "Returning turns are a conversation's turns >= 2 (its earlier turns were answered and then other users "
            "spoke). Hit rate = cached / prompt tokens over all measured requests; 'device' was in the KV pool, "
            "'restored' came back from the lower tier (kvtc: decompressed from the compressed store; hicache: loaded "
            "from host memory). Cached tok/GB = peak over /metrics scrapes of (KV-pool slots holding KV, "
            "sglang:kv_evictable_tokens + sglang:kv_used_tokens, + kvtc compressed tokens in the GPU store) / "
            "((max_total_num_tokens x KV bytes per token + compressed-store capacity) / 1e9).", "",
            "Memory: every config of a run had the same --server-args (same --mem-fraction-static); "
            + "; ".join(notes), "", sc.markdown_table(rows, COLUMNS), ""]
    for r in rows:
        k = r.get("kvtc")
        if k:
            text.append(f"- {r['config']} {r['workload']} ws={r['working_set_tokens']}: kvtc tokens hot "
                        f"{k.get('hot_tokens')} / compressed {k.get('compressed_tokens')} / host {k.get('host_tokens')}"
                        f", realized ratio {k.get('realized_ratio')}, load-backs {k.get('decompress_count')}, "
                        f"integrity failures {k.get('integrity_failures')} (gauges refresh every 30 s; counters "
                        f"include warm-up)")
    path.write_text("\n".join(text) + "\n")


def plot_ttft_cdf(rows: list[dict], path: Path, model: str, workload: str) -> bool:
    rows = [r for r in rows if r.get("model") == model and r.get("workload") == workload
            and r.get("ttft_returning_cdf_ms")]
    plt = sc.pyplot_or_none() if rows else None
    if plt is None:
        return False
    sizes = sorted({r["working_set_tokens"] for r in rows})[-4:]
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.0), squeeze=False)
    for ax, ws in zip(axes[0], sizes):
        for r in sorted((r for r in rows if r["working_set_tokens"] == ws), key=sort_key):
            ax.plot([max(v, 1e-3) for v in r["ttft_returning_cdf_ms"]], [q / 100 for q in range(101)],
                    label=r["config"])
        x = next((r["working_set_x"] for r in rows if r["working_set_tokens"] == ws and r.get("working_set_x")), None)
        ax.set_title(f"working set {ws} tokens" + (f" ({x:.1f}x KV budget)" if x else ""))
        ax.set_xscale("log")
        ax.set_xlabel("returning-turn TTFT (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{model}, {workload}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_throughput(rows: list[dict], path: Path, model: str, workload: str) -> bool:
    rows = [r for r in rows if r.get("model") == model and r.get("workload") == workload and r.get("req_per_s")]
    if len({r["working_set_tokens"] for r in rows}) < 2:
        return False
    plt = sc.pyplot_or_none()
    if plt is None:
        return False
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.5, 4.0))
    use_x = all(r.get("working_set_x") for r in rows)
    for config in sorted({r["config"] for r in rows}, key=lambda c: CONFIG_ORDER.get(c, 99)):
        rs = sorted((r for r in rows if r["config"] == config), key=lambda r: r["working_set_tokens"])
        xs = [r["working_set_x"] if use_x else r["working_set_tokens"] for r in rs]
        a1.plot(xs, [r["req_per_s"] for r in rs], "o-", label=config)
        a2.plot(xs, [r["ttft_p50_ms"] or float("nan") for r in rs], "o-", label=config)
    for ax, ylabel in ((a1, "requests / s"), (a2, "returning-turn TTFT p50 (ms)")):
        ax.set_xlabel("working set / KV budget" if use_x else "working set (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    a2.set_yscale("log")
    fig.suptitle(f"{model}, {workload}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(new_rows: list[dict], args) -> list[dict]:
    out = Path(args.out_dir)
    merged = sc.merge_rows(out / "serving.json", new_rows, KEY)
    write_markdown(merged, out / "serving.md")
    if not args.no_plots and new_rows:
        model, workload = new_rows[0]["model"], new_rows[0]["workload"]
        plot_ttft_cdf(merged, out / "serving_ttft_cdf.png", model, workload)
        plot_throughput(merged, out / "serving_throughput.png", model, workload)
    return merged


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    sc.install_sigterm_exit()
    t_start = time.monotonic()
    model = sc.read_model_info(args.model_path)
    tok = load_tokenizer(args.tokenizer, model, args.model_path)
    print(f"[serve_multiturn] workload {args.workload}, prompts from "
          f"{'the chat template' if tok else 'pseudo-random token ids'}, output {args.output_len} tokens, "
          f"concurrency {args.concurrency}, rate {args.request_rate}")
    failures = sc.run_configs(
        args, model=model, report=lambda rows: write_reports(rows, args),
        measure=lambda url, plan: asyncio.run(measure(url, args, label=plan.config if plan else args.config_label,
                                                      plan=plan, model=model, tok=tok)))
    print(f"[serve_multiturn] results in {args.out_dir} (serving.json, serving.md) [done in "
          f"{time.monotonic() - t_start:.0f} s]" + (f"; failed configs: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
