"""The serving benchmarks (serve_multiturn.py, throughput.py, serve_agreement.py) end to end against a fake SGLang
server, on a CPU.

The fake server (``FakeSGLang``, a stdlib ``ThreadingHTTPServer``) answers like sglang 0.5.17: ``/health``,
``/health_generate``, ``/server_info``, ``/flush_cache``, ``/generate`` (with ``"stream": true``: SSE chunks with
cumulative ``output_ids`` and a ``meta_info`` carrying ``prompt_tokens``, ``completion_tokens``, ``cached_tokens`` and
``cached_tokens_details``, then ``data: [DONE]``; without it: one JSON object with ``output_ids`` and that
``meta_info``, plus ``output_token_logprobs`` rows ``[logprob, token_id, None]`` when ``return_logprob`` is set) and
``/metrics`` (``sglang:kv_*`` and, as a kvtc server, ``sglang:kvtc_*`` gauges). Its prefix cache is a token-budgeted
LRU of sequences plus a second tier of evicted sequences (the "host"/"compressed" part of a hit). Run as ``python
test_serving_client.py --fake-server -m sglang.launch_server --port P ...`` it stands in for a launched server (the
launcher tests point ``--python`` at a wrapper that does this).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
for p in (str(BENCH), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)


# ---------------------------------------------------------------------------------------------------------------------
# The fake server
# ---------------------------------------------------------------------------------------------------------------------

def _lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class FakeSGLang:
    """sglang-shaped HTTP server with a two-tier prefix cache.

    pool_tokens: device tier capacity (tokens of whole cached sequences, LRU).
    label: "radix" (evicted sequences are gone), "kvtc" or "hicache" (evicted sequences move to a second tier whose
        hits are reported as ``cached_tokens_details["host"]``; kvtc also exports ``sglang:kvtc_*`` gauges).
    fail_over: prompts longer than this are aborted (streaming: an sglang-style error chunk; non-streaming: HTTP 400
        with an ``{"error": ...}`` body), to exercise error accounting.
    diverge_on_restore_at: when a request's prefix hit reached the second tier (``host`` > 0), the output token at
        this index differs from the deterministic answer (a compressed tier that changed the greedy answer).

    Answers are deterministic: token i of the answer to a prompt of n tokens is ``(7 n + 3 i) % (vocab - 1) + 1``
    (``answer_ids``), its logprob ``-(id % 50 + 1) / 100`` (``logprob_of``).
    """

    def __init__(self, *, pool_tokens=4096, label="radix", metrics=True, vocab=1000, fail_over=None,
                 ttft_base=0.002, per_token=2e-6, per_output=2e-4, model_path="fake-model", diverge_on_restore_at=None):
        self.pool_tokens, self.label, self.metrics_on, self.vocab = pool_tokens, label, metrics, vocab
        self.fail_over, self.ttft_base, self.per_token, self.per_output = fail_over, ttft_base, per_token, per_output
        self.model_path, self.diverge_on_restore_at = model_path, diverge_on_restore_at
        self.device: OrderedDict = OrderedDict()
        self.cold: OrderedDict = OrderedDict()
        self.lock = threading.Lock()
        self.received: list[dict] = []
        self.counters = {"decompress_count": 0, "integrity_failures": 0}
        self.flushes = 0
        self.httpd = None

    # answers ----------------------------------------------------------------------------------------------------
    def answer_ids(self, n_prompt: int, n_out: int, host: int = 0) -> list[int]:
        out = [(n_prompt * 7 + 3 * i) % (self.vocab - 1) + 1 for i in range(n_out)]
        k = self.diverge_on_restore_at
        if host and k is not None and k < n_out:
            out[k] = out[k] % (self.vocab - 1) + 1  # another id in [1, vocab)
        return out

    @staticmethod
    def logprob_of(token_id: int) -> float:
        return -((token_id % 50) + 1) / 100

    # cache ------------------------------------------------------------------------------------------------------
    def lookup(self, ids):
        with self.lock:
            dev = max((_lcp(ids, s) for s in self.device), default=0)
            cold = max((_lcp(ids, s) for s in self.cold), default=0) if self.label != "radix" else 0
            host = max(0, cold - dev)
            if host:
                self.counters["decompress_count"] += 1
            return dev, host

    def insert(self, seq):
        seq = tuple(seq)
        with self.lock:
            self.device.pop(seq, None)
            self.device[seq] = None
            self.cold.pop(seq, None)
            while sum(len(s) for s in self.device) > self.pool_tokens and len(self.device) > 1:
                old, _ = self.device.popitem(last=False)
                if self.label != "radix":
                    self.cold[old] = None

    def flush(self):
        with self.lock:
            self.device.clear()
            self.cold.clear()
            self.flushes += 1

    def metrics_text(self) -> str:
        with self.lock:
            hot = sum(len(s) for s in self.device)
            cold = sum(len(s) for s in self.cold)
        lab = 'model_name="fake",tp_rank="0"'
        lines = ["# HELP sglang:kv_evictable_tokens Number of evictable token slots.",
                 "# TYPE sglang:kv_evictable_tokens gauge",
                 f"sglang:kv_evictable_tokens{{{lab}}} {float(hot)}", f"sglang:kv_used_tokens{{{lab}}} 0.0",
                 f"sglang:kv_available_tokens{{{lab}}} {float(self.pool_tokens - hot)}"]
        if self.label == "kvtc":
            kl = 'cache_type="KVTCRadixCache",tp_rank="0"'
            values = {"hot_tokens": hot, "compressed_tokens": cold, "host_tokens": 0, "store_capacity_bytes": 1000000,
                      "store_used_bytes": 1000 * cold, "realized_ratio": 17.5, **self.counters}
            lines += [f"sglang:kvtc_{k}{{{kl}}} {float(v)}" for k, v in values.items()]
        if self.label == "hicache":
            lines.append(f"sglang:hicache_host_used_tokens{{{lab}}} {float(cold)}")
        return "\n".join(lines) + "\n"

    def server_info(self) -> dict:
        return {"model_path": self.model_path, "max_total_num_tokens": self.pool_tokens,
                "max_req_input_len": self.pool_tokens - 1, "version": "0.5.17-fake",
                "radix_cache_backend": "kvtc" if self.label == "kvtc" else None,
                "enable_hierarchical_cache": self.label == "hicache"}

    # http -------------------------------------------------------------------------------------------------------
    def handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _json(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path in ("/health", "/health_generate"):
                    return self._json(200, {})
                if self.path in ("/server_info", "/get_server_info"):
                    return self._json(200, fake.server_info())
                if self.path == "/metrics" and fake.metrics_on:
                    body = fake.metrics_text().encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    return self.wfile.write(body)
                return self._json(404, {"detail": "Not Found"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path == "/flush_cache":
                    fake.flush()
                    return self._json(200, {"message": "Cache flushed."})
                if self.path != "/generate":
                    return self._json(404, {"detail": "Not Found"})
                ids = list(body["input_ids"])
                sp = body.get("sampling_params", {})
                fake.received.append({"input_ids": ids, "sampling_params": sp, "stream": body.get("stream"),
                                      "return_logprob": body.get("return_logprob")})
                if not body.get("stream"):
                    return self._generate_once(ids, sp, bool(body.get("return_logprob")))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                if fake.fail_over is not None and len(ids) > fake.fail_over:
                    err = {"error": {"message": f"input too long ({len(ids)})", "code": 400}}
                    self.wfile.write(b"data: " + json.dumps(err).encode() + b"\n\ndata: [DONE]\n\n")
                    return
                dev, host = fake.lookup(ids)
                cached = dev + host
                time.sleep(fake.ttft_base + fake.per_token * (len(ids) - cached) + fake.per_token / 10 * host)
                n = int(sp.get("max_new_tokens", 16))
                answer = fake.answer_ids(len(ids), n, host)
                out = []
                for i in range(n):
                    out.append(answer[i])
                    meta = {"id": "r", "finish_reason": {"type": "length", "length": n} if i == n - 1 else None,
                            "prompt_tokens": len(ids), "completion_tokens": len(out), "cached_tokens": cached}
                    if cached:
                        meta["cached_tokens_details"] = {"device": dev, "host": host}
                    chunk = {"output_ids": out, "meta_info": meta}
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                    if i < n - 1:
                        time.sleep(fake.per_output)
                self.wfile.write(b"data: [DONE]\n\n")
                fake.insert(ids + out[:-1])

            def _generate_once(self, ids, sp, return_logprob):
                """Non-streaming /generate: one JSON object (sglang's shape for ``"stream": false``)."""
                if fake.fail_over is not None and len(ids) > fake.fail_over:
                    return self._json(400, {"error": {"message": f"input too long ({len(ids)})"}})
                dev, host = fake.lookup(ids)
                cached = dev + host
                n = int(sp.get("max_new_tokens", 16))
                time.sleep(fake.ttft_base + fake.per_token * (len(ids) - cached) + fake.per_token / 10 * host
                           + fake.per_output * max(0, n - 1))
                out = fake.answer_ids(len(ids), n, host)
                meta = {"id": "r", "finish_reason": {"type": "length", "length": n}, "prompt_tokens": len(ids),
                        "completion_tokens": n, "cached_tokens": cached}
                if cached:
                    meta["cached_tokens_details"] = {"device": dev, "host": host}
                if return_logprob:
                    meta["output_token_logprobs"] = [[fake.logprob_of(t), t, None] for t in out]
                self._json(200, {"text": "", "output_ids": out, "meta_info": meta})
                fake.insert(ids + out[:-1])

        return Handler

    def start(self, host="127.0.0.1", port=0) -> str:
        self.httpd = ThreadingHTTPServer((host, port), self.handler())
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://{host}:{self.httpd.server_address[1]}"

    def stop(self):
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


def fake_server_main(argv) -> None:
    """Stand-in for ``python -m sglang.launch_server ...``: serve FakeSGLang on --port; append argv to
    $FAKE_ARGV_LOG."""
    ap = argparse.ArgumentParser()
    ap.add_argument("-m")
    ap.add_argument("--model-path")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-total-tokens", type=int, default=100000)
    ap.add_argument("--kv-compress")
    ap.add_argument("--enable-hierarchical-cache", action="store_true")
    ap.add_argument("--enable-metrics", action="store_true")
    a, _ = ap.parse_known_args(argv)
    if os.environ.get("FAKE_ARGV_LOG"):
        with open(os.environ["FAKE_ARGV_LOG"], "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0), "argv": argv}) + "\n")
    label = "kvtc" if a.kv_compress == "kvtc" else "hicache" if a.enable_hierarchical_cache else "radix"
    pool_tokens = a.max_total_tokens
    if label == "kvtc":  # the plugin carves its store (default budget: 0.25 of the slots) out of the pool
        pool_tokens = math.floor(pool_tokens * 0.75)
    fake = FakeSGLang(pool_tokens=pool_tokens, label=label, metrics=a.enable_metrics,
                      model_path=a.model_path)
    time.sleep(0.3)  # a short start-up, so the launcher polls /health at least once
    fake.start(a.host, a.port)
    while True:
        time.sleep(3600)


if __name__ == "__main__" and "--fake-server" in sys.argv:
    fake_server_main([a for a in sys.argv[1:] if a != "--fake-server"])
    sys.exit(0)


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------

import asyncio  # noqa: E402

import pytest  # noqa: E402

import serve_agreement as sa  # noqa: E402
import serve_multiturn as smt  # noqa: E402
import serving_common as sc  # noqa: E402
import throughput as tp  # noqa: E402

REQUIRED = {"config", "model", "gpu", "workload", "ttft_p50_ms", "ttft_p99_ms", "req_per_s", "tok_per_s", "hit_rate",
            "commit"}


@pytest.fixture
def fake():
    servers = []

    def make(**kw):
        s = FakeSGLang(**kw)
        url = s.start()
        servers.append(s)
        return s, url

    yield make
    for s in servers:
        s.stop()


@pytest.fixture(autouse=True)
def _no_sigterm_handler(monkeypatch):
    monkeypatch.setattr(sc, "install_sigterm_exit", lambda: None)
    monkeypatch.setenv("KVTC_GPU", "fake-gpu")
    monkeypatch.setenv("KVTC_COMMIT", "abc123")


def _model_dir(tmp_path, **over) -> Path:
    d = tmp_path / "tiny-llama"
    d.mkdir(exist_ok=True)
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
           "vocab_size": 1000, "torch_dtype": "bfloat16", "max_position_embeddings": 4096, **over}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _requests(out_dir: Path) -> list[dict]:
    recs = []
    for f in sorted((out_dir / "serving_requests").glob("*.jsonl")):
        recs.append([json.loads(line) for line in f.read_text().splitlines()])
    return recs


# --- statistics --------------------------------------------------------------------------------------------------

def test_percentile_interpolates_linearly_like_numpy():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert sc.percentile(xs, 0) == 1.0 and sc.percentile(xs, 100) == 5.0 and sc.percentile(xs, 50) == 3.0
    assert sc.percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert sc.percentile([], 50) is None
    np = pytest.importorskip("numpy")
    vals = [0.3, 1.7, 0.01, 9.0, 2.2, 2.2, 5.5]
    for q in (1, 25, 50, 90, 99):
        assert sc.percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)))


