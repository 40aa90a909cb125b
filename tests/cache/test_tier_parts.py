"""The tier's parts alone: the policy (one order over hot and compressed), the blob store's slot accounting and row
layout, the transfer engine's deferred ordering and error capture, TP agreement with one rank, node states."""

from __future__ import annotations

import types

import pytest
import torch

from kvtc_sglang.cache.blob_store import BlobStore, HostSpill
from kvtc_sglang.cache.policy import Action, Costs, TierPolicy
from kvtc_sglang.cache.tier_state import BlobRef, NodeState, set_state, state_of
from kvtc_sglang.cache.tp_agreement import TPAgreement
from kvtc_sglang.cache.transfer import COMPRESS, LOAD, Op, TransferEngine


def node(id, last_access=0.0, hits=0, priority=0, created=0.0):
    return types.SimpleNamespace(id=id, last_access_time=last_access, hit_count=hits, priority=priority,
                                 creation_time=created)


# --- policy ------------------------------------------------------------------------------------------------------------

def test_equal_ages_and_costs_give_lru_order_within_an_action():
    p = TierPolicy("lru", Costs(recompute=1, restore=1, encode=1), clock=lambda: 100.0)
    old, new = node(1, last_access=10.0), node(2, last_access=90.0)
    keys = sorted([(p.key(Action.DELETE, n, 8, 8), n.id) for n in (new, old)])
    assert [k[1] for k in keys] == [1, 2]  # older first


def test_one_order_prefers_freeing_hot_copies_then_compressing_then_dropping():
    p = TierPolicy("lru", clock=lambda: 0.0)  # age 0 everywhere: P(reuse) = 1
    n = node(1)
    evict_hot = p.key(Action.EVICT_HOT, n, 64, 64)        # blob exists: lose a restore, free 64
    compress = p.key(Action.COMPRESS, n, 64, 56)          # lose a restore, free 56
    delete = p.key(Action.DELETE, n, 64, 64)              # lose a recompute
    drop = p.key(Action.DROP, n, 64, 8)                   # lose recompute - restore per 8 slots
    redundant = p.key(Action.DROP_REDUNDANT, n, 64, 8)    # lose a future encode per 8 slots
    assert evict_hot < compress < redundant < delete < drop


def test_an_old_blob_goes_before_a_fresh_hot_node():
    p = TierPolicy("lru", clock=lambda: 10_000.0, tau_s=60.0)
    fresh, stale = node(1, last_access=9_999.0), node(2, last_access=0.0)
    assert p.key(Action.DROP, stale, 64, 8) < p.key(Action.COMPRESS, fresh, 64, 56)


def test_never_compress_what_would_be_dropped_next():
    p = TierPolicy("lru", clock=lambda: 1000.0, tau_s=10.0)
    old, fresh = node(1, last_access=0.0), node(2, last_access=999.0)
    lowest_drop = p.key(Action.DROP, fresh, 64, 8)
    assert not p.worth_compressing(old, 64, 8, lowest_drop)  # its blob would be the first to go
    assert p.worth_compressing(fresh, 64, 8, p.key(Action.DROP, old, 64, 8))
    assert p.worth_compressing(old, 64, 8, None)  # nothing else to drop: compress


def test_reuse_statistics_set_the_time_scale():
    p = TierPolicy("lru", tau_s=1000.0)
    for _ in range(300):
        p.observe_reuse(5.0)
    assert p.tau_s == pytest.approx(5.0, rel=1e-3)


def test_compression_stops_when_compressed_tokens_are_not_restored_and_probes():
    p = TierPolicy("lru", window_tokens=1000, min_restored_fraction=0.1, probe_every=4)
    assert p.compress_enabled()
    for _ in range(20):
        p.observe_fate(100, restored=False)
    assert p.restored_fraction == 0.0
    decisions = [p.compress_enabled() for _ in range(8)]
    assert decisions.count(True) == 2  # one probe in four
    for _ in range(10):
        p.observe_fate(100, restored=True)
    assert p.restored_fraction == 1.0 and p.compress_enabled()


def test_priority_strategy_keeps_request_priority_first():
    p = TierPolicy("priority", clock=lambda: 0.0)
    low, high = node(1, priority=0), node(2, priority=5)
    assert p.key(Action.DROP, low, 64, 8) < p.key(Action.EVICT_HOT, high, 64, 64)


# --- blob store ----------------------------------------------------------------------------------------------------------

