"""KVTCRadixCache: SGLang's radix prefix cache with a compressed tier stored in the KV pool's own slots.

States of a node and where its bytes are: ``tier_state.py``. Blob storage: ``blob_store.py``. Streams, events and
ordering: ``transfer.py``. What to compress and drop: ``policy.py``. Agreement across TP ranks: ``tp_agreement.py``.
Checks and statistics: ``invariants.py``. Failure injection: ``faults.py``.

Life of a node:
    compress ahead  ``cache_finished_req`` queues the request's new leaf; once per scheduler step (``step``, run by
                    a hook before SGLang forms a prefill batch) the queued nodes are encoded in one batch on the
                    compress stream, into blob slots taken from free slots only, when the pool is above the
                    compress-ahead watermark. The nodes are ENCODING and locked until the encode is acknowledged
                    (polled, never waited for), then HOT_BLOB.
    evict           frees at least the requested number of slots, net, in the policy's order: the hot slots of a
                    HOT_BLOB node (no codec work), a blob (instant), or a hot node without blob compressed at
                    eviction time (in place into the node's own first slots when the codec allows, else into free
                    slots; the only codec work on this path) or deleted.
    match_prefix    a lookup: splits the node where the match ends; hot slots (HOT, ENCODING, HOT_BLOB, LOADING) form
                    ``device_indices``, the COMPRESSED/HOST tokens after them ``host_hit_length``.
    init_load_back  allocates slots for the chain of COMPRESSED/HOST nodes (evicting if short: frees and drops are
                    instant), checks the blobs' token binding on the host, starts the decode (its first stage, on the
                    load stream), marks the chain LOADING (locked, blobs pinned) and returns the slots at once.
    start_loading   (a hook after SGLang formed a prefill batch) runs the layer-wise decode of every pending load on
                    the load stream, signalling SGLang's LayerDoneCounter per layer; returns the batch's consumer
                    index. Loads of requests that were not admitted ride with the next batch.
    acks            ``step`` polls the finish events; the count of completed operations is agreed (MIN) across TP
                    ranks and applied in order: ENCODING -> HOT_BLOB, LOADING -> HOT_BLOB, locks and pins released.

Accounting (SGLang's invariant ``available + evictable + protected == max_total_num_tokens``): hot slots are
evictable when their node is unlocked, protected when locked (as RadixCache); a blob's slots are evictable when no
kernel in flight reads or writes them, protected otherwise. ``evictable_size()`` and ``protected_size()`` report
the sums, ``evict(n)`` counts net freed slots, ``total_size()`` counts hot tokens (as RadixCache).

Failures: any exception in compress, evict, load-back, spill or ack becomes a dropped (or plainly evicted) node, its
slots and blob storage returned, one counter and one log line; under TP the outcome is agreed, so no rank waits in
a collective another skipped. A load that fails after its batch formed cannot be undone: the affected requests are
aborted (never served from undecoded slots) and the nodes taken out of the tree.

Exact rows: sinks at the start of a path (positions below ``sink_tokens``); the recent window (``window_tokens``)
only on a node that is a leaf when compressed. A blob with a window whose node later gets a child is dropped, so the
next compression folds the window into the coded part.
"""

from __future__ import annotations

import logging
import time
import zlib
from array import array
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from kvtc_sglang import sglang_compat as compat
from kvtc_sglang.cache import audit, faults
from kvtc_sglang.cache.blob_store import Blob, BlobStore, HostSpill
from kvtc_sglang.cache.codec_info import codec_class, in_place_mode, layer_group, scratch_rows_of
from kvtc_sglang.cache.metrics import KVTCStats, PrometheusExporter, StatsLogger
from kvtc_sglang.cache.options import KVTCOptions
from kvtc_sglang.cache.policy import Action, TierPolicy
from kvtc_sglang.cache.tier_state import COLD_STATES, BlobRef, NodeState, Tier, ref_of, set_state, state_of
from kvtc_sglang.cache.tp_agreement import TPAgreement
from kvtc_sglang.cache.transfer import COMPRESS, LOAD, Op, TransferEngine, host_buffer
from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.interfaces import BatchedCodec

logger = logging.getLogger(__name__)

S = NodeState


@dataclass
class _PendingLoad:
    """A load-back whose decode began (init_load_back) and whose layers are not launched yet."""

    batch: Any                 # the codec's DecodeBatch
    nodes: list                # the LOADING chain, top first
    lock_node: Any             # the node the tier locked (the deepest of the chain)
    blobs: list                # blobs pinned for reading (one entry per pin)
    keep: list = field(default_factory=list)
    req: Any = None


IN_PLACE_MAX_TOKENS = 8192  # the codec's scratch area is planned for an in-place compression of this many tokens