def _rec(turn, ttft, prompt, cached, device=None, host=0, ok=True, out=10):
    return {"ok": ok, "turn": turn, "ttft_s": ttft if ok else None, "latency_s": (ttft or 0) + 0.1,
            "prompt_tokens": prompt, "cached_tokens": cached if ok else 0,
            "cached_device": (cached - host if device is None else device) if ok else 0,
            "cached_host": host if ok else 0, "output_tokens": out if ok else 0}


def test_summarize_uses_returning_turns_for_ttft_and_sums_tokens_for_hit_rates():
    recs = [_rec(1, 0.50, 100, 0), _rec(1, 0.70, 100, 20), _rec(2, 0.010, 200, 150, host=50),
            _rec(2, 0.030, 200, 190), _rec(3, 0.020, 300, 280, host=280), _rec(2, 9.0, 999, 0, ok=False)]
    s = sc.summarize(recs, duration_s=2.0)
    assert s["requests"] == 6 and s["errors"] == 1 and s["returning_requests"] == 3
    assert s["ttft_p50_ms"] == pytest.approx(20.0)  # returning turns only: 10, 20, 30 ms
    assert s["ttft_p99_ms"] == pytest.approx(sc.percentile([10, 20, 30], 99))
    assert s["ttft_first_p50_ms"] == pytest.approx(600.0)
    assert s["req_per_s"] == pytest.approx(2.5) and s["tok_per_s"] == pytest.approx(25.0)
    prompt = 100 + 100 + 200 + 200 + 300
    assert s["hit_rate"] == pytest.approx(round((20 + 150 + 190 + 280) / prompt, 5))
    assert s["hit_rate_host"] == pytest.approx(round((50 + 280) / prompt, 5))
    assert s["hit_rate_device"] + s["hit_rate_host"] == pytest.approx(s["hit_rate"], abs=2e-5)
    assert s["hit_rate_returning"] == pytest.approx(round((150 + 190 + 280) / 700, 5))
    assert s["restored_requests"] == 2
    assert len(s["ttft_returning_cdf_ms"]) == 101 and s["ttft_returning_cdf_ms"][50] == pytest.approx(20.0)


