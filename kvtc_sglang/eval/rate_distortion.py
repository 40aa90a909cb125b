"""Rate-distortion of KV-cache methods on evaluation windows, with bootstrap confidence intervals.

Protocol (per window of `prefix + score` tokens, see ``eval_texts.text_windows``):
  1. prefill the prefix and take its KV cache, rounded to bf16 (the pool dtype of a bf16 server);
  2. positions < `sinks` and the last `window` tokens of the prefix stay exact, the tokens in between go
     through the method under test;
  3. continue from the decoded cache and score the next `score` tokens where the text's mask says so (all
     tokens of prose and code, assistant tokens of chat): summed NLL and greedy (top-1) agreement with the
     continuation from the uncompressed cache.

Every method is scored on the same windows, so Δppl is paired: the 95% interval comes from resampling
windows with replacement (`bootstrap` times) and recomputing exp(ΣNLL_method/N) / exp(ΣNLL_base/N) − 1 on
each resample (percentile interval).

Ratios: `realized_ratio` = 16-bit bytes of the compressed tokens / bytes stored for them (entropy framing
included, PCA matrices excluded), as the KVTC paper counts; `effective_ratio` = 16-bit bytes of the whole
prefix / bytes stored for it, exact rows included.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from kvtc_sglang.codec.artifact import CalibrationArtifact
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.eval.baselines import Baseline
from kvtc_sglang.eval.eval_texts import DEFAULT_WINDOW, describe, load_text, text_windows
from kvtc_sglang.models.kv_capture import capture_kv

# A method maps (k, v [n, L, H, D] bf16 prefix KV, lo, hi) to (k̂, v̂ [n, L, H, D], stored bytes of the
# tokens [lo, hi), stored bytes of the whole prefix). Tokens outside [lo, hi) must come back exact.
MethodFn = Callable[[torch.Tensor, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor, float, float]]


@dataclass(frozen=True)
class Method:
    """One row of the table: `name` (kvtc, fp8_e4m3, ...), `target_ratio`, `variant` (the calibration or plan
    variant a kvtc row uses; "" for baselines) and its function."""

    name: str
    target_ratio: float
    fn: MethodFn
    variant: str = ""


def kvtc_method(artifact: CalibrationArtifact, ratio: int, variant: str = "", entropy: str = "deflate") -> Method:
    """KVTC at one plan: the compressed range [lo, hi) is one blob (at its absolute positions) and decodes back
    into the prefix; the prefix's other rows stay exact and are counted at 16 bits (the tiered cache stores them
    in the node's blob, where DEFLATE may shrink them a little)."""
    codec = KVTCCodec(artifact, ratio, entropy=entropy)

    def fn(k, v, lo, hi):
        blob = codec.encode(k[lo:hi], v[lo:hi], lo, 0, 0)
        dec = codec.decode(blob)
        kd, vd = k.clone(), v.clone()
        kd[lo:hi], vd[lo:hi] = dec.k, dec.v
        exact = (k.shape[0] - (hi - lo)) * k[0].numel() * 2 * 2
        return kd, vd, float(blob.numel()), float(blob.numel() + exact)

    return Method("kvtc", float(ratio), fn, variant)


def split_plan_method(artifact: CalibrationArtifact, lead_ratio: int, lead_tokens: int, ratio: int,
                      variant: str = "", entropy: str = "deflate", tail_ratio: int | None = None,
                      tail_tokens: int = 0) -> Method:
    """KVTC with position classes: the first `lead_tokens` compressed tokens (right after the sinks) use the
    `lead_ratio` plan, the last `tail_tokens` (right before the exact window) the `tail_ratio` plan, the rest
    the `ratio` plan. Bytes are those of one blob per class, less the 80-byte header of each extra blob (one
    blob with several plans would carry one header)."""
    main = KVTCCodec(artifact, ratio, entropy=entropy)
    lead = KVTCCodec(artifact, lead_ratio, entropy=entropy)
    tail = KVTCCodec(artifact, tail_ratio, entropy=entropy) if tail_tokens else None

    def fn(k, v, lo, hi):
        kd, vd = k.clone(), v.clone()
        a = min(hi, lo + lead_tokens)
        b = max(a, hi - tail_tokens) if tail else hi
        stored = 0.0
        extra = 0
        for codec, s, e in ((lead, lo, a), (main, a, b), (tail, b, hi)):
            if codec is None or e <= s:
                continue
            blob = codec.encode(k[s:e], v[s:e], s, 0, 0)
            dec = codec.decode(blob)
            kd[s:e], vd[s:e] = dec.k, dec.v
            stored += blob.numel()
            extra += 1
        stored -= 80 * (extra - 1)
        exact = (k.shape[0] - (hi - lo)) * k[0].numel() * 2 * 2
        return kd, vd, stored, stored + exact

    name_ratio = float(ratio)
    return Method("kvtc", name_ratio, fn, variant or f"lead{lead_tokens}@{lead_ratio}x" + (f"+tail{tail_tokens}@{tail_ratio}x" if tail else ""))


