"""Result files: ``serving.json`` rows (one commit per file), per-request records, aggregation over repeats, and
``serving.md``.

* ``serving.json``: one row per (config, model, workload, working_set_x, rate_fraction, repeat); a rerun of the
  same key replaces the row. A file holds rows of one commit: writing rows of another commit raises
  ``MixedCommitError`` (start a new results folder instead of mixing code versions in one table).
* ``serving_requests/<config>__<workload>__x<x>__f<rate fraction>__r<repeat>.jsonl.gz``: every sent request.
* With more than one repeat, ``aggregate`` adds a row with ``repeat`` = "all" per point: percentiles over every
  repeat's returning turns with a two-level bootstrap CI (repeats, then requests), and a Student-t CI of the
  per-repeat means for rates and hit rates.
* ``serving_breakeven.json``: the break-even probe's rows; ``saturation.json``: the measured saturation rates.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Sequence

from .stats import latency_fields, mean_ci, percentile

ROW_KEY = ("config", "model", "workload", "working_set_x", "rate_fraction", "repeat")
BREAKEVEN_KEY = ("config", "model", "prefix_tokens")
CONFIG_ORDER = ("radix", "fp8", "fp4", "hicache2", "hicache8", "kvtc8", "kvtc16", "kvtc32", "unlimited")


class MixedCommitError(ValueError):
    """Rows of another commit are already in the results file."""


def load_rows(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); move it away or fix it") from None
    if not isinstance(rows, list):
        raise ValueError(f"{path} does not hold a list of rows; move it away or fix it")
    return rows


def write_rows(path: str | os.PathLike, rows: Sequence[dict], key: Sequence[str] = ROW_KEY) -> list[dict]:
    """Merge ``rows`` into the JSON list at ``path`` (same key: replaced) and return the merged list."""
    path = Path(path)
    old = load_rows(path)
    commits = {r.get("commit") for r in old} | {r.get("commit") for r in rows}
    if len(commits) > 1:
        raise MixedCommitError(f"{path} would mix commits {sorted(map(str, commits))}: one table per commit; write "
                               f"this run to another --out-dir or move {path.name} away")
    new_keys = {tuple(r.get(k) for k in key) for r in rows}
    merged = [r for r in old if tuple(r.get(k) for k in key) not in new_keys] + list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, path)
    return merged


def records_path(out_dir: str | os.PathLike, row: dict) -> Path:
    name = (f"{row['config']}__{row['workload']}__x{row['working_set_x']:g}__f{row['rate_fraction']:g}"
            f"__r{row['repeat']}.jsonl.gz").replace("/", "_").replace("@", "-")
    return Path(out_dir) / "serving_requests" / name


def write_records(out_dir: str | os.PathLike, row: dict, records: Sequence[dict]) -> Path:
    path = records_path(out_dir, row)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def read_records(out_dir: str | os.PathLike, row: dict) -> list[dict]:
    path = records_path(out_dir, row)
    if not path.exists():
        return []
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def config_rank(name: str) -> tuple:
    base, _, backend = name.partition("@")
    return (backend, CONFIG_ORDER.index(base) if base in CONFIG_ORDER else 99, name)


def sort_key(r: dict) -> tuple:
    return (str(r.get("model")), str(r.get("workload")), r.get("working_set_x") or 0, r.get("rate_fraction") or 0,
            config_rank(str(r.get("config"))), str(r.get("repeat")))


_MEANED = ("req_per_s", "goodput_req_per_s", "out_tok_per_s", "hit_rate", "hit_rate_device", "hit_rate_restored",
           "hit_rate_returning", "cached_tokens_per_gpu_gb", "in_flight_kv_peak_fraction", "errors")


def aggregate(rows: Sequence[dict], out_dir: str | os.PathLike) -> list[dict]:
    """One row with ``repeat`` "all" per point measured in more than one repeat (see the module docstring)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("repeat") != "all" and "ttft_p50_ms" in r:
            groups.setdefault(tuple(r.get(k) for k in ROW_KEY[:-1]), []).append(r)
    out = []
    for key, rs in groups.items():
        if len(rs) < 2:
            continue
        rs = sorted(rs, key=lambda r: r["repeat"])
        recs = [[x for x in read_records(out_dir, r) if x["measured"] and x["ok"]] for r in rs]
        ttft = [[x["ttft_s"] for x in g if x["returning"] and x["ttft_s"] is not None] for g in recs]
        tpot = [[x["tpot_s"] for x in g if x.get("tpot_s") is not None] for g in recs]
        agg = {k: rs[0].get(k) for k in (*ROW_KEY[:-1], "gpu", "commit", "capacity", "rate", "max_parallel",
                                         "budget_tokens", "kv_gpu_bytes", "capacity_note")}
        agg.update(repeat="all", repeats=len(rs), **latency_fields("ttft", ttft, seed=11),
                   **latency_fields("tpot", tpot, seed=13))
        pooled = sorted(v for g in ttft for v in g)
        agg["ttft_returning_cdf_ms"] = ([round(1000 * percentile(pooled, q), 3) for q in range(101)]
                                        if pooled else [])
        for k in _MEANED:
            mean, ci = mean_ci([r.get(k) for r in rs])
            agg[k] = None if mean is None else round(mean, 5)
            agg[k + "_ci"] = None if ci is None else [round(ci[0], 5), round(ci[1], 5)]
        kv = [r.get("kvtc") for r in rs if r.get("kvtc")]
        agg["kvtc"] = _mean_dicts(kv) if kv else None
        agg["realized_ratio"] = None if not kv else agg["kvtc"].get("realized_ratio")
        out.append(agg)
    return out


