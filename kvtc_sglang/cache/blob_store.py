"""Blob storage of the compressed tier: payload bytes in the KV pool's own slots, an optional pinned host spill.

Pool slots (``BlobStore``):
    A blob of B payload bytes occupies ``k = slots_for(B)`` slots handed out by SGLang's allocator (whole pages when
    page_size > 1), or the first k slots of the node it was compressed from (in place). A slot is ``2L`` rows of
    ``row_bytes = H * D * esize`` bytes: the pool keeps 2L per-layer buffers ``[size + page_size, H, D]``, buffer
    b < L is ``k_buffer[b]`` and b >= L is ``v_buffer[b - L]``. Blob row j lives at slot ``slots[j // 2L]``, buffer
    ``j % 2L``; its row address (what the codec kernels turn into a byte address) is ``slot * 2L + buffer``. The row
    table is built on the device from the device slot tensor with torch ops (no host copy of slot ids is needed).
    Tail waste is below one page per blob (``tail_waste_bytes``).

    There is no fixed budget: blobs grow and shrink with the workload. ``cap_slots`` (``--kvtc-store-budget``) is
    an optional upper bound on the slots all blobs may hold together.

Accounting: every live device blob's slots are either *evictable* (nothing reads or writes them in flight: dropping
the blob frees them at once) or *protected* (an encode is writing them, or a decode/spill is reading them).
``device_slots == evictable_slots + protected_slots`` at all times.

Host spill (``HostSpill``): pinned host copies of blobs within a byte budget (``--kvtc-host-spill``). A blob may
have a device copy, a host copy, or both (the host copy is made ahead, while the device copy still exists, so that
dropping the device copy later is instant).
"""

from __future__ import annotations

import itertools
from array import array
from dataclasses import dataclass, field
from typing import Any

import torch

from kvtc_sglang.cache.tier_state import Tier


@dataclass(eq=False)
class Blob:
    """One compressed run of tokens. Owned by a ``BlobStore``; nodes hold ``BlobRef``s to it.

    Attributes:
        id: unique per store, increasing in creation order (identical across TP ranks).
        layout: the codec's ``BlobLayout`` (host-only: token counts and the exact payload size ``nbytes``).
        start_pos: absolute position of the blob's first token.
        token_ids: the blob's token ids (host copy; binds the blob to its tokens, checked at load-back).
        tier: DEVICE while the payload is in pool slots, HOST once only the host copy is left.
        slots: device int64 [num_slots] pool slots holding the payload (whole pages), None on HOST.
        num_slots: len(slots) (known on the host), 0 on HOST.
        rows: device int64 [n_rows] row addresses of the payload (``slot * 2L + buffer``), None on HOST.
        crc_host: [1] int64 host tensor (a view of its encode batch's pinned buffer on CUDA) that an async copy of
            the codec's device CRC-32 fills after the encode.
        crc: the CRC-32 on the host, known after the encode's acknowledgement.
        host_payload: pinned host copy of the payload ([nbytes] uint8), or None.
        host_verified: the host copy passed its CRC check (it counts as stored only then).
        refcount: nodes referencing the blob.
        doomed: no node references it any more, but a kernel in flight still uses its rows: it is freed when the
            last one is acknowledged (release after read).
        readers: decodes and spills in flight that read the device rows.
        writing: an encode in flight writes the device rows.
        alive: False once every copy is gone.
    """

    id: int
    layout: Any
    start_pos: int
    token_ids: array
    tier: Tier = Tier.DEVICE
    slots: torch.Tensor | None = field(default=None, repr=False)
    num_slots: int = 0
    rows: torch.Tensor | None = field(default=None, repr=False)
    crc_host: torch.Tensor | None = field(default=None, repr=False)
    crc: int | None = None
    host_payload: torch.Tensor | None = field(default=None, repr=False)
    host_verified: bool = False
    refcount: int = 0
    readers: int = 0
    writing: bool = False
    doomed: bool = False
    alive: bool = True

    @property
    def n_tokens(self) -> int:
        return int(self.layout.n_tokens)

    @property
    def n_head(self) -> int:
        return int(self.layout.n_head)

    @property
    def n_tail(self) -> int:
        return int(self.layout.n_tail)

    @property
    def nbytes(self) -> int:
        return int(self.layout.nbytes)

    @property
    def protected(self) -> bool:
        """Dropping the device copy is not allowed now (a kernel in flight reads or writes its rows)."""
        return self.readers > 0 or self.writing

    @property
    def on_device(self) -> bool:
        return self.slots is not None

    def exact_positions(self) -> range | tuple[range, range]:
        """Absolute positions stored bit-exact: the leading n_head and trailing n_tail tokens."""
        head = range(self.start_pos, self.start_pos + self.n_head)
        end = self.start_pos + self.n_tokens
        return head, range(end - self.n_tail, end)


