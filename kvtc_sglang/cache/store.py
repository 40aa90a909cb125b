"""The compressed store: KVTC blobs in a preallocated, paged byte arena (device), with an optional host tier.

Memory is reserved once: one uint8 tensor of ``capacity_bytes`` on the KV pool's device, cut into fixed pages of
``page_bytes``. A blob occupies ``ceil(nbytes / page_bytes)`` pages anywhere in the arena (no contiguity needed, so
there is no fragmentation); ``get`` gathers them back into one contiguous tensor. Every byte is accounted in whole
pages: ``used_bytes == used pages * page_bytes`` and equals the sum of the live blobs' page-rounded sizes.

Blobs are reference counted: a radix-tree node split in two keeps one blob and two references into it (different
token ranges), so the bytes are freed only when the last reference is released.

The optional ``HostTier`` is the same paged arena in host memory (pinned when CUDA is available, so device<->host
copies can be DMA'd). ``CompressedStore.demote`` moves a blob device -> host (its handle, and so every reference to
it, follows), ``promote`` moves it back.

Glossary: a page is ``page_bytes`` bytes; a handle (``BlobHandle``) names one blob for its whole life, whatever tier
it sits in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

import torch

from kvtc_sglang.codec.transfer import to_device_async



class Tier(str, Enum):
    """Where a stored blob's bytes are: the device store or the host tier."""

    DEVICE = "device"
    HOST = "host"


DEFAULT_PAGE_BYTES = 4096


@dataclass(eq=False)
class BlobHandle:
    """One stored blob. Owned by the store; holders keep the object and retain/release it.

    Attributes:
        id: unique per store, increasing in creation order.
        nbytes: the blob's size in bytes.
        num_pages: pages reserved for it (>= ceil(nbytes / page_bytes); more when the caller asked for a larger,
            rank-agreed reservation).
        page_bytes: page size of the store (both tiers use the same).
        tier: Tier.DEVICE or Tier.HOST.
        refcount: live references; the bytes are freed when it reaches 0.
        pages: page ids in the arena of its tier, shape: [num_pages], dtype: torch.int64, on that arena's device.
        pages_cpu: the same ids on the CPU (the free list's copy).
        alive: False once the bytes are freed; every later use raises.
    """

    id: int
    nbytes: int
    num_pages: int
    page_bytes: int
    tier: str
    refcount: int = 1
    pages: torch.Tensor = field(default=None, repr=False)
    pages_cpu: torch.Tensor = field(default=None, repr=False)
    alive: bool = True

    @property
    def reserved_bytes(self) -> int:
        """Bytes the blob holds in its tier (whole pages)."""
        return self.num_pages * self.page_bytes


