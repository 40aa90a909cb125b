"""Tensor parallelism: two TP ranks' KVTCRadixCaches take identical tree decisions although their blobs differ.

Two CPU processes (torch.multiprocessing spawn, gloo on 127.0.0.1) stand for two TP ranks. Each builds a
KVTCRadixCache over its own CPU sglang pool with its own calibration artifact (a different basis per rank, as two ranks
holding different KV heads have) and its own KV data (different statistics per rank), so the same tokens give blobs of
different sizes on the two ranks, each rank's being the larger one for some nodes. The cache gets the TP CPU group the way sglang hands it over (``CacheInitParams.tp_cache_group``, a gloo
ProcessGroup) and agrees on blob page counts, integrity failures and store capacities through it.

Both ranks run the same seeded sequence of operations: requests admitted the scheduler's way (match, lock,
init_load_back, allocate, write; cache_finished_req / cache_unfinished_req), lookups that split nodes, explicit
lock/unlock, evictions under memory pressure over a small pool and a store small enough that blobs are demoted to the
host tier and dropped, resets, and bit flips in a blob on ONE rank only (the other rank reads a good blob and must
still drop the same node). After every step each rank describes its tree canonically (each node's key, state, lock
count, pins, slots, blob reference and reserved pages; the evictable/protected sizes, allocator and store free space,
the eviction and demotion orders and the decision counters) and the ranks compare the descriptions' digests.

``test_tp_ranks_take_identical_decisions`` asserts the descriptions were identical after every step, that the blob
sizes (and the page counts they need on their own) really differed between the ranks, and that corruption detected by
one rank only made both drop the node. The negative controls run the same drive with the agreement made the identity
(``_agree_max`` returning its argument) and assert that the trees then diverge: once from the blob sizes alone, once
from a one-rank corruption alone (both ranks then use the same artifact and data, so their blobs are identical).

``test_tp_calibration_cards`` checks the per-rank calibration of ``kvtc-sglang calibrate --tp-size 2`` on a tiny
synthetic KV source and that the startup checks refuse another rank's card and a tp1 card under tp 2.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pickle
import random
import socket
import time
import traceback
import zlib
from collections import Counter

import pytest
import torch

WORLD = 2
PAGE_BYTES = 64  # small store pages: a few bytes of difference between the ranks' blobs change their page counts
POOL_TOKENS = 160
ALPHABET = 12
MAX_LEN = 48
MAX_LIVE = 4
MAX_LOCKS = 3
COLLECTIVE_TIMEOUT_S = 30  # a collective waiting longer (a rank stuck or out of step) raises instead of hanging
TOTAL_TIMEOUT_S = 240  # the parent kills the ranks and fails after this

# Agreed drives: (name, allocator, page size, eviction policy, store bytes, host bytes, steps).
# Rank 1 gets a slightly larger store and host budget than rank 0: the cache agrees on the smaller one.
AGREED_RUNS = [
    ("token-p1-lru-host", "token", 1, "lru", 6 << 10, 6 << 10, 1000),
    ("paged-p4-lfu-nohost", "paged", 4, "lfu", 8 << 10, 0, 1000),
    ("paged-p2-fifo-host", "paged", 2, "fifo", 6 << 10, 4 << 10, 1000),
]
# Negative controls (agreement off; equal budgets): (name, allocator, page size, policy, store, host, max steps,
# per-rank artifacts and data, corruption ops).
NEGATIVE_RUNS = [
    ("blob-sizes", "token", 1, "lru", 6 << 10, 6 << 10, 300, True, False),
    ("one-rank-corruption", "token", 1, "lru", 6 << 10, 6 << 10, 400, False, True),
]


# --- per-rank setup --------------------------------------------------------------------------------------------------

def rank_artifact(rank: int):
    """The synthetic artifact of ``rank`` (its own basis; a card for tp_size 2, this rank)."""
    from tests.cache.conftest import make_artifact

    art = make_artifact(seed=10 * rank)
    art.tp_size, art.tp_rank = WORLD, rank
    return art


def rank_kv(art, rank: int):
    """KV data of ``rank``: the conftest KVData (its own random coefficients), with all-zero K/V rows for the odd token
    ids on rank 0 and the even ones on rank 1 (heads of different ranks have different statistics; zero rows cost
    almost nothing after the entropy stage). Which rank's blob of a node is larger then depends on the node's tokens,
    so each rank is the one needing more pages for some nodes."""
    from tests.cache.conftest import KVData

    kv = KVData(art, seed=1 + rank)
    quiet = torch.arange(kv.vocab) % 2 == (1 - rank)
    for kind in ("k", "v"):
        kv.coef[kind][quiet] = 0
    kv.k_pre[quiet] = 0
    kv.v[quiet] = 0
    return kv


def tp_harness(rank: int, group, allocator: str, page_size: int, policy: str, store_bytes: int, host_bytes: int,
               per_rank: bool):
    """A conftest Harness whose cache is a KVTCRadixCache given ``group`` as sglang's ``tp_cache_group``."""
    from kvtc_sglang import sglang_compat as compat
    from kvtc_sglang.cache.radix_cache import KVTCRadixCache
    from kvtc_sglang.codec.pool_codec import ReferencePoolCodec
    from tests.cache.conftest import Harness

    data_rank = rank if per_rank else 0
    art = rank_artifact(data_rank)
    h = Harness(art, allocator=allocator, page_size=page_size, pool_tokens=POOL_TOKENS, store_bytes=store_bytes,
                host_bytes=host_bytes, page_bytes=PAGE_BYTES, eviction_policy=policy, kv=rank_kv(art, data_rank),
                min_compress_tokens=4)
    # The Harness's own cache has no TP group; the ranks use one built as sglang builds it (the empty cache it
    # replaces holds no slots).
    params = compat.CacheInitParams(disable=False, req_to_token_pool=h.req_to_token_pool,
                                    token_to_kv_pool_allocator=h.allocator, page_size=page_size,
                                    eviction_policy=policy, tp_cache_group=group)
    h.cache = KVTCRadixCache(params, ReferencePoolCodec(h.codec), h.options, store_bytes, host_budget_bytes=host_bytes,
                             page_bytes=PAGE_BYTES)
    return h


