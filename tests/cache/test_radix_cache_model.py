"""Randomized model-based test of KVTCRadixCache against sglang 0.5.17's CPU pool and allocators.

A seeded driver runs requests the way sglang's scheduler does (match with the request, lock the hot prefix,
init_load_back, allocate and write the rest, cache_unfinished_req / cache_finished_req) mixed with evictions under
memory pressure, split-inducing lookups, blob corruption and resets, over a small pool and a store that fills up.
After EVERY step it checks:

* the cache's own invariants (``check_consistency``) and, recomputed here from the tree: ``evictable_size_`` /
  ``protected_size_``, allocator free size + hot tokens + tokens held by live requests == capacity, and the store's
  device/host bytes == the page-rounded sizes of the blobs the tree references;
and after every served or looked-up prefix:

* its K/V equals what was written for those tokens within the codec's bound, bit-exact at sink positions and at the
  positions the restored blobs declare exact (sinks and the recent window);
* it is no longer than the longest prefix shared with a sequence ever inserted (the reference model);
* a load-back stops exactly before the first node whose blob was corrupted (or restores nothing when no memory could
  be found), and the corrupted node is gone afterwards.

At the end every request is released and the cache reset: the allocator is full and the store empty.

The pool is float32 so that restoring, re-compressing and restoring again stays within the one-pass bound (with a
16-bit pool each pass adds the pool's rounding).
"""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
import torch

from kvtc_sglang import sglang_compat as compat  # imports sglang lazily

pytestmark = pytest.mark.sglang

ALPHABET = 12  # token ids 1..12: random extensions of shared prefixes keep branching and splitting the tree
MAX_LEN = 48
MAX_LIVE = 4

# (seed, allocator, page size, need_sort, store bytes, host bytes, min_compress_tokens, eviction policy, steps):
# 42,000 steps in all.
RUNS = [
    (0, "token", 1, False, 12 << 10, 0, 4, "lru", 6000),
    (1, "paged", 1, True, 8 << 10, 16 << 10, 4, "lru", 6000),
    (2, "paged", 4, False, 12 << 10, 12 << 10, 8, "lru", 6000),
    (3, "paged", 4, True, 20 << 10, 0, 4, "lru", 6000),
    (4, "token", 1, True, 64 << 10, 8 << 10, 16, "lru", 6000),
    (5, "paged", 4, False, 16 << 10, 16 << 10, 4, "lfu", 6000),
    (6, "token", 1, False, 8 << 10, 8 << 10, 4, "fifo", 6000),
]


class Trie:
    """Every key ever inserted into the cache; ``lcp`` bounds what any lookup may return."""

    def __init__(self):
        self.root: dict = {}

    def add(self, tokens) -> None:
        node = self.root
        for t in tokens:
            node = node.setdefault(t, {})

    def lcp(self, tokens) -> int:
        node, n = self.root, 0
        for t in tokens:
            if t not in node:
                break
            node, n = node[t], n + 1
        return n