def baseline_method(b: Baseline) -> Method:
    def fn(k, v, lo, hi):
        kq, vq = b.fn(k[lo:hi], v[lo:hi])
        kd, vd = k.clone(), v.clone()
        kd[lo:hi], vd[lo:hi] = kq, vq
        tok16 = k[0].numel() * 2 * 2
        coded = (hi - lo) * tok16 * b.bits_per_element / 16.0
        return kd, vd, coded, coded + (k.shape[0] - (hi - lo)) * tok16

    return Method(b.name, b.ratio, fn)


@dataclass
class WindowScores:
    """Per-window record of one method: masked NLL sum, agreeing greedy tokens, bytes stored."""

    nll: list
    agree: list
    stored_coded: float = 0.0
    stored_total: float = 0.0


def score_caches(model, caches: Sequence[tuple[torch.Tensor, torch.Tensor]], cont: torch.Tensor, last_logits: torch.Tensor,
                 mask: torch.Tensor, batch: int = 8) -> list[tuple[float, torch.Tensor]]:
    """Continue `cont` from each (k, v) prefix cache ([n, L, H, D], post-RoPE keys at positions 0..n-1) and score it.

    The caches run as one batch (up to `batch` at a time: the same tokens on several caches share the weights'
    matrix products). Returns per cache (summed NLL of the masked tokens, greedy prediction [len(cont)] int64);
    `last_logits` [vocab] predicts cont[0].
    """
    from transformers import DynamicCache

    out = []
    cfg = model.config
    for s in range(0, len(caches), batch):
        group = caches[s : s + batch]
        B = len(group)
        cache = DynamicCache(config=cfg)
        L = group[0][0].shape[1]
        for layer in range(L):
            ks = torch.stack([k[:, layer].transpose(0, 1) for k, _ in group]).float().contiguous()
            vs = torch.stack([v[:, layer].transpose(0, 1) for _, v in group]).float().contiguous()
            cache.update(ks, vs, layer)
        ids = cont[:-1].reshape(1, -1).expand(B, -1).to(model.device)
        with torch.inference_mode():
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits.float()
        for b in range(B):
            lg = torch.cat([last_logits[None], logits[b]])
            nll = torch.nn.functional.cross_entropy(lg, cont, reduction="none")
            out.append((float(nll[mask].sum()), lg.argmax(-1)))
    return out


def _score(model, k, v, cont, last_logits, mask):
    return score_caches(model, [(k, v)], cont, last_logits, mask)[0]


