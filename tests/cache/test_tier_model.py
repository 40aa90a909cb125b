"""Randomized model-based test of the compressed tier in the pool's own slots, against sglang 0.5.17's CPU pool and
allocators, with the side streams' work deferred (it runs only when the driver lets the "GPU" progress).

A seeded driver runs requests the way SGLang's scheduler does (match with the request, lock, init_load_back, the
batch forms: start_loading, allocate and write the rest; cache_finished_req / cache_unfinished_req) mixed with
scheduler steps (acknowledgements, compression ahead of eviction), GPU progress (deferred encodes and decodes run),
evictions under memory pressure, lookups that split nodes, binding corruption, injected faults at every point of
the tier and the codec, and resets, over a small pool. Deferred work reads the pool when it runs, not when it was
launched, so any slot or blob row released before the work reading it ran would surface as wrong KV.

After EVERY step:
* the cache's own consistency check (states, blob refcounts, readers/writers, every slot held once and not free);
* SGLang's pool invariant, with its own checker's arithmetic: available + evictable + protected + uncached ==
  total (uncached = the live requests' private slots);
and after every served request or lookup:
* every prefix row is the KV written for its token (bit-exact, or restored from a coded token), bit-exact at
  sink positions; no prefix is longer than the longest prefix shared with an inserted sequence;
at the end: every request released, work drained, the cache reset: the allocator is full.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest
import torch

compat = pytest.importorskip("kvtc_sglang.sglang_compat")
if compat.installed_sglang_version() != compat.SUPPORTED_SGLANG_VERSION:
    pytest.skip(f"needs sglang=={compat.SUPPORTED_SGLANG_VERSION}", allow_module_level=True)

from kvtc_sglang.cache import faults  # noqa: E402
from kvtc_sglang.cache.tier_state import COLD_STATES, state_of  # noqa: E402

pytestmark = pytest.mark.sglang

ALPHABET = 12
MAX_LIVE = 4
# Faults the deferred model can contain the way a GPU server does ("codec.decode_layers" raises inside deferred
# work, after the batch read the slots: the fault tests cover it in inline mode, where it raises at launch).
FAULT_POINTS = list(faults.TIER_POINTS) + ["codec.encode", "codec.decode_begin"]

# (seed, allocator, page size, host bytes, in-place mode, eviction policy, steps)
RUNS = [
    (0, "token", 1, 0, "scratch", "lru", 5000),
    (1, "paged", 16, 0, "scratch", "lru", 5000),
    (2, "paged", 1, 1 << 14, None, "lfu", 2500),
    (3, "paged", 16, 1 << 15, "direct", "lru", 2500),
]


def model_config(allocator: str, page_size: int, host_bytes: int, in_place, policy: str) -> dict:
    return dict(allocator=allocator, page_size=page_size, pool_tokens=192 if page_size == 1 else 48 * 16,
                transfer_mode="deferred", in_place=in_place, host_bytes=host_bytes, eviction_policy=policy,
                coded_bytes_per_token=24, compress_ahead_watermark=0.3,
                min_compress_tokens=4 if page_size == 1 else 8)


class Trie:
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
        self.ops: Counter = Counter()
        self.sink = h.options.sink_tokens
        self.ps = h.page_size
        self.max_len = 12 * self.ps if self.ps > 1 else 48

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
        ext = [rng.randint(1, ALPHABET) for _ in range(rng.randint(1, 4 * self.ps + 12))]
        seq = (prefix + ext)[:self.max_len]
        return seq if len(seq) >= 2 else seq + [1]

    def remember(self, tokens) -> None:
        aligned = len(tokens) // self.ps * self.ps
        self.trie.add(tokens[:aligned])
        self.sequences.append(list(tokens))

    def assert_prefix(self, indices, tokens) -> None:
        n = len(indices)
        assert n <= self.trie.lcp(tokens), "a lookup returned tokens that were never inserted"
        self.h.assert_kv(indices, tokens[:n], exact=range(min(self.sink, n)))

    # --- operations -----------------------------------------------------------------------------------------------
    def serve(self) -> None:
        if len(self.live) >= MAX_LIVE:
            return self.finish()
        tokens = self.new_sequence()
        req, info = self.req.admit(self.h, tokens)
        if req is None:
            self.ops["serve_no_memory"] += 1
            return
        if getattr(req, "kvtc_aborted", False):
            self.ops["serve_aborted"] += 1
        else:
            self.assert_prefix(req.prefix_indices, tokens)
        self.live.append(req)
        self.ops["serve"] += 1
        if info.restored is not None and len(info.restored):
            self.ops["restored"] += 1
        if self.rng.random() < 0.5:
            self.finish(req)

    def finish(self, req=None) -> None:
        if not self.live:
            return
        req = req or self.rng.choice(self.live)
        self.live.remove(req)
        self.req.finish(self.h, req)
        if not getattr(req, "kvtc_aborted", False):
            self.remember(list(req.origin_input_ids))
        self.ops["finish"] += 1

    def checkpoint(self) -> None:
        live = [r for r in self.live if not getattr(r, "kvtc_aborted", False)]
        if not live:
            return
        req = self.rng.choice(live)
        self.req.checkpoint(self.h, req)
        self.remember(list(req.origin_input_ids))
        tokens = list(req.origin_input_ids)
        self.h.assert_kv(req.prefix_indices[:len(tokens)], tokens[:len(req.prefix_indices)],
                         exact=range(min(self.sink, len(tokens))))
        self.ops["checkpoint"] += 1

    def evict(self) -> None:
        n = self.rng.randint(1, self.h.capacity // 4)
        cache = self.h.cache
        before = cache.evictable_size()
        freed = self.h.evict(n)
        assert freed >= min(n, before), (freed, n, before)
        self.ops["evict"] += 1

    def lookup(self) -> None:
        if not self.sequences:
            return
        base = self.rng.choice(self.sequences)
        tokens = base[:self.rng.randint(1, len(base))] + [self.rng.randint(1, ALPHABET)
                                                          for _ in range(self.rng.randint(0, 4))]
        m = self.h.match(tokens, req=object() if self.rng.random() < 0.5 else None)
        assert len(m.device_indices) + m.host_hit_length <= self.trie.lcp(tokens)
        self.h.gpu("load")  # a reader of slots waits for the loads queued before it (the forward's per-layer wait)
        self.assert_prefix(m.device_indices, tokens)
        self.ops["lookup"] += 1

    def step(self) -> None:
        self.h.cache.step()
        self.ops["step"] += 1

    def progress(self) -> None:
        self.ops["gpu_items"] += self.h.gpu(None, self.rng.randint(1, 3))

    def corrupt_binding(self) -> None:
        """A bookkeeping bug stand-in: a blob's token ids no longer match its nodes (load-back must catch it)."""
        cold = [n for n in self.h.cache._iter_nodes() if state_of(n) in COLD_STATES]
        if not cold:
            return
        blob = self.rng.choice(cold).kvtc_ref.blob
        if len(blob.token_ids):
            i = self.rng.randrange(len(blob.token_ids))
            blob.token_ids[i] = blob.token_ids[i] + 100
            self.ops["corrupt_binding"] += 1

    def fault(self) -> None:
        point = self.rng.choice(FAULT_POINTS)
        faults.arm(point, self.rng.choice(faults.KINDS), times=1)
        self.ops["fault_armed"] += 1

    def reset(self) -> None:
        if self.live:
            return
        self.h.cache.reset()
        assert self.h.allocator.available_size() == self.h.capacity
        self.ops["reset"] += 1

    def step_random(self) -> None:
        r = self.rng.random()
        if r < 0.30:
            self.serve()
        elif r < 0.40:
            self.finish()
        elif r < 0.45:
            self.checkpoint()
        elif r < 0.55:
            self.evict()
        elif r < 0.65:
            self.lookup()
        elif r < 0.78:
            self.step()
        elif r < 0.93:
            self.progress()
        elif r < 0.95:
            self.corrupt_binding()
        elif r < 0.995:
            self.fault()
        else:
            self.reset()
        self.check()

    def release_everything(self) -> None:
        faults.disarm()
        while self.live:
            self.finish(self.live[0])
            self.check()
        self.h.cache.drain()
        self.check()
        self.h.cache.reset()
        self.check()
        cache = self.h.cache
        assert self.h.allocator.available_size() == self.h.capacity
        assert cache.blobs.blobs() == [] and cache.host.used_bytes == 0
        assert (cache.evictable_size(), cache.protected_size(), cache.total_size()) == (0, 0, 0)