def _mean_dicts(ds: list[dict]) -> dict:
    out: dict[str, Any] = {}
    for k in ds[0]:
        vs = [d.get(k) for d in ds if isinstance(d.get(k), (int, float))]
        out[k] = round(sum(vs) / len(vs), 6) if vs else None
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) < 1 and value != 0:
            return f"{value:.3f}"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ci(r: dict, k: str) -> str:
    ci = r.get(k + "_ci_ms")
    return fmt(r.get(k + "_ms")) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def _p99(r: dict, prefix: str) -> str:
    text = _ci(r, f"{prefix}_p99")
    return text if r.get(f"{prefix}_p99_reliable") else f"({text}, n<1000)"


def _kv(r: dict, k: str) -> Any:
    return (r.get("kvtc") or {}).get(k)


COLUMNS: list[tuple[str, Any]] = [
    ("config", "config"), ("x", "working_set_x"), ("rate (x sat.)", "rate_fraction"), ("repeat", "repeat"),
    ("n ret.", "ttft_n"), ("TTFT p50 ms [95% CI]", lambda r: _ci(r, "ttft_p50")),
    ("TTFT p99 ms [95% CI]", lambda r: _p99(r, "ttft")), ("TPOT p50 ms", "tpot_p50_ms"),
    ("TPOT p99 ms", "tpot_p99_ms"), ("req/s", "req_per_s"), ("goodput req/s", "goodput_req_per_s"),
    ("hit rate", "hit_rate"), ("device", "hit_rate_device"), ("restored", "hit_rate_restored"),
    ("cached tok/GPU GB", "cached_tokens_per_gpu_gb"), ("in-flight KV peak", "in_flight_kv_peak_fraction"),
    ("compress ms/op", lambda r: _kv(r, "compress_ms_per_op")),
    ("restore ms/op", lambda r: _kv(r, "decompress_ms_per_op")),
    ("dropped unread", lambda r: _kv(r, "compressed_dropped_fraction")),
    ("syncs", lambda r: _kv(r, "host_syncs")), ("compiles", lambda r: _kv(r, "jit_compiles")),
    ("errors", "errors"),
]


def markdown_table(rows: Sequence[dict], columns=COLUMNS) -> str:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [fmt(k(r) if callable(k) else r.get(k)) for _, k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def capacity_lines(rows: Sequence[dict]) -> list[str]:
    seen: dict[str, str] = {}
    for r in sorted(rows, key=lambda r: config_rank(str(r.get("config")))):
        if r.get("capacity_note") and r["config"] not in seen:
            note = r["capacity_note"]
            if r.get("capacity_tokens_measured"):
                note += f"; at the realized ratio {fmt(r.get('realized_ratio'), 2)}: " \
                        f"{r['capacity_tokens_measured']:,} tokens"
            seen[r["config"]] = note
    return [f"- {n}" for n in seen.values()]


def write_markdown(rows: Sequence[dict], breakeven: Sequence[dict], path: str | os.PathLike) -> None:
    rows = sorted(rows, key=sort_key)
    first = rows[0] if rows else {}
    text = [f"# Serving suite: {first.get('model', '-')} on {first.get('gpu', '-')}, commit {first.get('commit', '-')}",
            "", f"Profile {first.get('profile', '-')}; bf16 KV budget {fmt(first.get('budget_tokens'))} token slots "
            f"({fmt((first.get('kv_gpu_bytes') or 0) / 2**30, 2)} GiB) for every pressured config; page size "
            f"{first.get('page_size', '-')}, attention backend {first.get('attention_backend', '-')}, CUDA graphs "
            f"{'off' if first.get('cuda_graphs') is False else 'on'}. x = working set / budget; rates are fractions "
            f"of radix's saturation rate; TTFT is over returning turns (n ret.), TPOT over all measured requests; "
            f"goodput counts requests with TTFT <= 1 s and TPOT <= 50 ms. A p99 from fewer than 1,000 samples is in "
            f"parentheses. kvtc counters cover the measured window ('-': not exported by this server).", "",
            "Capacity model (distinct tokens each cache can hold at equal GPU bytes):", "", *capacity_lines(rows), ""]
    for workload in sorted({r["workload"] for r in rows}):
        ws = [r for r in rows if r["workload"] == workload]
        multi = any(r.get("repeat") == "all" for r in ws)
        shown = [r for r in ws if r.get("repeat") == "all"] if multi else ws
        text += [f"## {workload}" + (" (aggregated over repeats)" if multi else ""), "", markdown_table(shown), ""]
    if breakeven:
        text += ["## Break-even probe (serial requests, no other load)", "",
                 "| config | prefix tokens | cold prefill TTFT ms | again after eviction TTFT ms | restored | "
                 "device |", "|---|---|---|---|---|---|"]
        for b in sorted(breakeven, key=lambda b: (config_rank(str(b["config"])), b["prefix_tokens"])):
            text.append(f"| {b['config']} | {fmt(b['prefix_tokens'])} | {fmt(b['cold_ttft_ms'])} | "
                        f"{fmt(b['again_ttft_ms'])} | {fmt(b['restored_tokens'])} | {fmt(b['device_tokens'])} |")
        text.append("")
    Path(path).write_text("\n".join(text) + "\n")
