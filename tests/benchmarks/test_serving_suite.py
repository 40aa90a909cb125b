"""The serving suite end to end on a CPU against the fake SGLang server: launched configs (one server at a time,
nothing left running), every workload, repeats with aggregated CIs, SGLang's own bench_serving for the shared-prefix
workload, every row field and every plot."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from bench_helpers import add_word_tokenizer, fake_python, model_dir
from fake_sglang import FakeSGLang

from benchmarks.serving import suite
from benchmarks.serving.argv import get_flag
from benchmarks.serving.process import (ServerProcess, ServerStartError, find_free_port, group_members)

ROW_FIELDS = {
    "config", "model", "workload", "working_set_x", "rate", "rate_fraction", "repeat", "gpu", "commit", "run_id",
    "ttft_p50_ms", "ttft_p50_ci_ms", "ttft_p99_ms", "ttft_p99_ci_ms", "ttft_n", "ttft_p99_reliable",
    "tpot_p50_ms", "tpot_p99_ms", "tpot_p50_ci_ms", "tpot_p99_ci_ms", "tpot_n", "req_per_s", "goodput_req_per_s",
    "slo", "hit_rate", "hit_rate_device", "hit_rate_restored", "cached_tokens_per_gpu_gb", "kvtc", "sglang",
    "errors", "capacity", "capacity_note", "capacity_knee_x", "in_flight_kv_peak_fraction", "server_cmd",
    "max_parallel", "trace", "window", "budget_tokens", "kv_gpu_bytes", "page_size", "attention_backend",
    "cuda_graphs", "ttft_returning_cdf_ms", "realized_ratio",
}
KVTC_COUNTERS = ("compress_count", "compress_ms_per_op", "decompress_count", "decompress_ms_per_op",
                 "compressed_dropped_fraction", "host_syncs", "jit_compiles", "realized_ratio", "blob_slots")
PLOTS = ("serving_hit_rate_vs_x.png", "serving_ttft_vs_x.png", "serving_goodput_vs_rate.png", "serving_ttft_cdf.png",
         "serving_breakeven.png")


@pytest.fixture(autouse=True)
def _provenance(monkeypatch):
    monkeypatch.setattr(suite, "install_sigterm_exit", lambda: None)
    monkeypatch.setenv("KVTC_GPU", "fake-gpu")
    monkeypatch.setenv("KVTC_COMMIT", "abc123")


def test_launched_configs_one_at_a_time_write_every_field_and_every_plot(tmp_path, monkeypatch):
    log = tmp_path / "argv.jsonl"
    monkeypatch.setenv("FAKE_ARGV_LOG", str(log))
    monkeypatch.setenv("FAKE_FAIL_FLAG", "fp8_e4m3")  # the fp8 server fails to start: reported, the others go on
    out = tmp_path / "res"
    rc = suite.main(["--profile", "ci", "--workloads", "multiturn", "--configs", "radix,fp8,hicache2,kvtc16",
                     "--model-path", str(model_dir(tmp_path)), "--kvtc-calibration", "/cal", "--kvtc-sync-audit",
                     "--python", str(fake_python(tmp_path)), "--port", str(find_free_port("127.0.0.1", 39400)),
                     "--out-dir", str(out), "--health-timeout", "30"])
    assert rc == 1  # fp8 failed
    launched = [json.loads(x) for x in log.read_text().splitlines()]
    by_config = {}
    for x in launched:
        argv = x["argv"]
        name = ("kvtc16" if get_flag(argv, "--kv-compress") else "hicache2" if "--enable-hierarchical-cache" in argv
                else "fp8" if get_flag(argv, "--kv-cache-dtype") else "radix")
        by_config[name] = x
        assert group_members(x["pgid"]) == []  # the whole process group is gone
    assert list(by_config) == ["radix", "kvtc16", "fp8", "hicache2"] or list(by_config)[0] == "radix"
    assert {get_flag(x["argv"], "--max-total-tokens") for c, x in by_config.items() if c != "fp8"} == {"2048"}
    assert get_flag(by_config["fp8"]["argv"], "--max-total-tokens") == "4096"
    assert by_config["kvtc16"]["env_sync_audit"] == "1" and by_config["radix"]["env_sync_audit"] is None
    assert "not supported on this device" in (out / "logs" / "server_fp8_r0.log").read_text()

    rows = json.loads((out / "serving.json").read_text())
    assert sorted({r["config"] for r in rows}) == ["hicache2", "kvtc16", "radix"]
    sat = json.loads((out / "saturation.json").read_text())["multiturn"]
    for r in rows:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["errors"] == 0 and r["ttft_n"] > 20 and r["gpu"] == "fake-gpu" and r["commit"] == "abc123"
        assert r["rate"] == pytest.approx(r["rate_fraction"] * sat["req_per_s"], rel=1e-3)
        assert r["ttft_p50_ci_ms"][0] <= r["ttft_p50_ms"] <= r["ttft_p50_ci_ms"][1]
        assert 0 <= r["in_flight_kv_peak_fraction"] <= 0.6  # the client keeps in-flight KV <= ~40% of the pool
        assert abs(r["working_set_x_trace"] - r["working_set_x"]) < 0.1
    assert {(r["working_set_x"], r["rate_fraction"]) for r in rows if r["config"] == "radix"} == {
        (1.5, 0.7), (3.0, 0.7), (1.5, 0.9)}
    kv = [r for r in rows if r["config"] == "kvtc16"]
    for r in kv:
        assert all(r["kvtc"][k] is not None for k in KVTC_COUNTERS) and r["kvtc"]["host_syncs"] == 0
        assert r["realized_ratio"] == 9.6 and r["capacity_knee_x"] == 9.6 and r["hit_rate_restored"] > 0
        assert r["sglang"]["load_back"]["count"] > 0
    assert all(r["kvtc"] is None and r["sglang"]["load_back"] is None for r in rows if r["config"] == "radix")
    assert all(r["hicache_host_tokens_peak"] for r in rows if r["config"] == "hicache2")
    # at 3x the budget the compressed tier still serves the conversations plain radix has evicted
    hit = {r["config"]: r["hit_rate"] for r in rows if r["working_set_x"] == 3.0}
    assert hit["kvtc16"] > hit["radix"] + 0.3

    be = json.loads((out / "serving_breakeven.json").read_text())
    assert {b["config"] for b in be} == {"radix", "hicache2", "kvtc16"}
    assert all(b["restored_tokens"] == b["prefix_tokens"] for b in be if b["config"] == "kvtc16")
    assert all(b["restored_tokens"] == 0 for b in be if b["config"] == "radix")
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 5000, plot
    md = (out / "serving.md").read_text()
    assert "kvtc16: 2,048 slots" in md and "at the realized ratio 9.60" in md and "## Break-even probe" in md
    recs = [json.loads(x) for x in gzip.open(out / "serving_requests" / "kvtc16__multiturn__x3__f0.7__r0.jsonl.gz",
                                             "rt")]
    assert recs and all(r["measured"] == (0.15 <= r["t_send_s"] < 0.6) for r in recs)


@pytest.fixture
def fake_url():
    servers = []

    def make(**kw):
        s = FakeSGLang(**kw)
        servers.append(s)
        return s, s.start()

    yield make
    for s in servers:
        s.stop()


def test_text_document_cyclic_and_shared_prefix_workloads_against_a_running_server(tmp_path, fake_url, monkeypatch):
    pytest.importorskip("transformers")
    has_sglang = importlib.util.find_spec("sglang") is not None  # the shared-prefix workload runs bench_serving
    monkeypatch.setenv("HOME", str(tmp_path))  # bench_serving caches generated prompts under ~/.cache
    model = add_word_tokenizer(model_dir(tmp_path))
    server, url = fake_url(pool_tokens=2048, tier="hicache", model_path=str(model), per_output=5e-5)
    out = tmp_path / "res"
    workloads = ["chat-docs", "long-doc-qa", "cyclic"] + (["shared-prefix"] if has_sglang else [])
    rc = suite.main(["--profile", "ci", "--workloads", ",".join(workloads), "--url", url, "--config-label",
                     "hicache2", "--model-path", str(model), "--saturation", "300", "--out-dir", str(out),
                     "--no-breakeven", "--no-plots"])
    assert rc == 0
    rows = {r["workload"]: r for r in json.loads((out / "serving.json").read_text())}
    assert sorted(rows) == sorted(workloads)
    for r in rows.values():
        assert ROW_FIELDS - {"capacity_knee_x", "trace", "window"} <= set(r) and r["errors"] == 0
        assert r["rate"] == pytest.approx(300 * r["rate_fraction"]) and r["capacity"] is None  # no launch plan
        assert r["sglang"]["load_back"] is not None and r["kvtc"] is None
    docs = rows["chat-docs"]
    assert docs["hit_rate_returning"] > 0.5 and docs["trace"]["system_tokens"] == 2  # "<s> user" opens turn 1
    assert docs["trace"]["document_tokens"] == 96 and docs["ttft_n"] > 5
    # chat-docs prompts were rendered through the chat template: "<s>" then the (unknown) role word
    assert any(p["input_ids"][:2] == [1, 0] for p in server.received)
    assert rows["long-doc-qa"]["hit_rate"] > 0.5 and rows["long-doc-qa"]["trace"]["num_docs"] == 11
    assert rows["cyclic"]["trace"]["num_users"] == round((3 * 2048 - 16) / (64 + 3 * (8 + 4)))
    assert rows["cyclic"]["ttft_n"] > 0
    assert "## long-doc-qa" in (out / "serving.md").read_text()
    if not has_sglang:
        return
    gsp = rows["shared-prefix"]
    cmd = gsp["bench_serving_cmd"]
    groups = round(1.5 * 2048 / (64 + 4 * (8 + 4)))  # x * budget / (prefix + prompts per group x (question + output))
    for part in ("-m sglang.bench_serving", "--dataset-name generated-shared-prefix", f"--gsp-num-groups {groups}",
                 "--gsp-prompts-per-group 4", "--gsp-group-distribution zipf", "--request-rate 210",
                 f"--max-concurrency {gsp['max_parallel']}", "--output-details", "--cache-report"):
        assert part in cmd
    n = 4 * groups
    assert gsp["requests"] == n and gsp["ttft_n"] == n and gsp["ttft_scope"].startswith("all requests")
    assert 0 < gsp["hit_rate"] <= 1 and gsp["bench_serving"]["completed"] == n


def test_a_server_that_exits_early_or_never_answers_is_stopped_with_its_log(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('boom: no GPU'); sys.exit(3)"]
    server = ServerProcess(cmd, "http://127.0.0.1:9", tmp_path / "a.log").start()
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*boom: no GPU"):
        server.wait_healthy(30.0)
    assert group_members(server.proc.pid) == []
    sleeper = [sys.executable, "-c", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
               "'import time; time.sleep(60)']); time.sleep(60)"]
    server = ServerProcess(sleeper, "http://127.0.0.1:9", tmp_path / "b.log").start()
    with pytest.raises(ServerStartError, match="not healthy after 1 s"):
        server.wait_healthy(1.0)
    assert group_members(server.proc.pid) == []  # the child it spawned is gone too
    assert Path(tmp_path / "b.log").read_text().startswith("$ ")


def test_gpu_script_serve_stage_resumes_and_bundles_two_files(tmp_path):
    """benchmarks/gpu_e2e.sh's serve stage with the fake server: rows at the given commit, a second serve skips what
    is measured, and $OUT receives the two bundle files."""
    import os
    import subprocess
    import tarfile

    root = Path(__file__).resolve().parents[2]
    state = tmp_path / "e2e"
    w = state / "first-slice"
    (w / "stages").mkdir(parents=True)
    for s in ("setup", "capture", "calibrate"):  # the GPU stages, as if done
        (w / "stages" / f"{s}.done").touch()
    model_dir(w, name="llama-3.1-8b-dummy")
    out = tmp_path / "out"
    env = {**os.environ, "KVTC_E2E": str(state), "OUT": str(out), "KVTC_COMMIT": "abc123", "KVTC_GPU": "fake-gpu",
           "KVTC_E2E_PYTHON": sys.executable, "KVTC_E2E_SERVER_PYTHON": str(fake_python(tmp_path)),
           "KVTC_E2E_SUITE_PROFILE": "ci", "PYTHONPATH": str(root),
           "KVTC_E2E_SUITE_ARGS": "--configs radix --workloads multiturn --xs 1.5 --no-breakeven --no-plots "
                                  f"--port {find_free_port('127.0.0.1', 39600)}"}
    script = ["bash", str(root / "benchmarks" / "gpu_e2e.sh"), "first-slice"]
    for _ in range(2):
        (w / "stages" / "serve.done").unlink(missing_ok=True)
        done = subprocess.run(script + ["stage", "serve"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((w / "results" / "serving.json").read_text())
    assert sorted((r["config"], r["working_set_x"], r["rate_fraction"], r["commit"]) for r in rows) == [
        ("radix", 1.5, 0.7, "abc123"), ("radix", 1.5, 0.9, "abc123")]
    serve_logs = sorted((w / "logs").glob("serve_*.log"))
    assert "already measured at commit abc123: skipped" in "".join(p.read_text() for p in serve_logs)
    assert sorted(p.name for p in out.iterdir()) == ["kvtc_e2e_first-slice.tar.gz", "progress.log"]
    with tarfile.open(out / "kvtc_e2e_first-slice.tar.gz") as tar:
        names = tar.getnames()
    assert {"results/serving.json", "results/serving.md", "results/saturation.json", "progress.log", "commit"} <= set(
        names)