def paired_delta_ci(nll_m: np.ndarray, nll_b: np.ndarray, n_tok: np.ndarray, bootstrap: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval (in %) of Δppl = exp((Σnll_m − Σnll_b)/Σn) − 1, resampling windows."""
    rng = np.random.default_rng(seed)
    w = len(n_tok)
    idx = rng.integers(0, w, size=(bootstrap, w))
    dm, nn = (nll_m - nll_b)[idx].sum(1), n_tok[idx].sum(1)
    deltas = 100.0 * np.expm1(dm / np.maximum(nn, 1))
    a = (1 - level) / 2
    return float(np.quantile(deltas, a)), float(np.quantile(deltas, 1 - a))


def evaluate_methods(model, windows: Sequence[tuple[torch.Tensor, torch.Tensor]], methods: Sequence[Method], *,
                     prefix: int, score: int, sinks: int = 4, window: int = 128, bootstrap: int = 2000,
                     progress: bool = True, desc: str = "windows") -> list[dict]:
    """Score every method on every window (see the module docstring); returns one row per method plus an
    "uncompressed" row: method, variant, target_ratio, realized_ratio, effective_ratio, ppl, baseline_ppl,
    delta_ppl_pct, delta_ppl_ci95 [lo, hi], top1_agreement, windows, tokens_scored, seconds."""
    lo, hi = sinks, prefix - window
    if not 0 <= lo < hi <= prefix:
        raise ValueError(f"prefix {prefix} leaves no tokens between {sinks} sinks and a {window}-token window")
    base_nll, n_tok = [], []
    recs = [WindowScores([], []) for _ in methods]
    t0 = time.time()
    p_bytes16 = None
    for ids, scored in tqdm(windows, desc=desc, disable=not progress, unit="win"):
        prefix_ids, cont = ids[:prefix], ids[prefix : prefix + score]
        mask = scored[prefix : prefix + score]
        cap = capture_kv(model, prefix_ids)
        k, v = cap.k.to(torch.bfloat16), cap.v.to(torch.bfloat16)
        p_bytes16 = k[0].numel() * 2 * 2
        caches = [(k, v)]
        for m, rec in zip(methods, recs):
            kd, vd, sc, st = m.fn(k, v, lo, hi)
            caches.append((kd, vd))
            rec.stored_coded += sc
            rec.stored_total += st
        scores = score_caches(model, caches, cont, cap.last_logits, mask)
        b_nll, b_top = scores[0]
        base_nll.append(b_nll)
        n_tok.append(int(mask.sum()))
        for (nll, top), rec in zip(scores[1:], recs):
            rec.nll.append(nll)
            rec.agree.append(int(((top == b_top) & mask).sum()))
    seconds = time.time() - t0
    nb, nt = np.array(base_nll), np.array(n_tok, dtype=np.float64)
    N = nt.sum()
    if N == 0:
        raise ValueError("no scored tokens in these windows")
    base_ppl = math.exp(nb.sum() / N)
    W = len(windows)
    raw_coded, raw_total = (hi - lo) * p_bytes16 * W, prefix * p_bytes16 * W
    common = dict(windows=W, tokens_scored=int(N), prefix=prefix, score=score, sinks=sinks, window=window,
                  seconds=round(seconds, 1))
    rows = [dict(method="uncompressed", variant="", target_ratio=1.0, realized_ratio=1.0, effective_ratio=1.0,
                 ppl=base_ppl, baseline_ppl=base_ppl, delta_ppl_pct=0.0, delta_ppl_ci95=[0.0, 0.0],
                 top1_agreement=1.0, **common)]
    for m, rec in zip(methods, recs):
        nm = np.array(rec.nll)
        ppl = math.exp(nm.sum() / N)
        rows.append(dict(
            method=m.name, variant=m.variant, target_ratio=m.target_ratio,
            realized_ratio=raw_coded / rec.stored_coded, effective_ratio=raw_total / rec.stored_total,
            ppl=ppl, baseline_ppl=base_ppl, delta_ppl_pct=100.0 * (ppl / base_ppl - 1.0),
            delta_ppl_ci95=list(paired_delta_ci(nm, nb, nt, bootstrap)),
            top1_agreement=float(sum(rec.agree)) / N, **common,
        ))
    return rows


def evaluate_text(model, tokenizer, name: str, methods: Sequence[Method], *, windows: int, prefix: int | None = None,
                  score: int | None = None, desc: str = "windows") -> list[dict]:
    """``evaluate_methods`` on ``windows`` windows of the evaluation text ``name`` ("prose", "code" or "chat"), at
    that text's default prefix + score lengths unless given; every row carries the text's description."""
    text = load_text(name, tokenizer)
    prefix = prefix or DEFAULT_WINDOW[name][0]
    score = score or DEFAULT_WINDOW[name][1]
    rows = evaluate_methods(model, text_windows(text, windows, prefix + score), methods, prefix=prefix, score=score,
                            desc=desc)
    for r in rows:
        r.update(describe(text))
    return rows


def format_rows(rows: Sequence[dict], with_variant: bool = False) -> str:
    """Markdown table of evaluate_methods() rows."""
    v_head, v_sep = ("variant | ", "---|") if with_variant else ("", "")
    head = (f"| method | {v_head}target | realized ratio | effective ratio | ppl | Δppl | 95% CI | top-1 agreement |\n"
            f"|---|{v_sep}---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        v = f"{r.get('variant') or '—'} | " if with_variant else ""
        lo, hi = r["delta_ppl_ci95"]
        body += (f"| {r['method']} | {v}{r['target_ratio']:.0f}x | {r['realized_ratio']:.2f}x | {r['effective_ratio']:.2f}x | "
                 f"{r['ppl']:.3f} | {r['delta_ppl_pct']:+.2f}% | [{lo:+.2f}, {hi:+.2f}] | {r['top1_agreement']:.3f} |\n")
    return head + body
