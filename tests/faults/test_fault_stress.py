"""Randomized stress of the compressed tier: 10^5 cache steps with injected failures (CUDA OOM, entropy coder
missing, blob format, any error) at every tier point and codec hook, token-binding corruption and bit flips in host
copies, over small pools under memory pressure, with SGLang's pool invariant checked after every step.

The drive is the model-based driver of tests/cache/test_tier_model.py (requests as SGLang's scheduler runs them,
scheduler steps, deferred GPU work, evictions, lookups that split nodes, resets), so every served prefix is compared
with the KV written for its tokens (bit-exact at sinks; a wrong row fails the run). To fit about a minute of CPU:
SGLang's invariant (available + evictable + protected + the live requests' private slots == pool size, with its own
checker's arithmetic) after every step, the cache's full consistency walk every ``FULL_CHECK_EVERY`` steps and at the
end, where everything is released and the allocator must be full again.
"""

from __future__ import annotations

import random
import time

import pytest

compat = pytest.importorskip("kvtc_sglang.sglang_compat")

from kvtc_sglang.cache import faults  # noqa: E402

pytestmark = pytest.mark.sglang



TOTAL_STEPS = 100_000
FULL_CHECK_EVERY = 25
# (seed, allocator, page size, host bytes, in-place mode, eviction policy, share of the steps)
CONFIGS = [
    (101, "paged", 1, 1 << 14, "scratch", "lru", 0.5),
    (102, "paged", 16, 1 << 15, "direct", "lru", 0.3),
    (103, "token", 1, 1 << 14, None, "lfu", 0.2),
]


def _invariant(h, private: int) -> None:
    from sglang.srt.managers.scheduler_components.invariant_checker import SchedulerInvariantChecker

    cache = h.cache
    leak, msg = SchedulerInvariantChecker._check_pool_invariant(
        "full", h.allocator.available_size(), cache.evictable_size(), cache.protected_size(), 0, h.capacity, private)
    assert not leak, msg


def make_driver(h, seed: int):
    import types

    from tests.cache import conftest as C
    from tests.cache.test_tier_model import Driver

    reqs = types.SimpleNamespace(new_request=C.new_request, admit=C.admit, finish=C.finish, checkpoint=C.checkpoint)
    driver = Driver(h, reqs, seed)
    steps = {"n": 0}
    full_check = driver.check

    def check() -> None:
        steps["n"] += 1
        if steps["n"] % FULL_CHECK_EVERY == 0:
            full_check()
        else:
            _invariant(h, driver.private())

    driver.check = check
    flip_rng = random.Random(seed + 7)

    def corrupt_host_copy() -> None:
        """Flip one or two bits of a host-resident blob's pinned copy (its CRC-32 must catch it at promotion)."""
        from kvtc_sglang.cache.tier_state import state_of

        hosts = [n for n in h.cache._iter_nodes() if state_of(n).value == "host"]  # noqa: SLF001
        if not hosts:
            return
        blob = flip_rng.choice(hosts).kvtc_ref.blob
        if blob.host_payload is None or not blob.nbytes:
            return
        for p in flip_rng.sample(range(blob.nbytes * 8), flip_rng.choice((1, 2))):
            blob.host_payload[p // 8] ^= 1 << (p % 8)
        driver.ops["corrupt_host_copy"] += 1

    original_step = driver.step_random

    def step_random() -> None:
        if flip_rng.random() < 0.01:
            corrupt_host_copy()
            check()
        else:
            original_step()

    driver.step_random = step_random
    return driver


@pytest.mark.parametrize("seed, allocator, page_size, host_bytes, in_place, policy, share", CONFIGS,
                         ids=[f"seed{c[0]}-{c[1]}-p{c[2]}-{c[4]}" for c in CONFIGS])
def test_stress_keeps_every_invariant_and_serves_no_wrong_kv(seed, allocator, page_size, host_bytes, in_place, policy,
                                                             share):
    from tests.cache.conftest import TierHarness
    from tests.cache.test_tier_model import model_config

    steps = int(TOTAL_STEPS * share)
    faults.disarm()
    compat.TreeNode.counter = 0
    h = TierHarness(**model_config(allocator, page_size, host_bytes, in_place, policy))
    driver = make_driver(h, seed)
    t0 = time.perf_counter()
    try:
        for _ in range(steps):
            driver.step_random()
        driver.release_everything()
    finally:
        faults.disarm()
    s = h.cache.stats()
    print(f"{steps} steps in {time.perf_counter() - t0:.1f}s; ops {dict(driver.ops)}; failures {s.failures}, "
          f"integrity {s.integrity_failures}, compress {s.compress_count}, restored {s.decompress_count}, "
          f"spills {s.spills}, promotions {s.promotions}")
    ops = driver.ops
    assert ops["fault_armed"] > steps // 50 and ops["corrupt_binding"] > steps // 200
    assert s.failures > steps // 200 and s.integrity_failures >= 10
    assert s.decompress_count > 5 and s.compress_count > steps // 100
    if host_bytes and page_size == 1:
        assert ops["corrupt_host_copy"] > 0 and s.spills > 0


def test_the_stress_runs_cover_ten_to_the_five_steps():
    assert sum(int(TOTAL_STEPS * c[-1]) for c in CONFIGS) >= 100_000
