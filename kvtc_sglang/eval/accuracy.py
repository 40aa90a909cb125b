"""Accuracy of compressed KV caches on a real model, the way serving would use them.

Protocol (per window of `prefix + score` tokens of evaluation text):
  1. prefill the prefix and take its KV cache (rounded to bf16, the pool dtype of a bf16 server);
  2. compress it the way the tiered cache does: positions < sinks and the last `window` tokens of the
     prefix stay exact, the tokens in between go through the method under test;
  3. continue the sequence from the decoded cache and score the next `score` tokens: perplexity and
     greedy (top-1) agreement with the continuation from the uncompressed cache.

Ratios: `realized_ratio` counts only the compressed tokens (their 16-bit bytes over the bytes the
method stores for them, entropy framing included; the PCA matrices excluded), as the KVTC paper
does; `effective_ratio` is the whole prefix cache: its 16-bit bytes over what is stored for it, exact
tokens included.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from kvtc_sglang.codec.artifact import CalibrationArtifact
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.defaults import DEFAULT_EXACT
from kvtc_sglang.eval.baselines import BASELINES, Baseline
from kvtc_sglang.models.kv_capture import cache_from_kv, capture_kv, forward_with_cache


@dataclass
class EvalSettings:
    windows: int = 32
    prefix: int = 768
    score: int = 256
    sinks: int = DEFAULT_EXACT.sink_tokens
    window: int = DEFAULT_EXACT.window_tokens
    entropy: str = "deflate"
    ratios: Sequence[int] | None = None  # default: every plan in the artifact
    baselines: Sequence[Baseline] = BASELINES
    progress: bool = True


@dataclass
class _Tally:
    nll: float = 0.0
    agree: float = 0.0
    windows: int = 0
    stored_coded: int = 0  # bytes stored for the compressed tokens
    stored_total: int = 0  # bytes stored for the whole prefix
    extra: dict = field(default_factory=dict)


def eval_windows(tokenizer, text: str, n_windows: int, length: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of `length` tokens from the start of `text`."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0].to(torch.int64)
    n = min(n_windows, ids.numel() // length)
    if n == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {length}")
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def _score(model, k, v, cont, last_logits):
    cache = cache_from_kv(k.float(), v.float(), model.config)
    logits = forward_with_cache(model, cache, cont[:-1])
    logits = torch.cat([last_logits[None], logits])
    nll = torch.nn.functional.cross_entropy(logits, cont.to(logits.device), reduction="sum").item()
    return nll, logits.argmax(-1)


def evaluate(model, windows: list[torch.Tensor], artifact: CalibrationArtifact | None, settings: EvalSettings) -> list[dict]:
    """Run the protocol on every window for KVTC (each plan of `artifact`) and the baselines.

    Returns rows: method, target_ratio, realized_ratio, effective_ratio, ppl, baseline_ppl,
    delta_ppl_pct, top1_agreement, windows, tokens_scored, seconds.
    """
    s = settings
    lo, hi = s.sinks, s.prefix - s.window  # the compressed token range of each prefix
    if not 0 <= lo < hi <= s.prefix:
        raise ValueError(f"prefix {s.prefix} leaves no tokens between {s.sinks} sinks and a {s.window}-token window")
    n_coded = hi - lo
    ratios = list(s.ratios) if s.ratios is not None else (sorted(artifact.plans) if artifact is not None else [])
    codecs = {r: KVTCCodec(artifact, r, entropy=s.entropy) for r in ratios}
    methods = [("kvtc", r) for r in ratios] + [(b.name, b) for b in s.baselines]
    tallies = {m: _Tally() for m in [("uncompressed", None)] + methods}
    t0 = time.time()
    for w in tqdm(windows, desc="accuracy windows", disable=not s.progress, unit="win"):
        prefix_ids, cont = w[: s.prefix], w[s.prefix : s.prefix + s.score]
        cap = capture_kv(model, prefix_ids)
        k, v = cap.k.to(torch.bfloat16), cap.v.to(torch.bfloat16)
        p_bytes16 = k[0].numel() * 2 * 2  # K+V of one token at 16 bits
        base_nll, base_top = _score(model, k, v, cont, cap.last_logits)
        t = tallies[("uncompressed", None)]
        t.nll += base_nll
        t.agree += 1.0
        t.windows += 1
        for key in methods:
            name, arg = key
            if name == "kvtc":
                codec = codecs[arg]
                blob = codec.encode(k, v, 0, lo, s.prefix - hi)
                dec = codec.decode(blob)
                kd, vd = dec.k, dec.v
                coded_blob = codec.encode(k[lo:hi], v[lo:hi], lo, 0, 0)
                stored_coded, stored_total = coded_blob.numel(), blob.numel()
            else:
                kq, vq = arg.fn(k[lo:hi], v[lo:hi])
                kd, vd = k.clone(), v.clone()
                kd[lo:hi], vd[lo:hi] = kq, vq
                stored_coded = n_coded * p_bytes16 * arg.bits_per_element / 16.0
                stored_total = stored_coded + (s.prefix - n_coded) * p_bytes16
            nll, top = _score(model, kd, vd, cont, cap.last_logits)
            t = tallies[key]
            t.nll += nll
            t.agree += (top == base_top).float().mean().item()
            t.windows += 1
            t.stored_coded += stored_coded
            t.stored_total += stored_total
    seconds = time.time() - t0
    n_tok = s.score * len(windows)
    base_ppl = math.exp(tallies[("uncompressed", None)].nll / n_tok)
    raw_coded = n_coded * p_bytes16 * len(windows)
    raw_total = s.prefix * p_bytes16 * len(windows)
    rows = [dict(method="uncompressed", target_ratio=1.0, realized_ratio=1.0, effective_ratio=1.0, ppl=base_ppl,
                 baseline_ppl=base_ppl, delta_ppl_pct=0.0, top1_agreement=1.0)]
    for key in methods:
        name, arg = key
        t = tallies[key]
        ppl = math.exp(t.nll / n_tok)
        rows.append(dict(
            method=name,
            target_ratio=float(arg) if name == "kvtc" else arg.ratio,
            realized_ratio=raw_coded / t.stored_coded,
            effective_ratio=raw_total / t.stored_total,
            ppl=ppl,
            baseline_ppl=base_ppl,
            delta_ppl_pct=100.0 * (ppl / base_ppl - 1.0),
            top1_agreement=t.agree / t.windows,
        ))
    for r in rows:
        r.update(windows=len(windows), tokens_scored=n_tok, prefix=s.prefix, sinks=s.sinks, window=s.window,
                 seconds=round(seconds, 1))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of evaluate() rows."""
    head = "| method | target | realized ratio | effective ratio | ppl | Δppl | top-1 agreement |\n|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['method']} | {r['target_ratio']:.0f}x | {r['realized_ratio']:.2f}x | {r['effective_ratio']:.2f}x | "
        f"{r['ppl']:.3f} | {r['delta_ppl_pct']:+.2f}% | {r['top1_agreement']:.3f} |\n"
        for r in rows
    )
    return head + body
