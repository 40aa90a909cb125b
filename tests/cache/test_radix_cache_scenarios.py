"""KVTCRadixCache scenarios on sglang 0.5.17's CPU KV pool and allocators: every state transition and split.

Sizes (synthetic model, bf16 pool): a token's K+V row is 256 bytes; a 32-token node with 2 sink and 4 window tokens
makes a blob of about 3.5 KiB.
"""

from __future__ import annotations

import logging

import pytest
import torch

from kvtc_sglang import sglang_compat as compat  # imports sglang lazily

pytestmark = pytest.mark.sglang

SEQ = list(range(1, 33))  # 32 tokens: a multiple of every page size used


def other(n: int, first: int = 40) -> list[int]:
    return list(range(first, first + n))


@pytest.fixture
def h(allocator_setup, make_harness):
    kind, page_size = allocator_setup
    return make_harness(allocator=kind, page_size=page_size, need_sort=kind == "paged")


def like(h, make_harness, **kw):
    """A harness with h's allocator and page size and other settings."""
    return make_harness(allocator=h.allocator_kind, page_size=h.page_size, **kw)


def flip_byte(store, handle, index: int) -> None:
    """Corrupt one byte of a stored blob in place (in its tier's arena)."""
    arena = store.arena if handle.tier == "device" else store.host
    page, offset = divmod(index, store.page_bytes)
    arena.data.view(-1, store.page_bytes)[int(handle.pages_cpu[page]), offset] ^= 0xFF


# --- hot -> compressed -> hot ----------------------------------------------------------------------------------------

def test_evict_compresses_in_place_and_load_back_restores(h):
    cache = h.cache
    h.insert(SEQ)
    node = h.node_for(SEQ)
    old_slots = node.value.clone()
    assert h.evict(len(SEQ)) == len(SEQ)
    h.check()
    # slots freed only after the blob exists; the node stays in the tree, compressed
    assert h.allocator.available_size() == h.capacity
    assert node.value is None and node.kvtc.tier == "device" and node.kvtc.count == len(SEQ)
    assert cache.store.used_bytes > 0 and cache.evictable_size_ == 0
    # match is a lookup: compressed tokens come back as host_hit_length
    m = h.match(SEQ + other(4))
    assert len(m.device_indices) == 0 and m.host_hit_length == len(SEQ)
    assert m.last_device_node is cache.root_node and m.best_match_node is node and m.last_host_node is node
    # scribble over the freed rows: the restore must not depend on them
    for buf in h.pool.k_buffer + h.pool.v_buffer:
        buf[old_slots] = 7
    indices, last = h.load_back(m)
    h.check()
    assert last is node and torch.equal(node.value, indices)
    assert indices.dtype == torch.int64 and indices.is_contiguous() and len(set(indices.tolist())) == len(SEQ)
    assert h.allocator.available_size() == h.capacity - len(SEQ)
    assert cache.evictable_size_ == len(SEQ) and cache.store.used_bytes == 0
    # sinks (positions 0, 1) and the window tail (last 4 tokens of a childless node) bit-exact, the rest in bound
    h.assert_kv(indices, SEQ, exact=[0, 1, 28, 29, 30, 31])
    rk, rv = h.kv_errors(indices[2:28], SEQ[2:28], 2)
    assert float(rk.max()) > 0 and float(rv.max()) > 0  # the middle really went through the codec
    # now hot again: a plain hit
    m = h.match(SEQ)
    assert torch.equal(m.device_indices, indices) and m.host_hit_length == 0
    s = cache.stats()
    assert (s.compress_count, s.compress_tokens, s.decompress_count, s.decompress_tokens) == (1, 32, 1, 32)


def test_inner_nodes_compress_without_window_and_restore_together(h):
    cache = h.cache
    h.insert(SEQ)
    h.insert(SEQ[:16] + other(16))  # splits SEQ: root -> A(16) -> {B(16), C(16)}
    a, b, c = h.node_for(SEQ[:16]), h.node_for(SEQ), h.node_for(SEQ[:16] + other(16))
    assert h.evict(48) == 48
    h.check()
    assert all(n.value is None for n in (a, b, c))
    assert a.kvtc.handle is not b.kvtc.handle
    m = h.match(SEQ)
    assert m.host_hit_length == 32 and m.best_match_node is b
    indices, last = h.load_back(m)
    h.check()
    assert last is b and torch.equal(a.value, indices[:16]) and torch.equal(b.value, indices[16:])
    # A had children when compressed: only its sinks are exact; B ended a sequence: its window is exact
    h.assert_kv(indices, SEQ, exact=[0, 1, 28, 29, 30, 31])
    ka, _ = h.rows(indices[12:16])
    wa, _ = h.expected_rows(SEQ[12:16], 12)
    assert not torch.equal(ka, wa)
    assert c.value is None and c.parent is a  # the sibling stays compressed under a hot parent
    assert cache.evictable_size_ == 32


