"""Compression ahead of eviction: the queue of hot nodes to compress, the compress-ahead batch chosen at each
scheduler step, the blobs and encode jobs of a batch (shared with compression at eviction), the encode launched on
the compress stream and its acknowledgement (ENCODING -> HOT_BLOB, or back to HOT on failure).

``CompressionMixin`` is a part of ``KVTCRadixCache`` (radix_cache.py), whose state it reads and writes.
"""

from __future__ import annotations

import logging
from array import array
from typing import Any

import torch

from kvtc_sglang.cache import audit, faults
from kvtc_sglang.cache.blob_store import Blob
from kvtc_sglang.cache.tier_state import BlobRef, NodeState, state_of
from kvtc_sglang.cache.transfer import COMPRESS, DoneEvent, Op, host_buffer

logger = logging.getLogger("kvtc_sglang.cache.radix_cache")  # the tier logs under one name

S = NodeState


class CompressionMixin:
    """Compress-ahead queue and batch, blob planning and creation, encode launch and acknowledgement."""

    def queue_compression(self, node: Any) -> None:
        """Queue a hot node (without blob) for compression ahead of eviction at the next step."""
        if state_of(node) is S.HOT and node.value is not None:
            self._compress_queue.append(node)

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
            finish = DoneEvent()
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
