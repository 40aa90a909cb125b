"""Consistency check and statistics of a KVTCRadixCache, recomputed from the tree (a debugging aid: walks every node).

``check_consistency(cache)`` raises RuntimeError naming the first violated invariant:

* tree links, hot closure (a node holding slots has a parent holding slots, or the root);
* per state: slots iff the state has them (one per token), a blob reference iff not HOT, the reference's range and
  absolute start match the node, COMPRESSED/ENCODING/HOT_BLOB/LOADING blobs are in pool slots, HOST blobs have a
  verified host copy; ENCODING and LOADING nodes are locked;
* blobs: every live blob is referenced, its refcount is the number of referencing nodes, the blob -> nodes index is
  exact, ``writing`` iff an encode in flight owns it, ``readers`` equals the decode/spill pins in flight;
* sizes: ``evictable_size_``/``protected_size_`` are the hot tokens of unlocked/locked nodes, the store's device and
  protected slot totals are the sums over blobs, the host spill's bytes the sum of host copies;
* candidate sets: SGLang's evictable leaves, the cold (COMPRESSED) and host leaves, the HOT_BLOB set;
* slots: no pool slot is held twice (hot nodes, blobs, in-flight work) or held while free in the allocator.

``collect_stats(cache)`` returns the counters plus gauges computed from the tree and the store (``KVTCStats``).
"""

from __future__ import annotations

from typing import Any

import torch

from kvtc_sglang.cache import audit
from kvtc_sglang.cache.codec_info import codec_compile_count
from kvtc_sglang.cache.metrics import KVTCStats
from kvtc_sglang.cache.tier_state import COLD_STATES, NodeState, Tier, ref_of, state_of

S = NodeState


def _fail(what: str) -> None:
    raise RuntimeError(f"KVTCRadixCache inconsistent: {what}")


def check_consistency(cache: Any) -> None:
    with audit.exempt():
        _check(cache)


