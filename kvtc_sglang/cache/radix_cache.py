"""KVTCRadixCache: SGLang's radix prefix cache with a compressed tier.

Node states (a ``TreeNode`` of sglang's tree, with two extra attributes: ``kvtc``, a ``KVTCRef`` or None, and
``kvtc_pin``, a pin count):

    hot         ``node.value`` = int64 KV-pool slot indices (as in RadixCache); ``node.kvtc`` is None.
    compressed  ``node.value`` is None; ``node.kvtc`` = (blob handle, token offset, token count) into a blob in the
                device store (``node.kvtc.tier == Tier.DEVICE``). Still in the tree and matchable.
    host        the same, with the blob in the host tier (``tier == Tier.HOST``).
    gone        deleted from the tree.

Hot nodes are ancestor-closed (a hot node's parent is hot or the root), so on every root path the hot nodes come
first; compressed and host nodes only have compressed or host descendants.

Transitions:
    evict           pops the coldest evictable hot leaves (the configured eviction strategy, as RadixCache) and
                    compresses each in place: encode its KV rows, store the blob, then free its slots. Leaves with
                    fewer than ``min_compress_tokens`` compressible tokens are deleted as in RadixCache; when a blob
                    cannot be stored, a leaf is deleted and a hot node with compressed children is dropped together
                    with its subtree. Making room in the store demotes the coldest compressed nodes whose children
                    are all on the host (or none) to the host tier, or deletes the coldest compressed leaves when
                    there is no host tier; the host tier makes room by deleting its coldest leaves.
    match_prefix    a lookup: walks hot and compressed nodes, splits the node where the match ends, reports the hot
                    prefix as device indices and the compressed/host tokens after it as ``host_hit_length``.
    init_load_back  allocates slots for the nodes from the deepest hot ancestor down to the matched node (evicting if
                    the allocator is short), decodes each node's token range straight into its slots and marks the
                    nodes hot. A blob failing its checks is never served: its node and subtree are dropped, the slots
                    allocated for them freed, and the restored part above it is returned (a shorter hit).
    insert          over compressed nodes (a request recomputed tokens that exist compressed): the nodes are revived
                    with the request's slots and their blob references dropped; see ``_insert_helper``.

Partial hits: a match that ends inside a compressed node splits it like a hot node, and the two halves share the blob
(two references with different token offsets; the blob's refcount goes up by one). Each half decodes only its own
token range, so a partial hit restores only what it matched; the blob's bytes are freed when both halves are gone.
Splits fall on page boundaries because matching is page-aligned.

Exactness: positions below ``sink_tokens`` of every path and the last ``window_tokens`` tokens of a node compressed
while it had no children (the end of a cached sequence) are stored as bit-exact copies of their pool rows; every other token
comes back within the codec's error bound.

Tensor parallelism: every rank holds the same tree and must take the same decisions. The only per-rank quantity that
decisions depend on is a blob's size (and whether it passed its integrity check), so each is agreed through
``_agree_max`` (an all-reduce MAX on the TP CPU group): a new blob reserves the largest page count any rank needs,
which makes the store's page accounting identical on every rank, so the demotions and drops that follow are too; and
a load-back drops from the first node any rank found corrupted. Store capacities are agreed (the smallest) at start.

Accounting: ``evictable_size_``/``protected_size_`` count hot tokens only; ``total_size()`` is the hot token count;
the store's ``used_bytes`` is the sum of the live blobs' page reservations. ``check_consistency()`` recomputes it all.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterator

import torch

from kvtc_sglang import sglang_compat as compat
from kvtc_sglang.cache.metrics import KVTCStats, PrometheusExporter, StatsLogger
from kvtc_sglang.cache.options import KVTCOptions, parse_bytes
from kvtc_sglang.cache.store import DEFAULT_PAGE_BYTES, BlobHandle, CompressedStore, HostTier, Tier
from kvtc_sglang.codec.errors import BlobFormatError, ShapeError
from kvtc_sglang.codec.interfaces import PoolCodec

logger = logging.getLogger(__name__)



class NodeState(str, Enum):
    """A tree node's state (see the module docstring)."""

    HOT = "hot"
    COMPRESSED = "compressed"
    HOST = "host"



