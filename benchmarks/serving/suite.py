"""The serving suite's command: ``python -m benchmarks.serving`` (see ``--help``).

    python -m benchmarks.serving --profile h200-first-slice --model-path DIR --kvtc-calibration ART --dry-run
    python -m benchmarks.serving --profile h200-first-slice --model-path DIR --kvtc-calibration ART \\
        [--configs radix,fp8] [--out-dir D]
    python -m benchmarks.serving --url http://127.0.0.1:30000 --config-label kvtc16 --model-path DIR --saturation 8
    python -m benchmarks.serving --report-only --out-dir D

For each server run of the profile's plan (``profiles.plan_runs``: configs interleaved in random order, one
server at a time): launch the server (its own process group and log), warm it up, on the first radix run measure
the saturation rate of each workload (closed loop, no pacing), then measure every point (flush, trace, window), and
after the points the break-even probe; stop the server. Rows are written after every point, the report (serving.md
and plots) after every server. ``--configs`` runs a subset of the plan (a GPU script stage runs one config at a
time; the saturation rates found by radix's stage are kept in ``saturation.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

from kvtc_sglang.eval.provenance import git_commit, gpu_name

from . import report
from .argv import get_flag, split_args
from .client import ServerClient
from .configs import config_spec
from .driver import Window
from .gsp import bench_serving_cmd, measure_gsp_point, tool_env
from .harness import ServerContext, breakeven_probe, measure_point, warm_up
from .launch import LaunchPlan, format_dry_run, plan_server
from .model import ModelInfo, read_model_info
from .plots import write_plots
from .process import ServerProcess, ServerStartError, find_free_port, install_sigterm_exit, wait_port_free
from .profiles import (PROFILES, Point, Profile, ServerRun, build_trace, get_profile, gsp_groups,
                       max_parallel_for, plan_runs, with_overrides)
from .stats import SLO

RESULTS = Path(__file__).resolve().parents[1] / "results"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--profile", default="h200-first-slice", help=f"one of {', '.join(PROFILES)}")
    ap.add_argument("--model-path", help="model folder (config.json; a tokenizer for text workloads)")
    ap.add_argument("--model-label", help="model name in the rows (default: the folder's name)")
    ap.add_argument("--kvtc-calibration", help="calibration artifact of the kvtc configs")
    ap.add_argument("--configs", help="comma list replacing the profile's configs (e.g. radix,kvtc16@flashinfer)")
    ap.add_argument("--workloads", help="comma list of the profile's workloads to run")
    ap.add_argument("--xs", help="comma list of working-set multiples replacing every workload's")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--budget-tokens", type=int, help="bf16 KV budget in token slots (profile's by default)")
    ap.add_argument("--warmup-s", type=float)
    ap.add_argument("--measure-s", type=float)
    ap.add_argument("--server-args", help="common server arguments replacing the profile's (one quoted string)")
    ap.add_argument("--attention-backend")
    ap.add_argument("--page-size", type=int)
    ap.add_argument("--kvtc-sync-audit", action="store_true", help="start kvtc servers with KVTC_SYNC_AUDIT=1 "
                                                                   "(host syncs counted; slower)")
    ap.add_argument("--saturation", type=float, help="saturation rate (req/s) of every workload instead of the "
                                                     "probe's")
    ap.add_argument("--no-breakeven", action="store_true")
    ap.add_argument("--skip-done", action="store_true", help="skip server runs whose every point already has a row "
                                                             "of this commit in --out-dir (resume an interrupted run)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out-dir", help=f"results folder (default {RESULTS})")
    ap.add_argument("--url", help="a running server instead of launching (one config: --config-label)")
    ap.add_argument("--config-label", help="config name of the --url server")
    ap.add_argument("--python", default=sys.executable, help="python running sglang.launch_server / bench_serving")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000, help="first port tried for launched servers")
    ap.add_argument("--health-timeout", type=float, default=900.0)
    ap.add_argument("--dry-run", action="store_true", help="print every config's launch command and the plan")
    ap.add_argument("--print-order", action="store_true", help="print the planned server runs' configs, one a line "
                                                               "(the GPU script runs them one stage each)")
    ap.add_argument("--report-only", action="store_true", help="rebuild serving.md and the plots from the rows")
    args = ap.parse_args(argv)
    if not args.report_only and not args.model_path:
        ap.error("--model-path is required")
    if args.url and not args.config_label:
        ap.error("--url needs --config-label (the config that server runs)")
    return args


def profile_from(args) -> Profile:
    profile = get_profile(args.profile)
    workloads = dict(profile.workloads)
    if args.workloads:
        names = [w.strip() for w in args.workloads.split(",") if w.strip()]
        unknown = [w for w in names if w not in workloads]
        if unknown:
            raise SystemExit(f"--workloads: {unknown} not in profile {profile.name} ({', '.join(workloads)})")
        workloads = {w: workloads[w] for w in names}
    if args.xs:
        from dataclasses import replace

        xs = tuple(float(v) for v in args.xs.split(",") if v.strip())
        workloads = {w: replace(p, xs=xs, rate_xs=tuple(x for x in p.rate_xs if x in xs)) for w, p in workloads.items()}
    configs = tuple(c.strip() for c in args.configs.split(",")) if args.configs else None
    if args.url:
        configs = (args.config_label,)
    return with_overrides(profile, workloads=workloads, configs=configs, repeats=args.repeats,
                          budget_tokens=args.budget_tokens, warmup_s=args.warmup_s, measure_s=args.measure_s,
                          common_args=tuple(split_args(args.server_args)) if args.server_args is not None else None,
                          attention_backend=args.attention_backend, page_size=args.page_size)


def make_plans(profile: Profile, model: ModelInfo, args) -> dict[str, LaunchPlan]:
    """Every config's launch plan (port 0 as a placeholder), built before anything runs so a bad config fails first."""
    return {c: plan_server(config_spec(c), model=model, model_path=args.model_path, port=0,
                           budget_tokens=profile.budget_tokens, common_args=profile.common_args,
                           page_size=profile.page_size, attention_backend=profile.attention_backend,
                           kvtc_calibration=args.kvtc_calibration, kvtc_sync_audit=args.kvtc_sync_audit,
                           host=args.host, python=args.python) for c in profile.configs}


