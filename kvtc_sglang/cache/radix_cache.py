"""KVTCRadixCache: SGLang's radix prefix cache with a compressed tier stored in the KV pool's own slots.

Parts of the class (mixins, one module each): compression ahead of eviction ``compression.py``; eviction, with
compression at eviction time, ``eviction.py``; load-back ``load_back.py``; the host tier's spill and promotion
``host_spill.py``. This module keeps construction, the scheduler hooks and acknowledgements, lookup and insert, lock
references and the node bookkeeping the parts share.

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
from collections import deque
from typing import Any, Iterator

import torch

from kvtc_sglang import sglang_compat as compat
from kvtc_sglang.cache import audit, faults
from kvtc_sglang.cache.blob_store import Blob, BlobStore, HostSpill
from kvtc_sglang.cache.codec_info import codec_class, in_place_mode
from kvtc_sglang.cache.compression import CompressionMixin
from kvtc_sglang.cache.eviction import EvictionMixin
from kvtc_sglang.cache.host_spill import HostSpillMixin
from kvtc_sglang.cache.load_back import LoadBackMixin, _PendingLoad
from kvtc_sglang.cache.metrics import KVTCStats, PrometheusExporter, StatsLogger
from kvtc_sglang.cache.options import KVTCOptions
from kvtc_sglang.cache.policy import TierPolicy
from kvtc_sglang.cache.tier_state import COLD_STATES, BlobRef, NodeState, ref_of, set_state, state_of
from kvtc_sglang.cache.tp_agreement import TPAgreement
from kvtc_sglang.cache.transfer import Op, TransferEngine
from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.interfaces import BatchedCodec

logger = logging.getLogger(__name__)

S = NodeState


IN_PLACE_MAX_TOKENS = 8192  # the codec's scratch area is planned for an in-place compression of this many tokens


class KVTCRadixCache(CompressionMixin, EvictionMixin, LoadBackMixin, HostSpillMixin, compat.RadixCache):
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
    # Finished requests and inserts (their new leaves are queued for compression ahead of eviction)
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

    def insert(self, params: Any) -> Any:
        result = super().insert(params)
        self._last_insert_node = result.last_device_node
        return result

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


class _NullContext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