@pytest.mark.parametrize("seed, allocator, page_size, host_bytes, in_place, policy, steps", RUNS,
                         ids=[f"seed{r[0]}-{r[1]}-p{r[2]}-{r[4]}-host{r[3]}" for r in RUNS])
def test_random_operations_keep_every_invariant(make_tier, requests, seed, allocator, page_size, host_bytes,
                                                in_place, policy, steps):
    faults.disarm()
    compat.TreeNode.counter = 0  # node ids break ties in the eviction order: the same run whatever ran before
    h = make_tier(**model_config(allocator, page_size, host_bytes, in_place, policy))
    driver = Driver(h, requests, seed)
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            driver.step_random()
        driver.release_everything()
    finally:
        faults.disarm()
    s = h.cache.stats()
    print(f"seed {seed}: {steps} steps in {time.perf_counter() - t0:.1f}s; ops {dict(driver.ops)}; "
          f"compress {s.compress_count} (ahead {s.compress_ahead_count}, at evict {s.compress_at_evict_count}) "
          f"restored {s.decompress_count} drops {s.drops} failures {s.failures} integrity {s.integrity_failures} "
          f"spills {s.spills} promotions {s.promotions}")
    assert s.compress_ahead_count > 50 and s.compress_at_evict_count > 5 and s.decompress_count > 20
    assert driver.ops["serve"] > steps // 10 and s.failures > 5 and s.failures_load + s.integrity_failures > 0
    if host_bytes:
        assert s.spills > 0