def describe_plan(profile: Profile, runs: list[ServerRun]) -> str:
    lines = [f"# profile {profile.name}: bf16 KV budget {profile.budget_tokens} slots, window {profile.warmup_s:g} s "
             f"warm-up + {profile.measure_s:g} s, {profile.repeats} repeat(s), {len(runs)} server runs in this order:"]
    for r in runs:
        pts = ", ".join(f"{p.workload} x{p.x:g} @{p.rate_fraction:g}" for p in r.points)
        lines.append(f"#   {r.config} (repeat {r.repeat}): {pts}")
    return "\n".join(lines)


class TextSources:
    """The client-side tokenizer (the model folder's, if it has one) and tokenized WikiText-2 test, loaded once."""

    def __init__(self, model: ModelInfo):
        self.model = model
        self._tok, self._loaded = None, False
        self._ids: list[int] = []
        self._chars = 0  # how much of the text ``_ids`` covers

    def tokenizer(self):
        if not self._loaded:
            self._loaded = True
            if self.model.has_tokenizer:
                from .text import ChatTokenizer

                self._tok = ChatTokenizer(self.model.path)
        return self._tok

    def for_workload(self, n_docs: int, doc_tokens: int, seed: int):
        from .model import pseudo_tokens
        from .text import cut_documents, mt_bench_questions, wikitext_test
        from .workloads import pseudo_chat_segments

        tok = self.tokenizer()
        if tok is None:
            docs = [pseudo_tokens(doc_tokens, f"{seed}:doc:{i}", self.model.vocab_size) for i in range(n_docs)]
            return pseudo_chat_segments(self.model.vocab_size, seed), docs, mt_bench_questions()
        text = wikitext_test()
        chars = min(len(text), 8 * n_docs * doc_tokens)  # ~4-5 characters per token: enough for distinct starts
        if chars > self._chars:
            self._ids, self._chars = tok.encode(text[:chars]), chars
        return tok.segments(), cut_documents(self._ids, n_docs, doc_tokens), mt_bench_questions()


