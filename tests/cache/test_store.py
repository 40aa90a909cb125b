"""CompressedStore / HostTier: paged arena, reference counts, exhaustion, tier moves, exact byte accounting."""

from __future__ import annotations

import random

import pytest
import torch

from kvtc_sglang.cache.store import CompressedStore, HostTier, PageArena, Tier

PAGE = 64


def blob(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def reserved(store: CompressedStore, tier: str) -> int:
    return sum(h.num_pages for h in store.handles() if h.tier == tier) * store.page_bytes


def test_capacity_is_rounded_down_to_whole_pages():
    store = CompressedStore(10 * PAGE + PAGE - 1, page_bytes=PAGE)
    assert store.capacity_bytes == 10 * PAGE and store.capacity_pages == 10
    assert store.used_bytes == 0 and store.free_pages == 10
    assert store.pages_for(0) == 0 and store.pages_for(1) == 1 and store.pages_for(PAGE) == 1
    assert store.pages_for(PAGE + 1) == 2
    with pytest.raises(ValueError):
        PageArena(100, page_bytes=0)


@pytest.mark.parametrize("n", [1, PAGE - 1, PAGE, PAGE + 1, 5 * PAGE + 7])
def test_put_get_roundtrip_and_page_rounded_accounting(n):
    store = CompressedStore(16 * PAGE, page_bytes=PAGE)
    data = blob(n, n)
    h = store.put(data)
    assert h is not None and h.tier == Tier.DEVICE and h.refcount == 1 and h.nbytes == n
    assert torch.equal(store.get(h), data)
    assert store.get(h).is_contiguous() and store.get(h).shape == (n,)
    assert store.used_bytes == store.pages_for(n) * PAGE == h.reserved_bytes
    assert store.live_bytes() == n


def test_blobs_are_scattered_over_free_pages_and_stay_intact():
    store = CompressedStore(12 * PAGE, page_bytes=PAGE)
    a, b, c = (store.put(blob(3 * PAGE, i)) for i in range(3))
    store.release(b)
    d = store.put(blob(5 * PAGE + 3, 9))  # needs 6 pages: the 3 freed by b and 3 never used
    assert d is not None
    assert torch.equal(store.get(a), blob(3 * PAGE, 0))
    assert torch.equal(store.get(c), blob(3 * PAGE, 2))
    assert torch.equal(store.get(d), blob(5 * PAGE + 3, 9))
    assert store.used_bytes == 12 * PAGE and store.free_pages == 0


def test_refcount_frees_bytes_only_at_zero():
    store = CompressedStore(8 * PAGE, page_bytes=PAGE)
    h = store.put(blob(2 * PAGE, 1))
    store.retain(h)
    assert h.refcount == 2
    assert store.release(h) is False and store.used_bytes == 2 * PAGE
    assert torch.equal(store.get(h), blob(2 * PAGE, 1))
    assert store.release(h) is True and store.used_bytes == 0 and not h.alive
    for use in (store.get, store.retain, store.release, store.free, store.demote):
        with pytest.raises(KeyError):
            use(h)


def test_free_drops_every_reference_at_once():
    store = CompressedStore(8 * PAGE, page_bytes=PAGE)
    h = store.put(blob(PAGE, 1))
    store.retain(h)
    store.retain(h)
    store.free(h)
    assert store.used_bytes == 0 and store.handles() == [] and h.refcount == 0
    with pytest.raises(KeyError):
        store.release(h)


def test_exhaustion_returns_none_and_changes_nothing():
    store = CompressedStore(4 * PAGE, page_bytes=PAGE)
    h = store.put(blob(3 * PAGE, 1))
    assert store.put(blob(PAGE + 1, 2)) is None
    assert store.used_bytes == 3 * PAGE and store.handles() == [h]
    assert store.put(blob(PAGE, 3)) is not None and store.free_pages == 0
    assert store.put(blob(1, 4)) is None
    assert CompressedStore(0, page_bytes=PAGE).put(blob(1, 5)) is None


def test_a_larger_reservation_is_accounted_and_bounded():
    store = CompressedStore(8 * PAGE, page_bytes=PAGE)
    h = store.put(blob(PAGE, 1), pages=3)
    assert h.num_pages == 3 and store.used_bytes == 3 * PAGE
    assert torch.equal(store.get(h), blob(PAGE, 1))
    with pytest.raises(ValueError):
        store.put(blob(2 * PAGE, 2), pages=1)
    with pytest.raises(ValueError):
        store.put(torch.zeros(4, dtype=torch.int32))


def test_demote_and_promote_move_bytes_between_tiers():
    host = HostTier(4 * PAGE, page_bytes=PAGE)
    store = CompressedStore(4 * PAGE, page_bytes=PAGE, host=host)
    data = blob(2 * PAGE + 5, 7)
    h = store.put(data)
    store.retain(h)  # two holders follow the same handle across tiers
    assert store.demote(h)
    assert h.tier == Tier.HOST and store.used_bytes == 0 and store.host_used_bytes == 3 * PAGE
    assert store.get(h).device.type == "cpu" and torch.equal(store.get(h), data)
    assert store.promote(h)
    assert h.tier == Tier.DEVICE and store.used_bytes == 3 * PAGE and store.host_used_bytes == 0
    assert torch.equal(store.get(h), data)
    assert store.demote(h)
    store.release(h)
    assert store.host_used_bytes == 3 * PAGE
    store.release(h)
    assert store.host_used_bytes == 0 and store.used_bytes == 0


def test_moves_refuse_without_room_and_change_nothing():
    host = HostTier(2 * PAGE, page_bytes=PAGE)
    store = CompressedStore(4 * PAGE, page_bytes=PAGE, host=host)
    big = store.put(blob(3 * PAGE, 1))
    assert not store.demote(big)
    assert big.tier == Tier.DEVICE and store.used_bytes == 3 * PAGE and store.host_used_bytes == 0
    small = store.put(blob(PAGE, 2))
    assert store.demote(small)
    filler = store.put(blob(PAGE, 3))
    assert not store.promote(small)  # the device arena is full again
    assert small.tier == Tier.HOST and torch.equal(store.get(small), blob(PAGE, 2))
    store.release(filler)
    assert store.promote(small)


def test_a_store_without_host_tier_refuses_moves():
    store = CompressedStore(4 * PAGE, page_bytes=PAGE)
    h = store.put(blob(PAGE, 1))
    with pytest.raises(RuntimeError):
        store.demote(h)
    with pytest.raises(ValueError):
        CompressedStore(4 * PAGE, page_bytes=PAGE, host=HostTier(4 * 128, page_bytes=128))


def test_double_free_of_a_page_is_refused():
    arena = PageArena(4 * PAGE, PAGE)
    ids = arena.alloc(2)
    arena.release(ids)
    with pytest.raises(RuntimeError):
        arena.release(ids)


def test_clear_frees_both_tiers():
    store = CompressedStore(8 * PAGE, page_bytes=PAGE, host=HostTier(8 * PAGE, page_bytes=PAGE))
    hs = [store.put(blob(PAGE + i, i)) for i in range(3)]
    store.demote(hs[0])
    store.clear()
    assert store.used_bytes == 0 and store.host_used_bytes == 0 and store.handles() == []
    assert store.free_pages == 8 and store.host_free_pages == 8 and not any(h.alive for h in hs)


def test_random_workload_accounts_every_byte_and_leaks_nothing():
    rng = random.Random(0)
    store = CompressedStore(40 * PAGE, page_bytes=PAGE, host=HostTier(24 * PAGE, page_bytes=PAGE))
    live: dict[int, tuple] = {}  # id -> (handle, data, refs)
    for step in range(3000):
        op = rng.random()
        if op < 0.35 or not live:
            data = blob(rng.randint(1, 6 * PAGE), step)
            h = store.put(data)
            if h is None:
                assert store.free_pages < store.pages_for(data.numel())
            else:
                live[h.id] = [h, data, 1]
        elif op < 0.5:
            entry = live[rng.choice(list(live))]
            store.retain(entry[0])
            entry[2] += 1
        elif op < 0.75:
            entry = live[rng.choice(list(live))]
            freed = store.release(entry[0])
            entry[2] -= 1
            assert freed == (entry[2] == 0)
            if freed:
                del live[entry[0].id]
        elif op < 0.88:
            h = live[rng.choice(list(live))][0]
            before = h.tier
            moved = store.demote(h) if before == Tier.DEVICE else store.promote(h)
            assert h.tier == (before if not moved else (Tier.HOST if before == Tier.DEVICE else Tier.DEVICE))
        else:
            h, data, _ = live[rng.choice(list(live))]
            assert torch.equal(store.get(h), data)
        assert store.used_bytes == reserved(store, Tier.DEVICE)
        assert store.host_used_bytes == reserved(store, Tier.HOST)
        assert store.used_bytes + store.free_pages * PAGE == store.capacity_bytes
        assert {h.id for h in store.handles()} == set(live)
        assert all(h.refcount == refs for h, _, refs in live.values())
    for h, data, refs in list(live.values()):
        assert torch.equal(store.get(h), data)
        for _ in range(refs):
            store.release(h)
    assert store.used_bytes == 0 and store.host_used_bytes == 0 and store.handles() == []
    assert store.free_pages == store.capacity_pages and store.host_free_pages == 24
