"""``/metrics`` of a server: Prometheus parsing, the kvtc tier's counters and SGLang's load-back / eviction
histograms, read as the difference between a scrape at the start and one at the end of a measured window.

The kvtc tier exports one gauge ``sglang:kvtc_<field>`` per field of ``kvtc_sglang.cache.metrics.KVTCStats`` (plus
``realized_ratio``, ``cached_tokens``, ``hit_rate``), refreshed every ``--kvtc-stats-interval`` seconds; the suite
launches kvtc with an interval of 1 s and pauses longer than that before each scrape. A gauge the server does not
export is None here, never 0: absent is not "nothing happened". ``host_syncs`` is only counted by a server started
with ``KVTC_SYNC_AUDIT=1``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from kvtc_sglang.cache.metrics import METRIC_PREFIX, KVTCStats

# fields the tier exports beyond today's KVTCStats (counters unless listed in _GAUGES_AHEAD)
FIELDS_AHEAD = ("compressed_dropped_tokens", "jit_compiles", "host_syncs", "blob_slots", "compress_ahead_count")
_GAUGES_AHEAD = ("blob_slots",)
KVTC_FIELDS = tuple(dict.fromkeys([f.name for f in fields(KVTCStats)] + list(KVTCStats().as_dict())
                                  + list(FIELDS_AHEAD)))
KVTC_COUNTERS = tuple(dict.fromkeys(list(KVTCStats.COUNTERS) + [f for f in FIELDS_AHEAD if f not in _GAUGES_AHEAD]))
HISTOGRAMS = {"load_back": "sglang:load_back_duration_seconds", "eviction": "sglang:eviction_duration_seconds"}
TOKEN_COUNTERS = {"load_back_tokens": "sglang:load_back_tokens_total", "evicted_tokens": "sglang:evicted_tokens_total"}
POOL_GAUGES = {"kv_used_tokens": "sglang:kv_used_tokens", "kv_evictable_tokens": "sglang:kv_evictable_tokens",
               "kv_available_tokens": "sglang:kv_available_tokens",
               "hicache_host_used_tokens": "sglang:hicache_host_used_tokens",
               "num_running_reqs": "sglang:num_running_reqs", "num_queue_reqs": "sglang:num_queue_reqs"}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict, float]]]:
    """``{metric name: [(labels, value), ...]}`` from Prometheus text exposition (comments skipped)."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.setdefault(m.group(1), []).append((dict(_LABEL.findall(m.group(2) or "")), value))
    return out


def metric(samples: dict | None, name: str) -> float | None:
    """The value of ``name`` on TP rank 0 (the ``tp_rank="0"`` sample, else the first); None when absent."""
    if not samples or name not in samples:
        return None
    for labels, v in samples[name]:
        if labels.get("tp_rank", "0") == "0":
            return v
    return samples[name][0][1]