class BlobStore:
    """Blobs in KV-pool slots of SGLang's allocator (see the module docstring).

    Args:
        allocator: the pool's token-to-KV allocator (``alloc``, ``free_segment``, ``available_size``, page_size).
        layers: L (the pool has 2L row buffers per slot).
        row_bytes: bytes of one row, H * D * element size.
        device: the pool's device.
        cap_slots: optional upper bound on the slots all device blobs hold together (None: no bound).
    """

    def __init__(self, allocator: Any, *, layers: int, row_bytes: int, device: torch.device | str,
                 cap_slots: int | None = None):
        self.allocator = allocator
        self.page_size = int(getattr(allocator, "page_size", 1) or 1)
        self.buffers = 2 * int(layers)
        self.row_bytes = int(row_bytes)
        self.slot_bytes = self.buffers * self.row_bytes
        self.device = torch.device(device)
        self.cap_slots = None if cap_slots is None else int(cap_slots)
        self._ids = itertools.count()
        self._live: dict[int, Blob] = {}
        self._buffer_ids = torch.arange(self.buffers, dtype=torch.int64, device=self.device)
        self.device_slots = 0
        self.protected_slots = 0
        self.on_destroy = None  # called with a blob just before its copies are freed (host budget bookkeeping)
        self.free_fn = lambda slots: allocator.free_segment(slots, start_pos=0)  # the owner may count frees
        self.allocated_total = 0  # slots taken from the allocator so far

    # ------------------------------------------------------------------ sizes
    def rows_for(self, nbytes: int) -> int:
        return -(-int(nbytes) // self.row_bytes)

    def slots_for(self, nbytes: int) -> int:
        """Pool slots (whole pages) a payload of ``nbytes`` bytes needs."""
        slots = -(-self.rows_for(nbytes) // self.buffers)
        return -(-slots // self.page_size) * self.page_size

    @property
    def evictable_slots(self) -> int:
        return self.device_slots - self.protected_slots

    def room_under_cap(self) -> int | None:
        """Slots blobs may still take under the cap (None: no cap)."""
        return None if self.cap_slots is None else max(0, self.cap_slots - self.device_slots)

    def blobs(self) -> list[Blob]:
        """Every live blob, in creation order."""
        return list(self._live.values())

    def tail_waste_bytes(self) -> int:
        """Pool bytes held by device blobs beyond their payloads (the partly used last page of each)."""
        return sum(b.num_slots * self.slot_bytes - b.nbytes for b in self._live.values() if b.on_device)

    # ------------------------------------------------------------------ rows
    def make_rows(self, slots: torch.Tensor, nbytes: int) -> torch.Tensor:
        """Row addresses of a payload laid out over ``slots`` (device int64 [k]): [rows_for(nbytes)] int64 on the
        slots' device, built with torch ops (no host read)."""
        rows = slots[:, None] * self.buffers + self._buffer_ids[None, :]
        return rows.reshape(-1)[:self.rows_for(nbytes)]

    # ------------------------------------------------------------------ blobs
    def allocate(self, num_slots: int) -> torch.Tensor | None:
        """``num_slots`` free pool slots for a new blob (never evicts), or None when the allocator or the cap
        cannot give them."""
        room = self.room_under_cap()
        if room is not None and num_slots > room:
            return None
        if num_slots > self.allocator.available_size():
            return None
        slots = self.allocator.alloc(num_slots)
        if slots is not None:
            self.allocated_total += num_slots
        return slots

    def create_many(self, specs: list[tuple[Any, int, array]], slots: list[torch.Tensor], *,
                    writing: bool) -> list[Blob]:
        """``create`` for a batch: (layout, start_pos, token_ids) per blob and its slots (device int64, whole
        pages). The row tables of all of them are built with one pass of tensor operations (a concatenation when
        the slots are separate tensors), each blob's a view of it."""
        if not specs:
            return []
        counts = [int(t.numel()) for t in slots]
        all_slots = slots[0] if len(slots) == 1 else torch.cat(slots)
        rows = (all_slots[:, None] * self.buffers + self._buffer_ids[None, :]).reshape(-1)
        out, at = [], 0
        for (layout, start_pos, token_ids), t, k in zip(specs, slots, counts):
            if k < self.slots_for(layout.nbytes):
                raise RuntimeError(f"a {layout.nbytes}-byte payload needs {self.slots_for(layout.nbytes)} slots, "
                                   f"{k} given")
            n_rows = self.rows_for(layout.nbytes)
            blob = Blob(id=next(self._ids), layout=layout, start_pos=int(start_pos), token_ids=token_ids, slots=t,
                        num_slots=k, rows=rows[at * self.buffers:at * self.buffers + n_rows], writing=writing)
            at += k
            self._live[blob.id] = blob
            self.device_slots += k
            if blob.protected:
                self.protected_slots += k
            out.append(blob)
        return out

    def create(self, layout: Any, start_pos: int, token_ids: array, slots: torch.Tensor, num_slots: int, *,
               writing: bool) -> Blob:
        """Register a blob whose payload is (or is about to be) in ``slots`` (device int64, ``num_slots`` long,
        whole pages, taken from the allocator or from a node's own slots). Refcount 0: the caller attaches nodes."""
        if num_slots < self.slots_for(layout.nbytes):
            raise RuntimeError(f"a {layout.nbytes}-byte payload needs {self.slots_for(layout.nbytes)} slots, "
                               f"{num_slots} given")
        blob = Blob(id=next(self._ids), layout=layout, start_pos=int(start_pos), token_ids=token_ids,
                    slots=slots, num_slots=int(num_slots), rows=self.make_rows(slots, layout.nbytes),
                    writing=writing)
        self._live[blob.id] = blob
        self.device_slots += blob.num_slots
        if blob.protected:
            self.protected_slots += blob.num_slots
        return blob

    def _set_protection(self, blob: Blob, change) -> None:
        before = blob.protected
        change()
        after = blob.protected
        if blob.on_device and before != after:
            self.protected_slots += blob.num_slots if after else -blob.num_slots
        if blob.doomed and not after and blob.alive:
            self.destroy(blob)

    def begin_read(self, blob: Blob) -> None:
        self._set_protection(blob, lambda: setattr(blob, "readers", blob.readers + 1))

    def end_read(self, blob: Blob) -> None:
        if blob.readers <= 0:
            raise RuntimeError(f"blob {blob.id}: end_read without a reader")
        self._set_protection(blob, lambda: setattr(blob, "readers", blob.readers - 1))

    def end_write(self, blob: Blob) -> None:
        if not blob.writing:
            raise RuntimeError(f"blob {blob.id}: end_write without a writer")
        self._set_protection(blob, lambda: setattr(blob, "writing", False))

    def retain(self, blob: Blob) -> None:
        self._check(blob)
        blob.refcount += 1

    def release(self, blob: Blob) -> int:
        """Drop a reference; at refcount 0 every copy is freed, at once or (while a kernel in flight uses the rows)
        when the last one is acknowledged. Returns the pool slots freed now."""
        self._check(blob)
        blob.refcount -= 1
        if blob.refcount < 0:
            raise RuntimeError(f"blob {blob.id}: refcount below 0")
        if blob.refcount > 0:
            return 0
        if blob.protected:
            blob.doomed = True
            return 0
        return self.destroy(blob)

    def destroy(self, blob: Blob) -> int:
        """Free every copy now, whatever the refcount (references become invalid). Returns pool slots freed."""
        self._check(blob)
        if self.on_destroy is not None:
            self.on_destroy(blob)
        freed = self.free_device_copy(blob)
        blob.host_payload = None
        blob.host_verified = False
        blob.alive = False
        del self._live[blob.id]
        return freed

    def free_device_copy(self, blob: Blob, *, to_allocator: bool = True) -> int:
        """Return the blob's pool slots to the allocator (refused while a kernel in flight uses them); with
        ``to_allocator=False`` the caller takes them back and frees them itself. The blob moves to the HOST tier
        (callers keep it only when a verified host copy exists). Returns slots given up."""
        if not blob.on_device:
            return 0
        if blob.protected:
            raise RuntimeError(f"blob {blob.id}: freeing pool slots that a kernel in flight still uses")
        n = blob.num_slots
        if to_allocator:
            self.free_fn(blob.slots)
        self.device_slots -= n
        blob.slots = None
        blob.rows = None
        blob.num_slots = 0
        blob.tier = Tier.HOST
        return n

    def unregister(self, blob: Blob) -> None:
        """Forget a blob whose slots still belong to the node it was being compressed from, in place (the
        compression failed; the node keeps, and frees, its own slots)."""
        self._check(blob)
        self.device_slots -= blob.num_slots
        if blob.protected:
            self.protected_slots -= blob.num_slots
        blob.slots = None
        blob.rows = None
        blob.num_slots = 0
        blob.alive = False
        del self._live[blob.id]

    def adopt_device_copy(self, blob: Blob, slots: torch.Tensor, num_slots: int, *, writing: bool) -> None:
        """Give a HOST blob device slots again (a promotion; the caller copies the payload in)."""
        if blob.on_device:
            raise RuntimeError(f"blob {blob.id} already has pool slots")
        blob.slots = slots
        blob.num_slots = int(num_slots)
        blob.rows = self.make_rows(slots, blob.nbytes)
        blob.tier = Tier.DEVICE
        self.device_slots += blob.num_slots
        self._set_protection(blob, lambda: setattr(blob, "writing", writing))

    def _check(self, blob: Blob) -> None:
        if not blob.alive or self._live.get(blob.id) is not blob:
            raise KeyError(f"blob {blob.id} is not in this store (freed or foreign)")

    def clear(self) -> None:
        """Forget every blob without touching the allocator (its caller clears the allocator or frees the slots)."""
        for blob in self._live.values():
            blob.alive = False
            blob.refcount = 0
        self._live.clear()
        self.device_slots = 0
        self.protected_slots = 0


class HostSpill:
    """Byte budget of pinned host copies of blobs (``--kvtc-host-spill``).

    Args:
        capacity_bytes: the budget (0 disables the host tier).
        pin: allocate pinned memory (True when CUDA is available: device<->host copies are DMA'd asynchronously).
    """

    def __init__(self, capacity_bytes: int, pin: bool | None = None):
        self.capacity_bytes = int(capacity_bytes)
        self.pin = torch.cuda.is_available() if pin is None else bool(pin)
        self.used_bytes = 0

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def fits(self, nbytes: int) -> bool:
        return self.used_bytes + int(nbytes) <= self.capacity_bytes

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A host buffer of ``nbytes`` bytes within the budget, or None."""
        if not self.fits(nbytes):
            return None
        buf = torch.empty(int(nbytes), dtype=torch.uint8, pin_memory=self.pin)
        self.used_bytes += int(nbytes)
        return buf

    def give_back(self, nbytes: int) -> None:
        self.used_bytes -= int(nbytes)
        if self.used_bytes < 0:
            raise RuntimeError("host spill: more bytes returned than taken")