def test_cache_split_reads_details_or_counts_all_as_device():
    assert sc.cache_split({"cached_tokens": 30, "cached_tokens_details": {"device": 10, "host": 20}}) == (30, 10, 20)
    assert sc.cache_split({"cached_tokens": 30}) == (30, 30, 0)
    assert sc.cache_split({"cached_tokens": 0, "cached_tokens_details": None}) == (0, 0, 0)


def test_prometheus_parsing_and_kvtc_gauges_of_rank_0():
    text = """# HELP sglang:kvtc_hot_tokens x
# TYPE sglang:kvtc_hot_tokens gauge
sglang:kvtc_hot_tokens{cache_type="KVTCRadixCache",tp_rank="1"} 100.0
sglang:kvtc_hot_tokens{cache_type="KVTCRadixCache",tp_rank="0"} 100.0
sglang:kvtc_store_used_bytes{cache_type="KVTCRadixCache",tp_rank="0"} 1.5e6
sglang:kvtc_store_used_bytes{cache_type="KVTCRadixCache",tp_rank="1"} 1.5e6
sglang:kv_evictable_tokens{model_name="a b",tp_rank="0"} 42
sglang:num_requests_total 7 1700000000000
"""
    samples = sc.parse_prometheus(text)
    assert sc.metric(samples, "sglang:kv_evictable_tokens") == 42
    assert sc.metric(samples, "sglang:num_requests_total") == 7
    assert sc.metric(samples, "missing") is None
    g = sc.kvtc_gauges(samples)
    assert g == {"hot_tokens": 100.0, "store_used_bytes": 1.5e6}  # TP rank 0


def test_cached_tokens_per_gb_formula():
    s1 = sc.MetricsSample(0, 900, 50, None, {"compressed_tokens": 4000.0, "store_capacity_bytes": 2e6,
                                              "decompress_count": 3.0})
    s2 = sc.MetricsSample(1, 1000, 0, None, {"compressed_tokens": 5000.0, "store_capacity_bytes": 2e6,
                                              "decompress_count": 5.0})
    rep = sc.cache_memory_report([s1, s2], pool_tokens=1000, kv_bytes_per_token=6000, store_bytes=None)
    assert rep["kv_gpu_bytes"] == 1000 * 6000 + 2_000_000
    assert rep["gpu_cached_tokens_peak"] == 6000
    assert rep["cached_tokens_per_gb"] == pytest.approx(round(6000 / (8e6 / 1e9), 1))
    assert rep["kvtc"]["decompress_count"] == 5 and rep["kvtc_compressed_tokens_peak"] == 5000
    radix = sc.cache_memory_report([sc.MetricsSample(0, 700, 300, None, {})], pool_tokens=1000,
                                   kv_bytes_per_token=8000, store_bytes=None)
    assert radix["cached_tokens_per_gb"] == pytest.approx(1000 / 8e-3) and "kvtc" not in radix


