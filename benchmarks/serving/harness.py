"""Measurements on one running server: warm-up, one measured point (a trace in a window, with ``/metrics`` read
at the window's start and end), the saturation probe and the break-even probe.

A point: flush the prefix cache; drive the trace; scrape ``/metrics`` when the warm-up ends (window start) and every
``poll_s`` seconds; after the last request finished, pause longer than the kvtc stats interval and scrape again
(window end). Counters (kvtc, SGLang histograms) are end minus start; they cover the measured window plus the
drain of its last requests. Gauges are peaks over the scrapes (cached tokens, in-flight KV) or end values.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass, field
from typing import Callable

from .client import ServerClient
from .configs import Capacity
from .driver import DriveResult, Window, drive
from .metrics import Snapshot, kvtc_window, sglang_window
from .model import ModelInfo, pseudo_tokens
from .stats import SLO, summarize
from .workloads import Trace

GB = 1e9  # "per GB" is per 10^9 bytes


@dataclass
class ServerContext:
    """What a measurement needs to know about the server (after warm-up).

    pool_tokens: the server's ``max_total_num_tokens``; kv_gpu_bytes: its KV pool bytes (equal for every pressured
    config); budget_tokens: the bf16 budget that working-set multiples refer to; base_row: fields of every row.
    """

    label: str
    info: dict
    model: ModelInfo
    budget_tokens: int
    pool_tokens: int | None
    kv_gpu_bytes: int | None
    max_context: int | None
    capacity: Capacity | None = None
    base_row: dict = field(default_factory=dict)


async def warm_up(client: ServerClient, *, vocab_size: int, lengths: tuple[int, ...] = (128, 1024, 4096),
                  batch: int = 4, timeout_s: float = 900.0, log: Callable[[str], None] = print) -> dict:
    """Unmeasured requests that compile the server's kernels (minutes on a fresh box): one prompt of each length, a
    repeat with a longer prompt (prefix-hit path), a concurrent batch (batched prefill and decode); then a flush.
    Raises RuntimeError when the first request fails (the server cannot serve)."""
    t0 = time.perf_counter()
    errors = 0
    for i, n in enumerate(lengths):
        r = await client.generate(pseudo_tokens(n, f"warmup:{n}", vocab_size), 8, timeout_s=timeout_s)
        if not r.ok and i == 0:
            raise RuntimeError(f"warm-up request failed: {r.error}")
        errors += not r.ok
    again = await client.generate(pseudo_tokens(lengths[-1], f"warmup:{lengths[-1]}", vocab_size)
                                  + pseudo_tokens(64, "warmup:ext", vocab_size), 8, timeout_s=timeout_s)
    res = await asyncio.gather(*(client.generate(pseudo_tokens(lengths[min(1, len(lengths) - 1)], f"warmup:b{i}",
                                                               vocab_size), 32, timeout_s=timeout_s)
                                 for i in range(batch)))
    errors += (not again.ok) + sum(not r.ok for r in res)
    flushed = await client.flush_cache()
    seconds = round(time.perf_counter() - t0, 2)
    log(f"  warm-up: {len(lengths) + 1 + batch} requests in {seconds:.0f} s (kernel compilation included), "
        f"errors {errors}, prefix hit of the repeat {again.cached_tokens}")
    return {"requests": len(lengths) + 1 + batch, "errors": errors, "seconds": seconds, "flushed": flushed}


class Scraper:
    """``/metrics`` snapshots: explicit ones and a background poll every ``poll_s`` seconds."""

    def __init__(self, client: ServerClient, poll_s: float):
        self.client, self.poll_s = client, poll_s
        self.polled: list[Snapshot] = []
        self._task: asyncio.Task | None = None

    async def snap(self) -> Snapshot:
        return Snapshot.parse(time.perf_counter(), await self.client.metrics_text())

    async def _loop(self) -> None:
        while True:
            s = await self.snap()
            self.polled.append(s)
            if not s.available:
                return
            await asyncio.sleep(self.poll_s)

    def start(self) -> None:
        if self.poll_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


def _peak(values) -> float | None:
    vs = [v for v in values if v is not None]
    return max(vs) if vs else None


async def measure_point(client: ServerClient, ctx: ServerContext, trace: Trace, *, max_parallel: int,
                        window: Window, pace: bool = True, poll_s: float = 5.0, stats_pause_s: float = 1.5,
                        slo: SLO = SLO(), timeout_s: float = 600.0, seed: int = 0,
                        log: Callable[[str], None] = print) -> tuple[dict, DriveResult]:
    """One measured point (see the module docstring): (row fields, the drive's records)."""
    if not await client.flush_cache():
        log("  warning: /flush_cache failed; the point starts with the previous point's prefixes cached")
    await asyncio.sleep(stats_pause_s)
    scraper = Scraper(client, poll_s)
    marks: dict[str, Snapshot] = {}

    async def mark_window_start() -> None:
        await asyncio.sleep(window.warmup_s)
        marks["start"] = await scraper.snap()

    marker = asyncio.get_running_loop().create_task(mark_window_start())
    scraper.start()
    try:
        result = await drive(client, trace, max_parallel=max_parallel, window=window, pace=pace,
                             timeout_s=timeout_s, max_context=ctx.max_context)
    finally:
        await scraper.stop()
        if not marker.done():
            marker.cancel()
    await asyncio.sleep(stats_pause_s)
    end = await scraper.snap()
    start = marks.get("start") or end
    snaps = [*scraper.polled, end]
    fields = {**summarize(result.measured, slo=slo, seed=seed), **window_fields(ctx, start, end, snaps),
              "sent_requests": len(result.records), "unsent_after_window": result.unsent,
              "skipped_requests": result.skipped,
              "client_queue_p50_s": _median([r["queue_s"] for r in result.measured if r["queue_s"] is not None])}
    return fields, result


def window_fields(ctx: ServerContext, start: Snapshot, end: Snapshot, snaps: list[Snapshot]) -> dict:
    """Server-side fields of a window: kvtc counters and SGLang histograms (end - start), peaks of cached tokens
    and in-flight KV over the scrapes, the realized ratio and the capacity at that ratio."""
    cached_peak = _peak(s.gpu_cached_tokens() for s in snaps)
    used_peak = _peak(s.pool.get("kv_used_tokens") for s in snaps)
    kvtc = kvtc_window(start, end)
    rho = None if kvtc is None else kvtc.get("realized_ratio") or None
    capacity = ctx.capacity.with_ratio(rho) if ctx.capacity is not None else None
    return {
        "kvtc": kvtc, "sglang": sglang_window(start, end), "metrics_exported": end.available,
        "gpu_cached_tokens_peak": None if cached_peak is None else int(cached_peak),
        "cached_tokens_per_gpu_gb": (round(cached_peak / (ctx.kv_gpu_bytes / GB), 1)
                                     if cached_peak is not None and ctx.kv_gpu_bytes else None),
        "in_flight_kv_peak_fraction": (round(used_peak / ctx.pool_tokens, 4)
                                       if used_peak is not None and ctx.pool_tokens else None),
        "hicache_host_tokens_peak": _peak(s.pool.get("hicache_host_used_tokens") for s in snaps),
        "realized_ratio": rho,
        "capacity_tokens_measured": None if capacity is None or rho is None else capacity.capacity_tokens,
        "capacity_knee_x": None if capacity is None else capacity.knee_x,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return None if not xs else round(xs[len(xs) // 2], 4)


async def breakeven_probe(client: ServerClient, ctx: ServerContext, lengths: tuple[int, ...], *,
                          fill_factor: float = 1.3, timeout_s: float = 600.0,
                          log: Callable[[str], None] = print) -> list[dict]:
    """Serial requests, no other load: for each prefix length L, the TTFT of a cold prompt of L tokens (a full
    prefill), then -- after prompts of ``fill_factor`` x the pool pushed it out of the pool (kvtc compresses it,
    HiCache has it on the host, radix drops it) -- the TTFT of the same prompt + 16 new tokens (a restore, or a
    recompute). One row per (config, L): cold_ttft_ms, again_ttft_ms, restored_tokens, device_tokens."""
    vocab = ctx.model.vocab_size
    lengths = tuple(L for L in lengths if ctx.max_context is None or L + 64 < ctx.max_context)
    if not lengths or not ctx.pool_tokens:
        return []
    await client.flush_cache()
    cold = {}
    for L in lengths:
        r = await client.generate(pseudo_tokens(L, f"be:{L}", vocab), 4, timeout_s=timeout_s)
        cold[L] = r
    chunk = max(lengths)
    n_fill = max(2, int(fill_factor * ctx.pool_tokens / chunk) + 1)
    for i in range(0, n_fill, 4):
        await asyncio.gather(*(client.generate(pseudo_tokens(chunk, f"be:fill:{j}", vocab), 1, timeout_s=timeout_s)
                               for j in range(i, min(n_fill, i + 4))))
    rows = []
    for L in lengths:
        again = await client.generate(pseudo_tokens(L, f"be:{L}", vocab) + pseudo_tokens(16, f"be:q:{L}", vocab), 4,
                                      timeout_s=timeout_s)
        c = cold[L]
        rows.append({**ctx.base_row, "prefix_tokens": L,
                     "cold_ttft_ms": None if c.ttft_s is None else round(1000 * c.ttft_s, 3),
                     "again_ttft_ms": None if again.ttft_s is None else round(1000 * again.ttft_s, 3),
                     "restored_tokens": again.cached_host, "device_tokens": again.cached_device,
                     "errors": int(not c.ok) + int(not again.ok)})
    await client.flush_cache()
    log("  break-even probe: " + ", ".join(f"{r['prefix_tokens']}: cold {r['cold_ttft_ms']} ms / again "
                                           f"{r['again_ttft_ms']} ms (restored {r['restored_tokens']})" for r in rows))
    return rows
