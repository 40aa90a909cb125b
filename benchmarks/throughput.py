#!/usr/bin/env python3
"""Offline maximum throughput on a shared-prefix workload: every request sent at once, radix vs kvtc vs hicache.

    python3 benchmarks/throughput.py --configs kvtc,radix,hicache --model-path M \\
        --server-args "--load-format dummy --skip-tokenizer-init --attention-backend triton --disable-cuda-graph \\
                       --mem-fraction-static 0.8 --max-total-tokens 32768" \\
        --kvtc-args "--kvtc-calibration DIR" --working-set-multipliers 4
    python3 benchmarks/throughput.py --url http://127.0.0.1:30000 --num-groups 64

Workload: G groups, each a prefix of P tokens (a long system prompt / document), K requests per group, each the
group's prefix + Q unique tokens, O output tokens (greedy, ignore_eos). Requests are ordered round-robin over the
groups (request i belongs to group i mod G), so when the G prefixes do not fit the KV pool a group's prefix has been
pushed out before its next request is scheduled. Working set = G * P + G * K * (Q + O) tokens;
--working-set-multipliers m picks G so that it is m x the KV budget (``--max-total-tokens`` of --server-args).
All requests are sent at once (or --max-concurrency at a time) after an unmeasured warm-up and a cache flush.

Reports per config: req/s, input/output/total tok/s, hit rate (device / restored), TTFT p50 of requests that reuse
their group's prefix (a group's 2nd..Kth request), cached tokens per GB. Rows (merged by config, model, workload,
working_set_tokens) go to --out-dir/throughput.json and throughput.md. Launching, equal memory, warm-up and
metrics are as in serve_multiturn.py (serving_common.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
from pathlib import Path

import serving_common as sc

HERE = Path(__file__).resolve().parent
KEY = ("config", "model", "workload", "working_set_tokens")
WORKLOAD = "shared-prefix"
DEFAULTS = dict(prefix_tokens=2048, suffix_tokens=128, output_len=64, requests_per_group=4, num_groups=32,
                warmup_requests=3, warmup_fill=1.25, metrics_interval=5.0)
SMOKE = dict(prefix_tokens=64, suffix_tokens=8, output_len=4, requests_per_group=3, num_groups=5, warmup_requests=1,
             warmup_fill=0.0, metrics_interval=1.0)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sc.add_target_args(ap)
    wl = ap.add_argument_group("workload")
    wl.add_argument("--num-groups", type=int, help="prefix groups G (default 32)")
    wl.add_argument("--requests-per-group", type=int, help="requests per group K (default 4)")
    wl.add_argument("--prefix-tokens", type=int, help="shared prefix length P (default 2048)")
    wl.add_argument("--suffix-tokens", type=int, help="unique tokens per request Q (default 128)")
    wl.add_argument("--output-len", type=int, help="output tokens per request O (default 64)")
    wl.add_argument("--working-set-multipliers", help="comma list m; G chosen so the working set is m x the KV "
                                                      "budget")
    wl.add_argument("--max-concurrency", type=int, help="requests in flight (default: all at once)")
    wl.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", help="results folder (default benchmarks/results; --smoke: /tmp/kvtc_serving_smoke)")
    args = ap.parse_args(argv)
    sc.check_target_args(ap, args)
    for k, v in (SMOKE if args.smoke else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out_dir = Path(args.out_dir or ("/tmp/kvtc_serving_smoke" if args.smoke else HERE / "results"))
    args.multipliers = ([float(m) for m in args.working_set_multipliers.split(",") if m.strip()]
                        if args.working_set_multipliers else None)
    return args


def per_group_tokens(args) -> int:
    return args.prefix_tokens + args.requests_per_group * (args.suffix_tokens + args.output_len)


def groups_for(multiplier: float, budget_tokens: int, args) -> int:
    """Groups G with G * (P + K * (Q + O)) closest to ``multiplier`` x ``budget_tokens`` (at least 1)."""
    return max(1, round(multiplier * budget_tokens / per_group_tokens(args)))


def build_requests(args, groups: int, vocab: int) -> list[tuple[int, int, list[int]]]:
    """(group, index within the group, token ids), round-robin over the groups."""
    prefixes = [sc.pseudo_tokens(args.prefix_tokens, f"{args.seed}:tp:prefix:{g}", vocab) for g in range(groups)]
    out = []
    for k in range(args.requests_per_group):
        for g in range(groups):
            out.append((g, k, prefixes[g] + sc.pseudo_tokens(args.suffix_tokens, f"{args.seed}:tp:{g}:{k}", vocab)))
    return out


async def send_all(client: sc.ServerClient, requests, *, output_len: int, max_concurrency: int | None,
                   timeout_s: float, desc: str) -> tuple[list[dict], float]:
    """Send every request at once (at most ``max_concurrency`` in flight); records with turn = index in group + 1."""
    sem = asyncio.Semaphore(max_concurrency or len(requests) or 1)
    bar = sc.progress(len(requests), desc)
    t0 = time.perf_counter()

    async def one(i: int, g: int, k: int, ids: list[int]) -> dict:
        async with sem:
            res = await client.generate(ids, output_len, ignore_eos=True, timeout_s=timeout_s)
        bar.update(1)
        return sc.record_of(res, t0, group=g, turn=k + 1, dispatch=i)

    records = await asyncio.gather(*(one(i, g, k, ids) for i, (g, k, ids) in enumerate(requests)))
    duration = time.perf_counter() - t0
    bar.close()
    return list(records), duration


async def measure(url: str, args, *, label: str | None, plan: sc.LaunchPlan | None, model: sc.ModelInfo | None,
                  log=print) -> list[dict]:
    rows = []
    async with sc.ServerClient(url, args.request_timeout) as client:
        ctx = await sc.prepare_server(client, args, label=label, plan=plan, model=model, log=log)
        budget = ctx.budget_tokens
        if args.multipliers and not budget:
            raise ValueError("--working-set-multipliers needs a KV budget (--max-total-tokens or --kv-budget-tokens)")
        sizes = [(m, groups_for(m, budget, args)) for m in args.multipliers] if args.multipliers \
            else [(None, args.num_groups)]
        for i, (mult, groups) in enumerate(sizes):
            if i > 0:
                await client.flush_cache()
            requests = build_requests(args, groups, ctx.vocab_size)
            ws = groups * per_group_tokens(args)
            desc = f"{ctx.label} {WORKLOAD} ws={ws}"
            log(f"[{desc}] {groups} groups x {args.requests_per_group} requests, working set {ws} tokens"
                + (f" ({ws / budget:.2f} x KV budget {budget})" if budget else ""))

            def run(requests=requests, desc=desc):
                return send_all(client, requests, output_len=args.output_len, max_concurrency=args.max_concurrency,
                                timeout_s=args.request_timeout, desc=desc)

            (records, duration), mem = await sc.measured_run(client, ctx, args.metrics_interval, run)
            summary = sc.summarize(records, duration)
            summary.pop("ttft_returning_cdf_ms", None)
            row = {**ctx.base_row, "workload": WORKLOAD, "working_set_tokens": ws,
                   "working_set_x": round(ws / budget, 3) if budget else None, "working_set_multiplier": mult,
                   "groups": groups, "requests_per_group": args.requests_per_group,
                   "prefix_tokens": args.prefix_tokens, "suffix_tokens": args.suffix_tokens,
                   "output_len": args.output_len, "max_concurrency": args.max_concurrency, **summary, **mem,
                   "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
            rows.append(row)
            f = sc.fmt
            log(f"  {ctx.label}: {f(row['req_per_s'], 2)} req/s, {f(row['input_tok_per_s'])} in + "
                f"{f(row['tok_per_s'])} out tok/s, hit {f(row['hit_rate'])} (device {f(row['hit_rate_device'])}, "
                f"restored {f(row['hit_rate_host'])}), errors {row['errors']}")
    return rows


COLUMNS = [("config", "config"), ("model", "model"), ("working set", "working_set_tokens"),
           ("x budget", "working_set_x"), ("groups", "groups"), ("requests", "requests"), ("req/s", "req_per_s"),
           ("input tok/s", "input_tok_per_s"), ("output tok/s", "tok_per_s"), ("total tok/s", "total_tok_per_s"),
           ("hit rate", "hit_rate"), ("device", "hit_rate_device"), ("restored", "hit_rate_host"),
           ("reuse TTFT p50 ms", "ttft_p50_ms"), ("cached tok/GB", "cached_tokens_per_gb"), ("errors", "errors"),
           ("gpu", "gpu"), ("commit", "commit")]


def write_reports(rows: list[dict], args) -> list[dict]:
    merged = sc.merge_rows(Path(args.out_dir) / "throughput.json", rows, KEY)
    ordered = sorted(merged, key=lambda r: (str(r.get("model")), r.get("working_set_tokens") or 0, str(r["config"])))
    notes = sorted({r.get("memory_note") for r in ordered if r.get("memory_note")})
    text = ["# Offline throughput, shared-prefix workload", "",
            "All requests sent at once; G groups x K requests, each = group prefix (P tokens) + Q unique tokens, O "
            "output tokens. Hit rate = cached / prompt tokens ('restored': decompressed by kvtc or loaded from host "
            "by hicache). Reuse TTFT = TTFT of a group's 2nd..Kth request.", "",
            "Memory: same --server-args for every config; " + "; ".join(notes), "",
            sc.markdown_table(ordered, COLUMNS), ""]
    (Path(args.out_dir) / "throughput.md").write_text("\n".join(text) + "\n")
    return merged


def main(argv=None) -> int:
    args = parse_args(argv)
    sc.install_sigterm_exit()
    t_start = time.monotonic()
    model = sc.read_model_info(args.model_path)
    failures = sc.run_configs(
        args, model=model, report=lambda rows: write_reports(rows, args),
        measure=lambda url, plan: asyncio.run(measure(url, args, label=plan.config if plan else args.config_label,
                                                      plan=plan, model=model)))
    print(f"[throughput] results in {args.out_dir} (throughput.json, throughput.md) [done in "
          f"{time.monotonic() - t_start:.0f} s]" + (f"; failed configs: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
