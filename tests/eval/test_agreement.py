"""eval/agreement.py: the first-divergence contract and the agreement scores built on it."""

from __future__ import annotations

import pytest

from kvtc_sglang.eval.agreement import agreement, first_divergence


def test_first_divergence_counts_the_shared_leading_tokens():
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [9, 2, 3]) == 0
    assert first_divergence([1, 2, 3], [1, 2]) == 2  # a length difference counts at the shorter end
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    assert first_divergence([1, 2, 3], [1, 2, 3]) == 3  # identical: their length
    assert first_divergence([], []) == 0


def test_agreement_scores_prefix_next_token_and_exact_match():
    records = [{"turn": 0, "reference_ids": [1, 2, 3, 4], "tested_ids": [1, 2, 9, 4],
                "tested": {"loaded_back_tokens": 0}},
               {"turn": 1, "reference_ids": [5, 6], "tested_ids": [5, 6], "tested": {"loaded_back_tokens": 7}},
               {"turn": 1, "reference_ids": [7, 8, 9], "tested_ids": [7, 8], "tested": {"loaded_back_tokens": 3}}]
    a = agreement(records)
    assert a["requests"] == 3 and a["reference_tokens"] == 9
    assert a["prefix_agreement"] == pytest.approx((2 + 2 + 2) / 9)
    assert a["next_token_agreement"] == pytest.approx((3 + 2 + 2) / 9)
    assert a["exact_match_rate"] == pytest.approx(1 / 3)
    assert a["first_divergences"] == [2, 2]  # the identical request is not listed
    assert a["per_turn"]["1"]["exact_match_rate"] == 0.0 and a["per_turn"]["2"]["exact_match_rate"] == 0.5
    lb = a["with_load_back"]
    assert lb["requests"] == 2 and lb["prefix_agreement"] == pytest.approx(4 / 5)


def test_agreement_of_no_records_is_perfect():
    a = agreement([])
    assert a["requests"] == 0 and a["prefix_agreement"] == 1.0 and a["exact_match_rate"] == 1.0
    assert a["per_turn"] == {} and a["first_divergences"] == []
