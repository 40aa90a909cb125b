"""Scenarios of the compressed tier in the pool's own slots, one behaviour each (the contract's test double as codec).

States, accounting and ordering: compression ahead of eviction (ENCODING -> HOT_BLOB), eviction that only frees,
compression at eviction time in place (a 100 % full pool), load-back that returns at once and decodes when the batch
forms (LOADING -> HOT_BLOB), loads riding with the next batch, release after read (a blob dropped while a decode
reads it), partial hits sharing a blob, token binding, exact rows (sinks at a path start, the window only on a
leaf, folded when a child extends it), host spill and promotion with CRC checks, the optional cap, statistics,
reset with work in flight, and the zero-sync audit of the hot path.
"""

from __future__ import annotations

import pytest
import torch

compat = pytest.importorskip("kvtc_sglang.sglang_compat")
if compat.installed_sglang_version() != compat.SUPPORTED_SGLANG_VERSION:
    pytest.skip(f"needs sglang=={compat.SUPPORTED_SGLANG_VERSION}", allow_module_level=True)

from kvtc_sglang.cache import audit  # noqa: E402
from kvtc_sglang.cache.tier_state import NodeState, state_of  # noqa: E402

pytestmark = pytest.mark.sglang
S = NodeState
SEQ = list(range(1, 33))  # 32 tokens


def tokens(n: int, base: int = 1) -> list[int]:
    return [base + (i % 50) for i in range(n)]


# --- compression ahead, eviction ------------------------------------------------------------------------------------

def test_finished_request_is_compressed_ahead_then_evicted_without_codec_work(make_tier, requests):
    h = make_tier(pool_tokens=128, transfer_mode="deferred")
    req, _ = requests.admit(h, SEQ)
    requests.finish(h, req)
    h.check()
    h.cache.step()  # launch: ENCODING, locked, blob slots protected
    node = h.node_for(SEQ)
    assert state_of(node) is S.ENCODING and node.lock_ref == 1
    blob = node.kvtc_ref.blob
    assert blob.writing and h.cache.protected_size() == 32 + blob.num_slots
    h.check()
    h.cache.step()  # not run yet: no ack
    assert state_of(node) is S.ENCODING
    h.gpu()
    h.cache.step()  # ack: HOT_BLOB, unlocked, blob evictable
    assert state_of(node) is S.HOT_BLOB and node.lock_ref == 0 and not blob.writing
    assert h.cache.evictable_size() == 32 + blob.num_slots
    h.check()
    encodes = h.codec.calls["encode"]
    assert h.evict(32) == 32  # the hot slots only: a state flip, no codec work
    assert state_of(node) is S.COMPRESSED and h.codec.calls["encode"] == encodes
    h.check()
    m = h.match(SEQ + [99])
    slots, last = h.load_back(m)
    assert last is node and h.assert_kv(slots, SEQ, exact=[0, 1, 28, 29, 30, 31]).count("coded") == 26
    h.check()


def test_compress_ahead_takes_free_slots_only_and_waits_for_the_watermark(make_tier):
    h = make_tier(pool_tokens=64, compress_ahead_watermark=0.9)
    h.insert(SEQ)
    h.cache.step()
    assert h.state(SEQ) == "hot"  # 50 % used: below the watermark
    h.insert(tokens(30, 100) + [7, 7])
    h.cache.step()
    assert h.allocator.available_size() == 0 and h.state(SEQ) == "hot"  # full: no free slot for a blob
    h.check()


def test_eviction_compresses_in_place_in_a_full_pool(make_tier):
    for mode in ("scratch", "direct"):
        h = make_tier(pool_tokens=64, in_place=mode, compress_ahead_watermark=1.0)
        h.insert(SEQ)
        h.insert(tokens(32, 100))
        assert h.allocator.available_size() == 0
        freed = h.evict(8)
        node = h.node_for(SEQ)
        blob = node.kvtc_ref.blob
        assert state_of(node) is S.COMPRESSED and freed == 32 - blob.num_slots
        assert h.cache.kvtc_counters.compress_at_evict_count == 1
        assert (h.codec.calls["copy_rows"] == 1) == (mode == "scratch")
        h.check()
        slots, _ = h.load_back(h.match(SEQ + [1]))
        h.assert_kv(slots, SEQ, exact=[0, 1])
        h.check()


def test_without_in_place_support_a_full_pool_deletes(make_tier):
    h = make_tier(pool_tokens=64, in_place=None, compress_ahead_watermark=1.0)
    h.insert(SEQ)
    h.insert(tokens(32, 100))
    assert h.evict(8) == 32
    assert h.match(SEQ).host_hit_length == 0 and h.cache.kvtc_counters.deleted_tokens == 32
    h.check()