class _Allocator:
    """Slots 1..n, page size p: just what BlobStore uses."""

    def __init__(self, n, page_size=1):
        self.page_size = page_size
        self.free = list(range(1, n + 1))
        self.size = n

    def available_size(self):
        return len(self.free)

    def alloc(self, k):
        if k > len(self.free):
            return None
        out, self.free = self.free[:k], self.free[k:]
        return torch.tensor(out, dtype=torch.int64)

    def free_segment(self, slots, start_pos=0):
        self.free.extend(slots.tolist())


def test_slot_counts_and_row_addresses():
    store = BlobStore(_Allocator(64, page_size=4), layers=2, row_bytes=100, device="cpu")
    assert store.slot_bytes == 400
    assert store.slots_for(1) == 4 and store.slots_for(400 * 4) == 4 and store.slots_for(400 * 4 + 1) == 8
    rows = store.make_rows(torch.tensor([5, 9]), 650)  # 7 rows: slot 5's four, then three of slot 9's
    assert rows.tolist() == [20, 21, 22, 23, 36, 37, 38]


def test_evictable_and_protected_slots_follow_readers_and_writers():
    alloc = _Allocator(32)
    store = BlobStore(alloc, layers=1, row_bytes=10, device="cpu")
    layout = types.SimpleNamespace(n_tokens=8, n_head=0, n_tail=0, nbytes=50)
    k = store.slots_for(50)
    blob = store.create(layout, 0, [], store.allocate(k), k, writing=True)
    assert (store.device_slots, store.protected_slots, store.evictable_slots) == (k, k, 0)
    store.retain(blob)
    store.end_write(blob)
    assert store.evictable_slots == k
    store.begin_read(blob)
    assert store.release(blob) == 0 and blob.doomed and blob.alive  # release after read
    assert alloc.available_size() == 32 - k
    store.end_read(blob)
    assert not blob.alive and alloc.available_size() == 32 and store.device_slots == 0


def test_the_cap_bounds_allocation():
    store = BlobStore(_Allocator(100), layers=1, row_bytes=10, device="cpu", cap_slots=5)
    assert store.allocate(6) is None and store.allocate(5) is not None


def test_host_spill_budget():
    host = HostSpill(100, pin=False)
    assert host.take(60) is not None and host.take(50) is None and host.used_bytes == 60
    host.give_back(60)
    assert host.used_bytes == 0
    with pytest.raises(RuntimeError):
        host.give_back(1)


# --- transfer engine ---------------------------------------------------------------------------------------------------

def test_deferred_work_runs_in_launch_order_per_stream_and_reports_errors():
    engine = TransferEngine("cpu", "deferred")
    ran = []
    e1 = engine.launch(COMPRESS, lambda: ran.append("c1"))
    e2 = engine.launch(LOAD, lambda: ran.append("l1"))
    e3 = engine.launch(COMPRESS, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    now = engine.launch(LOAD, lambda: ran.append("now"), defer=False)
    assert ran == ["now"] and now.query() and not e1.query()
    assert engine.run_pending(COMPRESS, 1) == 1 and ran == ["now", "c1"] and e1.query() and not e2.query()
    engine.run_pending()
    assert e2.query() and e3.query() and isinstance(e3.error, RuntimeError)
    ops = [Op("encode", COMPRESS, e1), Op("encode", COMPRESS, engine.launch(COMPRESS, lambda: None))]
    assert TransferEngine.ready_prefix(ops) == 1


def test_inline_mode_completes_at_launch_and_cuda_mode_needs_cuda():
    engine = TransferEngine("cpu")
    assert engine.mode == "inline" and engine.launch(COMPRESS, lambda: None).query()
    with pytest.raises(ValueError):
        TransferEngine("cpu", "cuda")


def test_one_rank_agreement_is_the_identity():
    agree = TPAgreement(None)
    assert agree.world == 1 and agree.max_vec([3, 1]) == [3, 1] and agree.min(4) == 4 and not agree.any(False)
    assert agree.collectives == 0


def test_state_and_reference_go_together():
    n = types.SimpleNamespace(id=1)
    assert state_of(n) is NodeState.HOT
    with pytest.raises(RuntimeError):
        set_state(n, NodeState.COMPRESSED, None)
    ref = BlobRef(types.SimpleNamespace(start_pos=10), 2, 3)
    set_state(n, NodeState.COMPRESSED, ref)
    assert state_of(n) is NodeState.COMPRESSED and ref.start == 12 and ref.end == 5
    assert NodeState.LOADING.has_slots and not NodeState.HOST.has_slots
