"""Observability of the compressed KV tier: counters and gauges, a periodic log line, optional Prometheus gauges.

``KVTCStats`` holds two kinds of numbers: gauges describing the cache right now (tokens and bytes per state, filled
by ``KVTCRadixCache.stats()`` from a walk over the tree) and counters accumulated by the cache as it works
(compressions, restores, hits, integrity failures, demotions, drops).

sglang 0.5.17 has no hook for plugin gauges: its collectors (``observability/metrics_collector.py``) create
``prometheus_client`` metrics directly, with a class-attribute override for tests (``_gauge_cls``). The exporter
below follows the same pattern: ``prometheus_client.Gauge`` (``multiprocess_mode="mostrecent"``, as sglang's own
gauges) unless a gauge class is injected; without ``prometheus_client`` installed it is simply not created.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)

METRIC_PREFIX = "sglang:kvtc_"


@dataclass
class KVTCStats:
    """Numbers of one KVTC radix cache (one TP rank).

    Gauges (state now, from a walk over the tree: ``KVTCRadixCache.stats()``):
        hot_tokens, compressed_tokens, host_tokens: tokens per node state (hot = holding pool slots: HOT, ENCODING,
            HOT_BLOB, LOADING; compressed = only a blob in pool slots; host = only a blob in the host tier).
        hot_blob_tokens: hot tokens that also have a blob (compressed ahead, or restored).
        hot_bytes: KV-pool bytes of the hot tokens (all layers, K and V, pool dtype).
        blob_slots: pool slots held by blobs; blob_slot_bytes: their bytes; protected_blob_slots: those a kernel in
            flight uses.
        blob_bytes: exact payload bytes of the blobs no node of which holds slots (the compressed part proper);
            blob_raw_bytes: KV-pool bytes their tokens would take uncompressed (realized_ratio = their quotient).
        tail_waste_bytes: blob_slot_bytes - device payload bytes (the partly used last page of each blob, < 1 page
            per blob).
        num_blobs: live blobs; host_used_bytes, host_capacity_bytes: the host spill tier.
        store_cap_bytes: the optional cap on blob pool bytes (0 = none).
        effective_ratio: tokens of the blobs held in pool slots by COMPRESSED nodes only / the slots those blobs take
            (exact rows and tail waste included): the capacity multiplier of the compressed part.
        jit_compiles: kernel compiles the codec reports.
        policy_restored_fraction: restored / (restored + dropped unread) compressed tokens over the policy window.
    Counters (since start or ``reset_counters``):
        compress_count, compress_tokens: blobs made (ahead and at eviction) and their tokens;
            compress_ahead_count: blobs made ahead of eviction; compress_at_evict_count: made at eviction time.
        compress_seconds: (unused by the asynchronous path; kept for the log line).
        decompress_count, decompress_tokens, decompress_seconds: nodes restored by load-back, their tokens, host
            time in init_load_back.
        hit_hot_tokens, hit_compressed_tokens, hit_host_tokens, miss_tokens: prefix lookups made for a request
            about to be scheduled, split by the state of the matched tokens.
        evicted_tokens: net pool slots freed by evict.
        deleted_tokens: hot tokens evicted by plain deletion.
        integrity_failures: blobs that failed a check (token binding, CRC) on this rank (never served).
        integrity_dropped_tokens: tokens dropped because a load-back failed or a blob failed on some rank.
        demotions: blobs whose pool copy was dropped because a verified host copy exists; spills, promotions:
            host copies made and copied back.
        drops, dropped_tokens: compressed nodes deleted; compressed_dropped_tokens: tokens that were compressed and
            dropped without being restored since.
        redundant_blob_drops: blobs of hot nodes dropped to free their slots; windows_folded: blobs dropped because
            a child extended their exact recent window.
        revived_tokens: compressed tokens made hot again by an insert of freshly computed KV.
        failures_compress, failures_evict, failures_load, failures_spill, failures_ack: contained failures per stage
            (each: nodes dropped or plainly evicted, storage returned, one log line).
        host_syncs: host syncs counted on the tier's hot path (only with KVTC_SYNC_AUDIT=1).
    """

    hot_tokens: int = 0
    compressed_tokens: int = 0
    host_tokens: int = 0
    hot_blob_tokens: int = 0
    hot_bytes: int = 0
    blob_slots: int = 0
    blob_slot_bytes: int = 0
    protected_blob_slots: int = 0
    blob_bytes: int = 0
    tail_waste_bytes: int = 0
    blob_raw_bytes: int = 0
    num_blobs: int = 0
    host_used_bytes: int = 0
    host_capacity_bytes: int = 0
    store_cap_bytes: int = 0
    effective_ratio: float = 0.0
    jit_compiles: int = 0
    policy_restored_fraction: float = 1.0
    compress_count: int = 0
    compress_tokens: int = 0
    compress_ahead_count: int = 0
    compress_at_evict_count: int = 0
    compress_seconds: float = 0.0
    decompress_count: int = 0
    decompress_tokens: int = 0
    decompress_seconds: float = 0.0
    hit_hot_tokens: int = 0
    hit_compressed_tokens: int = 0
    hit_host_tokens: int = 0
    miss_tokens: int = 0
    evicted_tokens: int = 0
    deleted_tokens: int = 0
    integrity_failures: int = 0
    integrity_dropped_tokens: int = 0
    demotions: int = 0
    spills: int = 0
    promotions: int = 0
    drops: int = 0
    dropped_tokens: int = 0
    compressed_dropped_tokens: int = 0
    redundant_blob_drops: int = 0
    windows_folded: int = 0
    revived_tokens: int = 0
    failures_compress: int = 0
    failures_evict: int = 0
    failures_load: int = 0
    failures_spill: int = 0
    failures_ack: int = 0
    host_syncs: int = 0

    GAUGES = ("hot_tokens", "compressed_tokens", "host_tokens", "hot_blob_tokens", "hot_bytes", "blob_slots",
              "blob_slot_bytes", "protected_blob_slots", "blob_bytes", "tail_waste_bytes", "blob_raw_bytes",
              "num_blobs", "host_used_bytes", "host_capacity_bytes", "store_cap_bytes", "effective_ratio",
              "jit_compiles", "policy_restored_fraction")
    COUNTERS = ("compress_count", "compress_tokens", "compress_ahead_count", "compress_at_evict_count",
                "compress_seconds", "decompress_count", "decompress_tokens", "decompress_seconds", "hit_hot_tokens",
                "hit_compressed_tokens", "hit_host_tokens", "miss_tokens", "evicted_tokens", "deleted_tokens",
                "integrity_failures", "integrity_dropped_tokens", "demotions", "spills", "promotions", "drops",
                "dropped_tokens", "compressed_dropped_tokens", "redundant_blob_drops", "windows_folded",
                "revived_tokens", "failures_compress", "failures_evict", "failures_load", "failures_spill",
                "failures_ack", "host_syncs")

    @property
    def realized_ratio(self) -> float:
        """Raw bytes (pool dtype) of the tokens held in blobs / bytes of those blobs; 0.0 with no blob."""
        return self.blob_raw_bytes / self.blob_bytes if self.blob_bytes else 0.0

    @property
    def cached_tokens(self) -> int:
        return self.hot_tokens + self.compressed_tokens + self.host_tokens

    @property
    def compressed_dropped_frac(self) -> float:
        """Compressed tokens dropped unread / compressed tokens (0.0 before any compression)."""
        return self.compressed_dropped_tokens / self.compress_tokens if self.compress_tokens else 0.0

    @property
    def failures(self) -> int:
        return (self.failures_compress + self.failures_evict + self.failures_load + self.failures_spill
                + self.failures_ack)

    @property
    def hit_rate(self) -> float:
        """Matched tokens (any state) / looked-up tokens; 0.0 before any lookup."""
        hits = self.hit_hot_tokens + self.hit_compressed_tokens + self.hit_host_tokens
        total = hits + self.miss_tokens
        return hits / total if total else 0.0

    def copy(self) -> "KVTCStats":
        return KVTCStats(**asdict(self))

    def reset_counters(self) -> None:
        for name in self.COUNTERS:
            setattr(self, name, type(getattr(self, name))())

    def as_dict(self) -> dict[str, float]:
        """Every field plus realized_ratio, cached_tokens and hit_rate."""
        out: dict[str, float] = asdict(self)
        out["realized_ratio"] = self.realized_ratio
        out["cached_tokens"] = self.cached_tokens
        out["hit_rate"] = self.hit_rate
        out["compressed_dropped_frac"] = self.compressed_dropped_frac
        out["failures"] = self.failures
        return out

    def summary_line(self) -> str:
        """One log line: states, store fill, ratio, work done, hits and failures."""
        return (
            f"KVTC: tokens hot={self.hot_tokens} (with blob {self.hot_blob_tokens}) compressed={self.compressed_tokens} "
            f"host={self.host_tokens} | blobs {self.num_blobs} in {self.blob_slots} slots "
            f"({format_bytes(self.blob_slot_bytes)}, tail waste {format_bytes(self.tail_waste_bytes)}), "
            f"effective ratio {self.effective_ratio:.2f}x, host {format_bytes(self.host_used_bytes)}/"
            f"{format_bytes(self.host_capacity_bytes)} | "
            f"compress {self.compress_count} ({self.compress_tokens} tok, ahead {self.compress_ahead_count}), "
            f"decompress {self.decompress_count} ({self.decompress_tokens} tok, {self.decompress_seconds:.3f}s) | "
            f"hits hot={self.hit_hot_tokens} compressed={self.hit_compressed_tokens} host={self.hit_host_tokens} "
            f"miss={self.miss_tokens} ({self.hit_rate:.1%}) | "
            f"integrity failures {self.integrity_failures}, contained failures {self.failures}, drops {self.drops} "
            f"({self.compressed_dropped_tokens} compressed tok unread), deleted {self.deleted_tokens} tok, "
            f"jit compiles {self.jit_compiles}, host syncs {self.host_syncs}"
        )


class StatsLogger:
    """Logs ``KVTCStats.summary_line()`` (and exports gauges) at most once every ``interval_s`` seconds.

    Args:
        interval_s: minimum seconds between two reports (<= 0 reports on every call).
        exporter: optional ``PrometheusExporter`` updated with each report.
        clock: time source (seconds), injectable for tests.
    """

    def __init__(self, interval_s: float = 30.0, exporter: "PrometheusExporter | None" = None,
                 clock: Callable[[], float] = time.monotonic):
        self.interval_s = float(interval_s)
        self.exporter = exporter
        self.clock = clock
        self._last = clock()

    def due(self) -> bool:
        return self.clock() - self._last >= self.interval_s

    def report(self, stats: KVTCStats) -> None:
        """Log and export now."""
        self._last = self.clock()
        logger.info(stats.summary_line())
        if self.exporter is not None:
            self.exporter.update(stats)


class PrometheusExporter:
    """One gauge per ``KVTCStats.as_dict()`` entry, named ``sglang:kvtc_<field>``, with the cache's labels.

    Args:
        labels: label names and values (e.g. ``{"cache_type": "KVTCRadixCache", "tp_rank": "0"}``).
        gauge_cls: a class with the ``prometheus_client.Gauge`` constructor and ``.labels(**kw).set(v)``; default
            ``prometheus_client.Gauge``.
    """

    def __init__(self, labels: dict[str, str], gauge_cls: Any = None):
        if gauge_cls is None:
            from prometheus_client import Gauge as gauge_cls  # noqa: N813
        self.labels = dict(labels)
        self.gauges = {}
        for name in KVTCStats().as_dict():
            kwargs = {"multiprocess_mode": "mostrecent"}
            self.gauges[name] = gauge_cls(name=METRIC_PREFIX + name, documentation=_doc(name),
                                          labelnames=list(self.labels), **kwargs)

    def update(self, stats: KVTCStats) -> None:
        for name, value in stats.as_dict().items():
            self.gauges[name].labels(**self.labels).set(value)

    @classmethod
    def create(cls, labels: dict[str, str], gauge_cls: Any = None) -> "PrometheusExporter | None":
        """An exporter, or None (with a warning) when ``prometheus_client`` is not installed."""
        try:
            return cls(labels, gauge_cls)
        except ImportError:
            logger.warning("KVTC: metrics are enabled but prometheus_client is not installed; KVTC gauges are only "
                           "logged")
            return None


def format_bytes(n: float) -> str:
    """``n`` bytes with a binary unit: "512 B", "3.5 KiB", "1.2 GiB"."""
    if abs(n) < 1024:
        return f"{n:.0f} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def _doc(name: str) -> str:
    return f"KVTC compressed KV tier: {name.replace('_', ' ')}."

