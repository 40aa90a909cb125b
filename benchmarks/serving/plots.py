"""The suite's plots (matplotlib optional: without it they are skipped with a message).

1. ``serving_hit_rate_vs_x.png``: hit rate vs working-set multiple, one line per config, a dotted vertical line at
   each config's capacity knee (capacity model; kvtc at its realized ratio), and the CPU replay's prediction
   dashed when ``cache_replay.json`` lies beside ``serving.json`` (rows with ``config``, ``workload``,
   ``working_set_x``, ``hit_rate``, written by ``benchmarks/cache_replay.py`` from the same traces).
2. ``serving_ttft_vs_x.png``: returning-turn TTFT p50 and p99 vs x (log y, 95% CI bars).
3. ``serving_goodput_vs_rate.png``: goodput (TTFT <= 1 s and TPOT <= 50 ms) vs offered rate, one panel per x.
4. ``serving_ttft_cdf.png``: CDF of returning-turn TTFT at the decisive x (the profile's, or the nearest measured).
5. ``serving_breakeven.png``: the break-even probe: TTFT of a prefix of L tokens prefilled cold vs served again after
   eviction (restored by kvtc / HiCache, recomputed by radix), by L.
One figure per workload for 1-4 (``..._<workload>.png`` when there is more than one workload).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from kvtc_sglang.eval.provenance import pyplot_or_none

from .report import config_rank

PLOTS = ("hit_rate_vs_x", "ttft_vs_x", "goodput_vs_rate", "ttft_cdf", "breakeven")


def _shown(rows: Sequence[dict]) -> list[dict]:
    """Aggregated rows where there are any, else the single repeat's rows."""
    agg = [r for r in rows if r.get("repeat") == "all"]
    return agg or [r for r in rows if r.get("repeat") in (0, None)]


def _configs(rows: Sequence[dict]) -> list[str]:
    return sorted({r["config"] for r in rows}, key=config_rank)