# --- the canonical description of a rank's tree ----------------------------------------------------------------------

def describe(h, live, locks) -> list:
    """Everything that must be identical on every rank, as plain ints/strings, in a rank-independent order.

    Node ids are taken relative to the root's (TreeNode ids come from a process-wide counter); LRU timestamps are
    per-rank clocks, so only the eviction order they induce is compared.
    """
    cache = h.cache
    base = cache.root_node.id
    out: list = []

    def walk(node, depth):
        for ck in sorted(node.children, key=repr):
            child = node.children[ck]
            ref = getattr(child, "kvtc", None)
            blob = None
            if ref is not None:
                hd = ref.handle
                blob = (hd.id, hd.tier, hd.num_pages, hd.refcount, ref.blob_start, ref.blob_tokens, ref.offset,
                        ref.count)
            slots = tuple(child.value.tolist()) if child.value is not None else None
            out.append(("node", depth, child.id - base, tuple(child.key), cache._state(child), child.lock_ref,
                        getattr(child, "kvtc_pin", 0), slots, blob))
            walk(child, depth + 1)

    walk(cache.root_node, 0)
    priority = cache.eviction_strategy.get_priority

    def order(nodes):
        return [n.id - base for n in sorted(nodes, key=lambda n: (priority(n), n.id))]

    store = cache.store
    c = cache.kvtc_counters
    out.append(("sizes", cache.evictable_size_, cache.protected_size_, cache.total_size(),
                h.allocator.available_size()))
    out.append(("store", store.capacity_pages, store.free_pages, store.host_capacity_bytes, store.host_free_pages,
                tuple((hd.id, hd.tier, hd.num_pages, hd.refcount) for hd in store.handles())))
    out.append(("evict order", order(cache.evictable_leaves)))
    out.append(("demote order", order(cache._device_cold_leaves)))
    out.append(("host drop order", order(cache._host_cold_leaves)))
    out.append(("counters", c.compress_count, c.compress_tokens, c.demotions, c.drops, c.dropped_tokens,
                c.deleted_tokens, c.evicted_tokens, c.revived_tokens, c.integrity_dropped_tokens, c.hit_hot_tokens,
                c.hit_compressed_tokens, c.hit_host_tokens, c.miss_tokens))
    out.append(("requests", tuple((len(r.prefix_indices), r.last_node.id - base, r.private_tokens) for r in live)))
    out.append(("locks", tuple(n.id - base for n in locks)))
    return out