class KVTCRadixCache(compat.RadixCache):
    """A RadixCache whose cold nodes live on as compressed blobs inside the KV pool (see the module docstring).

    Args:
        params: SGLang's ``CacheInitParams`` (allocator of an ``MHATokenToKVPool``, page_size, eviction_policy ...).
        pool_codec: the codec (``codec.interfaces.BatchedCodec``: blob_layout, pool_rows, encode, decode_begin,
            decode_layers, copy_rows, warmup).
        options: the KVTC options.
        tp_group: the group ranks agree through; None uses ``params.tp_cache_group``.
        transfer_mode: "auto" (CUDA streams, or inline on CPU) or "deferred" (CPU tests; see transfer.py).
        host_budget_bytes: host spill bytes; None reads ``options.host_spill``.
        store_cap_bytes: optional cap on the pool bytes blobs hold; None reads ``options.store_budget``.
        layer_counter: SGLang's ``LayerDoneCounter`` registered on the pool and the TP worker (CUDA), or None.
        policy: the TierPolicy; default one for the server's eviction policy, on the cache's logical clock.
        stats_interval_s, metric_labels: periodic stats log line / Prometheus gauges.
    """

    def __init__(self, params: Any, pool_codec: BatchedCodec, options: KVTCOptions, *, tp_group: Any = None,
                 transfer_mode: str = "auto", host_budget_bytes: int | None = None,
                 store_cap_bytes: int | None = None, layer_counter: Any = None, policy: TierPolicy | None = None,
                 stats_interval_s: float | None = None, metric_labels: dict[str, str] | None = None):
        self._ready = False
        self.options = options
        self.codec = pool_codec
        self.kvtc_counters = KVTCStats()
        self._tick = 0
        self._freed = 0
        super().__init__(params)

        pool = compat.kv_pool_of(self.token_to_kv_pool_allocator)
        self.kv_pool = pool
        self._k_buffers = list(pool.k_buffer)
        self._v_buffers = list(pool.v_buffer)
        shape = (len(self._k_buffers), int(self._k_buffers[0].shape[1]), int(self._k_buffers[0].shape[2]))
        if shape != tuple(pool_codec.shape):
            raise ShapeError(f"the KV pool holds [layers, heads, head_dim] = {list(shape)} per token but the "
                             f"codec's calibration is {list(pool_codec.shape)}")
        self.num_layers = shape[0]
        esize = self._k_buffers[0].element_size()
        self.row_bytes = shape[1] * shape[2] * esize
        self.slot_bytes = 2 * shape[0] * self.row_bytes
        device = self._k_buffers[0].device
        self.pool_rows = self._plan_pool_rows(pool_codec, options)

        self.max_total_tokens = int(self.token_to_kv_pool_allocator.size)
        self.agree = TPAgreement(params.tp_cache_group if tp_group is None else tp_group)
        cap_bytes = (options.store_cap_bytes(self.slot_bytes * self.max_total_tokens) if store_cap_bytes is None
                     else store_cap_bytes)
        cap_slots = None if cap_bytes is None else self.agree.min(int(cap_bytes) // self.slot_bytes)
        self.blobs = BlobStore(self.token_to_kv_pool_allocator, layers=shape[0], row_bytes=self.row_bytes,
                               device=device, cap_slots=cap_slots)
        self.blobs.on_destroy = self._drop_host_copy
        self.blobs.free_fn = self._free_slots
        if host_budget_bytes is None:
            host_budget_bytes = options.host_spill_bytes()
        self.host = HostSpill(self.agree.min(int(host_budget_bytes)))
        self.transfer = TransferEngine(device, transfer_mode)
        self.layer_counter = layer_counter
        self.policy = policy or TierPolicy(self.eviction_policy, clock=lambda: float(self._tick))
        self.audit_syncs = audit.sync_audit_enabled()
        self._in_place = in_place_mode(pool_codec, self.pool_rows)
        self._EncodeJob = codec_class(pool_codec, "EncodeJob")
        self._DecodeJob = codec_class(pool_codec, "DecodeJob")

        self._agree_size_model()
        self._reset_tier_state()
        interval = options.stats_interval_s if stats_interval_s is None else stats_interval_s
        exporter = None
        if params.enable_metrics:
            exporter = PrometheusExporter.create(dict(metric_labels or {"cache_type": type(self).__name__}))
        self._stats_logger = StatsLogger(interval, exporter)
        self._ready = True

    is_kvtc_tier = True

    def _plan_pool_rows(self, codec: Any, options: KVTCOptions) -> Any:
        """The codec's plan of this pool, with a scratch area for in-place compressions when the codec has one."""
        import inspect

        try:
            takes_scratch = "scratch_rows" in inspect.signature(codec.pool_rows).parameters
        except (TypeError, ValueError):
            takes_scratch = False
        if not takes_scratch:
            return codec.pool_rows(self._k_buffers, self._v_buffers)
        n = IN_PLACE_MAX_TOKENS
        head = min(n, options.sink_tokens)
        layout = codec.blob_layout(n, head, min(options.window_tokens, n - head))
        rows = -(-int(layout.nbytes) // self.row_bytes)
        return codec.pool_rows(self._k_buffers, self._v_buffers, scratch_rows=rows)

    def _reset_tier_state(self) -> None:
        self._blob_nodes: dict[int, set] = {}
        self._cold_leaves: set = set()       # COMPRESSED, every child HOST (or none): device drop candidates
        self._host_leaves: set = set()       # HOST without children: host drop candidates
        self._hot_blob_nodes: set = set()    # HOT_BLOB: redundant blobs
        self._compress_queue: deque = deque()
        self._encode_ops: deque[Op] = deque()
        self._load_ops: deque[Op] = deque()
        self._spill_ops: deque[Op] = deque()
        self._pending_loads: list[_PendingLoad] = []
        self._orphans: set = set()
        self._last_insert_node = None

    # ------------------------------------------------------------------------------------------------------------------
    # Sizes (SGLang's accounting)
    # ------------------------------------------------------------------------------------------------------------------

    def evictable_size(self) -> int:
        """Hot slots of unlocked nodes + pool slots of blobs no kernel in flight uses: all reclaimable by evict now."""
        return self.evictable_size_ + (self.blobs.evictable_slots if self._ready else 0)

    def protected_size(self) -> int:
        """Hot slots of locked nodes + pool slots of blobs an encode writes or a decode/spill reads."""
        return self.protected_size_ + (self.blobs.protected_slots if self._ready else 0)

    # ------------------------------------------------------------------------------------------------------------------
    # The scheduler step (hooks) and acknowledgements
    # ------------------------------------------------------------------------------------------------------------------

    def _audited(self):
        return audit.SyncAudit() if self.audit_syncs else _NullContext()

    def step(self) -> None:
        """Once per scheduler iteration, before a prefill batch forms: acknowledge completed work (agreed across TP
        ranks), launch leftover loads, spill ahead to the host tier, launch the compress-ahead batch."""
        if self.disable:
            return
        with self._audited() as a:
            self._poll_acks()
            if self._pending_loads:  # loads of requests that were not admitted: run now, ordered before any reader
                self._launch_loads(None, use_counter=False)
            if self.host.enabled:
                self._spill_ahead()
            self._compress_ahead()
        self._count_syncs(a)
        self._maybe_report()

    def start_loading(self, reqs: Any = None) -> int:
        """A prefill batch formed: launch the layer-wise decode of every pending load; returns the consumer index
        SGLang's forward waits on per layer (-1 when there is nothing to wait for). ``reqs``: the batch's requests
        (aborted if their load fails at launch)."""
        if self.disable or not self._pending_loads:
            return -1
        with self._audited() as a:
            index = self._launch_loads(reqs)
        self._count_syncs(a)
        return index

    def on_forward_launched(self, event: Any) -> None:
        self.transfer.on_forward_launched(event)

    def drain(self) -> None:
        """Run and acknowledge every operation in flight (CPU deferred work included); waits on the device (not for
        the hot path: reset, tests, shutdown)."""
        if self._pending_loads:
            self._launch_loads(None, use_counter=False)
        if self.transfer.mode == "deferred":
            self.transfer.run_pending()
        elif self.transfer.cuda:
            torch.cuda.synchronize(self.transfer.device)
        self._poll_acks()
        if self._encode_ops or self._load_ops or self._spill_ops:
            raise RuntimeError("operations still in flight after draining")

    def _count_syncs(self, a: Any) -> None:
        if isinstance(a, audit.SyncAudit):
            self.kvtc_counters.host_syncs += a.total

    _ACK_POINT = {"encode": "tier.compress.ack", "load": "tier.load.ack", "spill": "tier.spill.ack"}

    def _poll_acks(self) -> None:
        """Acknowledge completed operations: per queue, the count of completed ones from the oldest is agreed (MIN)
        across TP ranks together with each op's local failure flags (MAX: the work failed; its acknowledgement
        cannot be processed), in one all-reduce; then applied in order, identically on every rank."""
        queues = (self._encode_ops, self._load_ops, self._spill_ops)
        if not any(queues):
            return
        ready = [self.transfer.ready_prefix(q) for q in queues]
        flags = []
        for q, r in zip(queues, ready):
            for i, op in enumerate(q):
                if i < r and not op.polled:
                    op.polled = True
                    if getattr(op.finish, "error", None) is not None and not op.failed:
                        op.failed = op.logged = True
                        self._log_failure(op.kind, f"the {op.kind} running on the side stream", op.finish.error)
                    if op.kind == "encode" and not op.failed and faults.failed("tier.compress.complete"):
                        op.failed = op.logged = True
                        logger.warning("KVTC: an encode of %d nodes completed with a failure; the nodes stay hot "
                                       "without blob", len(op.items))
                    try:
                        faults.hit(self._ACK_POINT[op.kind])
                    except Exception as exc:  # noqa: BLE001 - agreed below
                        op.ack_error = exc
                flags.append(int(op.failed) + 2 * int(op.ack_error is not None))
        agreed = self.agree.min_vec(ready + [-f for f in flags])  # -MIN(-x) = MAX(x): one all-reduce
        pos = 3
        for q in queues:
            for i, op in enumerate(q):
                f = -agreed[pos + i]
                op.failed = bool(f & 1)
                op.ack_failed = bool(f & 2)
            pos += len(q)
        for q, r in zip(queues, agreed[:3]):
            for _ in range(r):
                self._ack(q.popleft())

    def _ack(self, op: Op) -> None:
        handler = {"encode": self._ack_encode, "load": self._ack_load, "spill": self._ack_spill}[op.kind]
        if op.ack_failed:
            self.kvtc_counters.failures_ack += 1
            if op.ack_error is not None:
                logger.warning("KVTC: acknowledging a %s failed (%s: %s); its nodes are dropped to a safe state",
                               op.kind, type(op.ack_error).__name__, op.ack_error)
            self._ack_fallback(op)
            return
        try:
            handler(op)
        except Exception as exc:  # noqa: BLE001 - a bug: contained on this rank, the op's nodes end in a safe state
            self.kvtc_counters.failures_ack += 1
            logger.warning("KVTC: acknowledging a %s failed (%s: %s); its nodes are dropped to a safe state",
                           op.kind, type(exc).__name__, exc)
            self._ack_fallback(op)

    # ------------------------------------------------------------------------------------------------------------------
    # Compression ahead of eviction
    # ------------------------------------------------------------------------------------------------------------------

    def cache_finished_req(self, req: Any, is_insert: bool = True, **kwargs: Any) -> None:
        """RadixCache's, then queue the request's new leaf for compression ahead of eviction."""
        self._last_insert_node = None
        if getattr(req, "kvtc_aborted", None) is not None:
            is_insert = False
        super().cache_finished_req(req, is_insert=is_insert, **kwargs)
        node = self._last_insert_node
        if node is not None and node is not self.root_node:
            self.queue_compression(node)

    def queue_compression(self, node: Any) -> None:
        """Queue a hot node (without blob) for compression ahead of eviction at the next step."""
        if state_of(node) is S.HOT and node.value is not None:
            self._compress_queue.append(node)

    def insert(self, params: Any) -> Any:
        result = super().insert(params)
        self._last_insert_node = result.last_device_node
        return result

    def _usage(self) -> float:
        allocator = self.token_to_kv_pool_allocator
        return 1.0 - allocator.available_size() / max(int(allocator.size), 1)

    def _compress_ahead(self) -> None:
        """Encode the queued (and, above the watermark, the coldest) hot nodes without blob in one batch."""
        queue = self._compress_queue
        if self._usage() < self.options.compress_ahead_watermark:
            while len(queue) > 4096:
                queue.popleft()
            return
        candidates, seen = [], set()
        while queue:
            node = queue.popleft()
            if id(node) not in seen and self._compressible_ahead(node):
                seen.add(id(node))
                candidates.append(node)
        limit = self.options.compress_ahead_tokens
        if sum(len(n.key) for n in candidates) < limit:
            key = self.eviction_strategy.get_priority
            for node in sorted((n for n in self.evictable_leaves if id(n) not in seen and
                                self._compressible_ahead(n)), key=lambda n: (key(n), n.id)):
                candidates.append(node)
                if sum(len(n.key) for n in candidates) >= limit:
                    break
        if not candidates:
            return
        plans = []
        for node in candidates:
            if not self.policy.compress_enabled():
                continue
            plan = self._plan_blob(node)
            if plan is not None:
                plans.append((node, plan))
        if not plans:
            return
        slots_needed = self.agree.max_vec([self.blobs.slots_for(p[0].nbytes) for _, p in plans])
        free = self.token_to_kv_pool_allocator.available_size()
        room = self.blobs.room_under_cap()
        chosen = []
        for (node, plan), k in zip(plans, slots_needed):
            if k >= len(node.key) or k > free or (room is not None and k > room):
                continue
            free -= k
            if room is not None:
                room -= k
            chosen.append((node, plan, k))
        if chosen:
            self._launch_encode(chosen)

    def _compressible_ahead(self, node: Any) -> bool:
        return (node.parent is not None and self._is_attached(node) and state_of(node) is S.HOT
                and node.value is not None and len(node.key) > 0)

    def _plan_blob(self, node: Any) -> tuple[Any, int, int, int] | None:
        """(layout, start, n_head, n_tail) of a node's blob, or None when too few tokens would be coded."""
        n = len(node.key)
        start = self._depth(node)
        n_head, n_tail = self.options.exact_policy.counts(start, n, at_sequence_end=not node.children)
        if n - n_head - n_tail < self.options.min_compress_tokens:
            return None
        return self.codec.blob_layout(n, n_head, n_tail), start, n_head, n_tail

    def _new_blobs(self, items: list[tuple[Any, tuple, torch.Tensor]], writing: bool) -> tuple[list[Blob], Any]:
        """Blobs for (node, plan, slots) items, their row tables built together, and one host buffer [len(items)]
        (pinned on CUDA) their CRC-32s are copied into after the encode (one copy for the batch)."""
        specs = [(plan[0], plan[1], array("q", node.key.raw_token_ids())) for node, plan, _ in items]
        blobs = self.blobs.create_many(specs, [slots for _, _, slots in items], writing=writing)
        crc_host = audit.mark_host(host_buffer((len(items),), torch.int64, self.blobs.device))
        for i, ((node, _, _), blob) in enumerate(zip(items, blobs)):
            blob.extra_key = node.key.extra_key
            blob.crc_host = crc_host
            blob.crc_index = i
        return blobs, crc_host

    def _encode_jobs(self, items: list[tuple[Any, tuple, Blob]], dst: list | None = None) -> list:
        jobs = []
        for i, (node, plan, blob) in enumerate(items):
            _, start, n_head, n_tail = plan
            jobs.append(self._EncodeJob(src_slots=node.value, start_pos=start, n_head=n_head, n_tail=n_tail,
                                        dst_rows=blob.rows if dst is None else dst[i], crc_out=None))
        return jobs

    def _launch_encode(self, chosen: list[tuple[Any, tuple, int]]) -> None:
        """Allocate blob slots (free slots only, one allocation), mark ENCODING + lock, launch one batched encode."""
        failed = False
        total = sum(k for _, _, k in chosen)
        slots = self.blobs.allocate(total)
        if slots is None:  # cannot happen after the free-slot check above; keeps the ranks in step anyway
            raise RuntimeError(f"allocator refused {total} free slots it reported")
        parts, at = [], 0
        for node, plan, k in chosen:
            parts.append((node, plan, slots[at:at + k]))
            at += k
        blobs, crc_host = self._new_blobs(parts, writing=True)
        items = []
        for (node, plan, _), blob in zip(chosen, blobs):
            self._set(node, S.ENCODING, BlobRef(blob, 0, len(node.key)))
            self.inc_lock_ref(node)
            items.append((node, plan, blob))
        jobs = self._encode_jobs(items)
        keep: list = []

        def work() -> None:
            batch = self.codec.encode(self.pool_rows, jobs)
            keep.append(batch)
            crc_host.copy_(batch.crc, non_blocking=True)

        try:
            faults.hit("tier.compress.launch")
            finish = self.transfer.launch(COMPRESS, work, keep=[slots] + [j.src_slots for j in jobs])
        except Exception as exc:  # noqa: BLE001 - contained below (agreed at the ack)
            failed = True
            finish = _Done()
            self._log_failure("compress", f"launching the encode of {len(items)} nodes", exc)
        op = Op("encode", COMPRESS, finish, items=[(node, blob) for node, _, blob in items], keep=keep,
                failed=failed, logged=failed)
        self._encode_ops.append(op)
        c = self.kvtc_counters
        c.compress_ahead_count += len(items)
        c.compress_count += len(items)
        c.compress_tokens += sum(len(n.key) for n, _, _ in items)

    def _ack_encode(self, op: Op) -> None:
        if op.failed:
            self.kvtc_counters.failures_compress += 1
            if not op.logged:
                logger.warning("KVTC: an encode of %d nodes failed on another TP rank; the nodes stay hot without "
                               "blob", len(op.items))
        crcs = op.items[0][1].crc_host.tolist() if op.items and not op.failed else None  # host memory: no sync
        for node, blob in op.items:
            if blob.writing:
                self.blobs.end_write(blob)
            if crcs is not None:
                blob.crc = int(crcs[blob.crc_index]) & 0xFFFFFFFF
        for i, (node, blob) in enumerate(op.items):
            for n in self._nodes_of(blob):
                if state_of(n) is not S.ENCODING:
                    continue
                ref = n.kvtc_ref
                if not op.failed and not (blob.n_tail and ref.end == blob.n_tokens and self._has_hot_child(n)):
                    self._set(n, S.HOT_BLOB, ref)
                else:
                    self._set(n, S.HOT, None)
            op.done.add(i)
            self.dec_lock_ref(node)

    def _has_hot_child(self, node: Any) -> bool:
        return any(state_of(c).has_slots for c in node.children.values())

    # ------------------------------------------------------------------------------------------------------------------
    # Eviction
    # ------------------------------------------------------------------------------------------------------------------

    def evict(self, params: Any) -> Any:
        """Free at least ``params.num_tokens`` slots, net, when that many are evictable (policy order; see the
        module docstring). Returns EvictResult(num_tokens_evicted = net slots freed)."""
        if self.disable:
            return compat.EvictResult()
        start_time = time.perf_counter()
        allocator = self.token_to_kv_pool_allocator
        group = getattr(allocator, "is_not_in_free_group", False)  # one free of the allocator for the whole evict
        if group:
            allocator.free_group_begin()
        try:
            with self._audited() as a:
                freed = self._evict(int(params.num_tokens))
        finally:
            if group:
                allocator.free_group_end()
        self._count_syncs(a)
        self.update_eviction_metrics(freed, start_time)
        self.kvtc_counters.evicted_tokens += freed
        self._maybe_report()
        return compat.EvictResult(num_tokens_evicted=freed)

    def _available(self) -> int:
        return self.token_to_kv_pool_allocator.available_size()

    def _free_slots(self, slots: torch.Tensor) -> None:
        """Return slots (whole pages, page-aligned) to the allocator, counted (``_freed``: evict's net count does
        not read the allocator, whose frees may be grouped)."""
        self._freed += int(slots.numel())
        self.token_to_kv_pool_allocator.free_segment(slots, start_pos=0)

    def _net_freed(self) -> int:
        """Slots the tier returned to the allocator minus those it took from it, so far."""
        return self._freed - self.blobs.allocated_total

    def _hot_action(self, node: Any) -> tuple[Action, int, Any]:
        """(action, slots it frees, plan) for an evictable hot leaf."""
        n = len(node.key)
        if state_of(node) is S.HOT_BLOB:
            return Action.EVICT_HOT, n, None
        plan = self._plan_blob(node)
        if plan is not None:
            _, _, n_head, n_tail = plan
            k = self._estimate_slots(n, n_head, n_tail)
            if k < n:
                return Action.COMPRESS, n - k, plan
        return Action.DELETE, n, None

    def _agree_size_model(self) -> None:
        """Payload bytes as an affine function of token counts, agreed (MAX) across TP ranks, so that estimates of
        blob sizes that steer the eviction order are the same on every rank (exact sizes are agreed per batch)."""
        n = 1024
        one = int(self.codec.blob_layout(n, 0, 0).nbytes)
        two = int(self.codec.blob_layout(2 * n, 0, 0).nbytes)
        per_token = -(-(two - one) // n)
        fixed = max(0, one - per_token * n)
        self._coded_bytes_per_token, self._fixed_bytes = self.agree.max_vec([per_token, fixed])

    def _estimate_slots(self, n: int, n_head: int, n_tail: int) -> int:
        nbytes = self._fixed_bytes + (n - n_head - n_tail) * self._coded_bytes_per_token + \
            (n_head + n_tail) * self.slot_bytes
        return self.blobs.slots_for(nbytes)

    def _evict(self, num_tokens: int) -> int:
        import heapq

        policy = self.policy
        now = policy.clock()
        hot_heap: list = []
        drop_heap: list = []

        def push_hot(node: Any) -> None:
            action, frees, _ = self._hot_action(node)
            heapq.heappush(hot_heap, (policy.key(action, node, len(node.key), frees, now), node.id, node))

        def push_drop(node: Any, redundant: bool) -> None:
            blob = node.kvtc_ref.blob
            action = Action.DROP_REDUNDANT if redundant else Action.DROP
            k = blob.num_slots if blob.on_device else 1
            key = policy.key(action, node, len(node.key), k, now)
            if blob.protected:  # frees nothing now (the blob goes when the kernel using it is acknowledged), but
                key = (float("inf"),) + key  # unblocks its parent: a last resort
            heapq.heappush(drop_heap, (key, node.id, node, redundant))

        for node in self.evictable_leaves:
            push_hot(node)
        for node in self._cold_leaves:
            if node.lock_ref == 0:
                push_drop(node, False)
        for node in self._hot_blob_nodes:
            if not node.kvtc_ref.blob.protected:
                push_drop(node, True)

        def valid_drop(entry) -> bool:
            node, redundant = entry[2], entry[3]
            if redundant:
                return node in self._hot_blob_nodes and not node.kvtc_ref.blob.protected
            return node in self._cold_leaves and node.lock_ref == 0

        def requeue(node: Any) -> None:
            """After an action: the node and its ancestors may have become (other) candidates (a demotion turns
            every node sharing the blob HOST, which can make their parents cold leaves)."""
            n = node
            while n is not None and n is not self.root_node:
                if n in self.evictable_leaves:
                    push_hot(n)
                if n in self._cold_leaves and n.lock_ref == 0:
                    push_drop(n, False)
                if n in self._hot_blob_nodes and not n.kvtc_ref.blob.protected:
                    push_drop(n, True)
                n = n.parent

        freed = 0
        batch: list = []  # COMPRESS actions planned in this round: (node, plan)
        planned = 0
        while freed + planned < num_tokens:
            while drop_heap and not valid_drop(drop_heap[0]):
                heapq.heappop(drop_heap)
            while hot_heap and (hot_heap[0][2] not in self.evictable_leaves or
                                any(hot_heap[0][2] is b[0] for b in batch)):
                heapq.heappop(hot_heap)
            if not hot_heap and not drop_heap:
                if batch:  # run the planned compressions, then look again
                    freed += self._run_evict_batch(batch, requeue)
                    batch, planned = [], 0
                    continue
                break
            take_hot = bool(hot_heap) and (not drop_heap or hot_heap[0][0] <= drop_heap[0][0])
            before = self._net_freed()
            if take_hot:
                _, _, node = heapq.heappop(hot_heap)
                action, frees, plan = self._hot_action(node)
                if action is Action.COMPRESS:
                    lowest = drop_heap[0][0] if drop_heap else None
                    k = len(node.key) - frees
                    if policy.compress_enabled() and policy.worth_compressing(node, len(node.key), k, lowest, now):
                        batch.append((node, plan))
                        planned += frees
                        continue
                    action = Action.DELETE
            else:
                _, _, node, redundant = heapq.heappop(drop_heap)
                action = Action.DROP_REDUNDANT if redundant else Action.DROP
            parent = node.parent
            self._evict_action(node, action)
            requeue(node if node.parent is not None and self._is_attached(node) else parent)
            freed += self._net_freed() - before
        if batch:
            freed += self._run_evict_batch(batch, requeue)
            if freed < num_tokens:
                freed += self._evict(num_tokens - freed)
        return freed

    def _evict_action(self, node: Any, action: Action) -> None:
        """One instant eviction action; a failure in it falls back to deleting the node (plain eviction)."""
        try:
            if action is Action.EVICT_HOT:
                self._evict_hot(node)
            elif action is Action.DELETE:
                self._delete_hot(node)
            elif action is Action.DROP_REDUNDANT:
                faults.hit("tier.evict.free")
                self._set(node, S.HOT, None)
                self.kvtc_counters.redundant_blob_drops += 1
            else:
                faults.hit("tier.evict.free")
                self._drop_device_copy(node)
        except Exception as exc:  # noqa: BLE001 - the node is plainly evicted instead
            self.kvtc_counters.failures_evict += 1
            self._log_failure("evict", f"evicting node {node.id} ({action.value})", exc)
            if self._is_attached(node) and node.lock_ref == 0 and state_of(node) not in (S.ENCODING, S.LOADING):
                self._drop_subtree(node)

    def _evict_hot(self, node: Any) -> None:
        """HOT_BLOB -> COMPRESSED: free the hot slots, keep the blob. No codec work."""
        self._free_hot_slots(node)
        self._set(node, S.COMPRESSED, node.kvtc_ref)

    def _free_hot_slots(self, node: Any) -> None:
        faults.hit("tier.evict.free")
        self._free_slots(node.value)
        self._account_hot(node, -1)
        node.value = None
        self.evictable_leaves.discard(node)
        self._update_leaf_status(node.parent)

    def _delete_hot(self, node: Any) -> None:
        """Evict a hot leaf as RadixCache does (with its compressed subtree, if any)."""
        self.kvtc_counters.deleted_tokens += len(node.key)
        self._drop_subtree(node)

    def _run_evict_batch(self, batch: list, requeue) -> int:
        """Compress the planned hot leaves at eviction time in one encode, each into its own first slots (through
        the codec's scratch rows, or directly when the codec reads before it writes) or else into free slots; a
        node that cannot be compressed is deleted. Slot counts and the outcome are agreed across TP ranks.
        Returns the net slots freed."""
        before = self._net_freed()
        ks = self.agree.max_vec([self.blobs.slots_for(plan[0].nbytes) for _, plan in batch])
        items, deleted = [], []
        free = self._available()
        scratch_left = scratch_rows_of(self.pool_rows)
        for (node, plan), k in zip(batch, ks):
            if k >= len(node.key):
                deleted.append(node)
            elif self._in_place == "scratch" and k * self.blobs.buffers <= scratch_left:
                items.append((node, plan, k, "scratch"))
                scratch_left -= k * self.blobs.buffers  # agreed counts: the same choice on every rank
            elif self._in_place == "direct":
                items.append((node, plan, k, "direct"))
            elif k <= free:
                items.append((node, plan, k, "free"))
                free -= k
            else:
                deleted.append(node)
        failed = False
        made = []
        crc_event = None
        free_slots = None
        if items:
            try:
                total_free = sum(k for _, _, k, where in items if where == "free")
                free_slots = self.blobs.allocate(total_free) if total_free else None
                if total_free and free_slots is None:
                    raise RuntimeError(f"allocator refused {total_free} free slots it reported")
                parts, at = [], 0
                for node, plan, k, where in items:
                    if where == "free":
                        parts.append((node, plan, free_slots[at:at + k]))
                        at += k
                    else:
                        parts.append((node, plan, node.value[:k]))
                blobs, crc_host = self._new_blobs(parts, writing=False)
                made = [(node, plan, blob, where) for (node, plan, _, where), blob in zip(items, blobs)]
                dst, copies, scratch_at = [], [], 0
                for node, plan, blob, where in made:
                    if where == "scratch":
                        rows = self.pool_rows.scratch_addresses(scratch_at, blob.rows.numel())
                        scratch_at += blob.rows.numel()
                        copies.append((rows, blob.rows))
                        dst.append(rows)
                    else:
                        dst.append(blob.rows)
                jobs = self._encode_jobs([(n, p, b) for n, p, b, _ in made], dst)
                faults.hit("tier.evict.encode")  # after the blobs exist: blob ids stay equal across TP ranks
                with self.transfer.on_current():
                    batch = self.codec.encode(self.pool_rows, jobs)
                    if copies:
                        self.codec.copy_rows(self.pool_rows, torch.cat([c[0] for c in copies]),
                                             torch.cat([c[1] for c in copies]))
                    crc_host.copy_(batch.crc, non_blocking=True)
                    crc_event = self.transfer.record_current()
            except Exception as exc:  # noqa: BLE001 - agreed below; the nodes are plainly evicted
                failed = True
                self._log_failure("evict", f"compressing {len(items)} nodes at eviction", exc)
        failed = self.agree.any(failed)
        if failed:
            self.kvtc_counters.failures_evict += 1
            for node, plan, blob, where in made:
                if where == "free":
                    self.blobs.destroy(blob)
                else:  # the node's own slots: freed with the node below
                    self.blobs.unregister(blob)
            if not made and free_slots is not None:
                self._free_slots(free_slots)
            deleted.extend(node for node, *_ in items)
            made = []
        for node, plan, blob, where in made:
            k = blob.num_slots
            n = len(node.key)
            if where == "free":
                self._free_slots(node.value)
            else:  # the node's first k slots now hold the blob; the rest go back
                self._free_slots(node.value[k:])
            self._account_hot(node, -1)
            node.value = None
            self.evictable_leaves.discard(node)
            self._update_leaf_status(node.parent)
            self._set(node, S.COMPRESSED, BlobRef(blob, 0, n))
            blob.crc_event = crc_event
            c = self.kvtc_counters
            c.compress_count += 1
            c.compress_tokens += n
            c.compress_at_evict_count += 1
            requeue(node)
        for node in deleted:
            if node.parent is not None and self._is_attached(node) and node in self.evictable_leaves:
                parent = node.parent
                self._evict_action(node, Action.DELETE)
                requeue(parent)
        return self._net_freed() - before

    # ------------------------------------------------------------------------------------------------------------------
    # Lookup and insert
    # ------------------------------------------------------------------------------------------------------------------

    def match_prefix(self, params: Any) -> Any:
        """Longest cached prefix of ``params.key`` over every state; a lookup (no decoding).

        Returns a MatchResult: ``device_indices`` the slots of the nodes with hot slots (int64), ``last_device_node``
        the deepest of them, ``best_match_node`` (= ``last_host_node``) the deepest matched node,
        ``host_hit_length`` the COMPRESSED/HOST tokens between them. Splits the node where the match ends.
        """
        key = params.key
        key, _ = key.maybe_to_bigram_view(self.is_eagle)
        if self.disable or len(key) == 0:
            return self._empty_match_result
        key = key.page_aligned(self.page_size)
        if len(key) == 0:
            return self._empty_match_result
        looked_up = len(key)
        scheduled = params.req is not None
        self._tick += 1
        tick = self._tick
        access_time = time.monotonic()
        node = self.root_node
        node.last_access_time = access_time
        values: list[torch.Tensor] = []
        last_hot = node
        cold = {S.COMPRESSED: 0, S.HOST: 0}
        child_key = key.child_key(self.page_size)
        while len(key) > 0 and child_key in node.children:
            child = node.children[child_key]
            if scheduled:
                self.policy.observe_reuse(tick - getattr(child, "kvtc_tick", tick))
            child.last_access_time = access_time
            child.kvtc_tick = tick
            prefix_len = child.key.match(key, page_size=self.page_size)
            partial = prefix_len < len(child.key)
            if partial:
                child = self._split_node(child.key, child, prefix_len)
            state = state_of(child)
            if state.has_slots:
                values.append(child.value)
                last_hot = child
            else:
                cold[state] += len(child.key)
            node = child
            if partial:
                break
            key = key[prefix_len:]
            if len(key):
                child_key = key.child_key(self.page_size)

        device_indices = torch.cat(values) if values else self._empty_match_result.device_indices
        if scheduled:
            c = self.kvtc_counters
            c.hit_hot_tokens += len(device_indices)
            c.hit_compressed_tokens += cold[S.COMPRESSED]
            c.hit_host_tokens += cold[S.HOST]
            c.miss_tokens += looked_up - len(device_indices) - cold[S.COMPRESSED] - cold[S.HOST]
        return compat.MatchResult(device_indices=device_indices, last_device_node=last_hot, last_host_node=node,
                                  best_match_node=node, host_hit_length=cold[S.COMPRESSED] + cold[S.HOST])

    def _split_node(self, key: Any, child: Any, split_len: int) -> Any:
        """Split ``child`` at ``split_len``; the halves of a node with a blob share it (refcount + 1)."""
        ref = ref_of(child)
        state = state_of(child)
        if ref is None:
            new_node = super()._split_node(key, child, split_len)
            new_node.kvtc_tick = getattr(child, "kvtc_tick", 0)
            return new_node
        new_node = compat.TreeNode(priority=child.priority)
        new_node.hit_count = child.hit_count
        new_node.children = {key[split_len:].child_key(self.page_size): child}
        new_node.parent = child.parent
        new_node.lock_ref = child.lock_ref
        new_node.key = child.key[:split_len]
        new_node.last_access_time = child.last_access_time
        new_node.kvtc_tick = getattr(child, "kvtc_tick", 0)
        if child.value is not None:
            new_node.value = child.value[:split_len].clone()
            child.value = child.value[split_len:].clone()
        else:
            new_node.value = None
        child.parent = new_node
        child.key = child.key[split_len:]
        new_node.parent.children[key.child_key(self.page_size)] = new_node
        new_node.hash_value, child.hash_value = compat.split_node_hash_value(child.hash_value, split_len,
                                                                           self.page_size)
        self._set(new_node, state, BlobRef(ref.blob, ref.offset, split_len))
        self._set(child, state, BlobRef(ref.blob, ref.offset + split_len, ref.count - split_len))
        record = getattr(child, "kvtc_load", None)
        if state is S.LOADING and record is not None:
            new_node.kvtc_load = record
            record.nodes.insert(record.nodes.index(child), new_node)
        self._refresh(new_node.parent)
        self._update_leaf_status(new_node)
        self._update_leaf_status(child)
        return new_node

    def _insert_helper(self, node: Any, key: Any, value: Any, priority: int = 0, chunked: bool = False):
        """RadixCache's insert walk; COMPRESSED/HOST nodes on the path are revived with the inserted slots (fresh,
        exact KV replaces the lossy copy) and a blob with a recent-window tail whose node gets a child is dropped.

        Returns (prefix_len, last node) like RadixCache; prefix_len counts only the tokens that already had slots
        (the caller frees those duplicates; the tree keeps every slot after them).
        """
        if priority is None:
            priority = 0
        self._tick += 1
        access_time = time.monotonic()
        node.last_access_time = access_time
        node.priority = max(node.priority, priority)
        if len(key) == 0:
            return 0, node
        child_key = key.child_key(self.page_size)
        hot_prefix = 0
        reviving = False
        while len(key) > 0 and child_key in node.children:
            node = node.children[child_key]
            node.last_access_time = access_time
            node.kvtc_tick = self._tick
            prefix_len = node.key.match(key, page_size=self.page_size)
            if prefix_len < len(node.key):
                node = self._split_node(node.key, node, prefix_len)
            node.priority = max(node.priority, priority)
            self._inc_hit_count(node, chunked)
            if state_of(node) in COLD_STATES:
                reviving = True
                self.kvtc_counters.revived_tokens += prefix_len
                self._revive(node, value[:prefix_len].clone())
            elif reviving:
                raise RuntimeError("a node with slots below a compressed node")
            else:
                hot_prefix += prefix_len
            key = key[prefix_len:]
            value = value[prefix_len:]
            if len(key):
                child_key = key.child_key(self.page_size)

        if len(key):
            self._fold_window(node)
            new_node = compat.TreeNode(priority=priority)
            new_node.parent = node
            new_node.key = key
            new_node.value = value.clone()
            new_node.kvtc_tick = self._tick
            self._inc_hit_count(new_node, chunked)
            node.children[child_key] = new_node
            self.evictable_size_ += len(key)
            self._update_leaf_status(node)
            self._update_leaf_status(new_node)
            self._refresh(node)
            self._record_store_event(new_node)
            node = new_node
        return hot_prefix, node

    def _fold_window(self, node: Any) -> None:
        """``node`` gets a child: a HOT_BLOB blob holding the node's recent window exact is dropped (the next
        compression codes those tokens). ENCODING nodes are handled at the ack."""
        ref = ref_of(node)
        if state_of(node) is S.HOT_BLOB and ref.blob.n_tail and ref.end == ref.blob.n_tokens:
            self._set(node, S.HOT, None)
            self.kvtc_counters.windows_folded += 1

    def _revive(self, node: Any, slots: torch.Tensor) -> None:
        """COMPRESSED/HOST -> HOT with freshly computed slots; the blob reference is dropped."""
        node.value = slots
        self._account_hot(node, +1)
        self._set(node, S.HOT, None)
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)

    # ------------------------------------------------------------------------------------------------------------------
    # Load-back
    # ------------------------------------------------------------------------------------------------------------------

    def init_load_back(self, params: Any) -> tuple[torch.Tensor, Any]:
        """Restore the COMPRESSED/HOST chain from the deepest node with slots down to ``params.best_match_node``.

        Allocates the chain's slots (evicting if short, with the anchor locked and the chain's blobs pinned), checks
        each blob's token binding on the host, begins the decode on the load stream and marks the chain LOADING
        (locked, blobs pinned) until the decode is acknowledged. The layer-wise rest of the decode runs when the
        prefill batch forms (``start_loading``).

        Returns (slots of the restored tokens, int64 in token order; the deepest restored node). A blob failing its
        checks ends the restore above its node (that node and its subtree are dropped); no memory gives
        (empty, anchor), a miss.
        """
        node = params.best_match_node
        empty = self._empty_match_result.device_indices
        if self.disable or node is None or state_of(node) not in COLD_STATES:
            return empty, node
        with self._audited() as a:
            result = self._load_back(node, params)
        self._count_syncs(a)
        self._maybe_report()
        return result

    def _load_back(self, node: Any, params: Any) -> tuple[torch.Tensor, Any]:
        empty = self._empty_match_result.device_indices
        t0 = time.perf_counter()
        chain = []
        anchor = node
        while state_of(anchor) in COLD_STATES:
            chain.append(anchor)
            anchor = anchor.parent
        chain.reverse()
        if not self._is_attached(chain[-1]) or (params.mem_quota is not None and
                                                sum(len(n.key) for n in chain) > params.mem_quota):
            return empty, anchor
        lock = [chain[-1]]  # the chain and the anchor stay locked until LOADING (or given up)
        self.inc_lock_ref(lock[0])
        pinned = [n.kvtc_ref.blob for n in chain if n.kvtc_ref.blob.on_device]
        for blob in pinned:
            self.blobs.begin_read(blob)
        try:
            return self._load_chain(chain, anchor, pinned, params, t0, lock)
        finally:
            self.dec_lock_ref(lock[0])

    def _load_chain(self, chain: list, anchor: Any, pinned: list, params: Any, t0: float, lock: list):
        """The body of init_load_back (anchor locked, device blobs of the chain pinned). Collectives are called on
        every rank in the same order whatever fails locally: local failures become values first."""
        empty = self._empty_match_result.device_indices
        # 1. host-side checks (local): token binding and start positions, host copies' CRC
        good = self._check_chain(chain)
        good = self.agree.min(good)
        if good < len(chain):
            self._unpin(pinned)
            pinned = [n.kvtc_ref.blob for n in chain[:good] if n.kvtc_ref.blob.on_device]
            for blob in pinned:
                self.blobs.begin_read(blob)
            self.kvtc_counters.integrity_dropped_tokens += sum(len(n.key) for n in chain[good:])
            self._drop_chain_from(chain, good, lock)
            chain = chain[:good]
        if not chain:
            self._unpin(pinned)
            return empty, anchor
        # 2. slots: the chain's, plus pool slots for host-only blobs (sizes agreed)
        host_blobs = list(dict.fromkeys(n.kvtc_ref.blob for n in chain if not n.kvtc_ref.blob.on_device))
        promote_slots = self.agree.max_vec([self.blobs.slots_for(b.nbytes) for b in host_blobs])
        total = sum(len(n.key) for n in chain)
        slots = self._alloc_for_load(total + sum(promote_slots))
        if slots is None:
            self._unpin(pinned)
            logger.warning("KVTC: no KV slots for a %d-token load-back (available %d, evictable %d); recomputing",
                           total, self._available(), self.evictable_size())
            return empty, anchor
        # 3. promotions and the decode's first stage (local work; failures agreed after)
        ok = True
        batch = None
        promoted = []
        at = total
        try:
            for blob, k in zip(host_blobs, promote_slots):
                self._promote(blob, slots[at:at + k], k)
                promoted.append(blob)
                at += k  # slots[at:] are not adopted yet
            faults.hit("tier.load.begin")
            jobs = self._decode_jobs(chain, slots)
            box: list = []
            self.transfer.launch(LOAD, lambda: box.append(self.codec.decode_begin(self.pool_rows, jobs)),
                                 defer=False)
            batch = box[0]
        except Exception as exc:  # noqa: BLE001 - agreed below; the chain is dropped and recomputed
            ok = False
            self._log_failure("load", f"beginning the decode of {len(chain)} nodes", exc)
        ok = not self.agree.any(not ok)
        for blob in promoted:
            self.blobs.end_write(blob)
        self._unpin(pinned)
        if not ok:
            self.kvtc_counters.failures_load += 1
            self.kvtc_counters.integrity_dropped_tokens += total
            if batch is not None and hasattr(batch, "close"):
                batch.close()
            for blob in promoted:  # the pool copies go (the nodes and host copies go with the drop below)
                if blob.on_device and blob.alive:
                    self.blobs.free_device_copy(blob, to_allocator=False)
            # one free, in one order on every rank, whatever was promoted here before the failure
            self._free_slots(slots)
            self._drop_chain_from(chain, 0, lock)
            return empty, anchor
        for blob in promoted:  # promoted blobs are device blobs again: their nodes are COMPRESSED now
            for n in self._nodes_of(blob):
                if state_of(n) is S.HOST:
                    self._set(n, S.COMPRESSED, n.kvtc_ref)
        # 4. the chain is LOADING: slots set, locked, blobs pinned until the ack
        record = _PendingLoad(batch, [], chain[-1], [], keep=[slots], req=getattr(params, "req", None))
        offset = 0
        for n in chain:
            count = len(n.key)
            blob = n.kvtc_ref.blob
            self.blobs.begin_read(blob)
            record.blobs.append(blob)
            n.value = slots[offset:offset + count]  # a view: no copy per node
            self._account_hot(n, +1)
            self._set(n, S.LOADING, n.kvtc_ref)
            n.kvtc_load = record
            record.nodes.append(n)
            self._update_leaf_status(n)
            self._update_leaf_status(n.parent)
            offset += count
        self.inc_lock_ref(chain[-1])
        self._pending_loads.append(record)
        c = self.kvtc_counters
        c.decompress_count += len(chain)
        c.decompress_tokens += total
        c.decompress_seconds += time.perf_counter() - t0
        for n in chain:
            self.policy.observe_fate(len(n.key), True)
        if self.metrics_collector is not None:
            self.metrics_collector.increment_load_back_num_tokens(total)
        return slots[:total], chain[-1]

    def _drop_chain_from(self, chain: list, i: int, lock: list) -> None:
        """Drop chain[i] and its subtree; init_load_back's lock (on lock[0]) moves above it first."""
        keep = chain[i - 1] if i > 0 else chain[0].parent
        self.inc_lock_ref(keep)
        self.dec_lock_ref(lock[0])
        lock[0] = keep
        self._drop_subtree(chain[i])

    def _unpin(self, blobs: list) -> None:
        for blob in blobs:
            if blob.alive and blob.readers:
                self.blobs.end_read(blob)
        blobs.clear()

    def _check_chain(self, chain: list) -> int:
        """Index of the first node of ``chain`` whose blob fails a host-side check (len(chain) when none does)."""
        try:
            faults.hit("tier.load.check")
            depth = self._depth(chain[0])
            for i, n in enumerate(chain):
                blob = n.kvtc_ref.blob
                if not self._binding_ok(n, depth):
                    self.kvtc_counters.integrity_failures += 1
                    logger.warning("KVTC: blob %d does not hold the tokens of node %d (binding check); the node is "
                                   "dropped and recomputed", blob.id, n.id)
                    return i
                if not blob.on_device and not self._host_copy_ok(blob):
                    self.kvtc_counters.integrity_failures += 1
                    logger.warning("KVTC: the host copy of blob %d failed its CRC-32 check; the node is dropped and "
                                   "recomputed", blob.id)
                    return i
                if blob.on_device and self.options.verify == "always" and not self._device_copy_ok(blob):
                    self.kvtc_counters.integrity_failures += 1
                    logger.warning("KVTC: blob %d failed its CRC-32 check (--kvtc-verify always); the node is "
                                   "dropped and recomputed", blob.id)
                    return i
                depth += len(n.key)
        except Exception as exc:  # noqa: BLE001
            self.kvtc_counters.failures_load += 1
            self._log_failure("load", "checking a load-back", exc)
            return 0
        return len(chain)

    def _host_copy_ok(self, blob: Blob) -> bool:
        with audit.exempt():  # pinned host memory: no device involved
            return blob.crc is not None and blob.host_payload is not None and \
                zlib.crc32(blob.host_payload[:blob.nbytes].numpy().tobytes()) == blob.crc

    def _device_copy_ok(self, blob: Blob) -> bool:
        """--kvtc-verify always: the pool copy against its CRC on the host (one device sync)."""
        crc = self._blob_crc(blob, wait=True)
        data = self._read_payload(blob)[:blob.nbytes].cpu()
        return crc is not None and zlib.crc32(data.numpy().tobytes()) == crc

    def _blob_crc(self, blob: Blob, wait: bool = False) -> int | None:
        """The payload's CRC-32 once known on the host (an encode at eviction time fills it asynchronously)."""
        if blob.crc is None and blob.crc_host is not None:
            event = getattr(blob, "crc_event", None)
            if event is not None and (event.query() or wait):
                if wait and hasattr(event, "synchronize"):
                    event.synchronize()
                blob.crc = int(blob.crc_host.tolist()[blob.crc_index]) & 0xFFFFFFFF
        return blob.crc

    def _binding_ok(self, node: Any, depth: int) -> bool:
        ref = node.kvtc_ref
        blob = ref.blob
        if ref.start != depth or getattr(blob, "extra_key", None) != node.key.extra_key:
            return False
        return blob.token_ids[ref.offset:ref.end] == array("q", node.key.raw_token_ids())

    def _decode_jobs(self, chain: list, slots: torch.Tensor) -> list:
        """One DecodeJob per run of consecutive nodes over adjacent ranges of one blob."""
        jobs = []
        offset = 0
        i = 0
        while i < len(chain):
            ref = chain[i].kvtc_ref
            lo, hi = ref.offset, ref.end
            j = i + 1
            while j < len(chain) and chain[j].kvtc_ref.blob is ref.blob and chain[j].kvtc_ref.offset == hi:
                hi = chain[j].kvtc_ref.end
                j += 1
            blob = ref.blob
            jobs.append(self._DecodeJob(src_rows=blob.rows, layout=blob.layout, start_pos=blob.start_pos,
                                        token_range=(lo, hi), dst_slots=slots[offset:offset + hi - lo]))
            offset += hi - lo
            i = j
        return jobs

    def _alloc_for_load(self, total: int) -> torch.Tensor | None:
        """``total`` slots (whole pages: node keys are page-aligned), evicting the shortfall if needed."""
        allocator = self.token_to_kv_pool_allocator
        if allocator.available_size() < total:
            self._evict(total - allocator.available_size())
        if allocator.available_size() < total:
            return None
        return allocator.alloc(total)

    def _launch_loads(self, reqs: Any, use_counter: bool = True) -> int:
        """The layer-wise decode of every pending load, as one operation on the load stream. Without the counter the
        current stream waits for the whole decode (loads launched outside a batch's formation)."""
        pending, self._pending_loads = self._pending_loads, []
        groups = self._layer_groups()
        batches = [p.batch for p in pending]

        def run_group(layers: range) -> None:
            for b in batches:
                self.codec.decode_layers(b, layers)

        failed = False
        try:
            faults.hit("tier.load.layers")
            counter = self.layer_counter if use_counter else None
            index, finish = self.transfer.launch_layered(counter, lambda: None, groups, run_group)
        except Exception as exc:  # noqa: BLE001
            failed = True
            index, finish = -1, _Done()
            self._log_failure("load", f"launching the layer-wise decode of {len(pending)} load-backs", exc)
        failed = self.agree.any(failed)
        op = Op("load", LOAD, finish, items=pending, keep=[t for p in pending for t in p.keep], failed=failed,
                consumer_index=index)
        if failed:
            self.kvtc_counters.failures_load += 1
            self._poison(pending, reqs)
            index = -1
        self._load_ops.append(op)
        return index

    def _layer_groups(self) -> list[range]:
        g = layer_group(self.codec)
        return [range(i, min(i + g, self.num_layers)) for i in range(0, self.num_layers, g)]

    def _ack_load(self, op: Op) -> None:
        if op.failed:  # the decode raised on its stream after launch (CPU deferred work): its slots are garbage
            self._poison([p for p in op.items if not getattr(p, "poisoned", False)], None)
        for i, p in enumerate(op.items):
            for blob in p.blobs:
                if blob.alive and blob.readers:
                    self.blobs.end_read(blob)
            p.blobs = []
            if not getattr(p, "poisoned", False):
                for n in p.nodes:
                    if state_of(n) is S.LOADING:
                        n.kvtc_load = None
                        self._set(n, S.HOT_BLOB, n.kvtc_ref)
                        self._fold_window_if_extended(n)
            op.done.add(i)
            self.dec_lock_ref(p.lock_node)

    def _fold_window_if_extended(self, node: Any) -> None:
        if node.children and any(state_of(c).has_slots for c in node.children.values()):
            self._fold_window(node)

    def _poison(self, pending: list[_PendingLoad], reqs: Any) -> None:
        """These loads' KV never reached (or may not have reached) their slots: take the nodes, and everything
        inserted below them, out of the tree (no later match can use them), abort the requests whose prefix uses
        them (they must not be served), and free the slots once every lock on them is gone."""
        bad = set()
        for p in pending:
            if getattr(p, "poisoned", False):
                continue
            p.poisoned = True
            top = next((n for n in p.nodes if n not in self._orphans), None)
            if top is None:
                continue
            parent = top.parent
            if parent is not None and parent.children.get(top.key.child_key(self.page_size)) is top:
                parent.children.pop(top.key.child_key(self.page_size))
                self._refresh(parent)
                self._update_leaf_status(parent)
            subtree = [top]
            i = 0
            while i < len(subtree):
                subtree.extend(subtree[i].children.values())
                i += 1
            for n in subtree:
                bad.add(id(n))
                self.kvtc_counters.integrity_dropped_tokens += len(n.key)
                if state_of(n) is S.LOADING:
                    n.kvtc_load = None
                if ref_of(n) is not None:
                    self._set(n, S.HOT, None)
                self._orphans.add(n)
                self.evictable_leaves.discard(n)
                self._cold_leaves.discard(n)
                self._host_leaves.discard(n)
                self._hot_blob_nodes.discard(n)
        candidates = list(reqs or [])
        candidates += [p.req for p in pending if p.req is not None]
        for req in candidates:
            node = getattr(req, "last_node", None)
            while node is not None and node is not self.root_node:
                if id(node) in bad:
                    compat.abort_request(req, "KVTC: the prefix cache could not restore this request's prefix")
                    req.kvtc_aborted = True
                    break
                node = node.parent
        self._release_orphans()

    def _release_orphans(self) -> None:
        """Free the slots of unlocked nodes taken out of the tree, leaves first (a locked node's ancestors are
        locked, so whatever stays is protected, never counted as evictable)."""
        changed = True
        while changed:
            changed = False
            for node in sorted(self._orphans, key=lambda n: n.id):
                if node.lock_ref > 0 or any(c in self._orphans for c in node.children.values()):
                    continue
                self._orphans.discard(node)
                changed = True
                if node.value is not None:
                    self._free_slots(node.value)
                    self._account_hot(node, -1)
                    node.value = None
                parent = node.parent
                if parent is not None and parent in self._orphans:
                    parent.children.pop(node.key.child_key(self.page_size), None)

    # ------------------------------------------------------------------------------------------------------------------
    # Host spill
    # ------------------------------------------------------------------------------------------------------------------

    def _payload_views(self) -> list[torch.Tensor]:
        return [b.view(torch.uint8).view(b.shape[0], -1) for b in self._k_buffers + self._v_buffers]

    def _read_payload(self, blob: Blob) -> torch.Tensor:
        """The blob's payload rows gathered into one device tensor [rows * row_bytes] uint8 (2L index_selects)."""
        views = self._payload_views()
        nb = len(views)
        rows = self.blobs.rows_for(blob.nbytes)
        out = torch.empty(rows, self.row_bytes, dtype=torch.uint8, device=self.blobs.device)
        for b in range(min(nb, rows)):
            count = -(-(rows - b) // nb)
            out[b::nb] = views[b].index_select(0, blob.slots[:count])
        return out.view(-1)

    def _write_payload(self, slots: torch.Tensor, nbytes: int, data: torch.Tensor) -> None:
        """Lay a payload ([>= nbytes] uint8, device) out over the rows of ``slots`` (2L index_copies)."""
        views = self._payload_views()
        nb = len(views)
        rows = self.blobs.rows_for(nbytes)
        padded = torch.zeros(rows * self.row_bytes, dtype=torch.uint8, device=self.blobs.device)
        padded[:nbytes] = data[:nbytes]
        padded = padded.view(rows, self.row_bytes)
        for b in range(min(nb, rows)):
            count = -(-(rows - b) // nb)
            views[b].index_copy_(0, slots[:count], padded[b::nb])

    def _spill_ahead(self) -> None:
        """Copy the coldest COMPRESSED blobs without host copy to the host tier (async), while it has room."""
        cands = sorted((n for n in self._cold_leaves if n.kvtc_ref.blob.host_payload is None
                        and not n.kvtc_ref.blob.protected and self._blob_crc(n.kvtc_ref.blob) is not None),
                       key=lambda n: (getattr(n, "kvtc_tick", 0), n.id))[:8]
        if not cands:
            return
        sizes = self.agree.max_vec([n.kvtc_ref.blob.nbytes for n in cands])
        items = []
        for node, size in zip(cands, sizes):
            blob = node.kvtc_ref.blob
            if blob in (b for b, _ in items):
                continue
            buf = self.host.take(size)
            if buf is None:
                break
            blob.host_payload = buf
            blob.host_reserved = size
            self.blobs.begin_read(blob)
            items.append((blob, buf))
        if not items:
            return
        failed = False

        def work() -> None:
            for blob, buf in items:
                data = self._read_payload(blob)
                buf[:blob.nbytes].copy_(data[:blob.nbytes], non_blocking=True)

        try:
            faults.hit("tier.spill.launch")
            finish = self.transfer.launch(COMPRESS, work)
        except Exception as exc:  # noqa: BLE001
            failed = True
            finish = _Done()
            self._log_failure("spill", f"copying {len(items)} blobs to the host", exc)
        self._spill_ops.append(Op("spill", COMPRESS, finish, items=items, failed=failed, logged=failed))

    def _ack_spill(self, op: Op) -> None:
        bad = 0
        for blob, buf in op.items:
            self.blobs.end_read(blob)
            if not blob.alive:  # dropped while the copy ran: nothing failed, there is just nothing to keep
                self._drop_host_copy(blob)
                continue
            ok = not op.failed and blob.crc is not None
            if ok:
                with audit.exempt():  # pinned host memory, written by a completed copy: no device involved
                    ok = zlib.crc32(buf[:blob.nbytes].numpy().tobytes()) == blob.crc
            if ok:
                blob.host_verified = True
                self.kvtc_counters.spills += 1
            else:
                bad += 1
                self._drop_host_copy(blob)
        if bad:
            self.kvtc_counters.failures_spill += 1
            if not op.logged:
                logger.warning("KVTC: %d of %d host copies failed (copy or CRC check); kept on the device only",
                               bad, len(op.items))

    def _drop_host_copy(self, blob: Blob) -> None:
        if blob.host_payload is not None:
            self.host.give_back(getattr(blob, "host_reserved", blob.nbytes))
            blob.host_payload = None
            blob.host_verified = False

    def _promote(self, blob: Blob, slots: torch.Tensor, k: int) -> None:
        """HOST blob -> pool slots ``slots`` (k of them, allocated by the caller): async host->device copy of the
        host copy (checked against its CRC on the host by ``_check_chain``)."""
        faults.hit("tier.spill.promote")
        data = blob.host_payload.to(self.blobs.device, non_blocking=True)
        self._write_payload(slots, blob.nbytes, data)
        self.blobs.adopt_device_copy(blob, slots, k, writing=True)
        self.kvtc_counters.promotions += 1

    # ------------------------------------------------------------------------------------------------------------------
    # Lock references
    # ------------------------------------------------------------------------------------------------------------------

    def inc_lock_ref(self, node: Any) -> Any:
        """Lock ``node`` and its ancestors; hot slots of newly locked nodes move from evictable to protected."""
        if self.disable:
            return compat.IncLockRefResult(delta=0)
        delta = 0
        while node is not self.root_node:
            if node.lock_ref == 0 and node.value is not None:
                self.evictable_size_ -= len(node.key)
                self.protected_size_ += len(node.key)
                delta -= len(node.key)
            node.lock_ref += 1
            self._update_leaf_status(node)
            node = node.parent
        return compat.IncLockRefResult(delta=delta)

    def dec_lock_ref(self, node: Any, params: Any = None) -> Any:
        """Unlock ``node`` and its ancestors; hot slots of nodes reaching lock 0 move back to evictable."""
        if self.disable:
            return compat.DecLockRefResult(delta=0)
        delta = 0
        while node is not self.root_node:
            if node.lock_ref == 1 and node.value is not None:
                self.evictable_size_ += len(node.key)
                self.protected_size_ -= len(node.key)
                delta += len(node.key)
            node.lock_ref -= 1
            self._update_leaf_status(node)
            if node.parent is None:
                raise RuntimeError("dec_lock_ref: this node belongs to another tree")
            node = node.parent
        if self._orphans:
            self._release_orphans()
        return compat.DecLockRefResult(delta=delta)

    def _update_leaf_status(self, node: Any) -> None:
        if node in self._orphans:
            self.evictable_leaves.discard(node)
            return
        super()._update_leaf_status(node)

    # ------------------------------------------------------------------------------------------------------------------
    # Node bookkeeping
    # ------------------------------------------------------------------------------------------------------------------

    def _nodes_of(self, blob: Blob) -> list:
        """The nodes referencing ``blob``, in creation order (every rank visits them, and frees, in one order)."""
        return sorted(self._blob_nodes.get(blob.id, ()), key=lambda n: n.id)

    def _account_hot(self, node: Any, sign: int) -> None:
        if node.lock_ref > 0:
            self.protected_size_ += sign * len(node.key)
        else:
            self.evictable_size_ += sign * len(node.key)

    def _set(self, node: Any, state: NodeState, ref: BlobRef | None) -> None:
        """Set a node's state and blob reference, keeping blob refcounts, the blob -> nodes index and the candidate
        sets right. A blob whose last reference goes is freed (its slots return to the allocator)."""
        old = ref_of(node)
        if old is not None and (ref is None or ref.blob is not old.blob):
            nodes = self._blob_nodes.get(old.blob.id)
            if nodes is not None:
                nodes.discard(node)
                if not nodes:
                    del self._blob_nodes[old.blob.id]
            if old.blob.alive:
                if old.blob.refcount == 1:
                    self._drop_host_copy(old.blob)
                self.blobs.release(old.blob)
        if ref is not None and (old is None or ref.blob is not old.blob):
            self.blobs.retain(ref.blob)
            self._blob_nodes.setdefault(ref.blob.id, set()).add(node)
        set_state(node, state, ref)
        self._refresh(node)
        if node.parent is not None:
            self._refresh(node.parent)

    def _refresh(self, node: Any) -> None:
        """Recompute the node's membership of the drop-candidate sets."""
        self._cold_leaves.discard(node)
        self._host_leaves.discard(node)
        self._hot_blob_nodes.discard(node)
        if node is self.root_node or node in self._orphans:
            return
        state = state_of(node)
        if state is S.HOT_BLOB:
            self._hot_blob_nodes.add(node)
        elif state is S.COMPRESSED:
            if all(state_of(c) is S.HOST for c in node.children.values()):
                self._cold_leaves.add(node)
        elif state is S.HOST and not node.children:
            self._host_leaves.add(node)

    def _drop_device_copy(self, node: Any) -> None:
        """A COMPRESSED leaf gives up its pool slots: to HOST when its blob has a verified host copy, else the node
        (and its host-only subtree) is deleted."""
        blob = node.kvtc_ref.blob
        if blob.host_verified and not blob.protected:
            for n in self._nodes_of(blob):
                if state_of(n) is S.HOT_BLOB:  # the redundant hot half lets go of it first
                    self._set(n, S.HOT, None)
            if blob.alive and all(state_of(n) is S.COMPRESSED for n in self._blob_nodes.get(blob.id, ())):
                self.blobs.free_device_copy(blob)
                for n in self._nodes_of(blob):
                    self._set(n, S.HOST, n.kvtc_ref)
                self.kvtc_counters.demotions += 1
                return
        self.kvtc_counters.drops += 1
        self._drop_subtree(node)

    def _drop_subtree(self, top: Any) -> None:
        """Delete ``top`` and its subtree: hot slots freed (only ``top`` may hold slots), blob references dropped."""
        nodes = [top]
        i = 0
        while i < len(nodes):
            nodes.extend(nodes[i].children.values())
            i += 1
        for node in nodes:
            if node.lock_ref > 0 or (ref_of(node) is not None and state_of(node) in (S.ENCODING, S.LOADING)):
                raise RuntimeError(f"dropping locked or in-flight node {node.id}")
        for node in nodes:
            state = state_of(node)
            if node.value is not None:
                self._free_slots(node.value)
                self._account_hot(node, -1)
                node.value = None
                self.evictable_leaves.discard(node)
            if state in COLD_STATES:
                self.kvtc_counters.dropped_tokens += len(node.key)
                self.kvtc_counters.compressed_dropped_tokens += len(node.key)
                self.policy.observe_fate(len(node.key), False)
            if ref_of(node) is not None:
                self._set(node, S.HOT, None)
            self._cold_leaves.discard(node)
            self._host_leaves.discard(node)
            self._hot_blob_nodes.discard(node)
            self._record_remove_event(node)
        parent = top.parent
        removed = parent.children.pop(top.key.child_key(self.page_size), None)
        if removed is not top:
            raise RuntimeError(f"node {top.id} is not its parent's child")
        self._update_leaf_status(parent)
        self._refresh(parent)

    def _ack_fallback(self, op: Op) -> None:
        """After an exception while acknowledging: every node of the op ends HOT (its blob reference dropped),
        unlocked, pins released. The work itself completed, so the hot slots hold valid KV."""
        if op.kind == "encode":
            for i, (node, blob) in enumerate(op.items):
                if blob.alive and blob.writing:
                    self.blobs.end_write(blob)
                for n in self._nodes_of(blob):
                    if state_of(n) is S.ENCODING:
                        self._set(n, S.HOT, None)
                if i not in op.done:
                    op.done.add(i)
                    self.dec_lock_ref(node)
        elif op.kind == "load":
            for i, p in enumerate(op.items):
                for blob in p.blobs:
                    if blob.alive and blob.readers:
                        self.blobs.end_read(blob)
                p.blobs = []
                for n in p.nodes:
                    if state_of(n) is S.LOADING:
                        n.kvtc_load = None
                        self._set(n, S.HOT, None)
                if i not in op.done:
                    op.done.add(i)
                    self.dec_lock_ref(p.lock_node)
        elif op.kind == "spill":
            for blob, _ in op.items:
                if blob.alive and blob.readers:
                    self.blobs.end_read(blob)
                self._drop_host_copy(blob)

    def _log_failure(self, stage: str, what: str, exc: BaseException) -> None:
        logger.warning("KVTC: %s failed (%s: %s); the nodes are dropped or evicted, the requests recompute",
                       what, type(exc).__name__, exc)

    # ------------------------------------------------------------------------------------------------------------------
    # SGLang API: reset, values, printing, stats
    # ------------------------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty the tree: every hot node's and blob's slots go back to the allocator; work in flight is drained
        first. Call it only when no request holds a node (SGLang's flush_cache does)."""
        if getattr(self, "_ready", False):
            self.drain()
            values = [n.value for n in self._iter_nodes() if n.value is not None and len(n.value)]
            values += [b.slots for b in self.blobs.blobs() if b.on_device and b.num_slots]
            values += [n.value for n in sorted(self._orphans, key=lambda n: n.id) if n.value is not None]
            if values:
                self.token_to_kv_pool_allocator.free(torch.cat(values))
            for b in self.blobs.blobs():
                self._drop_host_copy(b)
            self.blobs.clear()
            self._reset_tier_state()
        super().reset()

    def all_values_flatten(self) -> torch.Tensor:
        """Every pool slot the cache holds: hot nodes' slots and blobs' slots (int64)."""
        values = [n.value for n in self._iter_nodes() if n.value is not None and len(n.value)]
        values += [b.slots for b in self.blobs.blobs() if b.on_device and b.num_slots]
        return torch.cat(values) if values else self._empty_match_result.device_indices

    def pretty_print(self) -> None:
        stack = [(self.root_node, 0)]
        while stack:
            node, indent = stack.pop()
            ref = ref_of(node)
            where = f" blob={ref.blob.id}[{ref.offset}:{ref.end}]" if ref is not None else ""
            print(" " * indent, len(node.key), node.key.token_ids[:10], f"r={node.lock_ref}",
                  state_of(node).value + where)
            stack.extend((child, indent + 2) for child in node.children.values())
        print(f"#tokens: {self.total_size()}")
        print(self.stats().summary_line())

    def stats(self) -> KVTCStats:
        from kvtc_sglang.cache.invariants import collect_stats

        return collect_stats(self)

    def check_consistency(self) -> None:
        from kvtc_sglang.cache.invariants import check_consistency

        check_consistency(self)

    def _maybe_report(self) -> None:
        if self._stats_logger.due():
            self._stats_logger.report(self.stats())

    # ------------------------------------------------------------------------------------------------------------------
    # Tree helpers
    # ------------------------------------------------------------------------------------------------------------------

    def _iter_nodes(self) -> Iterator[Any]:
        """Every node but the root, parents before children."""
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _depth(self, node: Any) -> int:
        """Tokens on the path above ``node`` (the absolute position of its first token)."""
        depth = 0
        node = node.parent
        while node is not None and node is not self.root_node:
            depth += len(node.key)
            node = node.parent
        return depth

    def _is_attached(self, node: Any) -> bool:
        while node is not self.root_node:
            parent = node.parent
            if parent is None or parent.children.get(node.key.child_key(self.page_size)) is not node:
                return False
            node = parent
        return True


class _Done:
    def query(self) -> bool:
        return True


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