def test_evict_frees_net_slots_dropping_blobs_when_hot_slots_are_gone(make_tier):
    h = make_tier(pool_tokens=128, compress_ahead_watermark=1.0)
    h.insert(SEQ)
    h.insert(tokens(32, 100))
    before = h.cache.evictable_size()
    assert before == 64
    freed = h.evict(before)  # everything reclaimable is reclaimed: compressions, then their blobs
    assert freed == 64 and h.cache.evictable_size() == 0 and h.allocator.available_size() == 128
    assert h.cache.kvtc_counters.compressed_dropped_tokens == 64
    h.check()


def test_blobs_of_hot_nodes_are_dropped_to_free_their_slots(make_tier):
    h = make_tier(pool_tokens=64)
    h.insert(SEQ)
    h.cache.step()
    h.cache.step()
    k = h.node_for(SEQ).kvtc_ref.blob.num_slots
    h.cache.inc_lock_ref(h.node_for(SEQ))  # the hot part is in use: only its redundant blob can go
    assert h.evict(1) == k and h.state(SEQ) == "hot"
    assert h.cache.kvtc_counters.redundant_blob_drops == 1
    h.cache.dec_lock_ref(h.node_for(SEQ))
    h.check()


# --- load-back -------------------------------------------------------------------------------------------------------

def compressed(h, seq=SEQ):
    """Insert ``seq`` and compress it at eviction time (evicting one slot compresses the whole leaf)."""
    h.insert(seq)
    h.evict(1)
    assert h.state(seq) == "compressed"


def test_load_back_returns_at_once_and_decodes_when_the_batch_forms(make_tier, requests):
    h = make_tier(pool_tokens=128, transfer_mode="deferred", compress_ahead_watermark=1.0)
    compressed(h)
    node = h.node_for(SEQ)
    blob = node.kvtc_ref.blob
    m = h.match(SEQ + [5])
    slots, last = h.cache.init_load_back(compat.InitLoadBackParams(best_match_node=m.best_match_node,
                                                                   host_hit_length=m.host_hit_length))
    assert len(slots) == 32 and state_of(node) is S.LOADING and node.lock_ref == 1 and blob.readers == 1
    assert h.codec.calls["decode_layers"] == 0 and h.cache.protected_size() == 32 + blob.num_slots
    h.check()
    assert h.cache.start_loading() == -1  # CPU: no layer counter
    assert h.codec.calls["decode_layers"] == 0  # queued on the load stream
    h.gpu("load")
    assert h.codec.calls["decode_layers"] == 2  # one per layer, all jobs of the step together
    h.assert_kv(slots, SEQ)
    h.cache.step()
    assert state_of(node) is S.HOT_BLOB and node.lock_ref == 0 and blob.readers == 0
    h.check()


def test_a_load_whose_request_was_not_admitted_runs_at_the_next_step(make_tier):
    h = make_tier(pool_tokens=128, transfer_mode="deferred", compress_ahead_watermark=1.0)
    compressed(h)
    m = h.match(SEQ + [5])
    slots, _ = h.cache.init_load_back(compat.InitLoadBackParams(best_match_node=m.best_match_node,
                                                                host_hit_length=m.host_hit_length))
    h.cache.step()  # no batch formed in between: launched here, ahead of any reader
    assert not h.cache._pending_loads and h.cache.transfer.pending("load") == 1
    h.gpu()
    h.cache.step()
    assert h.state(SEQ) == "hot_blob"
    h.assert_kv(slots, SEQ)
    h.check()


def test_a_blob_dropped_while_a_copy_reads_it_is_freed_after_the_ack(make_tier):
    """Release after read: the last node of a blob goes while a host copy (queued) still reads its rows. The blob is
    doomed, its slots stay protected (never handed out) until the copy is acknowledged, then freed."""
    h = make_tier(pool_tokens=128, transfer_mode="deferred", host_bytes=1 << 16, compress_ahead_watermark=1.0)
    compressed(h)
    h.cache.step()  # spill launched (queued)
    blob = h.node_for(SEQ).kvtc_ref.blob
    assert blob.readers == 1
    k = blob.num_slots
    assert h.evict(1000) == 0 and blob.doomed and blob.alive  # the node went, its slots did not
    assert h.allocator.available_size() == 128 - k and h.cache.protected_size() == k
    h.check()
    h.gpu()
    h.cache.step()
    assert not blob.alive and h.allocator.available_size() == 128 and h.cache.host.used_bytes == 0
    h.check()


