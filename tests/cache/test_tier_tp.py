"""Tensor parallelism: two TP ranks' caches take identical decisions although their blobs differ and failures
happen on one rank only.

Two CPU processes (torch.multiprocessing spawn, gloo on 127.0.0.1) stand for two TP ranks. Each builds a
KVTCRadixCache over its own CPU pool with the TP CPU group SGLang hands over (``CacheInitParams.tp_cache_group``);
the ranks' codecs produce payloads of different sizes for the same tokens (as two ranks' calibrations do), so every
blob's slot count must be agreed. Both ranks run the same seeded drive as the model-based test (requests, steps,
deferred completions, evictions, lookups, resets), and on top of it:
* failures injected on ONE rank only (every tier point and codec hook, every kind), alternating ranks;
* token-binding corruption on one rank only (that rank's load-back check fails, the other's passes).
After every step each rank digests its tree (keys, states, locks, slot ids, blob ids and slot counts, allocator free
count, evictable/protected sizes, decision counters) and the ranks compare digests. A collective that one rank
skipped would hang: every collective runs with a timeout and the parent kills the ranks after TOTAL_TIMEOUT_S.

The negative control runs the drive with the agreement made the identity and shows the trees diverge (the check is
not vacuous).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import pickle
import socket
import time
import traceback
import types

import pytest
import torch

WORLD = 2
COLLECTIVE_TIMEOUT_S = 30
TOTAL_TIMEOUT_S = 300
AGREED_STEPS = 2000
NEGATIVE_STEPS = 600


def _sglang_ok() -> bool:
    try:
        from kvtc_sglang import sglang_compat as compat
    except ImportError:
        return False
    return compat.installed_sglang_version() == compat.SUPPORTED_SGLANG_VERSION


def digest(cache) -> str:
    """A canonical description of everything the ranks must agree on."""
    from kvtc_sglang.cache.tier_state import ref_of, state_of

    h = hashlib.sha256()
    stack = [(cache.root_node, ())]
    rows = []
    while stack:
        node, path = stack.pop()
        for key in sorted(node.children, key=repr):
            child = node.children[key]
            ref = ref_of(child)
            rows.append((path, tuple(child.key.token_ids[:len(child.key)]), state_of(child).value, child.lock_ref,
                         tuple(child.value.tolist()) if child.value is not None else None,
                         (ref.blob.id, ref.blob.num_slots, ref.offset, ref.count) if ref is not None else None))
            stack.append((child, path + (len(rows),)))
    c = cache.kvtc_counters
    alloc = cache.token_to_kv_pool_allocator
    rows.append(tuple(torch.cat([alloc.free_pages, alloc.release_pages]).tolist()))
    rows.append((cache.token_to_kv_pool_allocator.available_size(), cache.evictable_size(), cache.protected_size(),
                 c.compress_count, c.decompress_count, c.drops, c.integrity_dropped_tokens,
                 sorted((b.id, b.num_slots, b.readers, b.writing) for b in cache.blobs.blobs())))
    h.update(repr(rows).encode())
    return h.hexdigest(), rows


def drive(rank: int, group, steps: int, agree: bool, seed: int) -> dict:
    from tests.cache import conftest as C
    from tests.cache.test_tier_model import Driver, FAULT_POINTS

    # Instant eviction bookkeeping (tier.evict.free) does no device work and allocates nothing: a failure there is a
    # bug, contained on its rank (plain eviction) without agreement, so it is not a one-rank fault of this drive.
    TP_FAULT_POINTS = [p for p in FAULT_POINTS if p != "tier.evict.free"]
    from kvtc_sglang import sglang_compat as compat
    from kvtc_sglang.cache import faults
    import torch.distributed as dist

    faults.disarm()
    compat.TreeNode.counter = 0
    h = C.TierHarness(allocator="paged", page_size=1, pool_tokens=192, transfer_mode="deferred", in_place="scratch",
                      host_bytes=1 << 14, coded_bytes_per_token=24 + 16 * rank, compress_ahead_watermark=0.3,
                      tp_group=group)
    if not agree:
        h.cache.agree.max_vec = lambda values: [int(v) for v in values]
        h.cache.agree.min_vec = lambda values: [int(v) for v in values]
    reqs = types.SimpleNamespace(new_request=C.new_request, admit=C.admit, finish=C.finish, checkpoint=C.checkpoint)
    driver = Driver(h, reqs, seed)
    events = {"one_rank_faults": 0, "one_rank_corruptions": 0}
    calls = {"fault": 0, "corrupt": 0}

    def fault():  # the same draws on both ranks; armed on one rank only
        point = driver.rng.choice(TP_FAULT_POINTS)
        kind = driver.rng.choice(faults.KINDS)
        calls["fault"] += 1
        if calls["fault"] % WORLD == rank:
            faults.arm(point, kind, times=1)
            events["one_rank_faults"] += 1

    def corrupt():
        from kvtc_sglang.cache.tier_state import COLD_STATES, state_of

        cold = [n for n in h.cache._iter_nodes() if state_of(n) in COLD_STATES]
        calls["corrupt"] += 1
        if not cold:
            return
        node = driver.rng.choice(sorted(cold, key=lambda n: n.id))
        i = driver.rng.randrange(len(node.kvtc_ref.blob.token_ids) or 1)
        if calls["corrupt"] % WORLD == rank and len(node.kvtc_ref.blob.token_ids):
            node.kvtc_ref.blob.token_ids[i] += 100
            events["one_rank_corruptions"] += 1

    driver.fault = fault
    driver.corrupt_binding = corrupt
    result = {"steps": 0, "diverged": None, "error": None}
    t0 = time.perf_counter()
    try:
        history = []
        for name in ("serve", "finish", "checkpoint", "evict", "lookup", "step", "progress", "reset"):
            original = getattr(driver, name)

            def traced(*a, _original=original, _name=name, **k):
                history.append((_name, sorted(faults._armed)))  # noqa: SLF001
                return _original(*a, **k)

            setattr(driver, name, traced)
        for step in range(steps):
            history.clear()
            driver.step_random()
            mine, rows = digest(h.cache)
            both = [None] * WORLD
            dist.all_gather_object(both, mine)
            if both[0] != both[1]:
                result["diverged"] = step
                result["rows"] = rows
                result["last_ops"] = list(history)
                break
            result["steps"] = step + 1
    except Exception:  # noqa: BLE001 - reported to the parent
        result["error"] = traceback.format_exc()
    faults.disarm()
    s = h.cache.stats()
    result.update(events, seconds=time.perf_counter() - t0, collectives=h.cache.agree.collectives,
                  stats=dict(compress=s.compress_count, restored=s.decompress_count, failures=s.failures,
                             integrity=s.integrity_failures, integrity_dropped=s.integrity_dropped_tokens,
                             drops=s.drops))
    if result["diverged"] is None and result["error"] is None:
        driver.release_everything()
    return result


def rank_main(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timeout)
    results: dict = {}
    tp_group = None
    try:
        tp_group = dist.new_group(backend="gloo", timeout=timeout)  # the TP CPU group, as sglang's tp_cpu_group
        results["agreed"] = drive(rank, tp_group, AGREED_STEPS, agree=True, seed=11)
        results["negative"] = drive(rank, tp_group, NEGATIVE_STEPS, agree=False, seed=12)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
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
    if not _sglang_ok():
        pytest.skip("needs sglang==0.5.17")
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("tp")
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
    return results


@pytest.mark.sglang
def test_tp_ranks_take_identical_decisions_and_agree_on_one_rank_failures(tp_results):
    r0, r1 = (r["agreed"] for r in tp_results)
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert r0["diverged"] is None, f"the ranks' trees diverged at step {r0['diverged']}"
    assert r0["steps"] == r1["steps"] == AGREED_STEPS
    print(f"\n{AGREED_STEPS} steps, identical trees; rank 0 {r0['stats']} in {r0['seconds']:.1f}s, "
          f"{r0['collectives']} collectives; rank 1 {r1['stats']}; one-rank faults {r0['one_rank_faults']} / "
          f"{r1['one_rank_faults']}, one-rank corruptions {r0['one_rank_corruptions']} / "
          f"{r1['one_rank_corruptions']}")
    assert r0["one_rank_faults"] > 10 and r1["one_rank_faults"] > 10
    assert r0["stats"]["failures"] > 5 and r1["stats"]["failures"] > 5
    assert r0["stats"]["integrity_dropped"] == r1["stats"]["integrity_dropped"] > 0
    assert r0["stats"]["restored"] > 20 and r0["collectives"] > 100


@pytest.mark.sglang
def test_without_agreement_the_ranks_diverge(tp_results):
    r0, r1 = (r["negative"] for r in tp_results)
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert r0["diverged"] is not None and r0["diverged"] == r1["diverged"]


# --- per-rank calibration cards ---------------------------------------------------------------------------------------

def test_tp_calibration_cards(tmp_path):
    """``calibrate --tp-size 2``: one artifact per rank (tp2-rank{r}), each fitted to its half of the KV heads; the
    startup checks refuse rank 0's card on rank 1 and a tp1 card under tp 2, naming the field and the command."""
    from kvtc_sglang.cache.startup_checks import CalibrationModelMismatch, ModelGeometry, validate_calibration_for_model
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