@dataclass(frozen=True)
class KVTCRef:
    """A compressed node's tokens inside a stored blob.

    Attributes:
        handle: the blob (shared by the halves of a split node).
        blob_start: absolute position of the blob's first token (its header's start_pos).
        blob_tokens: tokens in the blob.
        offset: index of the node's first token inside the blob.
        count: the node's tokens (== len(node.key)).
    """

    handle: BlobHandle
    blob_start: int
    blob_tokens: int
    offset: int
    count: int

    @property
    def tier(self) -> str:
        return self.handle.tier

    @property
    def start(self) -> int:
        """Absolute position of the node's first token."""
        return self.blob_start + self.offset


def _ref(node: Any) -> KVTCRef | None:
    return getattr(node, "kvtc", None)


def _pins(node: Any) -> int:
    return getattr(node, "kvtc_pin", 0)


class KVTCRadixCache(compat.RadixCache):
    """A RadixCache whose evictions compress nodes into a byte store instead of deleting them.

    Args:
        params: sglang's ``CacheInitParams`` (allocator of an ``MHATokenToKVPool``, page_size, eviction_policy, ...).
        pool_codec: the codec reading/writing this pool's rows (a ``codec.interfaces.PoolCodec``).
        options: the KVTC options (sink/window tokens, min_compress_tokens, host_spill).
        store_budget_bytes: device bytes of the compressed store.
        host_budget_bytes: bytes of the host tier; None reads ``options.host_spill``; 0 disables it.
        tp_group: the group ranks agree through (a ProcessGroup or an object with ``.cpu_group``); None uses
            ``params.tp_cache_group``; no group (or one rank) makes agreement the identity.
        page_bytes: page size of the store and the host tier.
        stats_interval_s: seconds between two log lines (and Prometheus updates) of the stats.
        metric_labels: labels of the Prometheus gauges (when ``params.enable_metrics``).
    """

    def __init__(self, params: Any, pool_codec: PoolCodec, options: KVTCOptions, store_budget_bytes: int, *,
                 host_budget_bytes: int | None = None, tp_group: Any = None, page_bytes: int = DEFAULT_PAGE_BYTES,
                 stats_interval_s: float = 30.0, metric_labels: dict[str, str] | None = None):
        self.options = options
        self.pool_codec = pool_codec
        self.store: CompressedStore | None = None
        self._device_cold_leaves: set = set()
        self._host_cold_leaves: set = set()
        self._blob_nodes: dict[int, set] = {}
        self.kvtc_counters = KVTCStats()
        group = params.tp_cache_group if tp_group is None else tp_group
        self._tp_cpu_group = getattr(group, "cpu_group", group)
        self._tp_world = 1
        if self._tp_cpu_group is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            self._tp_world = torch.distributed.get_world_size(group=self._tp_cpu_group)
        super().__init__(params)

        pool = compat.kv_pool_of(self.token_to_kv_pool_allocator)
        self.kv_pool = pool
        self._k_buffers = list(pool.k_buffer)
        self._v_buffers = list(pool.v_buffer)
        pool_shape = (len(self._k_buffers), int(self._k_buffers[0].shape[1]), int(self._k_buffers[0].shape[2]))
        if pool_shape != tuple(pool_codec.shape):
            raise ShapeError(f"the KV pool holds [layers, heads, head_dim] = {list(pool_shape)} per token but the "
                             f"codec's calibration is {list(pool_codec.shape)}")
        self._row_bytes = 2 * pool_shape[0] * pool_shape[1] * pool_shape[2] * self._k_buffers[0].element_size()
        pool_device = self._k_buffers[0].device

        if host_budget_bytes is None:
            host_budget_bytes = parse_bytes(options.host_spill, what="--kvtc-host-spill", allow_fraction=False)
        device_pages = self._agree_min(int(store_budget_bytes) // page_bytes)
        host_pages = self._agree_min(int(host_budget_bytes) // page_bytes)
        host = HostTier(host_pages * page_bytes, page_bytes) if host_pages > 0 else None
        self.store = CompressedStore(device_pages * page_bytes, device=pool_device, page_bytes=page_bytes, host=host)

        exporter = None
        if params.enable_metrics:
            labels = dict(metric_labels or {"cache_type": type(self).__name__})
            exporter = PrometheusExporter.create(labels)
        self._stats_logger = StatsLogger(stats_interval_s, exporter)

    # ------------------------------------------------------------------------------------------------------------------
    # Agreement across TP ranks
    # ------------------------------------------------------------------------------------------------------------------

    def _agree_max(self, count: int) -> int:
        """The largest ``count`` over the TP ranks (all-reduce MAX on the CPU group); identity for one rank.

        Every decision that depends on per-rank sizes or checks goes through here, so all ranks take it alike.
        """
        if self._tp_world <= 1:
            return int(count)
        value = torch.tensor([int(count)], dtype=torch.int64)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=self._tp_cpu_group)
        return int(value.item())

    def _agree_min(self, count: int) -> int:
        return -self._agree_max(-int(count))

    # ------------------------------------------------------------------------------------------------------------------
    # Public API (sglang)
    # ------------------------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Empty the tree: every hot node's slots go back to the allocator and every blob's bytes are freed.

        Call it only when no request holds a node (sglang's flush_cache does, then also clears the allocator).
        """
        if self.store is not None:
            hot = [n.value for n in self._iter_nodes() if n.value is not None and len(n.value)]
            if hot:
                self.token_to_kv_pool_allocator.free(torch.cat(hot))
            self.store.clear()
        self._device_cold_leaves.clear()
        self._host_cold_leaves.clear()
        self._blob_nodes.clear()
        super().reset()

    def match_prefix(self, params: Any) -> Any:
        """Longest cached prefix of ``params.key`` over hot, compressed and host nodes; a lookup (no decoding).

        Returns a MatchResult: ``device_indices`` the hot prefix's slots (int64), ``last_device_node`` the deepest
        hot node, ``best_match_node`` (= ``last_host_node``) the deepest matched node, ``host_hit_length`` the
        compressed/host tokens between them. Splits the node where the match ends (see the module docstring).
        """
        key = params.key
        key, _ = key.maybe_to_bigram_view(self.is_eagle)
        if self.disable or len(key) == 0:
            return self._empty_match_result
        key = key.page_aligned(self.page_size)
        if len(key) == 0:
            return self._empty_match_result
        looked_up = len(key)

        access_time = time.monotonic()
        node = self.root_node
        node.last_access_time = access_time
        values: list[torch.Tensor] = []
        last_hot = node
        cold = {NodeState.COMPRESSED: 0, NodeState.HOST: 0}
        child_key = key.child_key(self.page_size)
        while len(key) > 0 and child_key in node.children:
            child = node.children[child_key]
            child.last_access_time = access_time
            prefix_len = child.key.match(key, page_size=self.page_size)
            partial = prefix_len < len(child.key)
            if partial:
                child = self._split_node(child.key, child, prefix_len)
            if child.value is not None:
                values.append(child.value)
                last_hot = child
            else:
                cold[self._state(child)] += len(child.key)
            node = child
            if partial:
                break
            key = key[prefix_len:]
            if len(key):
                child_key = key.child_key(self.page_size)

        device_indices = torch.cat(values) if values else self._empty_match_result.device_indices
        if params.req is not None:
            c = self.kvtc_counters
            c.hit_hot_tokens += len(device_indices)
            c.hit_compressed_tokens += cold[NodeState.COMPRESSED]
            c.hit_host_tokens += cold[NodeState.HOST]
            c.miss_tokens += looked_up - len(device_indices) - cold[NodeState.COMPRESSED] - cold[NodeState.HOST]
        return compat.MatchResult(device_indices=device_indices, last_device_node=last_hot, last_host_node=node,
                                  best_match_node=node,
                                  host_hit_length=cold[NodeState.COMPRESSED] + cold[NodeState.HOST])

    def evict(self, params: Any) -> Any:
        """Free at least ``params.num_tokens`` device tokens (if there are that many evictable ones).

        Coldest evictable hot leaves first; each is compressed in place (or deleted, see the module docstring).
        Returns EvictResult(num_tokens_evicted = device tokens freed).
        """
        if self.disable:
            return compat.EvictResult()
        start_time = time.perf_counter()
        priority = self.eviction_strategy.get_priority
        heap = [(priority(n), n.id, n) for n in self.evictable_leaves]
        heapq.heapify(heap)
        freed = 0
        while freed < params.num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            if node not in self.evictable_leaves:
                continue
            parent = node.parent
            freed += self._evict_hot_leaf(node)
            if parent in self.evictable_leaves:
                heapq.heappush(heap, (priority(parent), parent.id, parent))
        self.update_eviction_metrics(freed, start_time)
        self.kvtc_counters.evicted_tokens += freed
        self._maybe_report()
        return compat.EvictResult(num_tokens_evicted=freed)

    def init_load_back(self, params: Any) -> tuple[torch.Tensor, Any]:
        """Restore the compressed/host nodes from the deepest hot ancestor down to ``params.best_match_node``.

        Allocates their slots (evicting others if the allocator is short, with the hot ancestor locked and the nodes
        being restored pinned), decodes each node's token range into its slots and marks the nodes hot.

        Returns:
            (indices, node): the restored slots (shape: [restored tokens], dtype: torch.int64, contiguous, in token
            order, to append to the request's prefix) and the deepest restored node. No memory or a node that is no
            longer in the tree gives (empty, deepest hot ancestor), a miss. A blob failing its checks ends the
            restore above its node (that node and its subtree are dropped).
        """
        node = params.best_match_node
        empty = self._empty_match_result.device_indices
        if self.disable or node is None or node.value is not None:
            return empty, node
        chain = []
        anchor = node
        while anchor.value is None:
            chain.append(anchor)
            anchor = anchor.parent
        chain.reverse()
        total = sum(len(n.key) for n in chain)
        if not self._is_attached(chain[-1]) or (params.mem_quota is not None and total > params.mem_quota):
            return empty, anchor
        for n in chain:
            n.kvtc_pin = _pins(n) + 1
        try:
            slots = self._alloc_for_load(anchor, total)
        except BaseException:
            self._unpin(chain)
            raise
        if slots is None:
            self._unpin(chain)
            logger.warning("KVTC: no KV slots for a %d-token load-back (available %d, evictable %d); recomputing",
                           total, self.token_to_kv_pool_allocator.available_size(), self.evictable_size_)
            return empty, anchor
        return self._restore(chain, anchor, slots)

    def inc_lock_ref(self, node: Any) -> Any:
        """Lock ``node`` and its ancestors; hot tokens of newly locked nodes move from evictable to protected."""
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
        """Unlock ``node`` and its ancestors; hot tokens of nodes reaching lock 0 move back to evictable."""
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
        return compat.DecLockRefResult(delta=delta)

    def all_values_flatten(self) -> torch.Tensor:
        """Slots of every hot node (int64), in depth-first order."""
        values = [n.value for n in self._iter_nodes() if n.value is not None and len(n.value)]
        return torch.cat(values) if values else self._empty_match_result.device_indices

    def pretty_print(self) -> None:
        stack = [(self.root_node, 0)]
        while stack:
            node, indent = stack.pop()
            ref = _ref(node)
            where = f" blob={ref.handle.id}[{ref.offset}:{ref.offset + ref.count}]" if ref is not None else ""
            print(" " * indent, len(node.key), node.key.token_ids[:10], f"r={node.lock_ref}",
                  self._state(node).value + where)
            stack.extend((child, indent + 2) for child in node.children.values())
        print(f"#tokens: {self.total_size()}")
        print(self.stats().summary_line())

    # ------------------------------------------------------------------------------------------------------------------
    # Statistics and checks
    # ------------------------------------------------------------------------------------------------------------------

    def stats(self) -> KVTCStats:
        """Counters plus gauges recomputed from the tree and the store (a walk over every node)."""
        s = self.kvtc_counters.copy()
        handles = {}
        for node in self._iter_nodes():
            if node.value is not None:
                s.hot_tokens += len(node.key)
                continue
            ref = _ref(node)
            handles[ref.handle.id] = ref.handle
            if ref.tier == Tier.DEVICE:
                s.compressed_tokens += ref.count
            else:
                s.host_tokens += ref.count
        s.hot_bytes = s.hot_tokens * self._row_bytes
        s.blob_raw_bytes = (s.compressed_tokens + s.host_tokens) * self._row_bytes
        s.blob_bytes = sum(h.nbytes for h in handles.values())
        s.num_blobs = len(handles)
        s.store_used_bytes = self.store.used_bytes
        s.store_capacity_bytes = self.store.capacity_bytes
        s.host_used_bytes = self.store.host_used_bytes
        s.host_capacity_bytes = self.store.host_capacity_bytes
        return s

    def check_consistency(self) -> None:
        """Recompute every invariant from the tree; RuntimeError names the first one violated.

        Hot closure, per-state attachments, blob reference counts, store bytes, ``evictable_size_`` /
        ``protected_size_``, the evictable-leaf and cold-leaf sets. A debugging aid (walks the whole tree).
        """
        def fail(what: str) -> None:
            raise RuntimeError(f"KVTCRadixCache inconsistent: {what}")

        evictable = protected = 0
        refs: dict[int, int] = {}
        handles: dict[int, BlobHandle] = {}
        depth = {id(self.root_node): 0}
        for node in self._iter_nodes():
            parent = node.parent
            if parent.children.get(node.key.child_key(self.page_size)) is not node:
                fail(f"node {node.id} is not its parent's child")
            depth[id(node)] = depth[id(parent)] + len(node.key)
            ref = _ref(node)
            if node.value is not None:
                if ref is not None:
                    fail(f"hot node {node.id} holds a blob reference")
                if parent is not self.root_node and parent.value is None:
                    fail(f"hot node {node.id} under a non-hot parent")
                if len(node.value) != len(node.key):
                    fail(f"hot node {node.id}: {len(node.value)} slots for {len(node.key)} tokens")
                if node.lock_ref > 0:
                    protected += len(node.key)
                else:
                    evictable += len(node.key)
            else:
                if ref is None:
                    fail(f"non-hot node {node.id} without a blob reference")
                if not ref.handle.alive:
                    fail(f"node {node.id} references freed blob {ref.handle.id}")
                if ref.count != len(node.key) or ref.start != depth[id(parent)]:
                    fail(f"node {node.id}: blob range {ref.offset}+{ref.count} at {ref.start} for "
                         f"{len(node.key)} tokens at {depth[id(parent)]}")
                if not 0 <= ref.offset <= ref.offset + ref.count <= ref.blob_tokens:
                    fail(f"node {node.id}: range outside its blob")
                if node not in self._blob_nodes.get(ref.handle.id, ()):
                    fail(f"node {node.id} missing from blob {ref.handle.id}'s node set")
                refs[ref.handle.id] = refs.get(ref.handle.id, 0) + 1
                handles[ref.handle.id] = ref.handle
            if _pins(node):
                fail(f"node {node.id} is still pinned")
            want_leaf = node.value is not None and node.lock_ref == 0 and all(
                c.value is None for c in node.children.values())
            if want_leaf != (node in self.evictable_leaves):
                fail(f"node {node.id}: evictable-leaf set membership is {not want_leaf}")
            ref = _ref(node)
            want_dev = node.value is None and ref.tier == Tier.DEVICE and all(
                c.value is None and _ref(c).tier == Tier.HOST for c in node.children.values())
            want_host = node.value is None and ref.tier == Tier.HOST and not node.children
            if want_dev != (node in self._device_cold_leaves) or want_host != (node in self._host_cold_leaves):
                fail(f"node {node.id}: cold-leaf set membership")
        if evictable != self.evictable_size_ or protected != self.protected_size_:
            fail(f"evictable/protected {self.evictable_size_}/{self.protected_size_}, "
                 f"tree says {evictable}/{protected}")
        live = {h.id: h for h in self.store.handles()}
        if set(live) != set(handles):
            fail(f"store holds blobs {sorted(live)}, the tree references {sorted(handles)}")
        for hid, handle in handles.items():
            if handle.refcount != refs[hid]:
                fail(f"blob {hid} has refcount {handle.refcount} but {refs[hid]} referencing nodes")
            if len(self._blob_nodes.get(hid, ())) != refs[hid]:
                fail(f"blob {hid}'s node set has {len(self._blob_nodes.get(hid, ()))} nodes, {refs[hid]} reference it")
        if set(self._blob_nodes) != set(handles):
            fail("stale blob node sets")
        page = self.store.page_bytes
        for tier, used in ((Tier.DEVICE, self.store.used_bytes), (Tier.HOST, self.store.host_used_bytes)):
            want = sum(h.num_pages * page for h in handles.values() if h.tier == tier)
            if want != used:
                fail(f"{tier} store uses {used} bytes, live blobs hold {want}")
        for cold in (self._device_cold_leaves, self._host_cold_leaves):
            for node in cold:
                if not self._is_attached(node):
                    fail(f"cold-leaf set holds detached node {node.id}")

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

    def _state(self, node: Any) -> NodeState:
        if node.value is not None:
            return NodeState.HOT
        return NodeState.COMPRESSED if _ref(node).tier == Tier.DEVICE else NodeState.HOST

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

    def _unpin(self, nodes: list) -> None:
        for n in nodes:
            n.kvtc_pin -= 1

    def _protected(self, node: Any) -> bool:
        return node.lock_ref > 0 or _pins(node) > 0

    def _attach(self, node: Any, ref: KVTCRef) -> None:
        node.kvtc = ref
        self._blob_nodes.setdefault(ref.handle.id, set()).add(node)

    def _detach(self, node: Any) -> KVTCRef:
        """Drop the node's blob reference (the blob's bytes go at refcount 0)."""
        ref = node.kvtc
        node.kvtc = None
        nodes = self._blob_nodes[ref.handle.id]
        nodes.discard(node)
        if not nodes:
            del self._blob_nodes[ref.handle.id]
        self.store.release(ref.handle)
        return ref

    def _refresh_cold(self, node: Any) -> None:
        """Recompute the node's membership of the demotion (device) and drop (host) candidate sets."""
        self._device_cold_leaves.discard(node)
        self._host_cold_leaves.discard(node)
        if node is self.root_node or node.value is not None:
            return
        if _ref(node).tier == Tier.DEVICE:
            if all(c.value is None and _ref(c).tier == Tier.HOST for c in node.children.values()):
                self._device_cold_leaves.add(node)
        elif not node.children:
            self._host_cold_leaves.add(node)

    def _split_node(self, key: Any, child: Any, split_len: int) -> Any:
        """Split ``child`` at ``split_len``; a compressed/host node's halves share its blob (refcount + 1)."""
        ref = _ref(child)
        if child.value is not None or ref is None:
            return super()._split_node(key, child, split_len)
        new_node = compat.TreeNode(priority=child.priority)
        new_node.hit_count = child.hit_count
        new_node.children = {key[split_len:].child_key(self.page_size): child}
        new_node.parent = child.parent
        new_node.lock_ref = child.lock_ref
        new_node.key = child.key[:split_len]
        new_node.value = None
        child.parent = new_node
        child.key = child.key[split_len:]
        new_node.parent.children[key.child_key(self.page_size)] = new_node
        new_node.hash_value, child.hash_value = compat.split_node_hash_value(child.hash_value, split_len,
                                                                           self.page_size)
        self.store.retain(ref.handle)
        self._attach(new_node, KVTCRef(ref.handle, ref.blob_start, ref.blob_tokens, ref.offset, split_len))
        child.kvtc = KVTCRef(ref.handle, ref.blob_start, ref.blob_tokens, ref.offset + split_len,
                             ref.count - split_len)
        self._refresh_cold(new_node)
        self._refresh_cold(child)
        return new_node

    def _insert_helper(self, node: Any, key: Any, value: Any, priority: int = 0, chunked: bool = False):
        """RadixCache's insert walk, reviving compressed/host nodes on the path with the inserted slots.

        Choice: a request that recomputed tokens which exist compressed (e.g. after a failed or skipped load-back)
        gives the tree fresh, exact KV for them, so the nodes take those slots and drop their blob references rather
        than keeping the lossy copy and handing the slots back. This is also what keeps hot nodes ancestor-closed
        when the insert continues below them, and lets ``cache_unfinished_req`` find the whole key hot.

        Returns (prefix_len, last node) like RadixCache, where prefix_len counts only the tokens that were already hot:
        the caller frees the slots of that prefix as duplicates and the tree keeps every slot after it (revived and
        new nodes alike).
        """
        if priority is None:
            priority = 0
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
            prefix_len = node.key.match(key, page_size=self.page_size)
            if prefix_len < len(node.key):
                node = self._split_node(node.key, node, prefix_len)
            node.priority = max(node.priority, priority)
            self._inc_hit_count(node, chunked)
            if node.value is None:
                reviving = True
                self.kvtc_counters.revived_tokens += prefix_len
                self._make_hot(node, value[:prefix_len].clone())
            elif reviving:
                raise RuntimeError("hot node below a compressed node")
            else:
                hot_prefix += prefix_len
            key = key[prefix_len:]
            value = value[prefix_len:]
            if len(key):
                child_key = key.child_key(self.page_size)

        if len(key):
            new_node = compat.TreeNode(priority=priority)
            new_node.parent = node
            new_node.key = key
            new_node.value = value.clone()
            self._inc_hit_count(new_node, chunked)
            node.children[child_key] = new_node
            self.evictable_size_ += len(key)
            self._update_leaf_status(node)
            self._update_leaf_status(new_node)
            self._record_store_event(new_node)
            node = new_node
        return hot_prefix, node

    # ------------------------------------------------------------------------------------------------------------------
    # State changes
    # ------------------------------------------------------------------------------------------------------------------

    def _make_hot(self, node: Any, slots: torch.Tensor) -> None:
        """compressed/host -> hot: give the node its slots and drop its blob reference."""
        self._detach(node)
        node.value = slots
        if node.lock_ref > 0:
            self.protected_size_ += len(node.key)
        else:
            self.evictable_size_ += len(node.key)
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)
        self._refresh_cold(node)
        self._refresh_cold(node.parent)

    def _delete_hot_leaf(self, node: Any) -> None:
        """Evict a hot leaf as RadixCache does: free its slots and delete it."""
        self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
        self._delete_leaf(node)
        self._record_remove_event(node)
        self.kvtc_counters.deleted_tokens += len(node.key)

    def _drop_subtree(self, top: Any) -> None:
        """Delete ``top`` and its subtree: hot slots freed (only ``top`` may be hot), blob references dropped."""
        nodes = [top]
        i = 0
        while i < len(nodes):
            nodes.extend(nodes[i].children.values())
            i += 1
        for node in nodes:
            if self._protected(node):
                raise RuntimeError(f"dropping locked or pinned node {node.id}")
            if node.value is not None:
                self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
                self.evictable_size_ -= len(node.key)
                self.evictable_leaves.discard(node)
                self.kvtc_counters.deleted_tokens += len(node.key)
            else:
                self._detach(node)
                self.kvtc_counters.drops += 1
                self.kvtc_counters.dropped_tokens += len(node.key)
            self._device_cold_leaves.discard(node)
            self._host_cold_leaves.discard(node)
            self._record_remove_event(node)
        parent = top.parent
        removed = parent.children.pop(top.key.child_key(self.page_size), None)
        if removed is not top:
            raise RuntimeError(f"node {top.id} is not its parent's child")
        self._update_leaf_status(parent)
        self._refresh_cold(parent)

    def _evict_hot_leaf(self, node: Any) -> int:
        """Free an evictable hot leaf's slots by compressing it (or deleting it); returns the tokens freed."""
        n = len(node.key)
        start = self._depth(node)
        has_children = bool(node.children)
        n_head, n_tail = self._exact_counts(start, n, at_sequence_end=not has_children)
        if not has_children and n - n_head - n_tail < self.options.min_compress_tokens:
            self._delete_hot_leaf(node)
        elif not self._compress(node, start, n_head, n_tail):
            if node.children:
                self._drop_subtree(node)
            else:
                self._delete_hot_leaf(node)
        return n

    def _exact_counts(self, start: int, n: int, at_sequence_end: bool) -> tuple[int, int]:
        """(n_head, n_tail): a node's leading sink tokens and trailing window tokens, stored exact.

        Sinks are positions below ``sink_tokens``; the window is the last ``window_tokens`` tokens of a node that ends a
        cached sequence.
        """
        return self.options.exact_policy.counts(start, n, at_sequence_end)

    def _compress(self, node: Any, start: int, n_head: int, n_tail: int) -> bool:
        """hot -> compressed: encode the node's rows, store the blob, then free its slots; False when it cannot be
        stored (nothing changed then)."""
        if self.store.capacity_pages == 0:
            return False
        t0 = time.perf_counter()
        blob = self.pool_codec.encode_slots(self._k_buffers, self._v_buffers, node.value, start, n_head, n_tail)
        handle = self._store_blob(blob)
        c = self.kvtc_counters
        c.compress_seconds += time.perf_counter() - t0
        if handle is None:
            return False
        n = len(node.key)
        self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
        node.value = None
        self.evictable_size_ -= n
        self._attach(node, KVTCRef(handle, start, n, 0, n))
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)
        self._refresh_cold(node)
        c.compress_count += 1
        c.compress_tokens += n
        return True

    def _store_blob(self, blob: torch.Tensor) -> BlobHandle | None:
        """Put a blob in the device store, making room first; None when it cannot fit.

        The page count is agreed across TP ranks (the largest any rank needs), so the room-making below and the
        outcome are the same on every rank.
        """
        pages = self._agree_max(self.store.pages_for(blob.numel()))
        if pages > self.store.capacity_pages or not self._make_device_room(pages):
            return None
        handle = self.store.put(blob, pages=pages)
        if handle is None:
            raise RuntimeError(f"store refused {pages} pages after making room ({self.store.free_pages} free)")
        return handle

    def _make_device_room(self, pages: int) -> bool:
        """Demote (host tier) or delete (no host tier) the coldest device blobs' nodes until ``pages`` are free."""
        store = self.store
        release = self._demote if store.host is not None else self._drop_subtree
        return self._release_coldest(self._device_cold_leaves, release, lambda: store.free_pages >= pages)

    def _demote(self, node: Any) -> None:
        """Move the node's blob (and so every node sharing it) to the host tier; drop the node if the host is full."""
        handle = _ref(node).handle
        if not self._make_host_room(handle.num_pages):
            self._drop_subtree(node)
            return
        if not self.store.demote(handle):
            raise RuntimeError(f"host tier refused {handle.num_pages} pages after making room")
        self.kvtc_counters.demotions += 1
        for shared in list(self._blob_nodes[handle.id]):
            self._refresh_cold(shared)
            self._refresh_cold(shared.parent)

    def _make_host_room(self, pages: int) -> bool:
        """Delete the coldest host leaves until ``pages`` host pages are free."""
        host = self.store.host
        if pages > host.num_pages:
            return False
        return self._release_coldest(self._host_cold_leaves, self._drop_subtree, lambda: host.free_pages >= pages)

    def _release_coldest(self, leaves: set, release: Callable[[Any], None], done: Callable[[], bool]) -> bool:
        """Release the coldest unprotected nodes of ``leaves`` (a live set that ``release`` updates; a parent joins
        the queue when it becomes a leaf) in eviction-policy order until ``done()``; returns ``done()``."""
        if done():
            return True
        priority = self.eviction_strategy.get_priority
        heap = [(priority(n), n.id, n) for n in leaves]
        heapq.heapify(heap)
        while not done() and heap:
            _, _, node = heapq.heappop(heap)
            if node not in leaves or self._protected(node):
                continue
            parent = node.parent
            release(node)
            if parent in leaves:
                heapq.heappush(heap, (priority(parent), parent.id, parent))
        return done()

    # ------------------------------------------------------------------------------------------------------------------
    # Load-back
    # ------------------------------------------------------------------------------------------------------------------

    def _alloc_for_load(self, anchor: Any, total: int) -> torch.Tensor | None:
        """``total`` slots (whole pages: node keys are page-aligned), evicting with ``anchor`` locked if needed."""
        allocator = self.token_to_kv_pool_allocator
        slots = allocator.alloc(total)
        if slots is not None:
            return slots
        self.inc_lock_ref(anchor)
        try:
            self.evict(compat.EvictParams(num_tokens=total - allocator.available_size()))
        finally:
            self.dec_lock_ref(anchor)
        return allocator.alloc(total)

    def _restore(self, chain: list, anchor: Any, slots: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Decode ``chain``'s blobs into ``slots`` and mark the nodes hot (chain is pinned on entry, unpinned here)."""
        t0 = time.perf_counter()
        c = self.kvtc_counters
        # Consecutive nodes with adjacent ranges of one blob (a split node restored whole) decode in one call.
        groups: list[tuple[int, int]] = []  # (first chain index, end chain index)
        for i, node in enumerate(chain):
            if groups:
                prev = _ref(chain[i - 1])
                ref = _ref(node)
                if ref.handle is prev.handle and ref.offset == prev.offset + prev.count:
                    groups[-1] = (groups[-1][0], i + 1)
                    continue
            groups.append((i, i + 1))
        first_bad = len(chain)
        offset = 0
        for lo, hi in groups:
            first, last = _ref(chain[lo]), _ref(chain[hi - 1])
            count = last.offset + last.count - first.offset
            try:
                blob = self.store.get(first.handle)
                self.pool_codec.decode_into(blob, self._k_buffers, self._v_buffers, slots[offset:offset + count],
                                            token_range=(first.offset, first.offset + count),
                                            expected_tokens=first.blob_tokens, expected_start=first.blob_start)
            except BlobFormatError as exc:
                c.integrity_failures += 1
                logger.warning("KVTC: blob %d failed its checks on load-back and is dropped (%s)", first.handle.id,
                               exc)
                first_bad = lo
                break
            c.decompress_count += 1
            offset += count
        first_bad = self._agree_min(first_bad)
        self._unpin(chain)

        restored = chain[:first_bad]
        offset = 0
        for node in restored:
            n = len(node.key)
            self._make_hot(node, slots[offset:offset + n].clone())
            offset += n
        if first_bad < len(chain):
            self.token_to_kv_pool_allocator.free(slots[offset:])
            c.integrity_dropped_tokens += sum(len(n.key) for n in chain[first_bad:])
            self._drop_subtree(chain[first_bad])
        c.decompress_tokens += offset
        elapsed = time.perf_counter() - t0
        c.decompress_seconds += elapsed
        if self.metrics_collector is not None and offset:
            self.metrics_collector.observe_load_back_duration(elapsed)
            self.metrics_collector.increment_load_back_num_tokens(offset)
        self._maybe_report()
        return slots[:offset], (restored[-1] if restored else anchor)