class PageArena:
    """A byte arena of fixed-size pages with a LIFO free list.

    Args:
        capacity_bytes: budget; rounded down to whole pages (the arena never exceeds it).
        page_bytes: page size in bytes (> 0).
        device: where the bytes live.
        pin_memory: pin the host arena (only meaningful for a CPU arena with CUDA available).
    """

    def __init__(self, capacity_bytes: int, page_bytes: int = DEFAULT_PAGE_BYTES, device: torch.device | str = "cpu",
                 pin_memory: bool = False):
        if page_bytes <= 0:
            raise ValueError(f"page_bytes must be > 0, got {page_bytes}")
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.page_bytes = int(page_bytes)
        self.num_pages = int(capacity_bytes) // self.page_bytes
        self.device = torch.device(device)
        pin = bool(pin_memory) and self.device.type == "cpu" and self.num_pages > 0
        self.data = torch.empty(self.num_pages * self.page_bytes, dtype=torch.uint8, device=self.device, pin_memory=pin)
        self._pages2d = self.data.view(self.num_pages, self.page_bytes)
        self._free = torch.arange(self.num_pages - 1, -1, -1, dtype=torch.int64)  # stack; top = lowest id
        self._num_free = self.num_pages
        self._in_use = torch.zeros(self.num_pages, dtype=torch.bool)

    # ------------------------------------------------------------------ sizes
    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def free_pages(self) -> int:
        return self._num_free

    @property
    def used_pages(self) -> int:
        return self.num_pages - self._num_free

    @property
    def used_bytes(self) -> int:
        return self.used_pages * self.page_bytes

    @property
    def free_bytes(self) -> int:
        return self._num_free * self.page_bytes

    def pages_for(self, nbytes: int) -> int:
        """Pages a blob of ``nbytes`` bytes needs."""
        return -(-int(nbytes) // self.page_bytes)

    # ------------------------------------------------------------------ pages
    def alloc(self, n: int) -> torch.Tensor | None:
        """Take ``n`` pages; returns their ids (shape: [n], dtype: torch.int64, CPU) or None when fewer are free."""
        if n > self._num_free:
            return None
        ids = self._free[self._num_free - n:self._num_free].clone()
        self._num_free -= n
        self._in_use[ids] = True
        return ids

    def release(self, ids: torch.Tensor) -> None:
        """Return pages (CPU int64 ids from ``alloc``) to the free list."""
        n = ids.numel()
        if n == 0:
            return
        if not bool(self._in_use[ids].all()):
            raise RuntimeError("page arena: freeing a page that is not in use (double free)")
        self._in_use[ids] = False
        self._free[self._num_free:self._num_free + n] = ids.flip(0)
        self._num_free += n

    def write(self, pages: torch.Tensor, blob: torch.Tensor) -> None:
        """Copy ``blob`` (1-D uint8, any device) into ``pages`` (ids on this arena's device), in page order."""
        n = blob.numel()
        full, rest = divmod(n, self.page_bytes)
        src = blob.to(self.device)
        if full:
            self._pages2d.index_copy_(0, pages[:full], src[:full * self.page_bytes].view(full, self.page_bytes))
        if rest:  # a 1-element index tensor: a 0-dim one would be read back to the host (a device sync)
            self._pages2d[pages[full:full + 1], :rest] = src[full * self.page_bytes:].view(1, rest)

    def read(self, pages: torch.Tensor, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` bytes of ``pages`` as one contiguous 1-D uint8 tensor on this arena's device."""
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8, device=self.device)
        return self._pages2d.index_select(0, pages).view(-1)[:nbytes]

    def reset(self) -> None:
        """Mark every page free (the bytes are left as they are)."""
        self._free = torch.arange(self.num_pages - 1, -1, -1, dtype=torch.int64)
        self._num_free = self.num_pages
        self._in_use.zero_()


class HostTier(PageArena):
    """The host spill tier: a paged arena in host memory, pinned when CUDA is available.

    Args:
        capacity_bytes: its own budget (``--kvtc-host-spill``), rounded down to whole pages.
        page_bytes: page size in bytes.
    """

    def __init__(self, capacity_bytes: int, page_bytes: int = DEFAULT_PAGE_BYTES):
        super().__init__(capacity_bytes, page_bytes, device="cpu", pin_memory=torch.cuda.is_available())


class CompressedStore:
    """KVTC blobs in a device arena with reference counts, plus an optional host tier.

    Args:
        capacity_bytes: device budget in bytes (rounded down to whole pages).
        device: the KV pool's device.
        page_bytes: page size of the device arena (and of the host tier, which must use the same size).
        host: optional host tier for demoted blobs.
    """

    def __init__(self, capacity_bytes: int, device: torch.device | str = "cpu", page_bytes: int = DEFAULT_PAGE_BYTES,
                 host: HostTier | None = None):
        self.arena = PageArena(capacity_bytes, page_bytes, device)
        if host is not None and host.page_bytes != self.arena.page_bytes:
            raise ValueError(f"host tier pages ({host.page_bytes} bytes) must match the store's "
                             f"({self.arena.page_bytes} bytes)")
        self.host = host
        self._ids = itertools.count()
        self._live: dict[int, BlobHandle] = {}

    # ------------------------------------------------------------------ sizes
    @property
    def page_bytes(self) -> int:
        return self.arena.page_bytes

    @property
    def capacity_bytes(self) -> int:
        """Device bytes of the arena (whole pages)."""
        return self.arena.capacity_bytes

    @property
    def used_bytes(self) -> int:
        """Device bytes held by live blobs (whole pages)."""
        return self.arena.used_bytes

    @property
    def free_pages(self) -> int:
        return self.arena.free_pages

    @property
    def capacity_pages(self) -> int:
        return self.arena.num_pages

    @property
    def host_capacity_bytes(self) -> int:
        return self.host.capacity_bytes if self.host is not None else 0

    @property
    def host_used_bytes(self) -> int:
        return self.host.used_bytes if self.host is not None else 0

    @property
    def host_free_pages(self) -> int:
        return self.host.free_pages if self.host is not None else 0

    def pages_for(self, nbytes: int) -> int:
        """Pages a blob of ``nbytes`` bytes needs (same in both tiers)."""
        return self.arena.pages_for(nbytes)

    def handles(self) -> list[BlobHandle]:
        """Every live blob, in creation order."""
        return list(self._live.values())

    def live_bytes(self, tier: str | None = None) -> int:
        """Sum of the live blobs' exact sizes (not page-rounded), optionally of one tier."""
        return sum(h.nbytes for h in self._live.values() if tier is None or h.tier == tier)

    def _arena(self, tier: str) -> PageArena:
        if tier == Tier.DEVICE:
            return self.arena
        if self.host is None:
            raise RuntimeError("this store has no host tier")
        return self.host

    # ------------------------------------------------------------------ blobs
    def put(self, blob: torch.Tensor, pages: int | None = None) -> BlobHandle | None:
        """Store a blob in the device arena with refcount 1.

        Args:
            blob: shape: [nbytes], dtype: torch.uint8, any device.
            pages: pages to reserve (>= the blob's own need); None reserves exactly what it needs.
        Returns:
            its handle, or None when that many pages are not free (nothing changes then).
        """
        if blob.dtype != torch.uint8 or blob.dim() != 1:
            raise ValueError(f"a blob is a 1-D uint8 tensor, got {blob.dtype} {tuple(blob.shape)}")
        need = self.pages_for(blob.numel())
        n = need if pages is None else int(pages)
        if n < need:
            raise ValueError(f"a {blob.numel()}-byte blob needs {need} pages, {n} requested")
        ids = self.arena.alloc(n)
        if ids is None:
            return None
        handle = BlobHandle(id=next(self._ids), nbytes=int(blob.numel()), num_pages=n, page_bytes=self.page_bytes,
                            tier=Tier.DEVICE)
        self._place(handle, self.arena, ids)
        self.arena.write(handle.pages, blob)
        self._live[handle.id] = handle
        return handle

    def _place(self, handle: BlobHandle, arena: PageArena, ids: torch.Tensor) -> None:
        handle.pages_cpu = ids
        handle.pages = to_device_async(ids, arena.device)

    def _check(self, handle: BlobHandle) -> None:
        if not handle.alive or self._live.get(handle.id) is not handle:
            raise KeyError(f"blob {handle.id} is not in this store (freed or foreign)")

    def get(self, handle: BlobHandle) -> torch.Tensor:
        """The blob's bytes, shape: [nbytes], dtype: torch.uint8, contiguous, on its tier's device (a copy)."""
        self._check(handle)
        return self._arena(handle.tier).read(handle.pages, handle.nbytes)

    def retain(self, handle: BlobHandle) -> None:
        """Add a reference."""
        self._check(handle)
        handle.refcount += 1

    def release(self, handle: BlobHandle) -> bool:
        """Drop a reference; frees the bytes at refcount 0. Returns True when the bytes were freed."""
        self._check(handle)
        handle.refcount -= 1
        if handle.refcount > 0:
            return False
        self._free_bytes(handle)
        return True

    def free(self, handle: BlobHandle) -> None:
        """Free the blob's bytes now, whatever its refcount; every reference to it becomes invalid."""
        self._check(handle)
        handle.refcount = 0
        self._free_bytes(handle)

    def _free_bytes(self, handle: BlobHandle) -> None:
        self._arena(handle.tier).release(handle.pages_cpu)
        handle.alive = False
        del self._live[handle.id]

    def _move(self, handle: BlobHandle, tier: str) -> bool:
        self._check(handle)
        if handle.tier == tier:
            return True
        src, dst = self._arena(handle.tier), self._arena(tier)
        ids = dst.alloc(handle.num_pages)
        if ids is None:
            return False
        data = src.read(handle.pages, handle.nbytes)
        old = handle.pages_cpu
        self._place(handle, dst, ids)
        dst.write(handle.pages, data)
        src.release(old)
        handle.tier = tier
        return True

    def demote(self, handle: BlobHandle) -> bool:
        """Move a device blob to the host tier (same page count). False, with nothing changed, when it lacks room."""
        return self._move(handle, Tier.HOST)

    def promote(self, handle: BlobHandle) -> bool:
        """Move a host blob back to the device arena. False, with nothing changed, when it lacks room."""
        return self._move(handle, Tier.DEVICE)

    def clear(self) -> None:
        """Free every blob in both tiers (every handle becomes invalid)."""
        for handle in self._live.values():
            handle.alive = False
            handle.refcount = 0
        self._live.clear()
        self.arena.reset()
        if self.host is not None:
            self.host.reset()