# --- partial hits: split of a compressed node ------------------------------------------------------------------------

def test_partial_hit_splits_a_compressed_node_sharing_its_blob(h):
    cache = h.cache
    h.insert(SEQ)
    h.evict(32)
    whole = h.node_for(SEQ)
    handle = whole.kvtc.handle
    used = cache.store.used_bytes
    m = h.match(SEQ[:16] + other(8))
    h.check()
    first = m.best_match_node
    assert m.host_hit_length == 16 and len(first.key) == 16 and first.children
    second = next(iter(first.children.values()))
    assert second is whole and len(second.key) == 16
    assert first.kvtc.handle is handle and second.kvtc.handle is handle and handle.refcount == 2
    assert (first.kvtc.offset, first.kvtc.count, second.kvtc.offset, second.kvtc.count) == (0, 16, 16, 16)
    assert cache.store.used_bytes == used  # no bytes copied or freed by the split
    indices, last = h.load_back(m)
    h.check()
    assert last is first and len(indices) == 16
    h.assert_kv(indices, SEQ[:16], exact=[0, 1])
    assert handle.refcount == 1 and cache.store.used_bytes == used  # the second half still holds the blob
    m = h.match(SEQ)
    assert torch.equal(m.device_indices, indices) and m.host_hit_length == 16 and m.best_match_node is second
    rest, last = h.load_back(m)
    h.check()
    assert last is second
    h.assert_kv(rest, SEQ[16:], start=16, exact=[12, 13, 14, 15])
    assert not handle.alive and cache.store.used_bytes == 0


def test_split_halves_free_the_blob_only_when_both_are_gone(make_harness):
    h = make_harness(allocator="paged", page_size=4, min_compress_tokens=4)
    cache = h.cache
    h.insert(SEQ)
    h.evict(32)
    m = h.match(SEQ[:8] + other(4))
    handle = m.best_match_node.kvtc.handle
    used = cache.store.used_bytes
    tail = next(iter(m.best_match_node.children.values()))
    cache._drop_subtree(tail)  # what making room does to a cold leaf
    h.check()
    assert handle.alive and handle.refcount == 1 and cache.store.used_bytes == used
    cache._drop_subtree(m.best_match_node)
    h.check()
    assert not handle.alive and cache.store.used_bytes == 0


# --- store full: host tier, or drop --------------------------------------------------------------------------------

def store_for_one_blob(h) -> int:
    """Device bytes that hold exactly one 32-token blob of SEQ's shape (measured)."""
    h.insert(SEQ)
    h.evict(32)
    used = h.cache.store.used_bytes
    h.cache.reset()
    return used


def test_store_full_demotes_the_coldest_to_host_then_loads_back_from_host(h, make_harness):
    one = store_for_one_blob(h)
    h = like(h, make_harness, store_bytes=one + 256, host_bytes=4 * one)
    cache = h.cache
    a, b = SEQ, other(32)
    h.insert(a)
    h.insert(b)
    h.node_for(a).last_access_time -= 10  # a is the colder one
    assert h.evict(32) == 32 and h.node_for(a).kvtc.tier == "device"
    assert h.evict(32) == 32
    h.check()
    na, nb = h.node_for(a), h.node_for(b)
    assert na.kvtc.tier == "host" and nb.kvtc.tier == "device"
    assert cache.store.host_used_bytes > 0 and cache.stats().demotions == 1
    m = h.match(a)
    assert m.host_hit_length == 32 and m.best_match_node is na
    assert cache.stats().host_tokens == 32 and cache.stats().compressed_tokens == 32
    indices, last = h.load_back(m)
    h.check()
    assert last is na
    h.assert_kv(indices, a, exact=[0, 1, 28, 29, 30, 31])
    assert cache.store.host_used_bytes == 0