def _check(cache: Any) -> None:
    evictable = protected = 0
    refs: dict[int, int] = {}
    blobs: dict[int, Any] = {}
    depth = {id(cache.root_node): 0}
    held: list[torch.Tensor] = []
    for node in cache._iter_nodes():
        parent = node.parent
        if parent.children.get(node.key.child_key(cache.page_size)) is not node:
            _fail(f"node {node.id} is not its parent's child")
        depth[id(node)] = depth[id(parent)] + len(node.key)
        state = state_of(node)
        ref = ref_of(node)
        if state.has_slots != (node.value is not None):
            _fail(f"node {node.id} in state {state.value} with value {'set' if node.value is not None else 'None'}")
        if (ref is None) != (state is S.HOT):
            _fail(f"node {node.id} in state {state.value} with blob reference {ref}")
        if node.value is not None:
            if parent is not cache.root_node and not state_of(parent).has_slots:
                _fail(f"node {node.id} holds slots under a node without slots")
            if len(node.value) != len(node.key):
                _fail(f"node {node.id}: {len(node.value)} slots for {len(node.key)} tokens")
            held.append(node.value)
            if node.lock_ref > 0:
                protected += len(node.key)
            else:
                evictable += len(node.key)
        if state in (S.ENCODING, S.LOADING) and node.lock_ref <= 0:
            _fail(f"node {node.id} in state {state.value} is not locked")
        if ref is not None:
            blob = ref.blob
            if not blob.alive:
                _fail(f"node {node.id} references freed blob {blob.id}")
            if ref.count != len(node.key) or ref.start != depth[id(parent)]:
                _fail(f"node {node.id}: blob range {ref.offset}+{ref.count} at {ref.start} for {len(node.key)} "
                      f"tokens at {depth[id(parent)]}")
            if not 0 <= ref.offset <= ref.end <= blob.n_tokens:
                _fail(f"node {node.id}: range outside its blob")
            if state is S.HOST:
                if blob.on_device or not blob.host_verified:
                    _fail(f"HOST node {node.id}: blob {blob.id} on device {blob.on_device}, host copy verified "
                          f"{blob.host_verified}")
            elif not blob.on_device:
                _fail(f"node {node.id} in state {state.value}: blob {blob.id} has no pool slots")
            if node not in cache._blob_nodes.get(blob.id, ()):
                _fail(f"node {node.id} missing from blob {blob.id}'s node set")
            refs[blob.id] = refs.get(blob.id, 0) + 1
            blobs[blob.id] = blob
        want_leaf = node.value is not None and node.lock_ref == 0 and not any(
            c.value is not None for c in node.children.values())
        if want_leaf != (node in cache.evictable_leaves):
            _fail(f"node {node.id}: evictable-leaf set membership is {not want_leaf}")
        want_cold = state is S.COMPRESSED and all(state_of(c) is S.HOST for c in node.children.values())
        want_host = state is S.HOST and not node.children
        if want_cold != (node in cache._cold_leaves) or want_host != (node in cache._host_leaves):
            _fail(f"node {node.id}: cold/host leaf set membership")
        if (state is S.HOT_BLOB) != (node in cache._hot_blob_nodes):
            _fail(f"node {node.id}: HOT_BLOB set membership")
    for node in cache._orphans:
        if node.value is not None:
            held.append(node.value)
            if node.lock_ref > 0:
                protected += len(node.key)
            else:
                evictable += len(node.key)
    if (evictable, protected) != (cache.evictable_size_, cache.protected_size_):
        _fail(f"evictable/protected {cache.evictable_size_}/{cache.protected_size_}, tree says "
              f"{evictable}/{protected}")

    store = cache.blobs
    live = {b.id: b for b in store.blobs()}
    for bid, blob in live.items():
        if bid not in blobs and not (blob.doomed and blob.protected and blob.refcount == 0):
            _fail(f"blob {bid} is alive but unreferenced (doomed={blob.doomed}, protected={blob.protected})")
        if blob.on_device and bid not in blobs:
            held.append(blob.slots)
    if not set(blobs) <= set(live):
        _fail(f"the tree references blobs {sorted(set(blobs) - set(live))} the store does not hold")
    for bid, blob in blobs.items():
        if blob.refcount != refs[bid]:
            _fail(f"blob {bid} has refcount {blob.refcount} but {refs[bid]} referencing nodes")
        if len(cache._blob_nodes.get(bid, ())) != refs[bid]:
            _fail(f"blob {bid}'s node set has {len(cache._blob_nodes.get(bid, ()))} nodes, {refs[bid]} reference it")
        if blob.on_device != (blob.tier is Tier.DEVICE):
            _fail(f"blob {bid}: tier {blob.tier} with pool slots {blob.on_device}")
        if blob.on_device:
            held.append(blob.slots)
            if blob.num_slots < store.slots_for(blob.nbytes) or blob.num_slots != len(blob.slots):
                _fail(f"blob {bid}: {blob.num_slots} slots ({len(blob.slots)}) for {blob.nbytes} bytes")
    if set(cache._blob_nodes) != set(blobs):
        _fail("stale blob node sets")
    for blob in blobs.values():
        if blob.doomed:
            _fail(f"blob {blob.id} is doomed but referenced")

    writers: dict[int, int] = {}
    readers: dict[int, int] = {}
    for op in cache._encode_ops:
        for i, (node, blob) in enumerate(op.items):
            if i not in op.done and blob.alive and blob.writing:
                writers[blob.id] = writers.get(blob.id, 0) + 1
    for p in cache._pending_loads:
        for blob in p.blobs:
            readers[blob.id] = readers.get(blob.id, 0) + 1
    for op in cache._load_ops:
        for p in op.items:
            for blob in p.blobs:
                readers[blob.id] = readers.get(blob.id, 0) + 1
    for op in cache._spill_ops:
        for blob, _ in op.items:
            if blob.alive:
                readers[blob.id] = readers.get(blob.id, 0) + 1
    for bid, blob in live.items():
        if blob.writing != (writers.get(bid, 0) > 0):
            _fail(f"blob {bid}: writing={blob.writing}, encodes in flight {writers.get(bid, 0)}")
        if blob.readers != readers.get(bid, 0):
            _fail(f"blob {bid}: {blob.readers} readers, {readers.get(bid, 0)} decodes/spills in flight")
    dev = sum(b.num_slots for b in live.values() if b.on_device)
    prot = sum(b.num_slots for b in live.values() if b.on_device and b.protected)
    if (dev, prot) != (store.device_slots, store.protected_slots):
        _fail(f"store counts {store.device_slots} slots ({store.protected_slots} protected), blobs hold {dev} "
              f"({prot})")
    host_bytes = sum(getattr(b, "host_reserved", b.nbytes) for b in live.values() if b.host_payload is not None)
    if host_bytes != cache.host.used_bytes:
        _fail(f"host spill counts {cache.host.used_bytes} bytes, host copies hold {host_bytes}")

    # slots: each held once, none free in the allocator
    all_held = torch.cat([t.reshape(-1) for t in held]) if held else torch.empty(0, dtype=torch.int64)
    uniq, counts = torch.unique(all_held, return_counts=True)
    dup = uniq[counts > 1]
    if dup.numel():
        _fail(f"pool slots held twice: {dup[:8].tolist()}")
    allocator = cache.token_to_kv_pool_allocator
    free = torch.cat([allocator.free_pages, allocator.release_pages])
    page = max(1, cache.page_size)
    if page > 1:
        free = (free[:, None] * page + torch.arange(page)[None, :]).reshape(-1)
    overlap = torch.isin(uniq, free)
    if bool(overlap.any()):
        _fail(f"pool slots held by the cache are free in the allocator: {uniq[overlap][:8].tolist()}")


