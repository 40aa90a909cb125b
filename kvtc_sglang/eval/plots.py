"""Plots of benchmark rows (matplotlib is optional: without it, plotting is skipped with a message)."""

from __future__ import annotations

from pathlib import Path

from kvtc_sglang.eval.provenance import pyplot_or_none


def plot_accuracy(rows: list[dict], path: Path) -> bool:
    """Realized compression ratio (log x) vs perplexity increase, one series per method."""
    plt = pyplot_or_none()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if r["method"] != "uncompressed":
            by_method.setdefault(r["method"], []).append(r)
    for name, rs in by_method.items():
        rs = sorted(rs, key=lambda r: r["realized_ratio"])
        ax.plot([r["realized_ratio"] for r in rs], [r["delta_ppl_pct"] for r in rs], "o-" if len(rs) > 1 else "s", label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("realized compression ratio (compressed tokens)")
    ax.set_ylabel("perplexity increase (%)")
    ax.set_title("KV-cache compression: ratio vs accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
