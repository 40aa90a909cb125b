"""The serving suite's parts without a server: statistics, metrics, configurations and their commands, workload
traces, run order and result files."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
from bench_helpers import model_dir

from benchmarks.serving import configs, launch, profiles, report, stats, workloads
from benchmarks.serving.argv import get_flag
from benchmarks.serving.metrics import Histogram, Snapshot, kvtc_window, sglang_window, parse_prometheus
from benchmarks.serving.model import read_model_info
from benchmarks.serving.suite import main as suite_main

LLAMA_8B = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
            "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072}


# --- statistics ------------------------------------------------------------------------------------------------------

def test_percentile_interpolates_linearly_like_numpy():
    assert stats.percentile([], 50) is None
    assert stats.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert stats.percentile([0.0, 10.0], 25) == 2.5
    assert stats.percentile(range(101), 99) == 99.0
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_bootstrap_ci_is_seeded_covers_the_median_and_widens_with_run_to_run_spread():
    rng = random.Random(1)
    run = [rng.gauss(100, 10) for _ in range(400)]
    lo, hi = stats.bootstrap_ci([run], 50)
    assert stats.bootstrap_ci([run], 50) == (lo, hi)  # deterministic
    assert lo < stats.percentile(run, 50) < hi and hi - lo < 5
    # three repeats whose levels differ: the two-level interval is wider than pooling them as one run
    runs = [[v + shift for v in run[:130]] for shift in (-15, 0, 15)]
    pooled = stats.bootstrap_ci([[v for r in runs for v in r]], 50)
    two_level = stats.bootstrap_ci(runs, 50)
    assert (two_level[1] - two_level[0]) > 2 * (pooled[1] - pooled[0])
    assert stats.bootstrap_ci([[1.0]], 50) is None


def test_mean_ci_uses_student_t_over_repeats():
    mean, (lo, hi) = stats.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert stats.mean_ci([5.0]) == (5.0, None) and stats.mean_ci([None]) == (None, None)


def _rec(turn, ttft, tpot=0.01, prompt=100, cached=0, host=0, ok=True, send=0.0, end=1.0):
    return {"ok": ok, "turn": turn, "returning": turn > 1, "ttft_s": ttft if ok else None, "tpot_s": tpot,
            "latency_s": 1.0, "prompt_tokens": prompt, "cached_tokens": cached, "cached_device": cached - host,
            "cached_host": host, "output_tokens": 10, "t_send_s": send, "t_end_s": end}


def test_summarize_reports_returning_ttft_goodput_and_hit_rates_by_tier():
    recs = [_rec(1, 2.0, send=0.0), _rec(2, 0.5, cached=80, host=30, send=1.0),
            _rec(3, 0.3, tpot=0.08, cached=90, send=2.0), _rec(2, 0.1, ok=False, send=3.0, end=4.0)]
    s = stats.summarize(recs)
    assert s["requests"] == 4 and s["errors"] == 1 and s["returning_requests"] == 2 and s["ttft_n"] == 2
    assert s["ttft_p50_ms"] == 400.0 and s["ttft_first_p50_ms"] == 2000.0
    assert s["duration_s"] == 4.0 and s["req_per_s"] == 0.75
    # only the second request meets TTFT <= 1 s and TPOT <= 50 ms (the first is slow, the third decodes slowly)
    assert s["goodput_req_per_s"] == 0.25
    assert s["hit_rate"] == round(170 / 300, 5) and s["hit_rate_restored"] == round(30 / 300, 5)
    assert s["hit_rate_device"] + s["hit_rate_restored"] == pytest.approx(s["hit_rate"], abs=1e-5)
    assert not s["ttft_p99_reliable"] and len(s["ttft_returning_cdf_ms"]) == 101


# --- metrics ---------------------------------------------------------------------------------------------------------

def _metrics(compress_count, compress_seconds, dropped=None, lb_counts=(0, 0, 0), lb_sum=0.0, extra=""):
    k = 'cache_type="KVTCRadixCache",tp_rank="0"'
    lab = 'model_name="m",tp_rank="0"'
    lines = [f"sglang:kvtc_compress_count{{{k}}} {compress_count}", f"sglang:kvtc_compress_tokens{{{k}}} 1000",
             f"sglang:kvtc_compress_seconds{{{k}}} {compress_seconds}", f"sglang:kvtc_realized_ratio{{{k}}} 9.5",
             f"sglang:kvtc_hot_tokens{{{k}}} 100", f"sglang:kvtc_compressed_tokens{{{k}}} 900",
             f'sglang:kvtc_hot_tokens{{cache_type="KVTCRadixCache",tp_rank="1"}} 7',
             f"sglang:kv_used_tokens{{{lab}}} 50", f"sglang:kv_evictable_tokens{{{lab}}} 10"]
    if dropped is not None:
        lines.append(f"sglang:kvtc_compressed_dropped_tokens{{{k}}} {dropped}")
    for le, c in zip(("0.01", "0.1", "+Inf"), lb_counts):
        lines.append(f'sglang:load_back_duration_seconds_bucket{{{lab},le="{le}"}} {c}')
    lines += [f"sglang:load_back_duration_seconds_count{{{lab}}} {lb_counts[-1]}",
              f"sglang:load_back_duration_seconds_sum{{{lab}}} {lb_sum}"]
    return "# HELP x\n" + "\n".join(lines) + "\n" + extra


def test_kvtc_counters_over_a_window_and_absent_gauges_are_none_not_zero():
    start = Snapshot.parse(0.0, _metrics(10, 1.0, dropped=100, lb_counts=(1, 2, 2), lb_sum=0.05))
    end = Snapshot.parse(5.0, _metrics(30, 3.0, dropped=400, lb_counts=(3, 10, 12), lb_sum=0.85))
    k = kvtc_window(start, end)
    assert k["compress_count"] == 20 and k["compress_seconds"] == 2.0 and k["compress_ms_per_op"] == 100.0
    assert k["compress_tokens"] == 0 and k["compressed_dropped_fraction"] is None  # no tokens compressed in between
    assert k["compressed_dropped_tokens"] == 300
    assert k["realized_ratio"] == 9.5 and k["hot_tokens"] == 100  # gauges: end values of TP rank 0
    assert k["host_syncs"] is None and k["jit_compiles"] is None and k["decompress_count"] is None
    assert k["decompress_ms_per_op"] is None
    assert end.gpu_cached_tokens() == 1000  # kvtc: hot + compressed (blobs live in pool slots)
    sg = sglang_window(start, end)
    assert sg["load_back"]["count"] == 10 and sg["load_back"]["mean_ms"] == pytest.approx(80.0)
    # 2 of the window's 10 load-backs took <= 10 ms, 8 more <= 100 ms: the median lies in (10, 100] ms
    assert 10.0 < sg["load_back"]["p50_ms"] <= 100.0
    assert sg["eviction"] is None and sg["evicted_tokens"] is None  # not exported
    radix = Snapshot.parse(1.0, 'sglang:kv_used_tokens{tp_rank="0"} 5\nsglang:kv_evictable_tokens{tp_rank="0"} 20\n')
    assert kvtc_window(radix, radix) is None and radix.gpu_cached_tokens() == 25
    assert not Snapshot.parse(1.0, None).available


def test_histogram_quantile_interpolates_inside_buckets():
    h = Histogram([(0.01, 2.0), (0.1, 10.0), (math.inf, 10.0)], 10.0, 0.5)
    assert h.quantile(0.2) == pytest.approx(0.01)
    assert h.quantile(0.6) == pytest.approx(0.01 + 0.09 * 4 / 8)
    assert Histogram([(math.inf, 0.0)], 0.0, 0.0).quantile(0.5) is None
    assert parse_prometheus('a{le="+Inf",x="y"} 3\n# c\nb 1.5 123\n') == {"a": [({"le": "+Inf", "x": "y"}, 3.0)],
                                                                           "b": [({}, 1.5)]}


# --- configurations at equal bytes -----------------------------------------------------------------------------------

def test_equal_bytes_pools_follow_sglang_kv_dtype_rules(tmp_path):
    m = read_model_info(str(model_dir(tmp_path, **LLAMA_8B)))
    assert configs.kv_bytes_per_token(m, None, model_dtype="bfloat16") == 131072  # 128 KiB per token
    assert configs.kv_bytes_per_token(m, "fp8_e4m3") == 65536
    # FP4: half a byte per element + a scale byte per 16 + one layer's K and V dequant workspace (pool_configurator)
    assert configs.kv_bytes_per_token(m, "fp4_mx_block16") == 32768 + 4096 + 2048
    assert configs.kv_bytes_per_token(m, None, model_dtype="float32") == 262144
    with pytest.raises(ValueError, match="cannot size"):
        configs.kv_bytes_per_token(m, "int3")
    n = 65536
    caps = {c: configs.capacity_of(configs.config_spec(c), m, n, page_size=64) for c in configs.BASE_CONFIGS}
    assert caps["radix"].pool_slots == n and caps["radix"].knee_x == 1.0
    assert caps["fp8"].pool_slots == 2 * n and caps["fp8"].knee_x == 2.0
    assert caps["fp4"].pool_slots == n * 131072 // 38912 // 64 * 64 and 3.3 < caps["fp4"].knee_x < 3.4
    assert {c.kv_gpu_bytes for k, c in caps.items() if k not in ("fp4", "unlimited")} == {n * 131072}
    assert caps["fp4"].kv_gpu_bytes <= n * 131072
    assert caps["hicache2"].host_tokens == 2 * n and caps["hicache2"].knee_x == 2.0
    assert caps["hicache8"].knee_x == 8.0
    assert caps["kvtc16"].capacity_tokens is None and caps["kvtc16"].with_ratio(9.0).knee_x == 9.0
    assert caps["unlimited"].pool_slots is None and "memory fraction" in caps["unlimited"].describe()


def test_config_names_and_invalid_configs_fail_with_clear_errors(tmp_path):
    m = read_model_info(str(model_dir(tmp_path)))
    assert configs.config_spec("kvtc16@flashinfer").backend == "flashinfer"
    with pytest.raises(ValueError, match="unknown config"):
        configs.parse_configs("radix,kvtc12")
    with pytest.raises(ValueError, match="distinct"):
        configs.parse_configs("radix,radix")
    with pytest.raises(ValueError, match="unknown attention backend"):
        configs.config_spec("radix@cuda")
    kw = dict(model=m, model_path="M", port=1, budget_tokens=1024)
    with pytest.raises(ValueError, match="FP4 KV cache on Hopper"):
        launch.plan_server(configs.config_spec("fp4"), attention_backend="fa3", **kw)
    with pytest.raises(ValueError, match="calibration"):
        launch.plan_server(configs.config_spec("kvtc16"), **kw)
    with pytest.raises(ValueError, match="--max-total-tokens"):
        launch.plan_server(configs.config_spec("radix"), common_args=["--max-total-tokens", "5"], **kw)
    with pytest.raises(ValueError, match="--kvtc-window-tokens"):
        launch.plan_server(configs.config_spec("radix"), common_args=["--kvtc-window-tokens", "5"], **kw)


def test_dry_run_prints_the_exact_launch_command_of_every_config(tmp_path, capsys):
    m = model_dir(tmp_path, **LLAMA_8B)
    rc = suite_main(["--profile", "h200-full", "--model-path", str(m), "--kvtc-calibration", "/art", "--dry-run",
                     "--python", "python3"])
    assert rc == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    cmds = {head[2:].split(":")[0]: cmd.split() for head, cmd in zip(lines, lines[1:])
            if head.startswith("# ") and not cmd.startswith("#")}
    assert set(cmds) == set(profiles.PROFILES["h200-full"].configs)
    n = 65536
    for name, argv in cmds.items():
        assert argv[:3] == ["python3", "-m", "sglang.launch_server"] and get_flag(argv, "--page-size") == "64"
        assert "--enable-metrics" in argv and "--disable-cuda-graph" not in argv  # CUDA graphs stay on
        assert get_flag(argv, "--mem-fraction-static") == "0.85"
    tokens = {c: get_flag(a, "--max-total-tokens") for c, a in cmds.items()}
    assert tokens["radix"] == tokens["kvtc16"] == tokens["hicache2"] == tokens["radix@flashinfer"] == str(n)
    assert tokens["fp8"] == str(2 * n) and tokens["unlimited"] is None and int(tokens["fp4"]) > 3 * n
    assert get_flag(cmds["fp8"], "--kv-cache-dtype") == "fp8_e4m3"
    assert get_flag(cmds["fp4"], "--kv-cache-dtype") == "fp4_mx_block16"
    assert get_flag(cmds["radix"], "--attention-backend") == "triton"
    assert get_flag(cmds["kvtc16@flashinfer"], "--attention-backend") == "flashinfer"
    assert cmds["kvtc16@flashinfer"].count("--attention-backend") == 1
    h = cmds["hicache8"]
    assert "--enable-hierarchical-cache" in h and get_flag(h, "--hicache-ratio") == "8"
    assert (get_flag(h, "--hicache-write-policy"), get_flag(h, "--hicache-io-backend"),
            get_flag(h, "--hicache-mem-layout")) == ("write_through", "kernel", "page_first")
    for r in ("8", "16", "32"):
        k = cmds[f"kvtc{r}"]
        assert (get_flag(k, "--kv-compress"), get_flag(k, "--kvtc-ratio"), get_flag(k, "--kvtc-calibration"),
                get_flag(k, "--kvtc-stats-interval")) == ("kvtc", r, "/art", "1")
        assert get_flag(k, "--kvtc-store-budget") is None
    assert "holds up to 65,536 x rho tokens" in out and "= 2x budget" in out
    assert "# profile h200-full" in out and "radix (repeat 0):" in out


# --- workload traces ------------------------------------------------------------------------------------------------

def _check_prompts(trace):
    prompts = trace.replay_prompts()
    assert [len(p) for p in prompts] == trace.prompt_lengths()
    for r, p in zip(trace.requests, prompts):
        if r.history is not None:
            prev = trace.requests[r.history]
            assert prev.arrival_s <= r.arrival_s and prev.user == r.user and r.turn > prev.turn
            assert p[:len(prompts[r.history])] == prompts[r.history]
            assert p[len(prompts[r.history]):][:prev.output_len] == trace.placeholder_answer(prev)
    return prompts


def test_traces_are_pure_reusable_and_hit_the_requested_working_set(tmp_path):
    mt = dict(vocab_size=1000, seed=3, x=2.5, budget_tokens=4096, request_length=64, sub_question_length=16,
              output_length=8, num_rounds=5, request_rate=50.0, duration_s=10)
    a, b = workloads.multiturn(**mt), workloads.multiturn(**mt)
    assert a == b and a != workloads.multiturn(**{**mt, "seed": 4})
    assert abs(a.params["working_set_x"] - 2.5) < 0.05 and a.params["num_clients"] == round(2.5 * 4096 / 168)
    assert len(a.requests) == 500 and [r.index for r in a.requests] == list(range(500))
    assert all(x.arrival_s <= y.arrival_s for x, y in zip(a.requests, a.requests[1:]))
    assert all(r.returning == (r.history is not None) for r in a.requests)
    prompts = _check_prompts(a)
    # staggered start: the first request of each initial client carries its synthetic history
    firsts = [r for r in a.requests if r.history is None and r.user < a.params["num_clients"]]
    assert len({r.turn for r in firsts}) > 1
    assert all(len(prompts[r.index]) == 64 + (r.turn - 1) * 24 for r in firsts)
    path = tmp_path / "t.jsonl"
    a.to_jsonl(path)
    back = workloads.Trace.from_jsonl(path)
    assert back == a and back.replay_prompts() == prompts

    gsp = workloads.shared_prefix(vocab_size=1000, num_groups=6, prompts_per_group=4, system_prompt_len=32,
                                  question_len=4, output_len=2)
    assert sorted(r.user for r in gsp.requests) == sorted(list(range(6)) * 4)
    assert sum(not r.returning for r in gsp.requests) == 6
    assert len({id(r.prefix_ids) for r in gsp.requests}) == 6  # one shared prefix object per group
    gsp.to_jsonl(path)
    assert workloads.Trace.from_jsonl(path).replay_prompts() == gsp.replay_prompts()

    ld = workloads.long_doc_qa(vocab_size=1000, x=2.0, budget_tokens=4096, doc_tokens=512, question_tokens=8,
                               output_len=4, request_rate=10, num_requests=40, repeat_mode="tile")
    assert ld.params["num_docs"] == round(2 * 4096 / 524)
    assert [r.user for r in ld.requests[:16]] == [i % 16 for i in range(16)]
    assert all(len(p) == 520 for p in _check_prompts(ld))

    cy = workloads.cyclic(vocab_size=1000, num_users=4, history_tokens=20, rounds=3, question_tokens=5,
                          output_len=2, system_tokens=6)
    assert [(r.user, r.turn) for r in cy.requests] == [(u, t) for t in (1, 2, 3) for u in range(4)]
    assert cy.prompt_lengths() == [31] * 4 + [38] * 4 + [45] * 4
    _check_prompts(cy)

    docs = [list(range(10 + i, 60 + i)) for i in range(3)]
    ch = workloads.chat_over_documents(segments=workloads.pseudo_chat_segments(1000), documents=docs,
                                       questions=["Why is that so?", "Tell me more about it.", "Summarize."],
                                       vocab_size=1000, num_users=3, rounds=2, num_sessions=9,
                                       system_text="You answer questions.", think_mean_s=1.0)
    ps = _check_prompts(ch)
    for r, p in zip(ch.requests, ps):
        if r.turn == 1:
            assert p[len(p) - len(r.new_ids) - 50:][:50] == docs[r.user]  # the user's own document
    # a user's later sessions reuse the (system + document) prefix: returning although turn 1
    assert any(r.turn == 1 and r.returning for r in ch.requests)


def test_run_plan_interleaves_configs_randomly_with_radix_first():
    p = profiles.with_overrides(profiles.PROFILES["ci"], repeats=3)
    runs = profiles.plan_runs(p, ["radix", "fp8", "hicache2", "kvtc16"])
    assert len(runs) == 12 and runs[0].config == "radix"
    orders = [[r.config for r in runs[i * 4:(i + 1) * 4]] for i in range(3)]
    assert all(sorted(o) == ["fp8", "hicache2", "kvtc16", "radix"] for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # the order changes between repeats
    assert profiles.plan_runs(p, ["radix", "fp8", "hicache2", "kvtc16"]) == runs  # seeded
    assert {pt.seed for r in runs for pt in r.points} == {0, 1000, 2000}
    assert profiles.max_parallel_for(p, 100.0) == min(p.max_parallel_cap, int(0.4 * p.budget_tokens / 100))


# --- result files ----------------------------------------------------------------------------------------------------

def test_rows_merge_by_key_and_a_file_never_mixes_commits(tmp_path):
    path = tmp_path / "serving.json"
    row = {"config": "radix", "model": "m", "workload": "multiturn", "working_set_x": 1.5, "rate_fraction": 0.7,
           "repeat": 0, "commit": "abc", "ttft_p50_ms": 1.0}
    report.write_rows(path, [row])
    report.write_rows(path, [{**row, "ttft_p50_ms": 2.0}, {**row, "repeat": 1}])
    rows = json.loads(path.read_text())
    assert len(rows) == 2 and {r["ttft_p50_ms"] for r in rows} == {2.0, 1.0}
    with pytest.raises(report.MixedCommitError, match="one table per commit"):
        report.write_rows(path, [{**row, "commit": "def"}])
    path.write_text("{}")
    with pytest.raises(ValueError, match="list of rows"):
        report.write_rows(path, [row])


def test_the_client_side_never_imports_torch_or_sglang():
    code = ("import sys, benchmarks.serving.suite, benchmarks.serve_agreement; "
            "print('torch' in sys.modules, 'sglang' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_repeats_aggregate_into_one_row_with_two_level_cis(tmp_path):
    rng = random.Random(5)
    rows = []
    for rep, level in ((0, 0.10), (1, 0.14), (2, 0.12)):
        recs = [{**_rec(2, rng.gauss(level, 0.01), send=i * 0.01, end=i * 0.01 + 0.2), "measured": True}
                for i in range(300)] + [{**_rec(2, 9.9), "measured": False}]  # warm-up: excluded
        s = stats.summarize([r for r in recs if r["measured"]])
        row = {"config": "kvtc16", "model": "m", "workload": "multiturn", "working_set_x": 2.5, "rate_fraction": 0.7,
               "repeat": rep, "commit": "c", "kvtc": {"compress_ms_per_op": 10.0 * (rep + 1)}, **s}
        report.write_records(tmp_path, row, recs)
        rows.append(row)
    (agg,) = report.aggregate(rows, tmp_path)
    assert agg["repeat"] == "all" and agg["repeats"] == 3 and agg["ttft_n"] == 900
    lo, hi = agg["ttft_p50_ci_ms"]
    assert lo < agg["ttft_p50_ms"] < hi and hi - lo > 20  # run-to-run spread (100 vs 140 ms) widens it
    assert agg["req_per_s"] == pytest.approx(sum(r["req_per_s"] for r in rows) / 3, rel=1e-4)
    assert agg["req_per_s_ci"][0] <= agg["req_per_s"] <= agg["req_per_s_ci"][1]
    assert agg["kvtc"]["compress_ms_per_op"] == 20.0 and agg["ttft_returning_cdf_ms"][100] < 9000
    assert report.aggregate(rows[:1], tmp_path) == []  # one repeat: nothing to aggregate
