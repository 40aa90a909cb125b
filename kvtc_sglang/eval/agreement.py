"""Greedy agreement of a tested engine's answers with reference answers (token ids).

Stdlib only. One contract for where two answers part: ``first_divergence`` is the number of leading tokens they
share, so it is the index of the first differing token, a length difference counts at the shorter end, and two
identical answers give their length.
"""

from __future__ import annotations

from typing import Any, Sequence


def first_divergence(reference: Sequence[int], other: Sequence[int]) -> int:
    """Number of leading tokens ``reference`` and ``other`` share: the index of the first token that differs, the
    shorter length when one is a prefix of the other, the length when they are identical."""
    for i, (a, b) in enumerate(zip(reference, other)):
        if a != b:
            return i
    return min(len(reference), len(other))


def _agreement_of(records: Sequence[dict]) -> dict[str, Any]:
    ref_total = agree_prefix = same_pos = exact = 0
    for r in records:
        ref, got = r["reference_ids"], r["tested_ids"]
        ref_total += len(ref)
        agree_prefix += min(first_divergence(ref, got), len(ref))
        same_pos += sum(a == b for a, b in zip(ref, got))
        exact += list(ref) == list(got)
    n = len(records)
    return {"requests": n, "reference_tokens": ref_total,
            "prefix_agreement": agree_prefix / ref_total if ref_total else 1.0,
            "next_token_agreement": same_pos / ref_total if ref_total else 1.0,
            "exact_match_rate": exact / n if n else 1.0}


def agreement(records: Sequence[dict]) -> dict[str, Any]:
    """Greedy agreement of the tested answers with the reference answers.

    records: dicts with ``reference_ids`` and ``tested_ids`` (token ids), ``turn`` (0-based) and
        ``tested["loaded_back_tokens"]`` (as ``chat_engine.run_lockstep`` writes them).
    prefix_agreement: reference tokens reproduced before the first divergence / all reference tokens.
    next_token_agreement: positions where the tested engine's greedy choice is the reference token / reference
        tokens (teacher-forced top-1 agreement; equals position-wise agreement of free-running answers only up to
        the first divergence).
    exact_match_rate: requests answered identically / requests.
    Each also over ``per_turn`` (keyed by the 1-based turn number) and ``with_load_back`` (requests whose prefix was
    partly restored from the compressed tier); ``first_divergences`` lists the first divergence of every request whose
    answers differ.
    """
    out = _agreement_of(records)
    turns = sorted({r["turn"] for r in records})
    out["per_turn"] = {str(t + 1): _agreement_of([r for r in records if r["turn"] == t]) for t in turns}
    out["with_load_back"] = _agreement_of([r for r in records if r["tested"]["loaded_back_tokens"] > 0])
    out["first_divergences"] = [first_divergence(r["reference_ids"], r["tested_ids"]) for r in records
                                if list(r["reference_ids"]) != list(r["tested_ids"])]
    return out