def structure(desc: list) -> list:
    """The tree decisions alone: which nodes exist (depth and key) and their states."""
    return [(e[1], e[3], e[4]) for e in desc if e[0] == "node"]


def _digest(obj) -> int:
    return int.from_bytes(hashlib.sha256(repr(obj).encode()).digest()[:8], "little", signed=True)


def first_difference(a: list, b: list) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"entry {i}: rank 0 {x!r} / rank 1 {y!r}"
    return f"lengths: rank 0 {len(a)} entries / rank 1 {len(b)}"


# --- the driver ------------------------------------------------------------------------------------------------------

class Driver:
    """A seeded operation sequence; every random draw is independent of rank-local quantities (blob byte sizes)."""

    def __init__(self, h, rank: int, seed: int, corrupt: bool):
        from tests.cache import conftest

        self.h = h
        self.rank = rank
        self.rng = random.Random(seed)
        self.req = conftest
        self.live: list = []
        self.locks: list = []
        self.sequences: list[list[int]] = []
        self.allow_corrupt = corrupt
        self.ops: Counter = Counter()
        self.step_ops: list[str] = []

    def private(self) -> int:
        return sum(r.private_tokens for r in self.live)

    def new_sequence(self) -> list[int]:
        rng = self.rng
        prefix: list[int] = []
        if self.sequences and rng.random() < 0.8:
            base = rng.choice(self.sequences)
            prefix = base[:rng.randint(0, len(base))]
        seq = (prefix + [rng.randint(1, ALPHABET) for _ in range(rng.randint(1, 24))])[:MAX_LEN]
        return seq if len(seq) >= 2 else seq + [1]

    def serve(self) -> None:
        if len(self.live) >= MAX_LIVE:
            return self.finish()
        req, info = self.req.admit(self.h, self.new_sequence())
        if req is None:
            self._did("serve_no_memory")
            return
        if info.restored is not None and len(info.restored):
            self._did("load_back")
        self.live.append(req)
        self._did("serve")
        if self.rng.random() < 0.5:
            self.finish(req)

    def finish(self, req=None) -> None:
        if not self.live:
            return
        req = req or self.rng.choice(self.live)
        self.live.remove(req)
        self.req.finish(self.h, req)
        self.sequences.append(list(req.origin_input_ids))
        self._did("finish")

    def checkpoint(self) -> None:
        if not self.live:
            return
        req = self.rng.choice(self.live)
        self.req.checkpoint(self.h, req)
        self.sequences.append(list(req.origin_input_ids))
        self._did("checkpoint")

    def evict(self) -> None:
        self.h.evict(self.rng.randint(1, self.h.capacity // 2))
        self._did("evict")

    def lookup(self) -> None:
        if not self.sequences:
            return
        base = self.rng.choice(self.sequences)
        tokens = base[:self.rng.randint(1, len(base))] + [self.rng.randint(1, ALPHABET)
                                                          for _ in range(self.rng.randint(0, 4))]
        self.h.match(tokens, req=object() if self.rng.random() < 0.5 else None)
        self._did("lookup")

    def lock(self) -> None:
        if self.locks and (len(self.locks) >= MAX_LOCKS or self.rng.random() < 0.5):
            node = self.locks.pop(self.rng.randrange(len(self.locks)))
            self.h.cache.dec_lock_ref(node)
            self._did("unlock")
            return
        if not self.sequences:
            return
        m = self.h.match(self.rng.choice(self.sequences))
        if m.last_device_node is self.h.cache.root_node:
            return
        self.h.cache.inc_lock_ref(m.last_device_node)
        self.locks.append(m.last_device_node)
        self._did("lock")

    def corrupt(self) -> None:
        """Flip one bit of a blob on one rank (both ranks draw the same numbers; only the victim flips)."""
        store = self.h.cache.store
        handles = store.handles()
        if not handles:
            return
        handle = self.rng.choice(handles)
        where, bit, victim = self.rng.random(), self.rng.randrange(8), self.rng.randrange(WORLD)
        self._did("corrupt")
        if self.rank != victim:
            return
        arena = store.arena if handle.tier == "device" else store.host
        page, offset = divmod(int(where * handle.nbytes), store.page_bytes)
        arena.data.view(-1, store.page_bytes)[int(handle.pages_cpu[page]), offset] ^= 1 << bit

    def reset(self) -> None:
        if self.live or self.locks:
            return
        self.h.cache.reset()
        self._did("reset")

    def _did(self, op: str) -> None:
        self.ops[op] += 1
        self.step_ops.append(op)

    @property
    def last_op(self) -> str:
        """The operations of the last step."""
        return "+".join(self.step_ops) or "nothing"

    def step(self) -> None:
        self.step_ops = []
        r = self.rng.random()
        if r < 0.38:
            self.serve()
        elif r < 0.50:
            self.finish()
        elif r < 0.56:
            self.checkpoint()
        elif r < 0.68:
            self.evict()
        elif r < 0.80:
            self.lookup()
        elif r < 0.88:
            self.lock()
        elif r < 0.99:
            self.corrupt() if self.allow_corrupt and self.rng.random() < 0.5 else self.evict()
        else:
            self.reset()
        self.check()

    def check(self) -> None:
        """The cache's invariants (check_consistency compares the store with the blobs' agreed page reservations,
        which may exceed a rank's own need) and the allocator's: free + hot + held by live requests == capacity."""
        cache = self.h.cache
        cache.check_consistency()
        held = cache.evictable_size_ + cache.protected_size_ + self.private()
        assert self.h.allocator.available_size() + held == self.h.capacity

    def release_everything(self) -> None:
        while self.live:
            self.finish(self.live[0])
        while self.locks:
            self.h.cache.dec_lock_ref(self.locks.pop())
        self.check()
        self.h.cache.reset()
        self.check()
        store = self.h.cache.store
        assert self.h.allocator.available_size() == self.h.capacity
        assert store.used_bytes == 0 and store.host_used_bytes == 0 and store.handles() == []


def drive(rank: int, tp_group, name: str, allocator: str, page_size: int, policy: str, store_bytes: int,
          host_bytes: int, steps: int, *, agree: bool, per_rank: bool = True, corrupt: bool = True,
          extra_budget: int = 0) -> dict:
    """Run one drive on this rank, comparing the tree with the other rank after every step (on the default group).

    Stops at the first step where the descriptions differ or a rank raised; returns what happened.
    """
    import torch.distributed as dist

    h = tp_harness(rank, tp_group, allocator, page_size, policy, store_bytes + extra_budget * rank,
                   host_bytes + (extra_budget * rank if host_bytes else 0), per_rank)
    cache = h.cache
    assert cache._tp_world == WORLD and cache._tp_cpu_group is tp_group
    if not agree:
        cache._agree_max = lambda count: int(count)  # the negative control: each rank decides on its own sizes
    blob_bytes: dict[int, int] = {}  # blob id -> this rank's blob size
    blob_pages: dict[int, int] = {}  # blob id -> pages reserved for it
    put = cache.store.put

    def recording_put(blob, pages=None):
        handle = put(blob, pages=pages)
        if handle is not None:
            blob_bytes[handle.id], blob_pages[handle.id] = int(blob.numel()), handle.num_pages
        return handle

    cache.store.put = recording_put
    driver = Driver(h, rank, seed=zlib.crc32(name.encode()), corrupt=corrupt)
    result = dict(name=name, agree=agree, steps=0, diverged=None, tree_diverged=None, error=None,
                  one_rank_integrity_events=0)
    t0 = time.perf_counter()
    for step in range(steps):
        failures = cache.kvtc_counters.integrity_failures
        error = None
        try:
            driver.step()
            desc = describe(h, driver.live, driver.locks)
        except Exception:
            error, desc = traceback.format_exc(), []
        mine = torch.tensor([_digest(desc), _digest(structure(desc)),
                             cache.kvtc_counters.integrity_failures - failures, int(error is not None)],
                            dtype=torch.int64)
        both = [torch.zeros_like(mine) for _ in range(WORLD)]
        dist.all_gather(both, mine)
        if any(int(t[3]) for t in both):
            result["error"] = error or "the other rank raised"
            break
        result["steps"] = step + 1
        detected = [int(t[2]) for t in both]
        if min(detected) == 0 and max(detected) > 0:
            result["one_rank_integrity_events"] += 1
        if result["diverged"] is None and len({int(t[0]) for t in both}) > 1:
            descs = [None] * WORLD
            dist.all_gather_object(descs, desc)
            result["diverged"] = dict(step=step, op=driver.last_op, diff=first_difference(descs[0], descs[1]),
                                      integrity_detected=detected)
        if len({int(t[1]) for t in both}) > 1:
            descs = [None] * WORLD
            dist.all_gather_object(descs, structure(desc))
            result["tree_diverged"] = dict(step=step, op=driver.last_op, diff=first_difference(descs[0], descs[1]),
                                           integrity_detected=detected)
        if result["tree_diverged"] is not None or (agree and result["diverged"] is not None):
            # with agreement any difference fails; the negative controls run on to the first tree difference
            break
    result["seconds"] = time.perf_counter() - t0
    s = cache.stats()
    result.update(ops=dict(driver.ops), blob_bytes=blob_bytes, blob_pages=blob_pages, capacity_pages=cache.store.capacity_pages,
                  host_capacity_bytes=cache.store.host_capacity_bytes,
                  stats=dict(compress=s.compress_count, decompress=s.decompress_count, demotions=s.demotions,
                             drops=s.drops, integrity_failures=s.integrity_failures,
                             integrity_dropped_tokens=s.integrity_dropped_tokens, deleted=s.deleted_tokens))
    if result["diverged"] is None and result["error"] is None:
        driver.release_everything()
    return result


def rank_main(rank: int, port: int, out_dir: str) -> None:
    """One TP rank: join the gloo world, run every drive, write the results to ``out_dir/rank{rank}.pkl``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timeout)
    results: dict = {"agreed": [], "negative": []}
    tp_group, finished = None, False
    try:
        tp_group = dist.new_group(backend="gloo", timeout=timeout)  # the TP CPU group, as sglang's tp_cpu_group
        for name, allocator, page_size, policy, store, host, steps in AGREED_RUNS:
            results["agreed"].append(drive(rank, tp_group, name, allocator, page_size, policy, store, host, steps,
                                           agree=True, extra_budget=1 << 10))
        for name, allocator, page_size, policy, store, host, steps, per_rank, corrupt in NEGATIVE_RUNS:
            results["negative"].append(drive(rank, tp_group, name, allocator, page_size, policy, store, host, steps,
                                             agree=False, per_rank=per_rank, corrupt=corrupt))
        finished = True
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
        # The negative drives take no collectives, so the ranks reach this point at different times: meet
        # before tearing gloo down (a rank destroying its groups while its peer still holds the connections
        # can abort in gloo's C++ teardown).
        if finished:
            dist.barrier()
        if tp_group is not None:
            dist.destroy_process_group(tp_group)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    """Run both ranks once (every drive) and return [rank 0 results, rank 1 results] and the wall time (used by
    sglang-marked tests only: the conftest hook skips them without sglang)."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("tp")
    t0 = time.perf_counter()
    ctx = mp.start_processes(rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TOTAL_TIMEOUT_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the two TP ranks did not finish within {TOTAL_TIMEOUT_S} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    results = []
    for rank in range(WORLD):
        with open(out / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results, time.perf_counter() - t0


# --- the tests -------------------------------------------------------------------------------------------------------

@pytest.mark.sglang
def test_tp_ranks_take_identical_decisions(tp_results):
    results, seconds = tp_results
    total = 0
    for r0, r1 in zip(results[0]["agreed"], results[1]["agreed"]):
        name = r0["name"]
        assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
        assert r0["diverged"] is None, f"{name}: the ranks' trees diverged: {r0['diverged']}"
        spec = next(run for run in AGREED_RUNS if run[0] == name)
        assert r0["steps"] == r1["steps"] == spec[-1]
        total += r0["steps"]
        # the store capacities were agreed (rank 1 was given more)
        assert r0["capacity_pages"] == r1["capacity_pages"] == spec[4] // PAGE_BYTES
        assert r0["host_capacity_bytes"] == r1["host_capacity_bytes"] == spec[5]
        # the check is not vacuous: the same blobs had different sizes, and needed different page counts, on the ranks
        b0, b1 = r0["blob_bytes"], r1["blob_bytes"]
        assert b0.keys() == b1.keys()
        pages = lambda n: -(-n // PAGE_BYTES)  # noqa: E731
        differ = sum(b0[i] != b1[i] for i in b0)
        r0_more = sum(pages(b0[i]) > pages(b1[i]) for i in b0)
        r1_more = sum(pages(b1[i]) > pages(b0[i]) for i in b0)
        s0, s1 = r0["stats"], r1["stats"]
        print(f"\n{name}: {r0['steps']} agreed steps in {r0['seconds']:.1f}s; ops {r0['ops']}; blobs {len(b0)}, "
              f"bytes differ {differ}, more pages on rank 0 {r0_more} / rank 1 {r1_more}; stats rank 0 {s0}, "
              f"rank 1 {s1}; one-rank integrity failures handled alike {r0['one_rank_integrity_events']}")
        assert differ > len(b0) // 2 and r0_more > 0 and r1_more > 0
        # each blob reserved the larger of the two ranks' needs, on both ranks
        assert r0["blob_pages"] == r1["blob_pages"] == {i: max(pages(b0[i]), pages(b1[i])) for i in b0}
        # the drive exercised what it is meant to
        assert s0["compress"] > 50 and s0["decompress"] > 10 and r0["ops"].get("load_back", 0) > 10
        assert s0["drops"] > 0 and (s0["demotions"] > 0 or not spec[5])
        assert r0["ops"].get("lock", 0) > 5 and r0["ops"].get("corrupt", 0) > 0
        # corruption seen by one rank only: both dropped the node (the trees stayed equal), and each rank was the one
        # that saw it at least once over the runs
        assert r0["one_rank_integrity_events"] > 0
        assert s0["integrity_dropped_tokens"] == s1["integrity_dropped_tokens"] > 0
    events = [sum(r["stats"]["integrity_failures"] for r in results[rank]["agreed"]) for rank in range(WORLD)]
    assert min(events) > 0, events
    print(f"{total} steps with identical trees on both ranks; {seconds:.0f}s for both ranks (all drives)")


@pytest.mark.sglang
def test_without_agreement_the_ranks_diverge(tp_results):
    results, _ = tp_results
    for r0, r1 in zip(results[0]["negative"], results[1]["negative"]):
        name = r0["name"]
        assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
        first, tree = r0["diverged"], r0["tree_diverged"]
        assert tree is not None, f"{name}: the trees did not diverge in {r0['steps']} steps without agreement"
        for a, b in ((first, r1["diverged"]), (tree, r1["tree_diverged"])):
            assert (a["step"], a["diff"]) == (b["step"], b["diff"])
        print(f"\nnegative control {name}: first difference at step {first['step']} ({first['op']}; integrity "
              f"failures per rank {first['integrity_detected']}): {first['diff'][:300]}\n"
              f"  trees diverged at step {tree['step']} ({tree['op']}; integrity failures per rank "
              f"{tree['integrity_detected']}): {tree['diff'][:300]}")
        if name == "one-rank-corruption":
            # the blobs are identical on both ranks here: the divergence is a corruption only one rank saw
            assert r0["blob_bytes"] == r1["blob_bytes"]
            assert first["step"] == tree["step"] and sorted(tree["integrity_detected"]) == [0, 1]
        else:
            b0, b1 = r0["blob_bytes"], r1["blob_bytes"]
            assert any(b0[i] != b1[i] for i in b0.keys() & b1.keys())
            assert r0["ops"].get("corrupt", 0) == 0


# --- per-rank calibration cards ---------------------------------------------------------------------------------------

def test_tp_calibration_cards(tmp_path):
    """``calibrate --tp-size 2``: one artifact per rank (tp2-rank{r}), each fitted to its half of the KV heads; the
    startup checks refuse rank 0's card on rank 1 and a tp1 card under tp 2, naming the field and the command."""
    from kvtc_sglang.cache.startup_checks import CalibrationModelMismatch, validate_calibration_for_model
    from kvtc_sglang.models.geometry import ModelGeometry
    from kvtc_sglang.codec.artifact import check_artifact_matches, load_artifact
    from kvtc_sglang.codec.calibrate import CalibrationSettings, calibrate
    from kvtc_sglang.codec.errors import CalibrationMismatchError
    from kvtc_sglang.codec.rope import RopeConfig

    L, H, D, tp = 2, 4, 16, 2
    rope = RopeConfig(head_dim=D, rotary_dim=D, theta=10000.0, style="neox")
    offsets = torch.tensor([3.0, 3.0, -3.0, -3.0]).view(1, 1, H, 1)  # rank 0's heads sit at +3, rank 1's at -3

    def kv_source(ids):
        g = torch.Generator().manual_seed(int(ids[0]))
        n = ids.numel()
        k = torch.randn(n, L, H, D, generator=g)
        v = torch.randn(n, L, H, D, generator=g) + offsets
        return k, v

    windows = [torch.tensor([i] * 64) for i in range(4)]
    settings = CalibrationSettings(seq_len=64, max_tokens=256, dp_samples=128, ratios=(8,), progress=False)
    facts = {"name": "synthetic-l2h4d16", "fingerprint": "synthetic-l2h4d16", "num_layers": L, "num_kv_heads": H,
             "num_kv_heads_per_rank": H // tp, "head_dim": D, "rope": rope.to_dict()}
    dirs = []
    for rank in range(tp):  # what run_calibration does per rank for --tp-size 2
        heads = H // tp
        art = calibrate(kv_source, windows, facts, settings, head_slice=slice(rank * heads, (rank + 1) * heads))
        art.tp_size, art.tp_rank = tp, rank
        dirs.append(art.save(tmp_path / f"tp{tp}-rank{rank}").parent)
    full = dict(facts, num_kv_heads_per_rank=H)
    art1 = calibrate(kv_source, windows, full, settings)
    tp1_dir = art1.save(tmp_path / "tp1").parent

    arts = [load_artifact(d) for d in dirs]
    for rank, art in enumerate(arts):
        assert (art.tp_size, art.tp_rank, art.num_kv_heads, art.p) == (tp, rank, H // tp, L * (H // tp) * D)
        # fitted to its own heads: the V mean is that half's offset
        assert torch.allclose(art.blocks["v"][0].mean, torch.full((art.p,), 3.0 - 6.0 * rank), atol=0.5)
        check_artifact_matches(art, num_layers=L, num_kv_heads=H // tp, head_dim=D, tp_size=tp, tp_rank=rank)
    assert arts[0].artifact_id() != arts[1].artifact_id()

    with pytest.raises(CalibrationMismatchError, match=r"tp_rank: model 1, calibration 0.*kvtc-sglang calibrate"):
        check_artifact_matches(arts[0], num_layers=L, num_kv_heads=H // tp, head_dim=D, tp_size=tp, tp_rank=1)
    with pytest.raises(CalibrationMismatchError, match=r"num_kv_heads \(per rank\): model 2, calibration 4.*"
                                                      r"tp_size: model 2, calibration 1"):
        check_artifact_matches(load_artifact(tp1_dir), num_layers=L, num_kv_heads=H // tp, head_dim=D, tp_size=tp,
                               tp_rank=0)

    geometry = ModelGeometry(name="synthetic", num_layers=L, num_kv_heads=H, head_dim=D, rope_theta=10000.0,
                             rope_style="neox")
    for rank in range(tp):
        card = validate_calibration_for_model(dirs[rank], geometry, tp_size=tp, tp_rank=rank, ratio=8)
        assert (card.tp_size, card.tp_rank, card.num_kv_heads_per_rank) == (tp, rank, H // tp)
    with pytest.raises(CalibrationModelMismatch, match=r"tp_rank is 0 in the card but 1 .*calibrated for its heads"
                                                       r".*kvtc-sglang calibrate"):
        validate_calibration_for_model(dirs[0], geometry, tp_size=tp, tp_rank=1, ratio=8)
    with pytest.raises(CalibrationModelMismatch, match=r"tp_size \(KV-head shards\) is 1 in the card but 2.*"
                                                       r"at tp_size 2 with `kvtc-sglang calibrate"):
        validate_calibration_for_model(tp1_dir, geometry, tp_size=tp, tp_rank=0, ratio=8)
