"""Host spill: copies of COMPRESSED blobs' payloads to the host tier ahead of need (async, checked against the
blob's CRC-32 at the acknowledgement), the host copy given back, and promotion of a host copy into pool slots for a
load-back. Payload bytes are laid out over the rows of a blob's pool slots (``_read_payload``/``_write_payload``).

``HostSpillMixin`` is a part of ``KVTCRadixCache`` (radix_cache.py), whose state it reads and writes.
"""

from __future__ import annotations

import logging
import zlib

import torch

from kvtc_sglang.cache import audit, faults
from kvtc_sglang.cache.blob_store import Blob
from kvtc_sglang.cache.transfer import COMPRESS, DoneEvent, Op

logger = logging.getLogger("kvtc_sglang.cache.radix_cache")  # the tier logs under one name


class HostSpillMixin:
    """Spill ahead to the host, its acknowledgement, host copies dropped, promotion back into the pool."""

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
            finish = DoneEvent()
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
