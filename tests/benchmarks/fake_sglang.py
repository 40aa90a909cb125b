"""A fake SGLang 0.5.17 server for the benchmark tests (stdlib ``ThreadingHTTPServer``, no GPU, no model).

It answers ``/health``, ``/health_generate``, ``/server_info``, ``/flush_cache``, ``/metrics`` and ``/generate``
like sglang: with ``"stream": true`` SSE chunks with cumulative ``output_ids``, ``text`` and a ``meta_info``
carrying ``prompt_tokens``, ``completion_tokens``, ``cached_tokens`` and ``cached_tokens_details``, then
``data: [DONE]``; without it one JSON object (plus ``output_token_logprobs`` rows ``[logprob, token_id, None]`` with
``return_logprob``). Prompts are ``input_ids`` or ``text`` (one token per whitespace-separated word).

Its cache is a token-budgeted LRU of whole sequences (``pool_tokens``) above an optional second tier of evicted
sequences (``second_tier_tokens``; a hit there is the ``host`` part): ``tier`` "radix" (no second tier), "hicache"
(host pool; SGLang's load-back / eviction histograms) or "kvtc" (compressed blobs; the ``sglang:kvtc_*`` gauges of
``KVTCStats`` plus the newer fields, ``host_syncs`` only with ``KVTC_SYNC_AUDIT=1``, the fields named in
``absent_kvtc`` not exported). Timing: ``ttft_base`` + ``per_token`` per uncached prompt token + ``per_token / 10``
per restored token, then ``per_output`` per further output token.

``python fake_sglang.py -m sglang.launch_server --port P ...`` stands in for a launched server (the launcher tests
point ``--python`` at a wrapper that does this); ``$FAKE_ARGV_LOG`` records each launch's argv and process group;
a launch whose argv holds ``$FAKE_FAIL_FLAG`` exits with an error instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import zlib
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KVTC_FIELDS = ("hot_tokens", "compressed_tokens", "host_tokens", "hot_bytes", "store_used_bytes",
               "store_capacity_bytes", "host_used_bytes", "host_capacity_bytes", "blob_bytes", "blob_raw_bytes",
               "num_blobs", "compress_count", "compress_tokens", "compress_seconds", "decompress_count",
               "decompress_tokens", "decompress_seconds", "hit_hot_tokens", "hit_compressed_tokens", "hit_host_tokens",
               "miss_tokens", "evicted_tokens", "deleted_tokens", "integrity_failures", "integrity_dropped_tokens",
               "demotions", "drops", "dropped_tokens", "revived_tokens", "realized_ratio", "cached_tokens", "hit_rate",
               "compressed_dropped_tokens", "jit_compiles", "host_syncs", "blob_slots", "compress_ahead_count")
BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, float("inf"))


def _lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _Hist:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.n += 1
        self.sum += v
        for i, le in enumerate(BUCKETS):
            if v <= le:
                self.counts[i] += 1

    def lines(self, name: str, lab: str) -> list[str]:
        out = [f'{name}_bucket{{{lab},le="{"+Inf" if le == float("inf") else le}"}} {float(c)}'
               for le, c in zip(BUCKETS, self.counts)]
        return out + [f"{name}_count{{{lab}}} {float(self.n)}", f"{name}_sum{{{lab}}} {self.sum}"]


class FakeSGLang:
    """See the module docstring. ``label`` (default: ``tier``) is what ``/server_info`` reports."""

    def __init__(self, *, pool_tokens=4096, tier="radix", second_tier_tokens=None, metrics=True, vocab=1000,
                 fail_over=None, ttft_base=0.002, per_token=2e-6, per_output=2e-4, model_path="fake-model",
                 diverge_on_restore_at=None, realized_ratio=9.5, absent_kvtc=(), label=None):
        self.pool_tokens, self.tier, self.metrics_on, self.vocab = pool_tokens, tier, metrics, vocab
        self.label = label or tier
        if second_tier_tokens is None:
            second_tier_tokens = {"radix": 0, "hicache": 2 * pool_tokens, "kvtc": int(pool_tokens * 4)}[tier]
        self.second_tier_tokens = second_tier_tokens
        self.fail_over, self.ttft_base, self.per_token, self.per_output = fail_over, ttft_base, per_token, per_output
        self.model_path, self.diverge_on_restore_at = model_path, diverge_on_restore_at
        self.realized_ratio, self.absent_kvtc = realized_ratio, set(absent_kvtc)
        self.device: OrderedDict = OrderedDict()
        self.cold: OrderedDict = OrderedDict()  # sequence -> read since it went cold
        self.lock = threading.Lock()
        self.received: list[dict] = []
        self.counters = dict.fromkeys(("compress_count", "compress_tokens", "compress_seconds", "decompress_count",
                                       "decompress_tokens", "decompress_seconds", "hit_hot_tokens",
                                       "hit_compressed_tokens", "miss_tokens", "evicted_tokens", "drops",
                                       "dropped_tokens", "compressed_dropped_tokens", "integrity_failures"), 0)
        self.load_back, self.eviction = _Hist(), _Hist()
        self.load_back_tokens = self.evicted_tokens = 0
        self.running_tokens = 0
        self.flushes = 0
        self.httpd = None

    # answers ----------------------------------------------------------------------------------------------------
    def answer_ids(self, n_prompt: int, n_out: int, host: int = 0) -> list[int]:
        out = [(n_prompt * 7 + 3 * i) % (self.vocab - 1) + 1 for i in range(n_out)]
        k = self.diverge_on_restore_at
        if host and k is not None and k < n_out:
            out[k] = out[k] % (self.vocab - 1) + 1
        return out

    @staticmethod
    def logprob_of(token_id: int) -> float:
        return -((token_id % 50) + 1) / 100

    # cache ------------------------------------------------------------------------------------------------------
    def lookup(self, ids):
        with self.lock:
            dev = max((_lcp(ids, s) for s in self.device), default=0)
            best, cold = None, 0
            for s in self.cold:
                n = _lcp(ids, s)
                if n > cold:
                    best, cold = s, n
            host = max(0, cold - dev)
            self.counters["hit_hot_tokens"] += dev
            self.counters["miss_tokens"] += len(ids) - dev - host
            if host:
                self.cold[best] = True
                self.counters["hit_compressed_tokens"] += host
                self.counters["decompress_count"] += 1
                self.counters["decompress_tokens"] += host
                self.counters["decompress_seconds"] += host * 1e-6
                self.load_back.observe(host * 1e-6)
                self.load_back_tokens += host
            return dev, host

    def insert(self, seq):
        seq = tuple(seq)
        with self.lock:
            # a radix tree stores a prefix once: sequences the new one extends are absorbed into it
            for tier in (self.device, self.cold):
                for s in [s for s in tier if len(s) <= len(seq) and seq[:len(s)] == s]:
                    del tier[s]
            self.device[seq] = None
            while sum(len(s) for s in self.device) > self.pool_tokens and len(self.device) > 1:
                old, _ = self.device.popitem(last=False)
                self.counters["evicted_tokens"] += len(old)
                self.evicted_tokens += len(old)
                self.eviction.observe(len(old) * 1e-7)
                if self.second_tier_tokens:
                    self.cold[old] = False
                    self.counters["compress_count"] += 1
                    self.counters["compress_tokens"] += len(old)
                    self.counters["compress_seconds"] += len(old) * 2e-6
            while sum(len(s) for s in self.cold) > self.second_tier_tokens and self.cold:
                old, read = self.cold.popitem(last=False)
                self.counters["drops"] += 1
                self.counters["dropped_tokens"] += len(old)
                if not read:
                    self.counters["compressed_dropped_tokens"] += len(old)

    def flush(self):
        with self.lock:
            self.device.clear()
            self.cold.clear()
            self.flushes += 1

    def metrics_text(self) -> str:
        with self.lock:
            hot = sum(len(s) for s in self.device)
            cold = sum(len(s) for s in self.cold)
            counters = dict(self.counters)
        lab = 'model_name="fake",tp_rank="0"'
        lines = ["# HELP sglang:kv_evictable_tokens Number of evictable token slots.",
                 "# TYPE sglang:kv_evictable_tokens gauge",
                 f"sglang:kv_evictable_tokens{{{lab}}} {float(hot)}",
                 f"sglang:kv_used_tokens{{{lab}}} {float(self.running_tokens)}",
                 f"sglang:kv_available_tokens{{{lab}}} {float(max(0, self.pool_tokens - hot))}"]
        if self.tier in ("hicache", "kvtc"):
            lines += self.load_back.lines("sglang:load_back_duration_seconds", lab)
            lines += self.eviction.lines("sglang:eviction_duration_seconds", lab)
            lines += [f"sglang:load_back_tokens_total{{{lab}}} {float(self.load_back_tokens)}",
                      f"sglang:evicted_tokens_total{{{lab}}} {float(self.evicted_tokens)}"]
        if self.tier == "hicache":
            lines.append(f"sglang:hicache_host_used_tokens{{{lab}}} {float(cold)}")
        if self.tier == "kvtc":
            kl = 'cache_type="KVTCRadixCache",tp_rank="0"'
            values = {f: 0 for f in KVTC_FIELDS}
            values.update(counters, hot_tokens=hot, compressed_tokens=cold, realized_ratio=self.realized_ratio,
                          blob_slots=int(cold / self.realized_ratio), cached_tokens=hot + cold)
            if os.environ.get("KVTC_SYNC_AUDIT") != "1":
                values.pop("host_syncs")
            lines += [f"sglang:kvtc_{k}{{{kl}}} {float(v)}" for k, v in values.items() if k not in self.absent_kvtc]
        return "\n".join(lines) + "\n"

    def server_info(self) -> dict:
        return {"model_path": self.model_path, "max_total_num_tokens": self.pool_tokens,
                "max_req_input_len": self.pool_tokens - 1, "version": "0.5.17-fake",
                "kv_compress": "kvtc" if self.tier == "kvtc" else "none",
                "enable_hierarchical_cache": self.tier == "hicache"}

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
                if self.path == "/model_info":
                    return self._json(200, {"model_path": fake.model_path, "tokenizer_path": fake.model_path})
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
                if "input_ids" in body:
                    ids = list(body["input_ids"])
                else:  # one token per whitespace-separated word (what the tests' word-level tokenizer counts)
                    ids = [zlib.crc32(w.encode()) % (fake.vocab - 1) + 1 for w in str(body.get("text", "")).split()]
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
                fake.running_tokens += len(ids)
                try:
                    self._stream(ids, sp)
                finally:
                    fake.running_tokens -= len(ids)

            def _stream(self, ids, sp):
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
                    chunk = {"output_ids": out, "text": " t" * len(out), "meta_info": meta}
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
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return f"http://{host}:{self.httpd.server_address[1]}"

    def stop(self):
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


def fake_server_main(argv) -> None:
    """Stand-in for ``python -m sglang.launch_server ...``: serve FakeSGLang on --port, sized from the flags."""
    ap = argparse.ArgumentParser()
    ap.add_argument("-m")
    ap.add_argument("--model-path")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-total-tokens", type=int)
    ap.add_argument("--kv-compress")
    ap.add_argument("--kvtc-ratio", type=float, default=16.0)
    ap.add_argument("--enable-hierarchical-cache", action="store_true")
    ap.add_argument("--hicache-ratio", type=float, default=2.0)
    ap.add_argument("--enable-metrics", action="store_true")
    a, _ = ap.parse_known_args(argv)
    if os.environ.get("FAKE_ARGV_LOG"):
        with open(os.environ["FAKE_ARGV_LOG"], "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0), "argv": argv,
                                "env_sync_audit": os.environ.get("KVTC_SYNC_AUDIT")}) + "\n")
    tier = "kvtc" if a.kv_compress == "kvtc" else "hicache" if a.enable_hierarchical_cache else "radix"
    failing = os.environ.get("FAKE_FAIL_FLAG")
    if failing and failing in argv:  # a config the "GPU" cannot run
        print(f"RuntimeError: {failing} is not supported on this device", flush=True)
        sys.exit(1)
    pool = a.max_total_tokens or 100000
    second = {"radix": 0, "hicache": int(pool * a.hicache_ratio), "kvtc": int(pool * 0.6 * a.kvtc_ratio)}[tier]
    vocab = 1000
    if a.model_path and os.path.isfile(os.path.join(a.model_path, "config.json")):
        with open(os.path.join(a.model_path, "config.json")) as f:
            vocab = int(json.load(f).get("vocab_size", 1000))
    fake = FakeSGLang(pool_tokens=pool, tier=tier, second_tier_tokens=second, metrics=a.enable_metrics,
                      model_path=a.model_path, vocab=vocab, realized_ratio=0.6 * a.kvtc_ratio, per_output=5e-5)
    time.sleep(0.2)  # a short start-up, so the launcher polls /health at least once
    fake.start(a.host, a.port)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    fake_server_main([a for a in sys.argv[1:]])