class Suite:
    """One invocation: the profile, the model, the output folder and the rows written so far."""

    def __init__(self, args, profile: Profile, model: ModelInfo, log: Callable[[str], None] = print):
        self.args, self.profile, self.model, self.log = args, profile, model, log
        self.out = Path(args.out_dir or RESULTS)
        self.out.mkdir(parents=True, exist_ok=True)
        self.commit, self.gpu = git_commit(), gpu_name()
        self.run_id = f"{profile.name}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
        self.text = TextSources(model)
        self.saturation_path = self.out / "saturation.json"
        self.saturation: dict = json.loads(self.saturation_path.read_text()) if self.saturation_path.exists() else {}
        limits = [v for v in (model.max_context, profile.budget_tokens) if v]
        self.max_context = min(limits) - 1 if limits else None

    # -- one server ---------------------------------------------------------------------------------------------------
    async def run_server(self, url: str, run: ServerRun, plan: LaunchPlan | None) -> None:
        p = self.profile
        async with ServerClient(url, p.request_timeout_s) as client:
            info = await client.server_info()
            warm = await warm_up(client, vocab_size=self.model.vocab_size, log=self.log,
                                 lengths=(64, 512) if p.name == "ci" else (128, 1024, 4096))
            pool = info.get("max_total_num_tokens")
            capacity = plan.capacity if plan else None
            bpt = capacity.kv_bytes_per_token if capacity else None
            kv_bytes = (capacity.kv_gpu_bytes if capacity and capacity.kv_gpu_bytes
                        else (pool * bpt if pool and bpt else None))
            cmd = plan.cmd if plan else []
            base = {"config": run.config, "model": self.args.model_label or self.model.label, "gpu": self.gpu,
                    "commit": self.commit, "run_id": self.run_id, "profile": p.name,
                    "budget_tokens": p.budget_tokens, "pool_tokens": pool, "kv_bytes_per_token": bpt,
                    "kv_gpu_bytes": kv_bytes, "capacity": capacity.as_dict() if capacity else None,
                    "capacity_note": capacity.describe() if capacity else None, "page_size": p.page_size,
                    "attention_backend": get_flag(cmd, "--attention-backend") or p.attention_backend,
                    "cuda_graphs": get_flag(cmd, "--disable-cuda-graph") is None,
                    "server_cmd": plan.shell if plan else f"(running server at {url})", "warmup": warm}
            ctx = ServerContext(run.config, info, self.model, p.budget_tokens, pool, kv_bytes, self.max_context,
                                capacity, base)
            if run.repeat == 0 and config_spec(run.config).base == "radix" and "@" not in run.config:
                for w in p.workloads:
                    if w not in self.saturation and self.args.saturation is None:
                        await self.probe_saturation(client, ctx, w)
            for point in run.points:
                await self.run_point(client, ctx, point)
            if not self.args.no_breakeven and run.repeat == 0 and (capacity is None or capacity.pool_slots):
                rows = await breakeven_probe(client, ctx, p.breakeven_lengths, timeout_s=p.request_timeout_s,
                                             log=self.log)
                if rows:
                    report.write_rows(self.out / "serving_breakeven.json", rows, report.BREAKEVEN_KEY)

    def rate_for(self, workload: str) -> float:
        if self.args.saturation is not None:
            return self.args.saturation
        if workload not in self.saturation:
            raise RuntimeError(f"no saturation rate for {workload}: run the radix config first (its run measures "
                               f"it) or pass --saturation REQ_PER_S")
        return self.saturation[workload]["req_per_s"]

    async def probe_saturation(self, client: ServerClient, ctx: ServerContext, workload: str) -> None:
        """Closed loop at the point's max_parallel (no pacing): requests per second over the probe window."""
        p = self.profile
        plan = p.workloads[workload]
        warmup, measure = p.saturation_window
        self.log(f"[{ctx.label}] saturation probe: {workload} at x {plan.saturation_x:g} ({warmup:g} + {measure:g} s)")
        if workload == "shared-prefix":
            fields, _ = await self.gsp(client, ctx, Point(workload, plan.saturation_x, 1.0, 0, p.seed), math.inf,
                                       tag="saturation")
            max_parallel = fields["max_parallel"]
        else:
            trace = build_trace(p, workload, x=plan.saturation_x, rate=10.0, seed=p.seed + 7, model=self.model,
                                num_requests=p.probe_requests, text=self.text_for(workload, plan.saturation_x, p.seed))
            max_parallel = self.max_parallel(trace)
            fields, _ = await measure_point(client, ctx, trace, max_parallel=max_parallel,
                                            window=Window(warmup, measure), pace=False, poll_s=p.poll_s,
                                            stats_pause_s=p.stats_pause_s, timeout_s=p.request_timeout_s,
                                            log=self.log)
        if not fields.get("req_per_s") or fields.get("errors"):
            raise RuntimeError(f"saturation probe of {workload} failed: {fields.get('errors')} errors, "
                               f"{fields.get('req_per_s')} req/s")
        self.saturation[workload] = {"req_per_s": fields["req_per_s"], "x": plan.saturation_x,
                                     "max_parallel": max_parallel, "requests": fields["requests"],
                                     "config": ctx.label, "commit": self.commit}
        self.saturation_path.write_text(json.dumps(self.saturation, indent=1) + "\n")
        self.log(f"[{ctx.label}] saturation of {workload}: {fields['req_per_s']:.2f} req/s")

    def text_for(self, workload: str, x: float, seed: int):
        if workload not in ("chat-docs", "long-doc-qa"):
            return None
        doc_tokens = self.profile.workloads[workload].params["doc_tokens"]
        n_docs = math.ceil(x * self.profile.budget_tokens / doc_tokens) + 1
        return self.text.for_workload(n_docs, doc_tokens, seed)

    def max_parallel(self, trace) -> int:
        lengths = trace.prompt_lengths()
        mean = sum(lengths) / len(lengths) + sum(r.output_len for r in trace.requests) / len(lengths)
        return max_parallel_for(self.profile, mean)

    async def gsp(self, client, ctx, point: Point, rate: float, tag: str) -> tuple[dict, list[dict]]:
        p = self.profile
        gp = p.workloads["shared-prefix"].params
        groups = gsp_groups(p, point.x)
        max_parallel = max_parallel_for(p, gp["system_prompt_len"] + gp["question_len"] + gp["output_len"])
        stem = f"{ctx.label}__{tag}__x{point.x:g}__r{point.repeat}".replace("@", "-")
        out_file = self.out / "bench_serving" / f"{stem}.jsonl"
        out_file.parent.mkdir(parents=True, exist_ok=True)
        cmd = bench_serving_cmd(url=client.url, tokenizer=self.model.path, output_file=str(out_file),
                                num_groups=groups, prompts_per_group=gp["prompts_per_group"],
                                system_prompt_len=gp["system_prompt_len"], question_len=gp["question_len"],
                                output_len=gp["output_len"], zipf_alpha=gp.get("zipf_alpha"), request_rate=rate,
                                max_concurrency=max_parallel, seed=point.seed, python=self.args.python)
        fields, records = await measure_gsp_point(client, ctx, cmd, env=tool_env(self.args.python),
                                                  log_path=self.out / "logs" / f"bench_serving_{stem}.log",
                                                  output_file=out_file, timeout_s=max(600.0, 4 * p.measure_s),
                                                  poll_s=p.poll_s, stats_pause_s=p.stats_pause_s, slo=SLO(),
                                                  seed=point.seed)
        fields.update(max_parallel=max_parallel, bench_serving_cmd=shlex.join(cmd),
                      trace={"num_groups": groups, **gp}, working_set_x_trace=None)
        return fields, records

    async def run_point(self, client: ServerClient, ctx: ServerContext, point: Point) -> None:
        p = self.profile
        rate = point.rate_fraction * self.rate_for(point.workload)
        t0 = time.monotonic()
        if point.workload == "shared-prefix":
            fields, records = await self.gsp(client, ctx, point, rate, tag=f"f{point.rate_fraction:g}")
            window = None
        else:
            window = Window(p.warmup_s, p.measure_s)
            trace = build_trace(p, point.workload, x=point.x, rate=rate, seed=point.seed, model=self.model,
                                duration_s=1.1 * window.end_s, text=self.text_for(point.workload, point.x, point.seed))
            max_parallel = self.max_parallel(trace)
            fields, result = await measure_point(client, ctx, trace, max_parallel=max_parallel, window=window,
                                                 poll_s=p.poll_s, stats_pause_s=p.stats_pause_s,
                                                 timeout_s=p.request_timeout_s, seed=point.seed, log=self.log)
            records = result.records
            fields.update(max_parallel=max_parallel, working_set_x_trace=trace.params["working_set_x"],
                          trace={k: v for k, v in trace.params.items()})
        row = {**ctx.base_row, "workload": point.workload, "working_set_x": point.x,
               "rate_fraction": point.rate_fraction, "rate": round(rate, 4), "repeat": point.repeat,
               "seed": point.seed, "window": None if window is None else {"warmup_s": window.warmup_s,
                                                                          "measure_s": window.measure_s},
               **fields}
        report.write_rows(self.out / "serving.json", [row])
        report.write_records(self.out, row, records)
        self.log(f"[{ctx.label}] {point.workload} x {point.x:g} rate {rate:.2f}/s ({time.monotonic() - t0:.0f} s): "
                 f"returning TTFT p50 {report.fmt(row['ttft_p50_ms'])} ms (n {row['ttft_n']}), "
                 f"{report.fmt(row['req_per_s'], 2)} req/s, goodput {report.fmt(row['goodput_req_per_s'], 2)}, "
                 f"hit {report.fmt(row['hit_rate'])} (restored {report.fmt(row['hit_rate_restored'])}), "
                 f"errors {row['errors']}")

    # -- the whole plan -----------------------------------------------------------------------------------------------
    def run(self, plans: dict[str, LaunchPlan]) -> list[str]:
        """Run the plan; returns the server runs that failed."""
        failures = []
        for run in plan_runs(self.profile):
            name = f"{run.config} (repeat {run.repeat})"
            if self.args.skip_done and self.done(run):
                self.log(f"[{name}] already measured at commit {self.commit}: skipped")
                continue
            if self.args.url:
                asyncio.run(self.run_server(self.args.url, run, None))
                continue
            port = find_free_port(self.args.host, self.args.port)
            base = plans[run.config]
            plan = plan_server(config_spec(run.config), model=self.model, model_path=self.args.model_path, port=port,
                               budget_tokens=self.profile.budget_tokens, common_args=self.profile.common_args,
                               page_size=self.profile.page_size, attention_backend=self.profile.attention_backend,
                               kvtc_calibration=self.args.kvtc_calibration, kvtc_sync_audit=self.args.kvtc_sync_audit,
                               host=self.args.host, python=self.args.python)
            assert plan.capacity == base.capacity
            plan.log_path = str(self.out / "logs" / f"server_{run.config}_r{run.repeat}.log".replace("@", "-"))
            self.log(f"[{name}] {'; '.join(plan.notes)}\n[{name}] $ {plan.shell}")
            server = ServerProcess(plan.cmd, f"http://{self.args.host}:{port}", plan.log_path, env=plan.env)
            try:
                server.start()
                self.log(f"[{name}] healthy after {server.wait_healthy(self.args.health_timeout, log=self.log):.0f} s")
                asyncio.run(self.run_server(server.url, run, plan))
            except (ServerStartError, RuntimeError, OSError, ValueError) as exc:
                failures.append(name)
                self.log(f"[{name}] FAILED: {exc}")
            finally:
                server.stop()
                wait_port_free(self.args.host, port)
            self.write_report(plots=False)
        self.write_report(plots=not self.args.no_plots)
        return failures

    def done(self, run: ServerRun) -> bool:
        """Every point of ``run`` has a row of this commit (and its break-even rows, on repeat 0)."""
        have = {(r["workload"], r["working_set_x"], r["rate_fraction"], r["repeat"])
                for r in report.load_rows(self.out / "serving.json")
                if r.get("config") == run.config and r.get("commit") == self.commit}
        need = {(p.workload, p.x, p.rate_fraction, p.repeat) for p in run.points}
        probe = (self.args.no_breakeven or run.repeat > 0 or any(
            b.get("config") == run.config and b.get("commit") == self.commit
            for b in report.load_rows(self.out / "serving_breakeven.json")))
        return need <= have and probe

    def write_report(self, plots: bool) -> None:
        write_report(self.out, decisive_x=self.profile.decisive_x, plots=plots)


