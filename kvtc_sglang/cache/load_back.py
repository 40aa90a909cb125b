"""Load-back: restoring a COMPRESSED/HOST chain of nodes into pool slots. Host-side checks (token binding, CRC-32
of host copies, optionally of pool copies), slot allocation, promotion of host copies, the decode's first stage at
``init_load_back`` and its layer-wise rest when the prefill batch forms, the acknowledgement (LOADING -> HOT_BLOB),
and the removal of loads that failed after their batch formed (nodes out of the tree, requests aborted).

``LoadBackMixin`` is a part of ``KVTCRadixCache`` (radix_cache.py), whose state it reads and writes.
"""

from __future__ import annotations

import logging
import time
import zlib
from array import array
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtc_sglang import sglang_compat as compat
from kvtc_sglang.cache import audit, faults
from kvtc_sglang.cache.blob_store import Blob
from kvtc_sglang.cache.codec_info import layer_group
from kvtc_sglang.cache.tier_state import COLD_STATES, NodeState, ref_of, state_of
from kvtc_sglang.cache.transfer import LOAD, DoneEvent, Op

logger = logging.getLogger("kvtc_sglang.cache.radix_cache")  # the tier logs under one name

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


class LoadBackMixin:
    """init_load_back, the checks and decode of a chain, the layer-wise launch, its acknowledgement and poisoning."""

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
            index, finish = -1, DoneEvent()
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