def test_a_split_blob_survives_while_one_half_is_read(make_tier):
    h = make_tier(pool_tokens=128, transfer_mode="deferred", compress_ahead_watermark=1.0)
    compressed(h, SEQ + tokens(32, 60))
    slots, _ = h.load_back(h.match(SEQ + [99]), run=False)  # splits: the first half restores
    first, second = h.node_for(SEQ), h.node_for(SEQ + tokens(32, 60))
    blob = second.kvtc_ref.blob
    assert first.kvtc_ref.blob is blob and state_of(second) is S.COMPRESSED
    h.evict(1000)  # the second half is dropped; the blob stays (the first half holds and reads it)
    assert blob.alive and not blob.doomed and blob.refcount == 1
    h.gpu()
    h.assert_kv(slots, SEQ)
    h.cache.step()
    assert state_of(first) is S.HOT_BLOB
    h.check()


def test_partial_hit_restores_only_its_range_and_the_halves_share_the_blob(make_tier):
    h = make_tier(pool_tokens=128, compress_ahead_watermark=1.0)
    seq = tokens(64)
    compressed(h, seq)
    slots, _ = h.load_back(h.match(seq[:32] + [999]))
    assert len(slots) == 32
    first, second = h.node_for(seq[:32]), h.node_for(seq)
    assert first.kvtc_ref.blob is second.kvtc_ref.blob and first.kvtc_ref.blob.refcount == 2
    h.assert_kv(slots, seq[:32], exact=[0, 1])
    h.cache.step()
    h.check()


def test_a_blob_not_bound_to_its_tokens_is_dropped_and_recomputed(make_tier, caplog):
    h = make_tier(pool_tokens=128, compress_ahead_watermark=1.0)
    compressed(h)
    h.node_for(SEQ).kvtc_ref.blob.token_ids[5] += 1
    slots, last = h.load_back(h.match(SEQ + [1]))
    assert len(slots) == 0 and last is h.cache.root_node
    assert h.match(SEQ).host_hit_length == 0  # gone
    c = h.cache.kvtc_counters
    assert c.integrity_failures == 1 and c.integrity_dropped_tokens == 32
    assert "binding check" in caplog.text
    h.check()


def test_no_slots_for_a_load_back_is_a_miss_that_keeps_the_node(make_tier):
    h = make_tier(pool_tokens=64, compress_ahead_watermark=1.0)
    compressed(h)
    n = h.allocator.available_size()
    held = h.allocator.alloc(n)  # a running request holds every free slot; nothing else is evictable
    held_protected = h.cache.evictable_size()
    assert held_protected == h.node_for(SEQ).kvtc_ref.blob.num_slots
    slots, _ = h.load_back(h.match(SEQ + [1]))
    # dropping the blob itself would free its slots, but the chain's own blob is pinned while loading
    assert len(slots) == 0 and h.state(SEQ) == "compressed"
    h.allocator.free(held)
    h.check()


# --- exact rows --------------------------------------------------------------------------------------------------------

def test_sinks_only_at_the_path_start_and_the_window_only_on_a_leaf(make_tier):
    h = make_tier(pool_tokens=256, compress_ahead_watermark=1.0, sink_tokens=2, window_tokens=4)
    long = tokens(64)
    h.insert(long[:32])
    h.insert(long)  # splits nothing: the second node extends the first
    parent, leaf = h.node_for(long[:32]), h.node_for(long)
    h.evict(30)  # the leaf, then its parent, compressed (each frees more than 30 - what is left)
    assert state_of(parent) is S.COMPRESSED and state_of(leaf) is S.COMPRESSED
    pb, lb = parent.kvtc_ref.blob, leaf.kvtc_ref.blob
    assert (pb.n_head, pb.n_tail) == (2, 0)  # path start, inner node: no window
    assert (lb.n_head, lb.n_tail) == (0, 4)  # not at the path start, a leaf: the window
    h.check()


def test_a_window_is_folded_when_a_child_extends_its_node(make_tier):
    h = make_tier(pool_tokens=256)
    h.insert(SEQ)
    h.cache.step()
    h.cache.step()
    node = h.node_for(SEQ)
    assert state_of(node) is S.HOT_BLOB and node.kvtc_ref.blob.n_tail == 4
    h.insert(SEQ + tokens(16, 70))
    assert state_of(node) is S.HOT and h.cache.kvtc_counters.windows_folded == 1
    h.check()


# --- host spill ---------------------------------------------------------------------------------------------------------