def test_store_full_without_host_drops_the_coldest(h, make_harness):
    one = store_for_one_blob(h)
    h = like(h, make_harness, store_bytes=one + 256)
    cache = h.cache
    a, b = SEQ, other(32)
    h.insert(a)
    h.insert(b)
    h.node_for(a).last_access_time -= 10
    h.evict(32)
    h.evict(32)
    h.check()
    assert h.match(a).host_hit_length == 0 and len(h.match(a).device_indices) == 0
    assert h.node_for(b).kvtc.tier == "device"
    s = cache.stats()
    assert s.drops == 1 and s.dropped_tokens == 32 and s.compressed_tokens == 32


def test_host_tier_full_drops_its_coldest_leaf(h, make_harness):
    one = store_for_one_blob(h)
    h = like(h, make_harness, store_bytes=one + 256, host_bytes=one + 256)
    seqs = [SEQ, other(32), other(32, first=80)]
    for i, s in enumerate(seqs):
        h.insert(s)
        h.node_for(s).last_access_time -= 30 - i  # oldest first
    for _ in seqs:
        h.evict(32)
        h.check()
    assert h.match(seqs[0]).host_hit_length == 0  # device -> host -> dropped
    assert h.node_for(seqs[1]).kvtc.tier == "host" and h.node_for(seqs[2]).kvtc.tier == "device"


def test_a_blob_that_cannot_be_stored_falls_back_to_deletion(make_harness):
    h = make_harness(allocator="paged", page_size=1, store_bytes=1024)  # smaller than any 32-token blob
    h.insert(SEQ)
    assert h.evict(32) == 32
    h.check()
    assert h.match(SEQ).host_hit_length == 0 and h.cache.stats().deleted_tokens == 32


def test_a_hot_node_with_compressed_children_is_dropped_with_them_when_it_cannot_be_stored(make_harness):
    h = make_harness(allocator="paged", page_size=1, store_bytes=4096)
    trunk = list(range(1, 65))
    h.insert(trunk + other(8, first=100))
    h.insert(trunk + other(8, first=110))
    assert h.evict(16) == 16  # the two 8-token leaves: small blobs that fit
    h.check()
    trunk_node = h.node_for(trunk)
    assert all(c.value is None for c in trunk_node.children.values())
    assert h.evict(64) == 64  # the 64-token trunk's blob is larger than the whole store
    h.check()
    cache = h.cache
    assert cache.root_node.children == {} and cache.store.used_bytes == 0
    assert h.allocator.available_size() == h.capacity
    s = cache.stats()
    assert s.deleted_tokens == 64 and s.drops == 2 and s.dropped_tokens == 16


# --- integrity -------------------------------------------------------------------------------------------------------

