"""The fault campaign (tests/faults/campaign.py) in CI size: every fault class a few times, the TP classes on two
gloo ranks, negative controls showing the measurement catches wrong KV, leaks and escaped failures, and the
committed results file (``python -m tests.faults``) meeting the bar for every class the campaign defines."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

compat = pytest.importorskip("kvtc_sglang.sglang_compat")

from tests.faults import campaign  # noqa: E402

pytestmark = pytest.mark.sglang
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "faults.json"




def meets_the_bar(row: dict, minimum: int) -> bool:
    return (row["injected"] >= minimum and row["contained"] == row["injected"] and row["leaked_slots"] == 0
            and row["wrong_kv"] == 0 and row["hangs"] == 0)


def test_every_single_process_class_is_contained():
    names = campaign.all_single_process_classes()
    assert len(names) == 4 * 16 + len(campaign.CORRUPTION_CLASSES)
    bad = []
    for name in names:
        row = campaign.run_class(name, 3, seed=1).as_json()
        if not meets_the_bar(row, 3):
            bad.append(row)
    assert not bad, bad


def test_tp_classes_are_agreed_on_both_ranks():
    rows = [r.as_json() for r in campaign.run_tp(4, seed=1, total_timeout_s=600)]
    assert [r["fault"] for r in rows] == [f"tp.{k}" for k in campaign.TP_KINDS]
    bad = [r for r in rows if not meets_the_bar(r, 2)]
    assert not bad, bad


def test_a_missing_check_shows_as_wrong_kv_and_uncontained(monkeypatch):
    """Negative control: with the load-back's binding check turned off, a corrupted binding is served."""
    from kvtc_sglang.cache.radix_cache import KVTCRadixCache

    monkeypatch.setattr(KVTCRadixCache, "_binding_ok", lambda self, node, depth: True)
    outcomes = [campaign.run_corruption("corrupt.binding", random.Random(i)) for i in range(3)]
    assert all(not o.contained for o in outcomes)
    assert sum(o.wrong_kv for o in outcomes) >= 1


def test_a_leak_shows_in_leaked_slots(monkeypatch):
    """Negative control: slots that a reset forgets are counted."""
    from kvtc_sglang.cache.radix_cache import KVTCRadixCache

    original = KVTCRadixCache.reset
    calls = []

    def leaky_reset(self):
        original(self)
        calls.append(self)
        if calls.count(self) > 1:  # not the reset of the constructor
            self.token_to_kv_pool_allocator.alloc(3)

    monkeypatch.setattr(KVTCRadixCache, "reset", leaky_reset)
    out = campaign.run_corruption("corrupt.binding", random.Random(0))
    assert out.leaked_slots == 3


def test_an_escaping_failure_is_not_contained(monkeypatch):
    """Negative control: a stage that lets the exception out is measured as not contained."""
    from kvtc_sglang.cache.radix_cache import KVTCRadixCache

    def raw_evict(self, params):
        from kvtc_sglang.cache import faults

        faults.hit("tier.evict.free")
        raise AssertionError("unreachable without the fault")

    monkeypatch.setattr(KVTCRadixCache, "evict", raw_evict)
    row = campaign.run_class("error@tier.evict.free", 2, seed=0).as_json()
    assert row["contained"] == 0 and row["injected"] == 2 and "InjectedError" in row["escaped"][0]


def test_committed_results_meet_the_bar_for_every_class():
    data = json.loads(RESULTS.read_text())
    rows = {r["fault"]: r for r in data["rows"]}
    expected = set(campaign.all_single_process_classes()) | {f"tp.{k}" for k in campaign.TP_KINDS}
    assert set(rows) == expected, sorted(set(rows) ^ expected)
    bad = [r for r in rows.values() if not meets_the_bar(r, 100)]
    assert not bad, bad
    assert data["machine"] and data["commit"] and data["all_contained"] is True