@dataclass
class Histogram:
    """One Prometheus histogram (TP rank 0): cumulative bucket counts by upper bound, count and sum (seconds)."""

    buckets: list[tuple[float, float]]
    count: float
    sum: float

    @classmethod
    def read(cls, samples: dict | None, name: str) -> "Histogram | None":
        count, total = metric(samples, name + "_count"), metric(samples, name + "_sum")
        if count is None or total is None:
            return None
        rows = [(float(lab["le"]), v) for lab, v in (samples or {}).get(name + "_bucket", [])
                if "le" in lab and lab.get("tp_rank", "0") == "0"]
        return cls(sorted(rows), count, total)

    def minus(self, before: "Histogram | None") -> "Histogram":
        if before is None:
            return self
        prior = dict(before.buckets)
        return Histogram([(le, c - prior.get(le, 0.0)) for le, c in self.buckets], self.count - before.count,
                         self.sum - before.sum)

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket holding the q-quantile (seconds); the last finite bound when
        it falls in the +Inf bucket; None with no observation."""
        if self.count <= 0 or not self.buckets:
            return None
        rank, lo, below = q * self.count, 0.0, 0.0
        for le, cum in self.buckets:
            if cum >= rank:
                if math.isinf(le):
                    return lo
                return lo + (le - lo) * ((rank - below) / (cum - below) if cum > below else 1.0)
            lo, below = (le if not math.isinf(le) else lo), cum
        return lo

    def summary(self) -> dict:
        ms = (lambda s: None if s is None else round(1000 * s, 3))
        return {"count": int(self.count), "mean_ms": ms(self.sum / self.count) if self.count else None,
                "p50_ms": ms(self.quantile(0.5)), "p99_ms": ms(self.quantile(0.99))}


@dataclass
class Snapshot:
    """What one ``/metrics`` scrape says (None = not exported)."""

    t: float
    available: bool
    kvtc: dict[str, float | None] = field(default_factory=dict)
    pool: dict[str, float | None] = field(default_factory=dict)
    histograms: dict[str, Histogram | None] = field(default_factory=dict)
    token_counters: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, t: float, text: str | None) -> "Snapshot":
        samples = parse_prometheus(text) if text is not None else None
        return cls(t=t, available=samples is not None,
                   kvtc={f: metric(samples, METRIC_PREFIX + f) for f in KVTC_FIELDS},
                   pool={k: metric(samples, n) for k, n in POOL_GAUGES.items()},
                   histograms={k: Histogram.read(samples, n) for k, n in HISTOGRAMS.items()},
                   token_counters={k: metric(samples, n) for k, n in TOKEN_COUNTERS.items()})

    @property
    def kvtc_exported(self) -> bool:
        return any(v is not None for v in self.kvtc.values())

    def gpu_cached_tokens(self) -> float | None:
        """Tokens whose KV the GPU holds: kvtc hot + compressed (blobs live in pool slots), else the pool's
        evictable + used slots."""
        hot, comp = self.kvtc.get("hot_tokens"), self.kvtc.get("compressed_tokens")
        if hot is not None and comp is not None:
            return hot + comp
        ev, used = self.pool.get("kv_evictable_tokens"), self.pool.get("kv_used_tokens")
        return None if ev is None and used is None else (ev or 0.0) + (used or 0.0)


def _delta(end: float | None, start: float | None) -> float | None:
    return None if end is None or start is None else end - start


def _div(num: float | None, den: float | None, scale: float = 1.0, digits: int = 4) -> float | None:
    return None if num is None or not den else round(scale * num / den, digits)


def kvtc_window(start: Snapshot, end: Snapshot) -> dict | None:
    """kvtc counters over the window (end - start), gauges at the end, and the derived per-op costs; None when the
    server exports no kvtc gauge at all. Every field the server does not export is None."""
    if not end.kvtc_exported:
        return None
    out: dict = {}
    for f in KVTC_FIELDS:
        v = _delta(end.kvtc.get(f), start.kvtc.get(f)) if f in KVTC_COUNTERS else end.kvtc.get(f)
        out[f] = None if v is None else (int(v) if float(v).is_integer() else round(v, 6))
    out["compress_ms_per_op"] = _div(out["compress_seconds"], out["compress_count"], 1000.0, 3)
    out["decompress_ms_per_op"] = _div(out["decompress_seconds"], out["decompress_count"], 1000.0, 3)
    out["compressed_dropped_fraction"] = _div(out["compressed_dropped_tokens"], out["compress_tokens"])
    return out


def sglang_window(start: Snapshot, end: Snapshot) -> dict:
    """SGLang's load-back and eviction histograms and token counters over the window (None when not exported)."""
    out: dict = {}
    for k in HISTOGRAMS:
        h = end.histograms.get(k)
        out[k] = None if h is None else h.minus(start.histograms.get(k)).summary()
    for k in TOKEN_COUNTERS:
        d = _delta(end.token_counters.get(k), start.token_counters.get(k))
        out[k] = None if d is None else int(d)
    return out