class Driver:
    def __init__(self, h, requests, seed: int):
        self.h = h
        self.req = requests
        self.rng = random.Random(seed)
        self.live: list = []
        self.trie = Trie()
        self.sequences: list[list[int]] = []
        self.corrupted: set = set()
        # Prefixes whose last position was ever restored from coded (lossy) rows. A position stored exact in a blob
        # is a bit copy of the row the pool held when it was compressed, which is the original row unless that
        # position had been restored lossily before.
        self.lossy: set[tuple] = set()
        self.ops: Counter = Counter()
        self.sink = h.options.sink_tokens

    # --- helpers --------------------------------------------------------------------------------------------------
    def private(self) -> int:
        return sum(r.private_tokens for r in self.live)

    def check(self) -> None:
        self.h.check(private_tokens=self.private())

    def new_sequence(self) -> list[int]:
        rng = self.rng
        prefix: list[int] = []
        if self.sequences and rng.random() < 0.8:
            base = rng.choice(self.sequences)
            prefix = base[:rng.randint(0, len(base))]
        ext = [rng.randint(1, ALPHABET) for _ in range(rng.randint(1, 24))]
        seq = (prefix + ext)[:MAX_LEN]
        return seq if len(seq) >= 2 else seq + [1]

    def remember(self, tokens) -> None:
        aligned = len(tokens) // self.h.page_size * self.h.page_size
        self.trie.add(tokens[:aligned])
        self.sequences.append(list(tokens))

    def assert_prefix(self, indices, tokens, exact_positions=()) -> None:
        """In bound everywhere, bit-exact at sinks and at declared-exact positions whose rows were never lossy."""
        n = len(indices)
        assert n <= self.trie.lcp(tokens), "a lookup returned tokens that were never inserted"
        exact = {p for p in range(min(self.sink, n))}
        exact |= {p for p in exact_positions if p < n and tuple(tokens[:p + 1]) not in self.lossy}
        self.h.assert_kv(indices, tokens[:n], exact=sorted(exact))

    def live_corrupted(self) -> set:
        self.corrupted = {hd for hd in self.corrupted if hd.alive}
        return self.corrupted

    # --- operations -----------------------------------------------------------------------------------------------
    def serve(self) -> None:
        if len(self.live) >= MAX_LIVE:
            return self.finish()
        tokens = self.new_sequence()
        cache = self.h.cache
        failures = cache.kvtc_counters.integrity_failures
        bad = self.live_corrupted()
        req, info = self.req.admit(self.h, tokens)
        chain = info.chain
        first_bad = next((i for i, hd in enumerate(info.handles) if hd in bad), len(chain))
        expected = sum(len(n.key) for n in chain[:first_bad])
        restored = 0 if info.restored is None else len(info.restored)
        assert restored in (0, expected), (restored, expected)
        detected = cache.kvtc_counters.integrity_failures - failures
        if first_bad < len(chain):
            # the restore either ran and stopped before the corrupted node, which is gone now, or found no memory
            # (nothing restored, nothing dropped)
            ran = restored > 0 or detected > 0
            assert detected == int(ran) and cache._is_attached(chain[first_bad]) != ran
        else:
            assert detected == 0
        if req is None:
            self.ops["serve_no_memory"] += 1
            return
        self.assert_prefix(req.prefix_indices, tokens, info.exact_positions)
        hot = len(info.match.device_indices)
        for p in range(hot, hot + restored):
            if p not in info.exact_positions:
                self.lossy.add(tuple(tokens[:p + 1]))
        self.live.append(req)
        self.ops["serve"] += 1
        if self.rng.random() < 0.5:
            self.finish(req)

    def finish(self, req=None) -> None:
        if not self.live:
            return
        req = req or self.rng.choice(self.live)
        self.live.remove(req)
        self.req.finish(self.h, req)
        self.remember(list(req.origin_input_ids))
        self.ops["finish"] += 1

    def checkpoint(self) -> None:
        if not self.live:
            return
        req = self.rng.choice(self.live)
        self.req.checkpoint(self.h, req)
        self.remember(list(req.origin_input_ids))
        tokens = list(req.origin_input_ids)
        assert len(req.prefix_indices) == len(tokens)
        self.h.assert_kv(req.prefix_indices, tokens, exact=range(min(self.sink, len(tokens))))
        self.ops["checkpoint"] += 1

    def evict(self) -> None:
        n = self.rng.randint(1, self.h.capacity // 2)
        before = self.h.cache.evictable_size_
        freed = self.h.evict(n)
        assert freed >= min(n, before) and self.h.cache.evictable_size_ == before - freed
        self.ops["evict"] += 1

    def lookup(self) -> None:
        if not self.sequences:
            return
        base = self.rng.choice(self.sequences)
        tokens = base[:self.rng.randint(1, len(base))] + [self.rng.randint(1, ALPHABET)
                                                          for _ in range(self.rng.randint(0, 4))]
        req = object() if self.rng.random() < 0.5 else None
        m = self.h.match(tokens, req=req)
        assert len(m.device_indices) + m.host_hit_length <= self.trie.lcp(tokens)
        self.assert_prefix(m.device_indices, tokens)
        self.ops["lookup"] += 1

    def corrupt(self) -> None:
        handles = self.h.cache.store.handles()
        if not handles:
            return
        handle = self.rng.choice(handles)
        store = self.h.cache.store
        arena = store.arena if handle.tier == "device" else store.host
        page, offset = divmod(self.rng.randrange(handle.nbytes), store.page_bytes)
        arena.data.view(-1, store.page_bytes)[int(handle.pages_cpu[page]), offset] ^= 1 << self.rng.randrange(8)
        self.corrupted.add(handle)
        self.ops["corrupt"] += 1

    def reset(self) -> None:
        if self.live:
            return
        self.h.cache.reset()
        assert self.h.allocator.available_size() == self.h.capacity
        assert self.h.cache.store.used_bytes == 0 and self.h.cache.store.host_used_bytes == 0
        self.ops["reset"] += 1

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.40:
            self.serve()
        elif r < 0.55:
            self.finish()
        elif r < 0.62:
            self.checkpoint()
        elif r < 0.77:
            self.evict()
        elif r < 0.92:
            self.lookup()
        elif r < 0.99:
            self.corrupt() if self.rng.random() < 0.4 else self.evict()
        else:
            self.reset()
        self.check()

    def release_everything(self) -> None:
        while self.live:
            self.finish(self.live[0])
            self.check()
        self.h.cache.reset()
        self.check()
        cache = self.h.cache
        assert self.h.allocator.available_size() == self.h.capacity
        assert cache.store.used_bytes == 0 and cache.store.host_used_bytes == 0 and cache.store.handles() == []
        assert (cache.evictable_size_, cache.protected_size_, cache.total_size()) == (0, 0, 0)


@pytest.mark.parametrize("seed, allocator, page_size, need_sort, store_bytes, host_bytes, min_compress, policy, steps",
                         RUNS, ids=[f"seed{r[0]}-{r[1]}-p{r[2]}-{r[7]}" for r in RUNS])
def test_random_operations_keep_every_invariant(make_harness, requests, seed, allocator, page_size, need_sort,
                                                store_bytes, host_bytes, min_compress, policy, steps):
    h = make_harness(allocator=allocator, page_size=page_size, need_sort=need_sort, pool_tokens=160,
                     store_bytes=store_bytes, host_bytes=host_bytes, page_bytes=256, dtype=torch.float32,
                     eviction_policy=policy, min_compress_tokens=min_compress)
    driver = Driver(h, requests, seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        driver.step()
    driver.release_everything()
    s = h.cache.stats()
    print(f"seed {seed}: {steps} steps in {time.perf_counter() - t0:.1f}s; ops {dict(driver.ops)}; "
          f"compress {s.compress_count} decompress {s.decompress_count} demotions {s.demotions} drops {s.drops} "
          f"integrity failures {s.integrity_failures} revived {s.revived_tokens} deleted {s.deleted_tokens}")
    # the run exercised what it is meant to
    assert s.compress_count > 50 and s.decompress_count > 20 and driver.ops["serve"] > 200
    assert s.integrity_failures > 0 or driver.ops["corrupt"] == 0
    if host_bytes:
        assert s.demotions > 0