def test_corrupted_blob_is_a_miss_and_never_served(h):
    cache = h.cache
    h.insert(SEQ)
    h.insert(SEQ[:16] + other(16))
    a, b = h.node_for(SEQ[:16]), h.node_for(SEQ)
    h.evict(48)
    flip_byte(cache.store, b.kvtc.handle, b.kvtc.handle.nbytes // 2)
    m = h.match(SEQ)
    assert m.host_hit_length == 32
    available = h.allocator.available_size()
    indices, last = h.load_back(m)
    h.check()
    assert last is a and len(indices) == 16  # the shorter prefix: the rest is recomputed
    h.assert_kv(indices, SEQ[:16], exact=[0, 1])
    assert h.allocator.available_size() == available - 16  # the slots allocated for B went back
    assert b not in a.children.values()
    m = h.match(SEQ)
    assert len(m.device_indices) == 16 and m.host_hit_length == 0  # B is gone from the tree
    s = cache.stats()
    assert s.integrity_failures == 1 and s.integrity_dropped_tokens == 16


def test_corruption_of_the_first_node_gives_an_empty_result(h, caplog):
    cache = h.cache
    h.insert(SEQ)
    h.evict(32)
    node = h.node_for(SEQ)
    flip_byte(cache.store, node.kvtc.handle, 3)  # inside the header
    with caplog.at_level(logging.WARNING):
        indices, last = h.load_back(h.match(SEQ))
    h.check()
    assert len(indices) == 0 and last is cache.root_node
    assert h.allocator.available_size() == h.capacity and cache.store.used_bytes == 0
    assert cache.stats().integrity_failures == 1 and "failed its checks" in caplog.text


def test_a_corrupted_blob_on_the_host_is_caught_too(h, make_harness):
    one = store_for_one_blob(h)
    h = like(h, make_harness, store_bytes=one + 256, host_bytes=4 * one)
    h.insert(SEQ)
    h.insert(other(32))
    h.node_for(SEQ).last_access_time -= 10
    h.evict(64)
    node = h.node_for(SEQ)
    assert node.kvtc.tier == "host"
    flip_byte(h.cache.store, node.kvtc.handle, node.kvtc.handle.nbytes - 1)
    indices, _ = h.load_back(h.match(SEQ))
    h.check()
    assert len(indices) == 0 and h.cache.stats().integrity_failures == 1


# --- memory pressure during load-back --------------------------------------------------------------------------------

def test_load_back_evicts_other_nodes_to_find_slots(make_harness):
    h = make_harness(allocator="paged", page_size=4, pool_tokens=64)
    cache = h.cache
    h.insert(SEQ)
    h.evict(32)
    h.insert(other(32))
    h.insert(other(32, first=80))  # the pool is full of hot nodes now
    assert h.allocator.available_size() == 0
    indices, last = h.load_back(h.match(SEQ))
    h.check()
    assert len(indices) == 32 and last is h.node_for(SEQ)
    h.assert_kv(indices, SEQ, exact=[0, 1, 28, 29, 30, 31])
    assert cache.stats().compress_count == 2  # one other node compressed to make room


def test_allocator_exhausted_with_nothing_evictable_is_a_miss(h):
    cache = h.cache
    h.insert(SEQ)
    h.evict(32)
    held = h.allocator.alloc(h.capacity)  # a running request holds every slot
    assert held is not None and h.allocator.available_size() == 0
    m = h.match(SEQ)
    indices, last = h.load_back(m)
    h.check(private_tokens=h.capacity)
    assert len(indices) == 0 and last is cache.root_node
    node = h.node_for(SEQ)
    assert node.value is None and node.kvtc.handle.alive  # still compressed, still matchable
    h.allocator.free(held)
    indices, _ = h.load_back(h.match(SEQ))
    h.assert_kv(indices, SEQ, exact=[0, 1])


def test_locked_hot_prefix_is_protected_while_loading_back(make_harness):
    h = make_harness(allocator="paged", page_size=1, pool_tokens=64)
    cache = h.cache
    h.insert(SEQ)
    h.insert(SEQ[:16] + other(16))
    b = h.node_for(SEQ)
    h.node_for(SEQ[:16] + other(16)).last_access_time -= 10
    h.evict(16)
    h.evict(16)  # both children compressed, A hot
    a = h.node_for(SEQ[:16])
    assert a.value is not None and b.value is None
    held = h.allocator.alloc(h.allocator.available_size())
    m = h.match(SEQ)
    assert m.last_device_node is a
    cache.inc_lock_ref(a)  # the scheduler locks the hot prefix around init_load_back
    indices, last = h.load_back(m)
    cache.dec_lock_ref(a)
    h.check(private_tokens=len(held))
    assert len(indices) == 0 and last is a and a.value is not None  # nothing else evictable: a miss


def test_mem_quota_below_the_hit_is_a_miss(h):
    h.insert(SEQ)
    h.evict(32)
    m = h.match(SEQ)
    indices, last = h.cache.init_load_back(compat.InitLoadBackParams(
        best_match_node=m.best_match_node, host_hit_length=m.host_hit_length, mem_quota=16))
    h.check()
    assert len(indices) == 0 and last is h.cache.root_node


# --- insert over compressed nodes ------------------------------------------------------------------------------------

def test_insert_over_a_compressed_node_revives_it_with_the_new_slots(h):
    cache = h.cache
    h.insert(SEQ)
    h.evict(32)
    node = h.node_for(SEQ)
    handle = node.kvtc.handle
    slots = h.alloc(40)
    h.write(slots, SEQ + other(8))
    result = cache.insert(compat.InsertParams(key=h.key(SEQ + other(8)), value=slots))
    assert result.prefix_len == 0  # nothing was hot: the caller frees nothing, the tree keeps every slot
    h.check()
    assert torch.equal(node.value, slots[:32]) and not handle.alive and cache.store.used_bytes == 0
    assert cache.evictable_size_ == 40 and cache.stats().revived_tokens == 32
    m = h.match(SEQ + other(8))
    assert torch.equal(m.device_indices, slots) and m.host_hit_length == 0


def test_insert_ending_inside_a_compressed_node_revives_the_first_half(h):
    cache = h.cache
    h.insert(SEQ)
    h.evict(32)
    handle = h.node_for(SEQ).kvtc.handle
    assert h.insert(SEQ[:16]) == 0
    h.check()
    first = h.node_for(SEQ[:16])
    second = next(iter(first.children.values()))
    assert first.value is not None and second.value is None and handle.refcount == 1
    m = h.match(SEQ)
    assert len(m.device_indices) == 16 and m.host_hit_length == 16
    rest, _ = h.load_back(m)
    h.assert_kv(rest, SEQ[16:], start=16, exact=[12, 13, 14, 15])
    assert cache.store.used_bytes == 0


def test_insert_under_a_hot_prefix_counts_only_hot_tokens_as_duplicates(h):
    h.insert(SEQ)
    h.insert(SEQ[:16] + other(16))
    h.node_for(SEQ[:16] + other(16)).last_access_time -= 10
    h.evict(16)
    assert h.node_for(SEQ[:16]).value is not None
    assert h.insert(SEQ[:16] + other(16)) == 16  # 16 hot duplicates freed by the caller, 16 revived
    h.check()
    assert h.node_for(SEQ[:16] + other(16)).value is not None


# --- requests through cache_finished_req / cache_unfinished_req ------------------------------------------------------

def test_requests_reuse_compressed_prefixes_through_the_scheduler_flow(h, requests):
    cache = h.cache
    req, _ = requests.admit(h, SEQ + other(5))
    h.check(private_tokens=req.private_tokens)
    requests.finish(h, req)
    h.check()
    aligned = (37 // h.page_size) * h.page_size
    assert cache.evictable_size_ == aligned
    h.evict(h.capacity)
    assert cache.evictable_size_ == 0 and cache.stats().compressed_tokens == aligned
    req, info = requests.admit(h, SEQ + other(5) + other(7, first=90))
    h.check(private_tokens=req.private_tokens)
    assert info.match.host_hit_length == aligned and len(info.restored) == aligned
    h.assert_kv(req.prefix_indices, (SEQ + other(5))[:aligned], exact=[0, 1])
    assert cache.protected_size_ == aligned and req.last_node.lock_ref == 1
    requests.checkpoint(h, req)
    h.check(private_tokens=req.private_tokens)
    requests.finish(h, req)
    h.check()
    assert cache.protected_size_ == 0 and cache.evictable_size_ == h.hot_tokens()
    s = cache.stats()
    assert s.hit_compressed_tokens == aligned and s.miss_tokens > 0


# --- locks, reset, deletion ------------------------------------------------------------------------------------------

def test_lock_accounting_through_compress_split_and_restore(h):
    cache = h.cache
    h.insert(SEQ)
    node = h.node_for(SEQ)
    cache.inc_lock_ref(node)
    assert (cache.evictable_size_, cache.protected_size_) == (0, 32)
    assert h.evict(32) == 0 and node.value is not None  # locked: neither compressed nor deleted
    cache.dec_lock_ref(node)
    assert (cache.evictable_size_, cache.protected_size_) == (32, 0)
    h.evict(32)
    assert (cache.evictable_size_, cache.protected_size_) == (0, 0)
    m = h.match(SEQ[:16])
    indices, first = h.load_back(m)
    h.check()
    assert (cache.evictable_size_, cache.protected_size_) == (16, 0)
    cache.inc_lock_ref(first)
    h.check()
    assert (cache.evictable_size_, cache.protected_size_) == (0, 16)
    m = h.match(SEQ)  # the second half stays compressed below a locked hot parent
    assert m.last_device_node is first and m.host_hit_length == 16
    rest, last = h.load_back(m)
    assert (cache.evictable_size_, cache.protected_size_) == (16, 16)
    cache.inc_lock_ref(last)
    cache.dec_lock_ref(first)
    assert (cache.evictable_size_, cache.protected_size_) == (0, 32)
    cache.dec_lock_ref(last)
    h.check()
    assert (cache.evictable_size_, cache.protected_size_) == (32, 0)
    assert cache.total_size() == 32 and len(cache.all_values_flatten()) == 32


def test_reset_frees_every_slot_and_byte(make_harness):
    h = make_harness(allocator="paged", page_size=4, store_bytes=5000, host_bytes=1 << 14)
    cache = h.cache
    for i in range(4):
        h.insert(other(32, first=1 + 40 * i))
    h.evict(96)
    h.insert(SEQ[:16])
    assert cache.store.used_bytes > 0 and cache.store.host_used_bytes > 0 and cache.evictable_size_ > 0
    handles = cache.store.handles()
    cache.reset()
    h.check()
    assert h.allocator.available_size() == h.capacity
    assert cache.store.used_bytes == 0 and cache.store.host_used_bytes == 0 and cache.store.handles() == []
    assert not any(x.alive for x in handles)
    assert cache.root_node.children == {} and cache.total_size() == 0
    assert (cache.evictable_size_, cache.protected_size_) == (0, 0)
    assert len(cache.all_values_flatten()) == 0


def test_short_leaves_are_deleted_not_compressed(make_harness):
    h = make_harness(allocator="paged", page_size=4, min_compress_tokens=16)
    cache = h.cache
    h.insert(SEQ[:20])  # 20 - 2 sinks - 4 window = 14 compressible < 16
    assert h.evict(20) == 20
    h.check()
    assert cache.store.used_bytes == 0 and h.match(SEQ).host_hit_length == 0
    assert cache.stats().deleted_tokens == 20 and cache.stats().compress_count == 0
    h.insert(SEQ[:24])  # 18 compressible: compressed
    h.evict(24)
    assert h.match(SEQ).host_hit_length == 24


def test_short_inner_nodes_are_compressed_to_keep_their_children(make_harness):
    h = make_harness(allocator="paged", page_size=4, min_compress_tokens=16)
    h.insert(SEQ)
    h.insert(SEQ[:8] + other(24))  # an 8-token inner node under two long children
    h.evict(64)
    h.check()
    inner = h.node_for(SEQ[:8])
    assert inner.value is None and inner.kvtc.count == 8
    assert h.match(SEQ).host_hit_length == 32


def test_a_run_with_a_single_coded_token_round_trips(make_harness):
    h = make_harness(allocator="token", page_size=1, min_compress_tokens=1)
    h.insert(SEQ[:3] + other(8))
    h.insert(SEQ[:3] + other(8, first=60))  # a 3-token inner node: 2 sinks and 1 token left
    h.evict(19)
    inner = h.node_for(SEQ[:3])
    assert inner.value is None
    indices, last = h.load_back(h.match(SEQ[:3]))
    h.check()
    assert last is inner
    h.assert_kv(indices, SEQ[:3], exact=[0, 1])


def test_pretty_print_shows_states(h, capsys):
    h.insert(SEQ)
    h.insert(SEQ[:16] + other(16))
    h.node_for(SEQ).last_access_time -= 10
    h.evict(16)
    h.cache.pretty_print()
    out = capsys.readouterr().out
    assert "compressed blob=" in out and "hot" in out and "#tokens: 32" in out and "KVTC: tokens" in out


# --- observability ---------------------------------------------------------------------------------------------------

class FakeGauge:
    """The prometheus_client.Gauge surface sglang's collectors use: Gauge(name=, documentation=, labelnames=,
    multiprocess_mode=) and .labels(**kw).set(v)."""

    registry: dict = {}

    def __init__(self, name, documentation, labelnames, multiprocess_mode):
        assert multiprocess_mode == "mostrecent" and documentation
        self.name, self.labelnames = name, list(labelnames)
        FakeGauge.registry[name] = self
        self.values = {}

    def labels(self, **labels):
        assert sorted(labels) == sorted(self.labelnames)
        key = tuple(sorted(labels.items()))
        gauge = self

        class _Child:
            def set(self, value):
                gauge.values[key] = value

        return _Child()


def test_stats_arithmetic(make_harness):
    h = make_harness(allocator="paged", page_size=4, store_bytes=1 << 16, host_bytes=1 << 14)
    cache = h.cache
    h.insert(SEQ)
    h.insert(other(32))
    h.node_for(SEQ).last_access_time -= 10
    h.evict(32)
    handle = h.node_for(SEQ).kvtc.handle
    cache.store.demote(handle)
    cache._refresh_cold(h.node_for(SEQ))
    h.insert(other(16, first=100))
    h.evict(16)  # the colder other(32) is compressed
    s = cache.stats()
    row = 2 * 2 * 2 * 16 * 2  # K and V, L=2, H=2, D=16, bf16
    assert (s.hot_tokens, s.compressed_tokens, s.host_tokens, s.cached_tokens) == (16, 32, 32, 80)
    assert s.hot_bytes == 16 * row and s.blob_raw_bytes == 64 * row
    handles = cache.store.handles()
    assert s.num_blobs == 2 and s.blob_bytes == sum(x.nbytes for x in handles)
    assert s.realized_ratio == pytest.approx(64 * row / s.blob_bytes)
    assert s.store_used_bytes == cache.store.used_bytes > 0 and s.host_used_bytes == cache.store.host_used_bytes > 0
    assert s.store_capacity_bytes == 1 << 16 and s.host_capacity_bytes == 1 << 14
    assert (s.compress_count, s.compress_tokens, s.evicted_tokens) == (2, 64, 64)
    req = object()
    cache.match_prefix(compat.MatchPrefixParams(key=h.key(other(32) + other(8, first=200)), req=req))
    cache.match_prefix(compat.MatchPrefixParams(key=h.key(SEQ), req=req))
    cache.match_prefix(compat.MatchPrefixParams(key=h.key(other(16, first=100)), req=req))
    cache.match_prefix(compat.MatchPrefixParams(key=h.key(SEQ)))  # no request: not a counted lookup
    s = cache.stats()
    assert (s.hit_hot_tokens, s.hit_compressed_tokens, s.hit_host_tokens, s.miss_tokens) == (16, 32, 32, 8)
    assert s.hit_rate == pytest.approx(80 / 88)
    s.reset_counters()
    assert s.compress_count == 0 and s.hit_rate == 0.0 and s.hot_tokens == 16
    assert set(s.as_dict()) >= {"realized_ratio", "hit_rate", "cached_tokens", "integrity_failures"}


def test_log_line_and_prometheus_gauges(make_harness, caplog):
    from kvtc_sglang.cache.metrics import KVTCStats, PrometheusExporter, StatsLogger, format_bytes

    h = make_harness(allocator="paged", page_size=1, stats_interval_s=0.0)
    with caplog.at_level(logging.INFO, logger="kvtc_sglang.cache.metrics"):
        h.insert(SEQ)
        h.evict(32)
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KVTC: tokens")][-1]
    assert "hot=0 compressed=32 host=0" in line and "compress 1 (32 tok" in line and "ratio" in line
    assert "\n" not in line
    assert (format_bytes(512), format_bytes(3584), format_bytes(3 << 30)) == ("512 B", "3.5 KiB", "3.0 GiB")

    now = [100.0]
    exporter = PrometheusExporter({"cache_type": "KVTCRadixCache", "tp_rank": "0"}, gauge_cls=FakeGauge)
    logger_ = StatsLogger(interval_s=10.0, exporter=exporter, clock=lambda: now[0])
    assert not logger_.due()
    now[0] += 10.0
    assert logger_.due()
    stats = h.cache.stats()
    logger_.report(stats)
    assert not logger_.due()
    key = (("cache_type", "KVTCRadixCache"), ("tp_rank", "0"))
    assert FakeGauge.registry["sglang:kvtc_compressed_tokens"].values[key] == 32
    assert FakeGauge.registry["sglang:kvtc_realized_ratio"].values[key] == pytest.approx(stats.realized_ratio)
    assert set(FakeGauge.registry) >= {"sglang:kvtc_" + name for name in KVTCStats().as_dict()}


def test_prometheus_is_optional(monkeypatch, caplog):
    import builtins

    from kvtc_sglang.cache.metrics import PrometheusExporter

    real_import = builtins.__import__

    def no_prometheus(name, *args, **kwargs):
        if name == "prometheus_client":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prometheus)
    with caplog.at_level(logging.WARNING):
        assert PrometheusExporter.create({"cache_type": "x"}) is None
    assert "prometheus_client is not installed" in caplog.text


def test_a_codec_for_another_shape_is_refused(make_harness, artifact):
    from kvtc_sglang.cache.radix_cache import KVTCRadixCache
    from kvtc_sglang.codec.errors import ShapeError

    h = make_harness(allocator="paged", page_size=1)
    pool = compat.MHATokenToKVPool(size=64, page_size=1, dtype=torch.bfloat16, head_num=2, head_dim=32, layer_num=2,
                                   device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    allocator = compat.TokenToKVPoolAllocator(size=64, dtype=torch.bfloat16, device="cpu", kvcache=pool,
                                              need_sort=False)
    params = compat.CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator,
                                    page_size=1)
    with pytest.raises(ShapeError, match=r"\[2, 2, 32\].*\[2, 2, 16\]"):
        KVTCRadixCache(params, h.cache.pool_codec, h.options, 1 << 16)