def test_host_spill_then_load_from_the_host(make_tier):
    h = make_tier(pool_tokens=128, host_bytes=1 << 16, compress_ahead_watermark=1.0)
    compressed(h)
    h.cache.step()  # spill ahead (inline: completes at once)
    h.cache.step()  # ack: CRC checked on the host
    blob = h.node_for(SEQ).kvtc_ref.blob
    assert blob.host_verified and h.cache.kvtc_counters.spills == 1
    h.evict(1)  # the pool copy goes, the host copy stays
    assert h.state(SEQ) == "host" and not blob.on_device and h.cache.kvtc_counters.demotions == 1
    h.check()
    slots, _ = h.load_back(h.match(SEQ + [1]))
    h.assert_kv(slots, SEQ, exact=[0, 1])
    assert h.cache.kvtc_counters.promotions == 1
    h.cache.step()
    h.check()


def test_a_corrupted_host_copy_is_caught_before_use(make_tier):
    h = make_tier(pool_tokens=128, host_bytes=1 << 16, compress_ahead_watermark=1.0)
    compressed(h)
    h.cache.step()
    h.cache.step()
    h.evict(1)
    blob = h.node_for(SEQ).kvtc_ref.blob
    blob.host_payload[100] ^= 4
    slots, _ = h.load_back(h.match(SEQ + [1]))
    assert len(slots) == 0 and h.cache.kvtc_counters.integrity_failures == 1
    assert h.match(SEQ).host_hit_length == 0
    h.check()


# --- cap, stats, reset, audit ---------------------------------------------------------------------------------------

def test_the_optional_cap_bounds_blob_slots(make_tier):
    h = make_tier(pool_tokens=256, store_cap_bytes=16 * 256)  # 16 slots of 256 bytes
    for base in (1, 100, 200):
        h.insert(tokens(32, base))
    h.cache.step()
    h.cache.step()
    assert 0 < h.cache.blobs.device_slots <= 16
    h.evict(256)
    assert h.cache.blobs.device_slots <= 16
    h.check()


def test_stats_report_slots_tail_waste_and_the_effective_ratio(make_tier):
    h = make_tier(pool_tokens=256, page_size=16, compress_ahead_watermark=1.0, coded_bytes_per_token=24,
                  window_tokens=0)
    seq = tokens(128)
    compressed(h, seq)
    s = h.cache.stats()
    blob = h.node_for(seq).kvtc_ref.blob
    assert s.compressed_tokens == 128 and s.blob_slots == blob.num_slots == 16
    assert s.tail_waste_bytes == 16 * h.cache.slot_bytes - blob.nbytes and s.effective_ratio == 128 / 16
    assert "effective ratio 8.00x" in s.summary_line()


def test_reset_drains_work_in_flight_and_frees_everything(make_tier, requests):
    h = make_tier(pool_tokens=128, transfer_mode="deferred", compress_ahead_watermark=0.0)
    compressed(h)
    h.load_back(h.match(SEQ + [3]), run=False)
    h.insert(tokens(40, 100))
    h.cache.step()  # an encode in flight too
    assert h.cache.transfer.pending() >= 1
    h.cache.reset()
    assert h.allocator.available_size() == 128 and h.cache.blobs.blobs() == []
    h.check()


def test_the_hot_path_reads_nothing_back_from_the_device(make_tier, requests):
    """Every tier entry point under the strict sync audit (every CPU tensor counts as device-side unless marked
    host-side; the test double's own reads are exempt): no host read of a device tensor."""
    h = make_tier(pool_tokens=256, transfer_mode="deferred", compress_ahead_watermark=0.0)
    with audit.SyncAudit(strict_cpu=True, raise_on_sync=True) as a:
        for base in (1, 100):
            h.insert(tokens(32, base))
        h.cache.step()
        h.gpu()
        h.cache.step()
        h.evict(64)
        m = h.match(tokens(32, 1) + [7])
        h.cache.init_load_back(compat.InitLoadBackParams(best_match_node=m.best_match_node,
                                                         host_hit_length=m.host_hit_length))
        h.cache.start_loading()
        h.gpu()
        h.cache.step()
        h.evict(300)
    assert a.total == 0, a.counts
    h.check()


def test_the_audit_counts_host_reads(make_tier):
    t = torch.arange(4)
    with audit.SyncAudit(strict_cpu=True) as a:
        t.sum().item()
        t.tolist()
        bool(t.any())
        t.nonzero()
        t[t > 1]
        audit.mark_host(torch.tensor([1])).item()
        with audit.exempt():
            t.tolist()
    assert a.total == 5, a.counts