def test_kvtc_numbers_from_the_servers_summary_log_line(tmp_path):
    from kvtc_sglang.cache.metrics import KVTCStats

    stats = KVTCStats(hot_tokens=10, compressed_tokens=2000, host_tokens=5, num_blobs=3, blob_bytes=100,
                      blob_raw_bytes=1750, compress_count=4, decompress_count=7, decompress_tokens=900,
                      hit_compressed_tokens=11, integrity_failures=1, drops=2)
    log = tmp_path / "server.log"
    log.write_text("start\n[2026-01-01 00:00:00] " + KVTCStats().summary_line() + "\n[2026-01-01 00:00:30] "
                   + stats.summary_line() + "\nshutting down\n")
    assert sc.kvtc_from_log(log) == {"hot_tokens": 10, "compressed_tokens": 2000, "host_tokens": 5, "num_blobs": 3,
                                     "realized_ratio": 17.5, "compress_count": 4, "decompress_count": 7,
                                     "decompress_tokens": 900, "integrity_failures": 1, "drops": 2}
    assert sc.kvtc_from_log(tmp_path / "missing.log") == {}


# --- workloads ----------------------------------------------------------------------------------------------------

def _args(argv):
    return smt.parse_args(["--url", "http://unused", *argv])


def test_synthetic_working_set_and_users_for_a_multiplier():
    args = _args(["--workload", "synthetic", "--system-tokens", "100", "--history-tokens", "300", "--rounds", "3",
                  "--question-tokens", "20", "--output-len", "10", "--num-users", "7"])
    w = smt.build_synthetic(args, 7, vocab=32000, max_context=None)
    assert w.users == 7 and w.requests == 21 and w.shared_prefix_tokens == 100
    assert [len(s) for s in w.segments[0]] == [100 + 300 + 20, 20, 20]
    assert w.working_set_tokens() == 100 + 7 * (300 + 3 * (20 + 10))
    budget = 1000
    for m in (1, 2, 4, 8):
        u = smt.synthetic_users_for(m, budget, system=100, history=300, rounds=3, question=20, output=10)
        ws = smt.build_synthetic(args, u, 32000, None).working_set_tokens()
        per_user = 300 + 3 * 30
        assert abs(ws - m * budget) <= per_user / 2 + 1 or u == 2
    # every user's tokens after the system prompt are its own
    firsts = [tuple(s[0][100:]) for s in w.segments]
    assert len(set(firsts)) == 7


def test_dispatch_order_users_return_only_after_all_others_spoke():
    args = _args(["--workload", "sharegpt", "--num-users", "9", "--max-turns", "3", "--tokenizer", "none"])
    w = smt.build_chat_workload(args, None, vocab=32000, max_context=None)
    order = smt.dispatch_order(w)
    assert len(order) == w.requests
    for u in range(w.users):
        turns = [i for i, (v, _) in enumerate(order) if v == u]
        assert [order[i][1] for i in turns] == list(range(1, len(turns) + 1))
        for a, b in zip(turns, turns[1:]):
            t = order[b][1]
            between = {v for v, _ in order[a + 1:b]}
            still_talking = {v for v in range(w.users) if v != u and len(w.segments[v]) >= t}
            assert still_talking and still_talking <= between and u not in between


