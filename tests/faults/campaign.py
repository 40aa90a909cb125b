"""Fault campaign: every fault class injected many times into the compressed tier, each outcome measured.

A *fault class* is one way things go wrong, at one place:

``{kind}@{point}``
    an exception of ``kind`` (``oom``: torch.OutOfMemoryError, ``entropy``: EntropyCodecUnavailable, ``blob``:
    BlobFormatError, ``error``: any RuntimeError) raised at one of the tier's fault points or the codec hooks
    (``cache.faults``: TIER_POINTS, CODEC_POINTS; ``codec.encode@evict`` is the codec failing inside an eviction).
    Each run drives a fresh cache to that point with the scenario of ``tests/cache/test_tier_faults.py`` (the
    stage's inline path, or the deferred one between launch and acknowledgement), on random token ids.
``corrupt.binding``
    two compressed sibling nodes of equal length at the same position with their blob references swapped (a
    tree-bookkeeping bug that a CRC cannot see): load-back's host check of the blob's token ids must catch it.
``corrupt.host_copy_{1,2}bit``
    one or two random bits of a blob's pinned host copy flipped: the CRC-32 check at promotion must catch it.
``corrupt.pool_rows_{1,2}bit``
    one or two random bits of a blob's payload in its pool rows flipped, with ``--kvtc-verify always``: the CRC-32
    check before the load must catch it.
``tp.{kind}``, ``tp.corrupt.binding``
    two TP ranks (gloo on CPU, one process each, the TP CPU group the cache agrees through): the fault is armed (or
    the binding corrupted) on ONE rank only, at a random point; both ranks must take the same outcome.

Each run is measured, and the class's row sums the runs:

``injected``      faults that fired (the registry's count; a corruption counts when it was applied)
``contained``     runs in which the failure ended as the contract says: no exception escaped the cache; the stage's
                  failure counter (or the integrity counter) moved; at most one KVTC log line per fired fault; the
                  cache's consistency check and SGLang's pool invariant hold; under TP, both ranks' trees identical
                  after every operation
``leaked_slots``  pool slots not back in the allocator after the requests finished, the work drained and the cache
                  reset (plus host-spill bytes still reserved, counted as 1 each run they occur)
``wrong_kv``      runs in which a request for the same tokens afterwards was served a row that is not the KV written
                  for its token (the fake codec marks lossy rows, so a wrong row is told apart from a coded one)
``hangs``         runs that did not finish within ``RUN_TIMEOUT_S`` (TP: a collective timed out, or the parent had to
                  kill the ranks)

The runs use the test double of the codec contract (``tests/cache/fake_codec.py``): real pool rows, real CRC-32s,
exact rows bit-exact, coded rows marked; what the campaign tests is the tier's handling of each failure, which does
not depend on the transform.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import time
import types
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

RUN_TIMEOUT_S = 20
TIER_LOGGER = "kvtc_sglang.cache.radix_cache"


@dataclass
class Row:
    """One fault class's totals (see the module docstring)."""

    fault: str
    injected: int = 0
    contained: int = 0
    leaked_slots: int = 0
    wrong_kv: int = 0
    hangs: int = 0
    runs: int = 0
    escaped: list = field(default_factory=list)   # first few uncontained outcomes, for the report
    seconds: float = 0.0

    def add(self, outcome: "Outcome") -> None:
        self.runs += 1
        self.injected += outcome.injected
        self.contained += int(outcome.contained) * outcome.injected
        self.leaked_slots += outcome.leaked_slots
        self.wrong_kv += outcome.wrong_kv
        self.hangs += int(outcome.hang)
        if not outcome.contained and len(self.escaped) < 3:
            self.escaped.append(outcome.detail)

    def as_json(self) -> dict:
        d = asdict(self)
        d["seconds"] = round(d["seconds"], 2)
        if not d["escaped"]:
            d.pop("escaped")
        return d


@dataclass
class Outcome:
    injected: int = 0
    contained: bool = False
    leaked_slots: int = 0
    wrong_kv: int = 0
    hang: bool = False
    detail: str = ""


class _Timeout(BaseException):
    """Raised by the alarm: a run that does not finish is a hang (BaseException: not swallowed by the cache)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """SIGALRM after ``seconds`` (main thread only; elsewhere no limit)."""
    try:
        previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Timeout()))
    except ValueError:  # not the main thread
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextlib.contextmanager
def captured_lines():
    """The tier's warning lines emitted inside the block."""
    handler = _Lines()
    log = logging.getLogger(TIER_LOGGER)
    log.addHandler(handler)
    old_level, old_propagate = log.level, log.propagate
    log.setLevel(logging.WARNING)
    log.propagate = False
    try:
        yield handler.lines
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate


def _random_tokens(rng: random.Random, n: int, avoid: set | None = None) -> list[int]:
    out = []
    while len(out) < n:
        t = rng.randint(1, 4000)
        if not avoid or t not in avoid:
            out.append(t)
    return out


def _requests():
    from tests.cache import conftest as C

    return types.SimpleNamespace(new_request=C.new_request, admit=C.admit, finish=C.finish, checkpoint=C.checkpoint)


def _run_scenario(scenario, h, point: str, kind, reqs) -> None:
    """Run one fault scenario on harness ``h``; the load-back and promotion scenarios also take the requests."""
    from tests.cache import test_tier_faults as tf

    if scenario in (tf.load_back, tf.promote):
        scenario(h, (point, kind), reqs)
    else:
        scenario(h, (point, kind))


def _failure_total(counters) -> int:
    return sum(getattr(counters, name) for name in ("failures_compress", "failures_evict", "failures_load",
                                                   "failures_spill", "failures_ack", "integrity_failures"))


def _serve_after(h, reqs, tokens) -> int:
    """Serve ``tokens`` once more; 1 if any prefix row is wrong (aborted requests are never served: 0)."""
    req, _info = reqs.admit(h, tokens)
    if req is None:
        return 0
    wrong = 0
    if not getattr(req, "kvtc_aborted", False):
        n = len(req.prefix_indices)
        states = h.kv_state(req.prefix_indices, tokens[:n])
        sinks = min(h.options.sink_tokens, n)
        wrong = int("wrong" in states or any(states[i] != "exact" for i in range(sinks)))
    reqs.finish(h, req)
    return wrong


def _release(h) -> int:
    """Drain, reset; the slots (and host bytes) that did not come back."""
    from kvtc_sglang.cache import faults

    faults.disarm()
    h.cache.drain()
    h.check()
    h.cache.reset()
    leaked = h.capacity - h.allocator.available_size()
    return leaked + int(h.cache.host.used_bytes != 0)


# ---------------------------------------------------------------------------------------------------------------------
# Single-process classes
# ---------------------------------------------------------------------------------------------------------------------

def injected_classes() -> list[tuple[str, str, Callable, dict]]:
    """(class name, point, scenario, harness config) for every kind at every point (TIER's containment cases)."""
    from kvtc_sglang.cache import faults
    from tests.cache import test_tier_faults as tf

    out = []
    for name, scenario, config in tf.CASES:
        for kind in faults.KINDS:
            out.append((f"{kind}@{name}", name.split("@")[0], kind, scenario, dict(config)))
    return out


def run_injected(point: str, kind: str, scenario: Callable, config: dict, rng: random.Random) -> Outcome:
    """One run of an injected-exception class: the scenario on random tokens, then the same tokens served again."""
    from kvtc_sglang.cache import faults
    from tests.cache import conftest as C
    from tests.cache import test_tier_faults as tf

    out = Outcome()
    config = dict(config)
    seq = _random_tokens(rng, 32)
    tf.SEQ, tf.OTHER = seq, _random_tokens(rng, 32, set(seq))
    reqs = _requests()
    before_fired = faults.fired(point)
    try:
        with time_limit(RUN_TIMEOUT_S), captured_lines() as lines:
            h = C.TierHarness(pool_tokens=config.pop("pool_tokens", 128), **config)
            before_fail = _failure_total(h.cache.kvtc_counters)
            _run_scenario(scenario, h, point, kind, reqs)
            out.injected = faults.fired(point) - before_fired
            moved = _failure_total(h.cache.kvtc_counters) - before_fail
            h.check()
            out.wrong_kv = _serve_after(h, reqs, tf.SEQ + [rng.randint(1, 4000)])
            h.check()
            out.leaked_slots = _release(h)
            out.contained = out.injected >= 1 and moved >= 1 and len(lines) <= out.injected
            if not out.contained:
                out.detail = f"fired {out.injected}, counters moved {moved}, lines {lines[:3]}"
    except _Timeout:
        out.hang, out.detail = True, "timeout"
    except Exception as exc:  # noqa: BLE001 - an escaped failure is what the campaign measures
        out.detail = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        faults.disarm()
        out.injected = faults.fired(point) - before_fired
    return out


def _cold_blob(h, state: str):
    from kvtc_sglang.cache.tier_state import state_of

    for n in h.cache._iter_nodes():  # noqa: SLF001 - the campaign corrupts what the tier holds
        if state_of(n).value == state:
            return n, n.kvtc_ref.blob
    return None, None


