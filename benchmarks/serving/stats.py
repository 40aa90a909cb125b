"""Statistics of measured requests: percentiles, bootstrap confidence intervals, goodput, per-run summaries.

* Percentiles interpolate linearly between order statistics (numpy's default).
* ``bootstrap_ci(groups, q)``: a 95% percentile-bootstrap interval of the q-th percentile. ``groups`` is one list
  of values per repeat; each resample draws repeats with replacement, then values within each drawn repeat
  (a two-level bootstrap: run-to-run and request-to-request variation both widen the interval). With one
  group it is the ordinary bootstrap over requests. Seeded: the same data give the same interval.
* ``mean_ci(values)``: mean and a 95% Student-t interval over repeats (throughput, goodput).
* Goodput: requests per second that met the SLO (TTFT <= 1 s and TPOT <= 50 ms by default).

Every percentile comes with its sample count ``n``; a p99 from fewer than 1,000 values is reported but flagged
(``ttft_p99_reliable``: False).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

P99_MIN_SAMPLES = 1000
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass(frozen=True)
class SLO:
    ttft_ms: float = 1000.0
    tpot_ms: float = 50.0


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation between order statistics; None if there are no values."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bootstrap_ci(groups: Sequence[Sequence[float]], q: float, *, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | None:
    """95% two-level percentile-bootstrap interval of the q-th percentile (see the module docstring)."""
    groups = [list(g) for g in groups if len(g)]
    if not groups or sum(len(g) for g in groups) < 2:
        return None
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        pooled: list[float] = []
        for g in (rng.choices(groups, k=len(groups)) if len(groups) > 1 else groups):
            pooled += rng.choices(g, k=len(g))
        stats.append(percentile(pooled, q))
    alpha = (1 - level) / 2
    return percentile(stats, 100 * alpha), percentile(stats, 100 * (1 - alpha))


def mean_ci(values: Sequence[float | None]) -> tuple[float | None, tuple[float, float] | None]:
    """Mean and 95% Student-t interval over repeats (None interval with fewer than two values)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = _T95.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs))
    return mean, (mean - half, mean + half)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000.0 * x, 3)


def _ms_pair(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [_ms(ci[0]), _ms(ci[1])]


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 5) if den else None


def latency_fields(prefix: str, groups: Sequence[Sequence[float]], seed: int) -> dict:
    """``<prefix>_p50_ms``, ``_p99_ms`` with their CIs and ``_n`` from per-repeat values in seconds."""
    pooled = [v for g in groups for v in g]
    return {f"{prefix}_n": len(pooled),
            f"{prefix}_p50_ms": _ms(percentile(pooled, 50)),
            f"{prefix}_p50_ci_ms": _ms_pair(bootstrap_ci(groups, 50, seed=seed)),
            f"{prefix}_p99_ms": _ms(percentile(pooled, 99)),
            f"{prefix}_p99_ci_ms": _ms_pair(bootstrap_ci(groups, 99, seed=seed + 1)),
            f"{prefix}_p99_reliable": len(pooled) >= P99_MIN_SAMPLES}


def meets_slo(r: dict, slo: SLO) -> bool:
    if not r["ok"] or r["ttft_s"] is None or 1000 * r["ttft_s"] > slo.ttft_ms:
        return False
    return r.get("tpot_s") is None or 1000 * r["tpot_s"] <= slo.tpot_ms


def summarize(records: Sequence[dict], *, slo: SLO = SLO(), seed: int = 0) -> dict:
    """Metrics of one measured window from its per-request records.

    Records need ``ok``, ``returning`` (a turn >= 2 of a conversation, or a request reusing an earlier one's
    prefix), ``turn``, ``ttft_s``, ``tpot_s``, ``latency_s``, ``prompt_tokens``, ``cached_tokens``,
    ``cached_device``, ``cached_host``, ``output_tokens``, ``t_send_s``, ``t_end_s``. Failed requests count only in
    ``errors``. Rates divide by the span from the first send to the last completion of the window's requests.
    Hit rates are cached / prompt tokens summed over requests; device + restored = total.
    """
    ok = [r for r in records if r["ok"]]
    ret = [r for r in ok if r["returning"]]
    span = (max(r["t_end_s"] for r in records) - min(r["t_send_s"] for r in records)) if records else 0.0
    d = max(span, 1e-9)
    prompt = sum(r["prompt_tokens"] for r in ok)
    out_tok = sum(r["output_tokens"] for r in ok)
    ttft_ret = [r["ttft_s"] for r in ret if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in ok if r.get("tpot_s") is not None]
    first = [r["ttft_s"] for r in ok if r.get("turn") == 1 and r["ttft_s"] is not None]
    return {
        "requests": len(records), "errors": len(records) - len(ok), "returning_requests": len(ret),
        "duration_s": round(span, 3),
        **latency_fields("ttft", [ttft_ret], seed), **latency_fields("tpot", [tpot], seed + 2),
        "ttft_first_p50_ms": _ms(percentile(first, 50)),
        "latency_p50_ms": _ms(percentile([r["latency_s"] for r in ok if r.get("latency_s") is not None], 50)),
        "req_per_s": round(len(ok) / d, 4) if records else None,
        "goodput_req_per_s": round(sum(1 for r in ok if meets_slo(r, slo)) / d, 4) if records else None,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        "out_tok_per_s": round(out_tok / d, 2) if records else None,
        "prompt_tokens": prompt, "output_tokens": out_tok,
        "hit_rate": _ratio(sum(r["cached_tokens"] for r in ok), prompt),
        "hit_rate_device": _ratio(sum(r["cached_device"] for r in ok), prompt),
        "hit_rate_restored": _ratio(sum(r["cached_host"] for r in ok), prompt),
        "hit_rate_returning": _ratio(sum(r["cached_tokens"] for r in ret), sum(r["prompt_tokens"] for r in ret)),
        "restored_requests": sum(1 for r in ok if r["cached_host"] > 0),
        "ttft_returning_cdf_ms": [_ms(percentile(ttft_ret, q)) for q in range(101)] if ttft_ret else [],
    }