def collect_stats(cache: Any) -> KVTCStats:
    s = cache.kvtc_counters.copy()
    with audit.exempt():
        blob_only = 0
        for node in cache._iter_nodes():
            state = state_of(node)
            if state.has_slots:
                s.hot_tokens += len(node.key)
                if state is not S.HOT:
                    s.hot_blob_tokens += len(node.key)
            elif state is S.COMPRESSED:
                s.compressed_tokens += len(node.key)
            else:
                s.host_tokens += len(node.key)
        store = cache.blobs
        live = store.blobs()
        s.hot_bytes = s.hot_tokens * cache.slot_bytes
        s.blob_slots = store.device_slots
        s.blob_slot_bytes = store.device_slots * cache.slot_bytes
        s.protected_blob_slots = store.protected_slots
        s.tail_waste_bytes = store.tail_waste_bytes()
        s.num_blobs = len(live)
        s.host_used_bytes = cache.host.used_bytes
        s.host_capacity_bytes = cache.host.capacity_bytes
        s.store_cap_bytes = (store.cap_slots or 0) * cache.slot_bytes
        # the compressed part proper: blobs every node of which holds no slots (a blob shared with a restored half
        # is counted with the hot tokens), their tokens, payload bytes and pool slots
        cold_tokens = cold_slots = cold_bytes = 0
        for b in live:
            nodes = cache._blob_nodes.get(b.id, ())
            if nodes and all(state_of(n) in COLD_STATES for n in nodes):
                cold_tokens += sum(len(n.key) for n in nodes)
                cold_bytes += b.nbytes
                if b.on_device:
                    cold_slots += b.num_slots
        device_cold = sum(len(n.key) for b in live if b.on_device for n in cache._blob_nodes.get(b.id, ())
                          if state_of(n) is S.COMPRESSED and all(state_of(m) is S.COMPRESSED
                                                                 for m in cache._blob_nodes.get(b.id, ())))
        s.blob_bytes = cold_bytes
        s.blob_raw_bytes = cold_tokens * cache.slot_bytes
        s.effective_ratio = device_cold / cold_slots if cold_slots else 0.0
        s.jit_compiles = codec_compile_count(cache.codec)
        s.policy_restored_fraction = cache.policy.restored_fraction
    return s


__all__ = ["check_consistency", "collect_stats", "COLD_STATES"]