def _flip_bits(buf: torch.Tensor, nbytes: int, bits: int, rng: random.Random) -> None:
    """Flip ``bits`` distinct random bits among the first ``nbytes`` bytes of a uint8 tensor (in place)."""
    positions = rng.sample(range(nbytes * 8), bits)
    for p in positions:
        buf[p // 8] ^= 1 << (p % 8)


def run_corruption(kind: str, rng: random.Random) -> Outcome:
    """One run of a corruption class: make a cold blob, corrupt it, load it back, serve, release."""
    from kvtc_sglang.cache import faults
    from tests.cache import conftest as C

    out = Outcome()
    reqs = _requests()
    seq = _random_tokens(rng, 32)
    try:
        with time_limit(RUN_TIMEOUT_S), captured_lines() as lines:
            if kind.startswith("corrupt.host_copy"):
                h = C.TierHarness(pool_tokens=128, host_bytes=1 << 16, compress_ahead_watermark=1.0)
                h.insert(seq)
                h.evict(1)
                h.cache.step()
                h.cache.step()   # spill launched and acknowledged
                h.evict(1)       # the device copy dropped: HOST
                node, blob = _cold_blob(h, "host")
                if blob is None:
                    raise AssertionError("no host blob to corrupt")
                _flip_bits(blob.host_payload, blob.nbytes, int(kind[-4]), rng)
            elif kind.startswith("corrupt.pool_rows"):
                h = C.TierHarness(pool_tokens=128, compress_ahead_watermark=1.0, verify="always")
                h.insert(seq)
                h.evict(1)
                node, blob = _cold_blob(h, "compressed")
                if blob is None:
                    raise AssertionError("no compressed blob to corrupt")
                payload = h.cache._read_payload(blob)[:blob.nbytes].clone()  # noqa: SLF001
                _flip_bits(payload, blob.nbytes, int(kind[-4]), rng)
                h.cache._write_payload(blob.slots, blob.nbytes, payload)  # noqa: SLF001
            elif kind == "corrupt.binding":
                h = C.TierHarness(pool_tokens=128, compress_ahead_watermark=1.0)
                seq, sibling = _swapped_siblings(h, rng)
            else:
                raise ValueError(kind)
            out.injected = 1
            before = h.cache.kvtc_counters.integrity_failures
            out.wrong_kv = _serve_after(h, reqs, seq + [rng.randint(1, 4000)])
            caught = h.cache.kvtc_counters.integrity_failures - before
            h.check()
            out.leaked_slots = _release(h)
            out.contained = caught == 1 and len(lines) == 1
            if not out.contained:
                out.detail = f"integrity failures {caught}, lines {lines[:3]}"
    except _Timeout:
        out.hang, out.detail = True, "timeout"
    except Exception as exc:  # noqa: BLE001
        out.detail = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        faults.disarm()
    return out


def _swapped_siblings(h, rng: random.Random) -> tuple[list[int], list[int]]:
    """Two compressed sibling leaves of equal length at the same position, their blob references swapped (what a
    bookkeeping bug would do: each node now points at the other's blob). Returns the two sequences."""
    from kvtc_sglang.cache.tier_state import state_of

    prefix = _random_tokens(rng, 8)
    a = prefix + _random_tokens(rng, 24)
    b = prefix + _random_tokens(rng, 24, set(a))
    h.insert(a)
    h.insert(b)
    for _ in range(8):
        na, nb = h.node_for(a), h.node_for(b)
        if state_of(na).value == state_of(nb).value == "compressed":
            break
        h.evict(1)
    na, nb = h.node_for(a), h.node_for(b)
    if not (state_of(na).value == state_of(nb).value == "compressed" and na.kvtc_ref.count == nb.kvtc_ref.count
            and na.kvtc_ref.start == nb.kvtc_ref.start):
        raise AssertionError(f"siblings not compressed alike: {state_of(na).value}, {state_of(nb).value}")
    na.kvtc_ref, nb.kvtc_ref = nb.kvtc_ref, na.kvtc_ref
    sets = h.cache._blob_nodes  # noqa: SLF001 - keep the tier's own bookkeeping consistent with the swap
    ia, ib = nb.kvtc_ref.blob.id, na.kvtc_ref.blob.id  # a's old blob is now b's, and the other way round
    sets[ia].discard(na)
    sets[ia].add(nb)
    sets[ib].discard(nb)
    sets[ib].add(na)
    h.check()
    return a, b


CORRUPTION_CLASSES = ("corrupt.binding", "corrupt.host_copy_1bit", "corrupt.host_copy_2bit",
                      "corrupt.pool_rows_1bit", "corrupt.pool_rows_2bit")


def run_class(name: str, runs: int, seed: int, progress: Callable[[str], None] | None = None) -> Row:
    """``runs`` runs of one single-process class (an injected-exception class or a corruption class)."""
    rng = random.Random(f"{name}:{seed}")
    row = Row(name)
    t0 = time.perf_counter()
    if name in CORRUPTION_CLASSES:
        for _ in range(runs):
            row.add(run_corruption(name, rng))
    else:
        match = [c for c in injected_classes() if c[0] == name]
        if not match:
            raise ValueError(f"unknown fault class {name!r}")
        _name, point, kind, scenario, config = match[0]
        for _ in range(runs):
            row.add(run_injected(point, kind, scenario, config, rng))
    row.seconds = time.perf_counter() - t0
    if progress:
        progress(f"{name}: {row.as_json()}")
    return row


def all_single_process_classes() -> list[str]:
    return [c[0] for c in injected_classes()] + list(CORRUPTION_CLASSES)


# ---------------------------------------------------------------------------------------------------------------------
# Tensor parallelism: two gloo ranks, the fault on one of them
# ---------------------------------------------------------------------------------------------------------------------

TP_WORLD = 2
TP_COLLECTIVE_TIMEOUT_S = 30
TP_KINDS = ("oom", "entropy", "blob", "error", "corrupt.binding")


def _tp_digest(cache) -> str:
    from tests.cache.test_tier_tp import digest

    return digest(cache)[0]


def tp_rank_runs(rank: int, group: Any, runs_per_kind: int, seed: int) -> dict[str, list[dict]]:
    """On one TP rank: for each TP class, ``runs_per_kind`` runs of a random scenario (the same draws on both ranks)
    with the fault armed (or the binding corrupted) on rank ``run % 2`` only. After the scenario and after the
    release both ranks compare tree digests. Returns this rank's outcome of every run; ``combine_tp`` pairs them."""
    import torch.distributed as dist

    from kvtc_sglang.cache import faults
    from tests.cache import conftest as C
    from tests.cache import test_tier_faults as tf

    cases = [c for c in tf.CASES if c[0] != "tier.evict.free"]  # instant bookkeeping: contained per rank (TIER)
    reqs = _requests()
    results: dict[str, list[dict]] = {}
    for kind in TP_KINDS:
        outcomes = results.setdefault(f"tp.{kind}", [])
        rng = random.Random(f"tp:{kind}:{seed}")  # the same draws on both ranks
        for run in range(runs_per_kind):
            mine = run % TP_WORLD == rank
            out = Outcome()
            seq = _random_tokens(rng, 32)
            other = _random_tokens(rng, 32, set(seq))
            tail = rng.randint(1, 4000)
            case = cases[rng.randrange(len(cases))]
            tf.SEQ, tf.OTHER = seq, other
            moved = 0
            t0 = time.perf_counter()
            try:
                with captured_lines() as lines:
                    if kind == "corrupt.binding":
                        h = C.TierHarness(pool_tokens=128, compress_ahead_watermark=1.0, tp_group=group,
                                          coded_bytes_per_token=24 + 16 * rank)
                        h.insert(seq)
                        h.evict(1)
                        before = h.cache.kvtc_counters.integrity_failures
                        _node, blob = _cold_blob(h, "compressed")
                        if mine and blob is not None and len(blob.token_ids):
                            blob.token_ids[0] = blob.token_ids[0] + 1
                            out.injected = 1
                        out.wrong_kv = _serve_after(h, reqs, seq + [tail])
                        moved = h.cache.kvtc_counters.integrity_failures - before
                    else:
                        name, scenario, config = case
                        point = name.split("@")[0]
                        config = dict(config)
                        h = C.TierHarness(pool_tokens=config.pop("pool_tokens", 128), tp_group=group,
                                          coded_bytes_per_token=24 + 16 * rank, **config)
                        before_fired, before_fail = faults.fired(point), _failure_total(h.cache.kvtc_counters)
                        with contextlib.nullcontext() if mine else _unarmed():
                            _run_scenario(scenario, h, point, kind, reqs)
                        out.injected = faults.fired(point) - before_fired
                        moved = _failure_total(h.cache.kvtc_counters) - before_fail
                        out.wrong_kv = _serve_after(h, reqs, seq + [tail])
                    h.check()
                    same = _agree_digest(group, _tp_digest(h.cache))
                    out.leaked_slots = _release(h)
                    same = _agree_digest(group, _tp_digest(h.cache)) and same
                    out.contained = same and (moved >= 1 if out.injected else True) and len(lines) <= 1
                    if not out.contained:
                        out.detail = f"identical trees {same}, counters moved {moved}, lines {lines[:2]}"
            except Exception as exc:  # noqa: BLE001 - an escaped failure is what the campaign measures
                text = f"{type(exc).__name__}: {exc}"
                out.hang = "timed out" in text.lower() or "timeout" in text.lower()
                out.detail = text[:300]
            finally:
                faults.disarm()
            d = asdict(out)
            d.update(mine=mine, seconds=time.perf_counter() - t0)
            outcomes.append(d)
            if out.hang:
                return results  # the group is unusable after a timed-out collective
        dist.barrier(group=group)
    return results


def combine_tp(per_rank: list, runs_per_kind: int) -> list[Row]:
    """Rows of the TP classes from both ranks' outcomes (``per_rank[r]``: rank r's ``tp_rank_runs`` result, or None
    when the rank produced none). A run is contained when both ranks' outcomes are (the injecting rank's fault
    fired and was counted, neither rank escaped, the trees were identical); injections are the injecting rank's;
    leaks and wrong KV add up over both ranks; a missing rank result or a timed-out collective is a hang."""
    rows = []
    for kind in TP_KINDS:
        name = f"tp.{kind}"
        row = Row(name)
        lists = [r.get(name, []) if r is not None else [] for r in per_rank]
        for run in range(runs_per_kind):
            pair = [lst[run] if run < len(lst) else None for lst in lists]
            if any(p is None for p in pair):
                row.runs += 1
                row.hangs += 1
                if len(row.escaped) < 3:
                    row.escaped.append(f"run {run}: a rank has no result (killed or stopped after a timeout)")
                break
            inj = next(p for p in pair if p["mine"])
            other = next(p for p in pair if not p["mine"])
            if inj["injected"] == 0 and not inj["hang"] and inj["contained"] and other["contained"]:
                continue  # the scenario's point was not reached on the injecting rank: nothing injected
            out = Outcome(injected=max(1, inj["injected"]), contained=inj["contained"] and other["contained"],
                          leaked_slots=inj["leaked_slots"] + other["leaked_slots"],
                          wrong_kv=inj["wrong_kv"] + other["wrong_kv"], hang=inj["hang"] or other["hang"],
                          detail=f"injecting rank: {inj['detail']}; other rank: {other['detail']}")
            row.add(out)
            row.seconds += max(inj["seconds"], other["seconds"])
        rows.append(row)
    return rows


@contextlib.contextmanager
def _unarmed():
    """The scenarios arm ``(point, kind)``; the rank without the fault runs them with arming turned off."""
    from kvtc_sglang.cache import faults

    original = faults.armed

    @contextlib.contextmanager
    def nothing(*_a, **_k):
        yield

    faults.armed = nothing
    try:
        yield
    finally:
        faults.armed = original


def _agree_digest(group: Any, mine: str) -> bool:
    import torch.distributed as dist

    both = [None] * TP_WORLD
    dist.all_gather_object(both, mine, group=group)
    return both[0] == both[1]


def _tp_rank_main(rank: int, port: int, out_dir: str, runs_per_kind: int, seed: int) -> None:
    import datetime
    import os
    import pickle

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=TP_COLLECTIVE_TIMEOUT_S)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP_WORLD,
                            timeout=timeout)
    group = dist.new_group(backend="gloo", timeout=timeout)  # the TP CPU group, as sglang's tp_cpu_group
    results = None
    try:
        results = tp_rank_runs(rank, group, runs_per_kind, seed)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(results, f)
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group(group)
            dist.destroy_process_group()


def run_tp(runs_per_kind: int, seed: int = 0, total_timeout_s: float = 1800.0) -> list[Row]:
    """Spawn two gloo ranks that run ``tp_rank_runs``; kill them after ``total_timeout_s`` (a hang). Rows of the TP
    classes (``combine_tp``)."""
    import os
    import pickle
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_tp_rank_main, args=(port, out, runs_per_kind, seed), nprocs=TP_WORLD, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + total_timeout_s
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    break
        except Exception:  # noqa: BLE001 - a rank that died is reported through its missing result
            pass
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        per_rank = []
        for rank in range(TP_WORLD):
            path = os.path.join(out, f"rank{rank}.pkl")
            try:
                with open(path, "rb") as f:
                    per_rank.append(pickle.load(f))
            except (OSError, EOFError, pickle.UnpicklingError):
                per_rank.append(None)
    return combine_tp(per_rank, runs_per_kind)