def write_report(out: Path, *, decisive_x: float = 2.5, plots: bool = True) -> None:
    rows = report.load_rows(out / "serving.json")
    if not rows:
        return
    rows = [r for r in rows if r.get("repeat") != "all"]
    agg = report.aggregate(rows, out)
    if agg:
        rows = report.write_rows(out / "serving.json", agg)
    breakeven = report.load_rows(out / "serving_breakeven.json")
    report.write_markdown(rows, breakeven, out / "serving.md")
    if plots:
        write_plots(rows, breakeven, out, decisive_x=decisive_x)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report_only:
        write_report(Path(args.out_dir or RESULTS))
        return 0
    profile = profile_from(args)
    model = read_model_info(args.model_path)
    if model is None:
        raise SystemExit(f"--model-path {args.model_path}: no config.json there")
    try:
        plans = {} if args.url or args.print_order else make_plans(profile, model, args)
    except ValueError as exc:
        raise SystemExit(f"cannot build the launch commands: {exc}") from None
    runs = plan_runs(profile)
    if args.print_order:
        print("\n".join(dict.fromkeys(r.config for r in runs)))
        return 0
    if args.dry_run:
        print(format_dry_run(list(plans.values())) if plans else f"# running server {args.url}")
        print(describe_plan(profile, runs))
        return 0
    install_sigterm_exit()
    t0 = time.monotonic()
    suite = Suite(args, profile, model)
    print(describe_plan(profile, runs))
    failures = suite.run(plans)
    print(f"[serving] results in {suite.out} (serving.json, serving.md, plots) after {time.monotonic() - t0:.0f} s"
          + (f"; failed: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0