def _main_fraction(rows: Sequence[dict]) -> float | None:
    fr = [r["rate_fraction"] for r in rows if r.get("rate_fraction") is not None]
    return max(set(fr), key=fr.count) if fr else None


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def hit_rate_vs_x(plt, rows, path: Path, title: str, replay: Sequence[dict] = ()) -> Path:
    frac = _main_fraction(rows)
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    for i, c in enumerate(_configs(rows)):
        rs = sorted((r for r in rows if r["config"] == c and r.get("rate_fraction") == frac),
                    key=lambda r: r["working_set_x"])
        color = f"C{i}"
        ax.plot([r["working_set_x"] for r in rs], [r.get("hit_rate") for r in rs], "o-", color=color, label=c)
        knee = next((r.get("capacity_knee_x") for r in rs if r.get("capacity_knee_x")), None)
        if knee:
            ax.axvline(knee, color=color, ls=":", lw=1)
        pred = sorted((p for p in replay if p.get("config") == c), key=lambda p: p["working_set_x"])
        if pred:
            ax.plot([p["working_set_x"] for p in pred], [p["hit_rate"] for p in pred], "--", color=color,
                    label=f"{c} (replay)")
    ax.set_xlabel("working set / bf16 KV budget (x)")
    ax.set_ylabel("prefix hit rate (cached / prompt tokens)")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title}; dotted: capacity knee" + ("; dashed: CPU replay" if replay else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def ttft_vs_x(plt, rows, path: Path, title: str) -> Path:
    frac = _main_fraction(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, q in zip(axes, ("p50", "p99")):
        for i, c in enumerate(_configs(rows)):
            rs = sorted((r for r in rows if r["config"] == c and r.get("rate_fraction") == frac
                         and r.get(f"ttft_{q}_ms") is not None), key=lambda r: r["working_set_x"])
            if not rs:
                continue
            ys = [r[f"ttft_{q}_ms"] for r in rs]
            cis = [r.get(f"ttft_{q}_ci_ms") or [y, y] for r, y in zip(rs, ys)]
            err = [[max(0.0, y - lo) for y, (lo, _) in zip(ys, cis)], [max(0.0, hi - y) for y, (_, hi) in zip(ys, cis)]]
            ax.errorbar([r["working_set_x"] for r in rs], ys, yerr=err, fmt="o-", color=f"C{i}", capsize=3, label=c)
        ax.set_yscale("log")
        ax.set_xlabel("working set / bf16 KV budget (x)")
        ax.set_ylabel(f"returning-turn TTFT {q} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}, rate {frac} x saturation; bars: 95% CI")
    return _save(fig, plt, path)


def goodput_vs_rate(plt, rows, path: Path, title: str) -> Path:
    xs = sorted({r["working_set_x"] for r in rows
                 if len({s["rate_fraction"] for s in rows if s["working_set_x"] == r["working_set_x"]}) > 1})
    xs = xs or sorted({r["working_set_x"] for r in rows})[:1]
    fig, axes = plt.subplots(1, len(xs), figsize=(5.2 * len(xs), 4.0), squeeze=False)
    for ax, x in zip(axes[0], xs):
        for i, c in enumerate(_configs(rows)):
            rs = sorted((r for r in rows if r["config"] == c and r["working_set_x"] == x and r.get("rate")),
                        key=lambda r: r["rate"])
            ax.plot([r["rate"] for r in rs], [r.get("goodput_req_per_s") for r in rs], "o-", color=f"C{i}", label=c)
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel("goodput (req/s meeting the SLO)")
        ax.set_title(f"x = {x:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{title}; SLO: TTFT <= 1 s and TPOT <= 50 ms")
    return _save(fig, plt, path)


def ttft_cdf(plt, rows, path: Path, title: str, decisive_x: float) -> Path:
    frac = _main_fraction(rows)
    xs = sorted({r["working_set_x"] for r in rows})
    x = min(xs, key=lambda v: abs(v - decisive_x))
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    for i, c in enumerate(_configs(rows)):
        r = next((r for r in rows if r["config"] == c and r["working_set_x"] == x and r.get("rate_fraction") == frac
                  and r.get("ttft_returning_cdf_ms")), None)
        if r:
            ax.plot([max(v, 1e-3) for v in r["ttft_returning_cdf_ms"]], [q / 100 for q in range(101)], color=f"C{i}",
                    label=f"{c} (n={r.get('ttft_n')})")
    ax.set_xscale("log")
    ax.set_xlabel("returning-turn TTFT (ms)")
    ax.set_ylabel("fraction of returning turns")
    ax.set_title(f"{title}, x = {x:g}, rate {frac} x saturation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def breakeven(plt, rows: Sequence[dict], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    by_length = (lambda r: r["prefix_tokens"])
    cold = sorted((r for r in rows if r["config"] == "radix" and r.get("cold_ttft_ms")), key=by_length)
    if not cold:
        cold = sorted((r for r in rows if r.get("cold_ttft_ms")), key=by_length)
    ax.plot([r["prefix_tokens"] for r in cold], [r["cold_ttft_ms"] for r in cold], "k--", lw=2,
            label="cold prefill (recompute)")
    for i, c in enumerate(sorted({r["config"] for r in rows}, key=config_rank)):
        rs = sorted((r for r in rows if r["config"] == c and r.get("again_ttft_ms")), key=lambda r: r["prefix_tokens"])
        ax.plot([r["prefix_tokens"] for r in rs], [r["again_ttft_ms"] for r in rs], "o-", color=f"C{i}",
                label=f"{c}: again after eviction")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prefix length (tokens)")
    ax.set_ylabel("TTFT (ms), serial requests")
    ax.set_title("Break-even prefix length: restore vs recompute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def write_plots(rows: Sequence[dict], breakeven_rows: Sequence[dict], out_dir: str | Path, *,
                decisive_x: float) -> list[Path]:
    """Every plot the data allows; returns the files written."""
    out = Path(out_dir)
    plt = pyplot_or_none()
    if plt is None:
        return []
    replay_path = out / "cache_replay.json"
    replay = json.loads(replay_path.read_text()) if replay_path.is_file() else []
    rows = _shown([r for r in rows if r.get("working_set_x") is not None])
    workloads = sorted({r["workload"] for r in rows})
    written = []
    for w in workloads:
        rs = [r for r in rows if r["workload"] == w]
        suffix = f"_{w}" if len(workloads) > 1 else ""
        title = f"{rs[0].get('model')}, {w}"
        written += [hit_rate_vs_x(plt, rs, out / f"serving_hit_rate_vs_x{suffix}.png", title,
                                  [p for p in replay if p.get("workload") == w]),
                    ttft_vs_x(plt, rs, out / f"serving_ttft_vs_x{suffix}.png", title),
                    goodput_vs_rate(plt, rs, out / f"serving_goodput_vs_rate{suffix}.png", title),
                    ttft_cdf(plt, rs, out / f"serving_ttft_cdf{suffix}.png", title, decisive_x)]
    if breakeven_rows:
        written.append(breakeven(plt, breakeven_rows, out / "serving_breakeven.png"))
    return written
