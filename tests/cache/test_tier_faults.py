"""Failure containment: a failure injected at every point of the tier (and the codec hooks) ends as a dropped or
plainly evicted node, storage returned, one counter and one log line, and the cache keeps serving correct KV.

Each case drives the tier to the point (inline completions, or deferred for the stages between launch and ack),
with the point armed for one failure of each kind (CUDA OOM, entropy coder unavailable, blob format, any error),
then checks: the fault fired, the stage's failure counter moved, a KVTC log line names it, every invariant holds
(SGLang's pool accounting included: nothing leaked), and a request for the same tokens afterwards gets correct KV
(recomputed or restored). The TP cases (one rank failing) are in test_tier_tp.py.
"""

from __future__ import annotations

import logging

import pytest

compat = pytest.importorskip("kvtc_sglang.sglang_compat")
if compat.installed_sglang_version() != compat.SUPPORTED_SGLANG_VERSION:
    pytest.skip(f"needs sglang=={compat.SUPPORTED_SGLANG_VERSION}", allow_module_level=True)

from kvtc_sglang.cache import faults  # noqa: E402
from kvtc_sglang.cache.tier_state import NodeState, state_of  # noqa: E402

pytestmark = pytest.mark.sglang
S = NodeState
SEQ = list(range(1, 33))
OTHER = list(range(100, 132))


@pytest.fixture(autouse=True)
def _clean_registry():
    faults.disarm()
    faults.reset_counts()
    yield
    faults.disarm()


def compress_ahead(h, point, deferred=False):
    h.insert(SEQ)
    with faults.armed(point[0], point[1]):
        h.cache.step()
        if deferred:
            h.gpu()
        h.cache.step()
    return "failures_compress" if point[0] != "tier.compress.ack" else "failures_ack"


def compress_at_evict(h, point):
    h.insert(SEQ)
    h.insert(OTHER)
    with faults.armed(*point):
        h.evict(1)
    assert h.match(SEQ).host_hit_length == 0 or h.match(OTHER).host_hit_length == 0
    return "failures_evict"


def evict_free(h, point):
    h.insert(SEQ)
    h.cache.step()
    h.cache.step()
    assert h.state(SEQ) == "hot_blob"
    with faults.armed(*point):
        h.evict(1)
    return "failures_evict"


def load_back(h, point, req_driver=None):
    h.insert(SEQ)
    h.evict(1)
    assert h.state(SEQ) == "compressed"
    with faults.armed(*point):
        req, info = req_driver.admit(h, SEQ + [7])
        h.cache.step()
    assert req is not None
    if point[0] in ("tier.load.layers", "codec.decode_layers"):
        assert getattr(req, "kvtc_aborted", False)  # the batch formed before the failure: never served
    elif point[0] != "tier.load.ack":
        assert len(info.restored) == 0  # a miss: recomputed
    req_driver.finish(h, req)
    h.cache.step()
    return "failures_ack" if point[0] == "tier.load.ack" else "failures_load"


def spill(h, point):
    h.insert(SEQ)
    h.evict(1)
    with faults.armed(*point):
        h.cache.step()  # launch
        h.cache.step()  # ack (the failure is handled; the copy is retried by a later step)
    return "failures_ack" if point[0] == "tier.spill.ack" else "failures_spill"


def promote(h, point, req_driver):
    h.insert(SEQ)
    h.evict(1)
    h.cache.step()
    h.cache.step()
    h.evict(1)
    assert h.state(SEQ) == "host"
    with faults.armed(*point):
        req, info = req_driver.admit(h, SEQ + [7])
    assert len(info.restored) == 0
    req_driver.finish(h, req)
    return "failures_load"


CASES = [
    ("tier.compress.launch", compress_ahead, {}),
    ("tier.compress.complete", compress_ahead, {}),
    ("tier.compress.ack", compress_ahead, {}),
    ("codec.encode", lambda h, p: compress_ahead(h, p, deferred=True), {"transfer_mode": "deferred"}),
    ("tier.evict.encode", compress_at_evict, {"pool_tokens": 64, "compress_ahead_watermark": 1.0}),
    ("codec.encode@evict", compress_at_evict, {"pool_tokens": 64, "compress_ahead_watermark": 1.0}),
    ("tier.evict.free", evict_free, {}),
    ("tier.load.check", load_back, {"compress_ahead_watermark": 1.0}),
    ("tier.load.begin", load_back, {"compress_ahead_watermark": 1.0}),
    ("codec.decode_begin", load_back, {"compress_ahead_watermark": 1.0}),
    ("tier.load.layers", load_back, {"compress_ahead_watermark": 1.0}),
    ("codec.decode_layers", load_back, {"compress_ahead_watermark": 1.0}),
    ("tier.load.ack", load_back, {"compress_ahead_watermark": 1.0}),
    ("tier.spill.launch", spill, {"host_bytes": 1 << 16, "compress_ahead_watermark": 1.0}),
    ("tier.spill.ack", spill, {"host_bytes": 1 << 16, "compress_ahead_watermark": 1.0}),
    ("tier.spill.promote", promote, {"host_bytes": 1 << 16, "compress_ahead_watermark": 1.0}),
]


@pytest.mark.parametrize("kind", faults.KINDS)
@pytest.mark.parametrize("name, scenario, config", CASES, ids=[c[0] for c in CASES])
def test_every_failure_is_contained(make_tier, requests, caplog, name, scenario, config, kind):
    point = name.split("@")[0]
    h = make_tier(pool_tokens=config.pop("pool_tokens", 128), **config)
    args = (h, (point, kind))
    with caplog.at_level(logging.WARNING, logger="kvtc_sglang.cache.radix_cache"):
        counter = scenario(*args, requests) if scenario in (load_back, promote) else scenario(*args)
    assert faults.fired(point) == 1, f"{point} never reached"
    c = h.cache.kvtc_counters
    assert getattr(c, counter) == 1, (counter, c)
    lines = [r.getMessage() for r in caplog.records if r.name == "kvtc_sglang.cache.radix_cache"]
    assert len(lines) == 1, lines
    assert (point in lines[0]) if point != "tier.compress.complete" else "completed with a failure" in lines[0]
    h.check()
    # nothing is stuck: the same tokens are served with correct KV, and everything can be released
    req, info = requests.admit(h, SEQ + [9])
    n = len(req.prefix_indices)
    h.assert_kv(req.prefix_indices, (SEQ + [9])[:n], exact=range(min(2, n)))
    requests.finish(h, req)
    h.cache.drain()
    h.check()
    h.cache.reset()
    assert h.allocator.available_size() == h.capacity and h.cache.host.used_bytes == 0
    h.check()


def test_every_point_has_a_case():
    covered = {c[0].split("@")[0] for c in CASES}
    assert set(faults.TIER_POINTS) <= covered
    assert set(faults.CODEC_POINTS) <= covered


def test_registry_arming_counts_and_kinds():
    with faults.armed("tier.evict.free", "oom", times=2, every=2):
        faults.hit("tier.evict.free")  # call 1: not triggered (every 2nd)
        with pytest.raises(faults.InjectedOOM):
            faults.hit("tier.evict.free")
        faults.hit("tier.evict.free")
        assert faults.failed("tier.evict.free")  # 4th call: the second trigger
        assert not faults.failed("tier.evict.free")  # exhausted
    assert faults.fired("tier.evict.free") == 2
    with pytest.raises(ValueError, match="fault kind"):
        faults.arm("x", "meteor")
    import torch

    assert issubclass(faults.InjectedOOM, torch.OutOfMemoryError)
