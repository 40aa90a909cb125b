"""Eviction: SGLang's ``evict(n)`` over the tier's candidates in policy order (hot leaves compressed or deleted,
redundant blobs dropped, cold blobs demoted to the host tier or dropped), counting net freed slots, and compression
at eviction time (one encode into the nodes' own first slots, the codec's scratch rows, or free slots).

``EvictionMixin`` is a part of ``KVTCRadixCache`` (radix_cache.py), whose state it reads and writes.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kvtc_sglang import sglang_compat as compat
from kvtc_sglang.cache import faults
from kvtc_sglang.cache.codec_info import scratch_rows_of
from kvtc_sglang.cache.policy import Action
from kvtc_sglang.cache.tier_state import BlobRef, NodeState, state_of

S = NodeState


class EvictionMixin:
    """evict(n), the per-node eviction actions, the blob size model, and compression at eviction time."""

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