def test_chat_workloads_from_the_data_files_with_pseudo_tokens():
    a = _args(["--workload", "mtbench", "--num-users", "5", "--tokenizer", "none", "--system-tokens", "16"])
    w = smt.build_chat_workload(a, None, vocab=1000, max_context=None)
    rows = [json.loads(x) for x in (smt.DATA / "mt_bench_question.jsonl").read_text().splitlines()[:5]]
    assert w.users == 5 and all(len(s) == 2 for s in w.segments)
    for segs, row in zip(w.segments, rows):
        assert len(segs[0]) == 16 + min(1024, max(4, len(row["turns"][0]) // 4))
        assert len(segs[1]) == min(1024, max(4, len(row["turns"][1]) // 4))
    assert w.shared_prefix_tokens >= 16 and w.ignore_eos
    lo, hi = sc.token_id_range(1000)
    assert all(lo <= t < hi for s in w.segments for seg in s for t in seg)
    again = smt.build_chat_workload(a, None, vocab=1000, max_context=None)
    assert again.segments == w.segments  # deterministic
    b = _args(["--workload", "sharegpt", "--num-users", "8", "--max-turns", "2", "--tokenizer", "none"])
    sg = smt.build_chat_workload(b, None, vocab=1000, max_context=None)
    assert sg.users == 8 and max(len(s) for s in sg.segments) == 2 and min(len(s) for s in sg.segments) >= 1


def test_chat_tokenizer_renders_turns_with_the_template():
    folder = Path.home() / ".cache" / "kvtc-sglang" / "models" / "SmolLM2-135M-Instruct.Q4_1"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip("no converted SmolLM2 folder with a tokenizer in the cache")
    pytest.importorskip("transformers")
    tok = smt.ChatTokenizer(str(folder))
    first = tok.tok.decode(tok.first_turn("", "What is 2+2?"))
    assert first.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    nxt = tok.tok.decode(tok.next_turn("And 3+3?"))
    assert nxt == "<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.tok.convert_tokens_to_ids("<|im_end|>") in tok.stop_ids


# --- the conversation runner -------------------------------------------------------------------------------------

def test_prompts_grow_by_the_servers_answers_and_returning_users_hit_the_cache(fake):
    server, url = fake(pool_tokens=100000)
    args = _args(["--workload", "synthetic", "--smoke", "--num-users", "5", "--rounds", "3"])
    w = smt.build_synthetic(args, 5, vocab=1000, max_context=None)

    async def go():
        async with sc.ServerClient(url) as c:
            return await smt.run_conversations(c, w, concurrency=3, request_rate=float("inf"), seed=0,
                                               timeout_s=30, desc="t")

    records, duration, skipped = asyncio.run(go())
    assert skipped == 0 and len(records) == 15 and all(r["ok"] for r in records) and duration > 0
    by_prompt = {tuple(r["input_ids"]): r for r in server.received}
    assert len(by_prompt) == 15
    # rebuild every user's prompts from the segments and the fake's deterministic answers
    for u in range(5):
        prompt = list(w.segments[u][0])
        for t in range(1, 4):
            assert tuple(prompt) in by_prompt, (u, t)
            n = args.output_len
            out = [(len(prompt) * 7 + 3 * i) % 999 + 1 for i in range(n)]
            if t < 3:
                prompt = prompt + out + w.segments[u][t]
    for r in records:
        assert r["output_tokens"] == args.output_len and r["ttft_s"] > 0 and r["latency_s"] >= r["ttft_s"]
        if r["turn"] >= 2:  # the whole previous prompt + answer minus its last token is cached
            assert r["cached_tokens"] >= r["prompt_tokens"] - args.question_tokens - 1
    assert all(s["sampling_params"]["temperature"] == 0.0 and s["stream"] for s in server.received)
    assert all(s["sampling_params"]["ignore_eos"] for s in server.received)


def test_poisson_rate_paces_arrivals(fake):
    _, url = fake(pool_tokens=100000, per_output=0)
    args = _args(["--workload", "synthetic", "--smoke", "--num-users", "10", "--rounds", "1", "--output-len", "1"])
    w = smt.build_synthetic(args, 10, vocab=1000, max_context=None)

    async def go(rate):
        async with sc.ServerClient(url) as c:
            return await smt.run_conversations(c, w, concurrency=10, request_rate=rate, seed=1, timeout_s=30)

    paced, dur, _ = asyncio.run(go(20.0))
    starts = sorted(r["t_start_s"] for r in paced)
    assert starts[-1] > 0.15  # 10 arrivals at 20/s take ~0.5 s (exponential gaps)
    fast, _, _ = asyncio.run(go(float("inf")))
    assert max(r["t_start_s"] for r in fast) < starts[-1]


def test_failed_requests_are_counted_and_stop_that_user(fake):
    server, url = fake(pool_tokens=100000, fail_over=200)
    args = _args(["--workload", "synthetic", "--smoke", "--num-users", "3", "--rounds", "4", "--output-len", "30"])
    w = smt.build_synthetic(args, 3, vocab=1000, max_context=None)  # 112 tokens, then +46 per turn -> 3rd fails

    async def go():
        async with sc.ServerClient(url) as c:
            return await smt.run_conversations(c, w, concurrency=2, request_rate=float("inf"), seed=0, timeout_s=30)

    records, _, skipped = asyncio.run(go())
    errors = [r for r in records if not r["ok"]]
    assert len(errors) == 3 and all("input too long" in r["error"] for r in errors)
    assert skipped == 3 and all(r["turn"] == 3 for r in errors)
    assert sc.summarize(records, 1.0)["errors"] == 3


# --- end to end: one server by URL --------------------------------------------------------------------------------

def test_url_mode_writes_rows_tables_plots_and_per_request_records(fake, tmp_path):
    server, url = fake(pool_tokens=500, label="kvtc")
    model = _model_dir(tmp_path)
    out = tmp_path / "res"
    rc = smt.main(["--url", url, "--model-path", str(model), "--workload", "synthetic", "--smoke",
                   "--working-set-multipliers", "1,3", "--kv-budget-tokens", "500", "--concurrency", "2",
                   "--warmup-requests", "2", "--warmup-prompt-len", "64", "--metrics-interval", "0.05",
                   "--out-dir", str(out)])
    assert rc == 0
    rows = json.loads((out / "serving.json").read_text())
    assert len(rows) == 2 and all(REQUIRED <= set(r) for r in rows)
    assert {r["config"] for r in rows} == {"kvtc"}  # read from /server_info
    assert all(r["gpu"] == "fake-gpu" and r["commit"] == "abc123" and r["model"] == "tiny-llama" for r in rows)
    assert server.flushes >= 2  # after warm-up and between the two working sets
    warm_ids = {tuple(r["input_ids"]) for r in server.received[:2]}
    all_recs = _requests(out)
    assert len(all_recs) == 2
    for row in rows:
        recs = next(rs for rs in all_recs if len(rs) == row["requests"] and
                    sum(r["prompt_tokens"] for r in rs) == row["prompt_tokens"])
        ok = [r for r in recs if r["ok"]]
        ret = [r["ttft_s"] for r in ok if r["turn"] >= 2]
        assert row["ttft_p50_ms"] == pytest.approx(1000 * sc.percentile(ret, 50), abs=1e-3)
        assert row["ttft_p99_ms"] == pytest.approx(1000 * sc.percentile(ret, 99), abs=1e-3)
        assert row["hit_rate"] == pytest.approx(sum(r["cached_tokens"] for r in ok) /
                                                sum(r["prompt_tokens"] for r in ok), abs=1e-5)
        assert row["working_set_tokens"] == 32 + row["users"] * (64 + 2 * (16 + 8))
        assert row["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # K+V, 2 layers, 2 KV heads, head_dim 16, bf16
        assert row["kvtc"]["realized_ratio"] == 17.5 and "decompress_count" in row["kvtc"]
        assert row["kv_gpu_bytes"] == 500 * row["kv_bytes_per_token"] + 1000000
        assert row["cached_tokens_per_gb"] == pytest.approx(
            round(row["gpu_cached_tokens_peak"] / (row["kv_gpu_bytes"] / 1e9), 1))
        assert not warm_ids & {tuple(r["input_ids"]) for r in server.received[2:]}
    small, big = sorted(rows, key=lambda r: r["working_set_tokens"])
    assert big["working_set_x"] > 2 * small["working_set_x"]
    assert big["hit_rate_host"] > 0  # the fake's second tier served returning users that fell out of the pool
    md = (out / "serving.md").read_text()
    assert "| config | model | workload |" in md and "Cached tok/GB" in md and "realized ratio 17.5" in md
    pytest.importorskip("matplotlib")
    assert (out / "serving_ttft_cdf.png").stat().st_size > 0
    assert (out / "serving_throughput.png").stat().st_size > 0


def test_rows_merge_by_key_across_workloads_and_reruns(fake, tmp_path):
    _, url = fake(pool_tokens=100000)
    out = tmp_path / "res"
    common = ["--url", url, "--smoke", "--warmup-requests", "1", "--warmup-prompt-len", "32", "--out-dir", str(out),
              "--no-plots", "--tokenizer", "none"]
    assert smt.main([*common, "--workload", "mtbench", "--num-users", "4"]) == 0
    assert smt.main([*common, "--workload", "synthetic"]) == 0
    rows = json.loads((out / "serving.json").read_text())
    assert sorted(r["workload"] for r in rows) == ["mtbench", "synthetic"]
    assert smt.main([*common, "--workload", "synthetic", "--config-label", "radix-nopressure"]) == 0
    assert smt.main([*common, "--workload", "synthetic"]) == 0  # same key: replaces, does not duplicate
    rows = json.loads((out / "serving.json").read_text())
    assert sorted((r["workload"], r["config"]) for r in rows) == [("mtbench", "radix"), ("synthetic", "radix"),
                                                                  ("synthetic", "radix-nopressure")]
    mt = next(r for r in rows if r["workload"] == "mtbench")
    assert mt["turns"] == 2 and mt["requests"] == 8 and mt["returning_requests"] == 4
    (out / "serving.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sc.merge_rows(out / "serving.json", rows, smt.KEY)


def test_throughput_url_mode(fake, tmp_path):
    server, url = fake(pool_tokens=100000)
    out = tmp_path / "res"
    # one request in flight: a group's later requests arrive after its first one was cached (no race on hits)
    rc = tp.main(["--url", url, "--smoke", "--warmup-requests", "1", "--warmup-prompt-len", "32",
                  "--max-concurrency", "1", "--out-dir", str(out)])
    assert rc == 0
    (row,) = json.loads((out / "throughput.json").read_text())
    assert REQUIRED <= set(row) and row["workload"] == "shared-prefix"
    g, k, p, q, o = 5, 3, 64, 8, 4
    assert row["requests"] == g * k and row["errors"] == 0 and row["working_set_tokens"] == g * (p + k * (q + o))
    assert row["total_tok_per_s"] == pytest.approx(row["input_tok_per_s"] + row["tok_per_s"], rel=1e-3)
    measured = server.received[-g * k:]
    assert [tuple(r["input_ids"][:p]) for r in measured[:g]] != [tuple(measured[0]["input_ids"][:p])] * g
    assert row["hit_rate"] > 0 and "| config | model | working set |" in (out / "throughput.md").read_text()


# --- serve_agreement.py: kvtc vs radix answers, by URL -------------------------------------------------------------

Q, O, USERS, TURNS, POOL = 16, 8, 4, 3, 100  # turn 1 fits the pool (4 x 23 tokens), turn 2 overflows it


@pytest.fixture
def no_flush_wait(monkeypatch):
    """serve_agreement.main waits 2 s after /flush_cache; skip that wait (only in that module)."""
    import types

    monkeypatch.setattr(sa, "time", types.SimpleNamespace(time=time.time, perf_counter=time.perf_counter,
                                                          sleep=lambda s: None))


def _agreement(ref_url, test_url, model, out, tag="t"):
    """serve_agreement.main by URL on random-id turns (ids from ``sc.token_id_range`` of the model's vocab)."""
    rc = sa.main(["--ref-url", ref_url, "--test-url", test_url, "--model-path", str(model), "--tokenizer", "none",
                  "--question-tokens", str(Q), "--users", str(USERS), "--turns", str(TURNS), "--output-len", str(O),
                  "--request-timeout", "30", "--tag", tag, "--out-dir", str(out)])
    return rc, json.loads((out / f"serving_agreement_{tag}.json").read_text())


def _check_history(server, ref_answer):
    """Every user's next prompt is its previous prompt + the reference answer + Q new ids (round-robin order)."""
    prompts = [r["input_ids"] for r in server.received]
    assert len(prompts) == USERS * TURNS
    for u in range(USERS):
        mine = prompts[u::USERS]
        assert len(mine[0]) == Q
        for a, b in zip(mine, mine[1:]):
            assert b[:len(a) + O] == a + ref_answer(len(a)) and len(b) == len(a) + O + Q
    assert len({tuple(p[:Q]) for p in prompts[:USERS]}) == USERS  # users' first turns differ


def test_agreement_identical_servers_agree_on_every_turn_and_restored_rows_are_counted(fake, tmp_path, no_flush_wait):
    ref, ref_url = fake(pool_tokens=100000, label="radix")
    test, test_url = fake(pool_tokens=POOL, label="kvtc")
    out = tmp_path / "res"
    rc, rep = _agreement(ref_url, test_url, _model_dir(tmp_path, vocab_size=32000), out, tag="same")
    assert rc == 0 and rep["request_errors"] == 0
    assert (out / "serving_agreement_same.md").is_file() and not (out / "serving_agreement.json").exists()
    rows = rep["rows"]
    assert len(rows) == USERS * TURNS
    assert [(r["user"], r["turn"]) for r in rows] == [(u, t) for t in range(1, TURNS + 1) for u in range(USERS)]
    for r in rows:
        assert r["prompt_tokens"] == r["turn"] * Q + (r["turn"] - 1) * O  # history carries the reference answer
        assert r["identical"] and r["first_divergence"] == O and r["output_tokens"] == O
        assert r["agreement_before_divergence"] == 1.0 and r["mean_abs_logprob_diff"] == 0.0
    # both servers got the same prompts; each turn extends the last by the reference answer
    assert [r["input_ids"] for r in ref.received] == [r["input_ids"] for r in test.received]
    assert all(r["return_logprob"] and not r["stream"] and r["sampling_params"] == {"temperature": 0.0,
                                                                                    "max_new_tokens": O}
               for r in ref.received + test.received)
    _check_history(ref, lambda n: ref.answer_ids(n, O))
    restored = [r for r in rows if r["test_restored"] > 0]
    assert restored and all(r["turn"] > 1 for r in restored)  # users evicted from the small pool came back
    # ... while a returning user still in the pool hit the device tier only
    assert any(r["turn"] > 1 and r["test_cached"] > 0 and r["test_restored"] == 0 for r in rows)
    assert all(r["test_cached"] >= r["test_restored"] for r in rows)
    assert all(r["ref_cached"] > 0 for r in rows if r["turn"] > 1)  # the big radix pool kept everyone
    s = rep["summary"]
    assert s["first_turns"]["requests"] == USERS and s["returning_turns"]["requests"] == USERS * (TURNS - 1)
    assert s["returning_with_restore"]["requests"] == len(restored)
    assert s["returning_with_restore"]["restored_tokens"] == sum(r["test_restored"] for r in restored)
    for part in s.values():
        assert part["identical_rate"] == 1.0 and part["agreement_before_divergence"] == 1.0
    assert test.flushes == 1 and ref.flushes == 0  # only the test server is flushed at the end
    assert rep["after_flush"]["flush_ok"] and rep["after_flush"]["kvtc"]["realized_ratio"] == 17.5
    assert "| returning_with_restore |" in (out / "serving_agreement_same.md").read_text()


def test_agreement_answers_that_diverge_after_a_restore(fake, tmp_path, no_flush_wait):
    ref, ref_url = fake(pool_tokens=100000, label="radix")
    test, test_url = fake(pool_tokens=POOL, label="kvtc", diverge_on_restore_at=2)
    out = tmp_path / "res"
    rc, rep = _agreement(ref_url, test_url, _model_dir(tmp_path, vocab_size=32000), out, tag="div")
    assert rc == 0 and rep["request_errors"] == 0
    rows = rep["rows"]
    restored = [r for r in rows if r["test_restored"] > 0]
    device_only = [r for r in rows if r["turn"] > 1 and r["test_cached"] > 0 and r["test_restored"] == 0]
    assert restored and device_only  # only the restored ones diverge
    for r in rows:
        if r["test_restored"] > 0:
            assert not r["identical"] and r["first_divergence"] == 2
            assert r["agreement_before_divergence"] == pytest.approx(2 / O)
        else:
            assert r["identical"] and r["first_divergence"] == O
        assert r["mean_abs_logprob_diff"] == 0.0  # the tokens before the divergence agree
    assert all(r["identical"] for r in rows if r["turn"] == 1)
    s = rep["summary"]
    assert s["first_turns"]["identical_rate"] == 1.0
    assert s["returning_with_restore"]["identical_rate"] == 0.0
    assert s["returning_with_restore"]["agreement_before_divergence"] == pytest.approx(2 / O)
    assert s["returning_turns"]["identical_rate"] == pytest.approx(
        1 - len(restored) / s["returning_turns"]["requests"])
    # the next turn carries the reference answer, not the diverged one
    assert [r["input_ids"] for r in ref.received] == [r["input_ids"] for r in test.received]
    _check_history(ref, lambda n: ref.answer_ids(n, O))


def test_agreement_request_errors_give_exit_code_1(fake, tmp_path, no_flush_wait):
    ref, ref_url = fake(pool_tokens=100000, label="radix")
    test, test_url = fake(pool_tokens=POOL, label="kvtc", fail_over=Q)  # every returning turn fails on the test server
    out = tmp_path / "res"
    rc, rep = _agreement(ref_url, test_url, _model_dir(tmp_path, vocab_size=32000), out, tag="err")
    assert rc == 1
    assert rep["request_errors"] == USERS * (TURNS - 1)
    assert [(r["user"], r["turn"]) for r in rep["rows"]] == [(u, 1) for u in range(USERS)]
    assert all(r["identical"] for r in rep["rows"])
    assert rep["summary"]["returning_turns"] == {"requests": 0}
    # a failed turn adds no answer to the history: the next prompt only grows by the question
    lens = [len(r["input_ids"]) for r in test.received]
    assert lens == [Q] * USERS + [2 * Q + O] * USERS + [3 * Q + O] * USERS
    assert f"Request errors: {USERS * (TURNS - 1)}." in (out / "serving_agreement_err.md").read_text()


# --- launcher -----------------------------------------------------------------------------------------------------

def _plan(config, tmp_path, **kw):
    model = sc.read_model_info(str(_model_dir(tmp_path)))
    kw.setdefault("server_args", sc.split_args("--load-format dummy --mem-fraction-static 0.8 --max-total-tokens 1000"))
    kw.setdefault("kvtc_args", ["--kvtc-calibration", "/cal"])
    kw.setdefault("hicache_args", sc.split_args(sc.DEFAULT_HICACHE_ARGS))
    return sc.plan_server(config, model_path="/m", host="127.0.0.1", port=31000, model=model, python="py", **kw)


def test_launch_commands_per_config(tmp_path):
    bpt = 2 * 2 * 2 * 16 * 2
    radix = _plan("radix", tmp_path)
    assert radix.cmd == ["py", "-m", "sglang.launch_server", "--model-path", "/m", "--host", "127.0.0.1", "--port",
                         "31000", "--load-format", "dummy", "--mem-fraction-static", "0.8", "--max-total-tokens",
                         "1000", "--enable-metrics"]
    assert radix.pool_tokens == 1000 and "KV budget 1000 token slots" in radix.note
    hi = _plan("hicache", tmp_path)
    assert hi.cmd[-4:] == ["--enable-hierarchical-cache", "--hicache-ratio", "2", "--enable-metrics"]
    assert sc.get_flag(hi.cmd, "--max-total-tokens") == "1000"
    kv = _plan("kvtc", tmp_path)
    assert sc.get_flag(kv.cmd, "--kv-compress") == "kvtc" and sc.get_flag(kv.cmd, "--kvtc-calibration") == "/cal"
    assert kv.pool_tokens == 750 and kv.store_bytes == 250 * bpt  # default store budget 0.25 of the budget
    # the same --max-total-tokens: the plugin carves the store out of those slots (equal KV memory)
    assert sc.get_flag(kv.cmd, "--max-total-tokens") == "1000"
    assert sc.get_flag(kv.cmd, "--kvtc-store-budget") is None
    assert kv.pool_tokens * bpt + kv.store_bytes == 1000 * bpt
    kv2 = _plan("kvtc", tmp_path, kvtc_args=["--kvtc-calibration", "/cal", "--kvtc-store-budget", "10000"])
    assert kv2.store_bytes == 10000 and kv2.pool_tokens == 1000 - (10000 + bpt - 1) // bpt
    nop = _plan("kvtc-nopressure", tmp_path)
    assert sc.get_flag(nop.cmd, "--max-total-tokens") is None and nop.kv_budget_tokens is None
    assert sc.get_flag(nop.cmd, "--kvtc-store-budget") is None and "mem-fraction-static 0.8" in nop.note
    assert sc.get_flag(_plan("radix-nopressure", tmp_path).cmd, "--max-total-tokens") is None
    for bad, msg in ((dict(kvtc_args=[]), "--kvtc-calibration"),
                     (dict(server_args=["--kv-compress", "kvtc"]), "belongs to the kvtc"),
                     (dict(server_args=["--enable-hierarchical-cache"]), "belongs to the hicache"),
                     (dict(server_args=["--port", "1"]), "launcher sets it")):
        with pytest.raises(ValueError, match=msg):
            _plan("kvtc", tmp_path, **bad)
    with pytest.raises(ValueError, match="unknown"):
        sc.parse_configs("kvtc,foo")
    assert sc.parse_configs("kvtc, radix,hicache-nopressure") == ["kvtc", "radix", "hicache-nopressure"]


def test_kvtc_split_matches_the_plugins_pool_sizing():
    plugin = pytest.importorskip("kvtc_sglang.cache.plugin", exc_type=ImportError)
    from kvtc_sglang.cache.options import KVTCOptions

    for budget in ("0.25", "0.5", "0.1", "123456", "2MiB"):
        want = plugin.store_bytes_for(KVTCOptions(store_budget=budget), 20000, 131072 // 64)
        assert sc.kvtc_split(20000, budget, 131072 // 64) == want


def test_kv_bytes_per_token_follows_sglang_dtype_rules(tmp_path):
    m = sc.read_model_info(str(_model_dir(tmp_path, torch_dtype="float32")))
    assert m.kv_bytes_per_token([]) == 2 * 2 * 2 * 16 * 2  # float32 configs are served in float16
    assert m.kv_bytes_per_token(["--dtype", "float32"]) == 2 * 2 * 2 * 16 * 4
    assert m.kv_bytes_per_token(["--kv-cache-dtype", "fp8_e4m3"]) == 2 * 2 * 2 * 16
    assert m.kv_bytes_per_token(["--tp", "2"]) == 2 * 2 * 1 * 16 * 2
    llama = sc.read_model_info(str(_model_dir(tmp_path, num_hidden_layers=32, num_attention_heads=32,
                                              num_key_value_heads=8, hidden_size=4096, head_dim=128)))
    assert llama.kv_bytes_per_token([]) == 128 * 1024


def _sleeper_cmd(spawn_child: bool) -> list[str]:
    code = "import time\n"
    if spawn_child:
        code += "import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    return [sys.executable, "-c", code + "time.sleep(60)"]


def test_server_that_never_becomes_healthy_is_stopped_with_a_clear_error(tmp_path):
    port = sc.find_free_port("127.0.0.1", 39000)
    server = sc.ServerProcess(_sleeper_cmd(spawn_child=True), f"http://127.0.0.1:{port}", tmp_path / "s.log")
    server.start()
    pgid = server.pid
    time.sleep(0.5)
    assert len(sc.group_members(pgid)) == 2  # the server and its child
    t0 = time.monotonic()
    with pytest.raises(sc.ServerStartError, match=r"not healthy after 2 s .*stopped it"):
        server.wait_healthy(2.0, poll_s=0.2, log=lambda s: None)
    assert time.monotonic() - t0 < 30
    assert sc.group_members(pgid) == [] and server.proc.returncode is not None
    assert "$ " in (tmp_path / "s.log").read_text()


def test_server_that_exits_early_reports_its_log(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('boom: no GPU'); sys.exit(3)"]
    server = sc.ServerProcess(cmd, "http://127.0.0.1:9", tmp_path / "s.log").start()
    with pytest.raises(sc.ServerStartError, match=r"(?s)exited with code 3.*boom: no GPU"):
        server.wait_healthy(30.0, poll_s=0.1)
    assert sc.group_members(server.pid) == []


def _fake_python(tmp_path) -> Path:
    wrapper = tmp_path / "fake-python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{Path(__file__).resolve()}" --fake-server "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_launch_mode_runs_each_config_in_turn_and_leaves_nothing_running(tmp_path, monkeypatch):
    log = tmp_path / "argv.jsonl"
    monkeypatch.setenv("FAKE_ARGV_LOG", str(log))
    model = _model_dir(tmp_path)
    out = tmp_path / "res"
    rc = smt.main(["--configs", "radix,kvtc,hicache,kvtc-nopressure", "--model-path", str(model),
                   "--python", str(_fake_python(tmp_path)), "--port", str(sc.find_free_port("127.0.0.1", 39100)),
                   "--server-args", "--load-format dummy --mem-fraction-static 0.8 --max-total-tokens 400",
                   "--kvtc-args", "--kvtc-calibration /cal", "--workload", "synthetic", "--smoke",
                   "--working-set-multipliers", "2", "--warmup-requests", "1", "--warmup-prompt-len", "32",
                   "--health-timeout", "60", "--out-dir", str(out), "--no-plots"])
    assert rc == 0
    launched = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(launched) == 4
    flags = [sc.get_flag(x["argv"], "--max-total-tokens") for x in launched]
    # kvtc gets the same --max-total-tokens; the plugin carves its store out of those slots
    assert flags == ["400", "400", "400", None]
    assert sc.get_flag(launched[1]["argv"], "--kvtc-store-budget") is None
    assert sc.get_flag(launched[1]["argv"], "--kv-compress") == "kvtc"
    assert sc.get_flag(launched[2]["argv"], "--enable-hierarchical-cache") == ""
    assert all("--enable-metrics" in x["argv"] for x in launched)
    for x in launched:
        assert sc.group_members(x["pgid"]) == []
    rows = json.loads((out / "serving.json").read_text())
    assert sorted(r["config"] for r in rows) == ["hicache", "kvtc", "kvtc-nopressure", "radix"]
    assert len({r["working_set_tokens"] for r in rows}) == 1  # the same workload for every config
    kv = next(r for r in rows if r["config"] == "kvtc")
    assert kv["pool_tokens"] == 300 and kv["store_bytes"] == 100 * kv["kv_bytes_per_token"]
    assert "compressed store" in kv["memory_note"] and kv["server_cmd"].startswith(str(tmp_path))
    assert all((out / "logs" / f"server_{c}.log").is_file() for c in ("radix", "kvtc", "hicache", "kvtc-nopressure"))
    assert "Memory: every config" in (out / "serving.md").read_text()


def test_launch_mode_reports_a_config_that_fails_to_start_and_goes_on(tmp_path, monkeypatch):
    bad = tmp_path / "bad-python"
    bad.write_text("#!/bin/sh\necho 'CUDA error: no device'\nexit 1\n")
    bad.chmod(0o755)
    out = tmp_path / "res"
    rc = tp.main(["--configs", "radix", "--model-path", str(_model_dir(tmp_path)), "--python", str(bad),
                  "--port", str(sc.find_free_port("127.0.0.1", 39200)), "--smoke", "--health-timeout", "20",
                  "--out-dir", str(out)])
    assert rc == 1
    assert "CUDA error: no device" in (out / "logs" / "server_radix.log").read_text()


def test_scripts_do_not_import_torch():
    import subprocess

    code = ("import sys; sys.path[:0] = [%r, %r]; import serve_multiturn, throughput, serve_agreement; "
            "print('torch' in sys.modules)") % (str(BENCH), str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
