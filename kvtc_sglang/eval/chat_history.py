"""Accuracy of a compressed conversation history: the returning-turn case of a chat server's prefix cache.

For each assistant turn that has at least one earlier exchange (turn t ≥ 2 of a conversation):
  1. the history (everything rendered before the user's turn t, i.e. ending with the previous answer's
     end-of-turn marker) is prefilled and its KV rounded to bf16;
  2. the history is stored the way the tiered cache stores a cached sequence: the first `sinks` tokens and the
     last `window` tokens exact, the tokens in between through the method under test;
  3. the next user turn (and the assistant header) are appended exact, computed on top of the decoded
     history, and the assistant's answer is teacher-forced: its tokens' NLL and greedy agreement with the
     continuation from the uncompressed history are recorded.

Rows per (method, window): Δppl over all scored answer tokens with a paired bootstrap 95% interval over turns,
top-1 agreement, and the history's effective ratio (16-bit bytes of the whole history over what is stored for
it, exact rows included): short chat histories make the exact window a large share of what is stored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from kvtc_sglang.eval.eval_texts import render_conversation
from kvtc_sglang.eval.rate_distortion import Method, paired_delta_ci, score_caches
from kvtc_sglang.models.kv_capture import capture_kv


@dataclass(frozen=True)
class ReturningTurn:
    """One scored turn: ids [n] int64 of history + user turn + answer; `history` = tokens before the user turn;
    `scored` [n] bool marks the answer's tokens."""

    ids: torch.Tensor
    history: int
    scored: torch.Tensor


def returning_turns(tokenizer, conversations: Sequence[Sequence[dict]], max_tokens: int = 2048) -> list[ReturningTurn]:
    """Every assistant turn after the first of each conversation, cut so that the whole sample fits max_tokens
    (turns whose history plus user turn already exceed it are skipped)."""
    out = []
    for conv in conversations:
        for a, msg in enumerate(conv):
            if msg["role"] != "assistant" or a < 3 or conv[a - 1]["role"] != "user":
                continue
            ids, mask = render_conversation(tokenizer, conv[: a + 1])
            hist_ids, _ = render_conversation(tokenizer, conv[: a - 1])
            h = hist_ids.numel()
            if not torch.equal(ids[:h], hist_ids):
                continue  # tokenization merged across the turn boundary; never seen with ChatML templates
            answer = mask.clone()
            answer[:h] = False
            first = int(answer.nonzero()[0]) if answer.any() else ids.numel()
            if first >= max_tokens:
                continue
            n = min(ids.numel(), max_tokens)
            out.append(ReturningTurn(ids[:n], h, answer[:n]))
    return out


def evaluate_history(model, turns: Sequence[ReturningTurn], methods: Sequence[Method], windows: Sequence[int], *,
                     sinks: int = 4, bootstrap: int = 2000, progress: bool = True) -> list[dict]:
    """Rows: method, variant, target_ratio, window, realized_ratio, effective_ratio, ppl, baseline_ppl,
    delta_ppl_pct, delta_ppl_ci95, top1_agreement, turns, tokens_scored, mean_history_tokens, seconds.

    A method is applied with each recent-window size W in `windows` to the history tokens [sinks, h − W).
    """
    base_nll, n_tok, hist = [], [], []
    keys = [(m, w) for w in windows for m in methods]
    nll = {i: [] for i in range(len(keys))}
    agree = {i: 0 for i in range(len(keys))}
    stored = {i: [0.0, 0.0] for i in range(len(keys))}
    raw = {i: [0.0, 0.0] for i in range(len(keys))}
    t0 = time.time()
    for t in tqdm(turns, desc="returning turns", disable=not progress, unit="turn"):
        h = t.history
        cap = capture_kv(model, t.ids[:h])
        k, v = cap.k.to(torch.bfloat16), cap.v.to(torch.bfloat16)
        tok16 = k[0].numel() * 2 * 2
        cont, mask = t.ids[h:], t.scored[h:]
        hist.append(h)
        caches = [(k, v)]
        for i, (m, w) in enumerate(keys):
            lo, hi = min(sinks, h), max(min(sinks, h), h - w)
            if hi > lo:
                kd, vd, sc, st = m.fn(k, v, lo, hi)
            else:
                kd, vd, sc, st = k, v, 0.0, h * tok16
            caches.append((kd, vd))
            stored[i][0] += sc
            stored[i][1] += st
            raw[i][0] += (hi - lo) * tok16
            raw[i][1] += h * tok16
        scores = score_caches(model, caches, cont, cap.last_logits, mask)
        b_nll, b_top = scores[0]
        base_nll.append(b_nll)
        n_tok.append(int(mask.sum()))
        for i, (s_nll, top) in enumerate(scores[1:]):
            nll[i].append(s_nll)
            agree[i] += int(((top == b_top) & mask).sum())
    seconds = time.time() - t0
    nb, nt = np.array(base_nll), np.array(n_tok, dtype=np.float64)
    N = nt.sum()
    base_ppl = math.exp(nb.sum() / N)
    common = dict(turns=len(turns), tokens_scored=int(N), mean_history_tokens=float(np.mean(hist)), sinks=sinks,
                  seconds=round(seconds, 1))
    rows = [dict(method="uncompressed", variant="", target_ratio=1.0, window=None, realized_ratio=1.0, effective_ratio=1.0,
                 ppl=base_ppl, baseline_ppl=base_ppl, delta_ppl_pct=0.0, delta_ppl_ci95=[0.0, 0.0], top1_agreement=1.0,
                 **common)]
    for i, (m, w) in enumerate(keys):
        nm = np.array(nll[i])
        ppl = math.exp(nm.sum() / N)
        rows.append(dict(
            method=m.name, variant=m.variant, target_ratio=m.target_ratio, window=w,
            realized_ratio=raw[i][0] / stored[i][0] if stored[i][0] else 1.0,
            effective_ratio=raw[i][1] / stored[i][1], ppl=ppl, baseline_ppl=base_ppl,
            delta_ppl_pct=100.0 * (ppl / base_ppl - 1.0), delta_ppl_ci95=list(paired_delta_ci(nm, nb, nt, bootstrap)),
            top1_agreement=agree[i] / N, **common,
        ))
    return rows


def format_history_rows(rows: Sequence[dict]) -> str:
    head = ("| method | target | window W | realized ratio | effective ratio (history) | ppl | Δppl | 95% CI | top-1 agreement |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        lo, hi = r["delta_ppl_ci95"]
        w = "—" if r["window"] is None else str(r["window"])
        body += (f"| {r['method']} | {r['target_ratio']:.0f}x | {w} | {r['realized_ratio']:.2f}x | {r['effective_ratio']:.2f}x | "
                 f"{r['ppl']:.3f} | {r['delta_ppl_pct']:+.2f}% | [{lo:+.2f}, {hi:+.2f}] | {r['top1_agreement']:.3f} |\n")
    return head + body
