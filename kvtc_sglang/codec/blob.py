"""The self-describing compressed blob (format version 2): fixed little-endian header, chunk table, data.

This is the form of a compressed run of tokens whenever it leaves the device (host spill, files, tests, the
golden fixture); the device tier keeps only the payload in KV-pool rows and the header fields on the host.

    offset 0        header (HEADER.size = 88 bytes, see BlobHeader)
    then            chunk table, only when an entropy coder is used (coder != 0): n_chunks x uint32 = stored
                    size of each chunk, bit 31 set when the chunk is stored uncompressed
    then            data: coder 0 ("none"): the raw payload itself; otherwise the chunks back to back

The raw payload (raw_size bytes; layout in `payload_layout.py`): exact rows, then the K and V sections.

Integrity: `crc32` is zlib's CRC-32 of the whole blob with the crc32 field zeroed. It detects every 1-, 2- and
3-bit error and every burst of up to 32 bits in blobs below 512 MiB (larger blobs are refused). The header
binds the run to its place: `start_pos` and `token_hash` (the first 8 bytes of BLAKE2b over the run's token
ids as little-endian int64, `token_hash()`; flag FLAG_TOKENS_BOUND says it was given).

Decoding never trusts a size it has not checked: every length is checked against the buffer and against what
the caller expects (model fingerprint, token count, start, token ids) before anything is allocated from it.
Version 1 blobs (64-bit additive checksum, no token binding) are refused with a BlobFormatError.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, replace

import numpy as np
import torch

from kvtc_sglang.codec import crc32 as crcmath
from kvtc_sglang.codec.errors import BlobFormatError
from kvtc_sglang.codec.transfer import bytes_to_device

MAGIC = b"KVTC"
FORMAT_VERSION = 2
RAW_FLAG = 1 << 31
FLAG_TOKENS_BOUND = 1

# magic, version, header_size, flags, fingerprint, ratio, exact_dtype, coder, n_tokens, start_pos,
# n_head, n_tail, chunk_bytes, n_chunks, raw_size, data_size, token_hash, crc32, reserved
HEADER = struct.Struct("<4sHHI16sHBBIIIIIIQQQII")
CRC_OFFSET = HEADER.size - 8  # the crc32 field (uint32), then 4 reserved bytes (0)
_VERSION = struct.Struct("<4sH")

EXACT_DTYPES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.uint8: 3,  # fp8 pools store their bytes as uint8
}
EXACT_DTYPE_FROM_CODE = {v: k for k, v in EXACT_DTYPES.items()}


def token_hash(token_ids) -> int:
    """64-bit hash of a run's token ids (sequence of ints, numpy array or CPU tensor): BLAKE2b-64 of int64 LE."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.numpy()
    data = np.ascontiguousarray(np.asarray(token_ids, dtype="<i8")).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class BlobHeader:
    fingerprint: bytes  # 16 bytes identifying the calibration artifact (and so the model)
    ratio: int  # target ratio of the plan used
    exact_dtype: int  # EXACT_DTYPES code of the exact rows
    coder: int  # entropy.EntropyCoderId of the chunks
    n_tokens: int  # tokens in the run (exact + coded)
    start_pos: int  # absolute position of the first token
    n_head: int  # exact tokens at the start of the run (attention sinks)
    n_tail: int  # exact tokens at the end of the run (recent window)
    chunk_bytes: int
    n_chunks: int  # 0 for coder 0
    raw_size: int
    data_size: int
    token_hash: int = 0  # token_hash(token ids) when flags & FLAG_TOKENS_BOUND
    crc32: int = 0
    version: int = FORMAT_VERSION
    flags: int = 0

    @property
    def n_coded(self) -> int:
        return self.n_tokens - self.n_head - self.n_tail

    @property
    def tokens_bound(self) -> bool:
        return bool(self.flags & FLAG_TOKENS_BOUND)

    @property
    def table_offset(self) -> int:
        return HEADER.size

    @property
    def data_offset(self) -> int:
        return HEADER.size + 4 * self.n_chunks

    @property
    def total_size(self) -> int:
        return self.data_offset + self.data_size

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC, self.version, HEADER.size, self.flags, self.fingerprint, self.ratio,
            self.exact_dtype, self.coder, self.n_tokens, self.start_pos, self.n_head, self.n_tail,
            self.chunk_bytes, self.n_chunks, self.raw_size, self.data_size, self.token_hash, self.crc32, 0,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> "BlobHeader":
        if len(raw) < _VERSION.size:
            raise BlobFormatError(f"blob of {len(raw)} bytes is shorter than its {HEADER.size}-byte header")
        magic, version = _VERSION.unpack(raw[: _VERSION.size])
        if magic != MAGIC:
            raise BlobFormatError(f"not a KVTC blob (magic {magic!r})")
        if version == 1:
            raise BlobFormatError("blob format version 1 (64-bit additive checksum, no token binding) is no longer "
                                  f"read; this build reads version {FORMAT_VERSION}: re-encode the blob")
        if version != FORMAT_VERSION:
            raise BlobFormatError(f"unsupported blob format version {version}; this build reads {FORMAT_VERSION}")
        if len(raw) < HEADER.size:
            raise BlobFormatError(f"blob of {len(raw)} bytes is shorter than its {HEADER.size}-byte header")
        (_, version, hsize, flags, fp, ratio, exact_dtype, coder, n_tokens, start_pos, n_head, n_tail, chunk_bytes,
         n_chunks, raw_size, data_size, thash, crc, reserved) = HEADER.unpack(raw[: HEADER.size])
        if hsize != HEADER.size or reserved != 0:
            raise BlobFormatError(f"blob header of {hsize} bytes (reserved {reserved}); version {version} has "
                                  f"{HEADER.size} bytes and reserved 0")
        h = cls(fp, ratio, exact_dtype, coder, n_tokens, start_pos, n_head, n_tail, chunk_bytes, n_chunks, raw_size,
                data_size, thash, crc, version, flags)
        h.check_consistency()
        return h

    def check_consistency(self) -> None:
        if self.exact_dtype not in EXACT_DTYPE_FROM_CODE:
            raise BlobFormatError(f"unknown exact dtype code {self.exact_dtype}")
        if self.n_head + self.n_tail > self.n_tokens:
            raise BlobFormatError(f"{self.n_head}+{self.n_tail} exact tokens exceed the run of {self.n_tokens}")
        if self.flags & ~FLAG_TOKENS_BOUND:
            raise BlobFormatError(f"unknown blob flags {self.flags:#x}")
        if self.coder == 0:
            if self.n_chunks != 0 or self.data_size != self.raw_size:
                raise BlobFormatError(f"an uncoded blob has no chunk table and raw data ({self.n_chunks} chunks, "
                                      f"{self.data_size} data bytes for {self.raw_size} raw)")
            return
        if self.chunk_bytes <= 0 and self.raw_size > 0:
            raise BlobFormatError("chunk size must be positive")
        expect_chunks = -(-self.raw_size // self.chunk_bytes) if self.raw_size else 0
        if self.n_chunks != expect_chunks:
            raise BlobFormatError(f"{self.n_chunks} chunks recorded, {expect_chunks} needed for {self.raw_size} bytes")


def _check_size(total: int) -> None:
    if total > crcmath.MAX_CRC_BYTES:
        raise BlobFormatError(f"a blob of {total} bytes exceeds the {crcmath.MAX_CRC_BYTES} bytes CRC-32 protects "
                              "against every 2-bit error")


def _write_crc(buf: torch.Tensor, crc: torch.Tensor) -> None:
    """Write a device CRC ([1] or 0-dim int64) into the header field of buf as 4 LE bytes (device ops)."""
    shifts = torch.arange(0, 32, 8, device=buf.device, dtype=torch.int64)
    buf[CRC_OFFSET : CRC_OFFSET + 4] = ((crc.reshape(()) >> shifts) & 0xFF).to(torch.uint8)


def frame(header: BlobHeader, payload: torch.Tensor, payload_crc: torch.Tensor | int | None = None) -> torch.Tensor:
    """Blob of an uncoded payload (coder 0): header + payload, on the payload's device, without waiting for it.

    One allocation and one copy of the payload; no chunk table. The CRC of the blob is combined from the host
    CRC of the header and the payload's CRC (`payload_crc`: a device [1] int64 tensor or host int when the caller
    has it, e.g. from the batched encode; otherwise computed here on the device).
    """
    n = payload.numel()
    header = replace(header, coder=0, n_chunks=0, raw_size=n, data_size=n, crc32=0)
    _check_size(header.total_size)
    head = header.pack()
    dev = payload.device
    buf = torch.empty(HEADER.size + n, dtype=torch.uint8, device=dev)
    buf[: HEADER.size] = bytes_to_device(head, dev)
    buf[HEADER.size :] = payload
    c_head = crcmath.multmod(crcmath.x2n(n), zlib.crc32(head))
    if isinstance(payload_crc, int):
        buf[CRC_OFFSET : CRC_OFFSET + 4] = bytes_to_device(struct.pack("<I", c_head ^ payload_crc), dev)
        return buf
    if payload_crc is None:
        payload_crc = crcmath.crc32_rows_reference(payload, torch.zeros(1, dtype=torch.int64, device=dev), [n])
    _write_crc(buf, payload_crc ^ c_head)
    return buf


def header_bytes(header: BlobHeader, payload_crc: int) -> bytes:
    """The header of an uncoded blob whose payload has zlib CRC `payload_crc` (host only: the blob is then
    these bytes followed by the payload)."""
    header = replace(header, coder=0, n_chunks=0, data_size=header.raw_size, crc32=0)
    _check_size(header.total_size)
    head = header.pack()
    return replace(header, crc32=crcmath.crc32_combine(zlib.crc32(head), payload_crc, header.raw_size)).pack()


def assemble(header: BlobHeader, stored: list[torch.Tensor], raw_flags: list[bool]) -> torch.Tensor:
    """Blob of an entropy-coded payload (coder != 0): header, chunk table, chunks; sizes and CRC filled in."""
    if header.coder == 0:
        raise BlobFormatError("uncoded payloads are framed with blob.frame")
    sizes = [int(c.numel()) for c in stored]
    table = struct.pack(f"<{len(sizes)}I", *[s | (RAW_FLAG if f else 0) for s, f in zip(sizes, raw_flags)])
    header = replace(header, n_chunks=len(stored), data_size=sum(sizes), crc32=0)
    _check_size(header.total_size)
    dev = stored[0].device if stored else torch.device("cpu")
    head = header.pack() + table
    buf = torch.cat([bytes_to_device(head, dev), *stored])
    body = crcmath.crc32_rows_reference(buf, torch.full((1,), len(head), dtype=torch.int64, device=dev),
                                        [buf.numel() - len(head)])
    _write_crc(buf, body ^ crcmath.multmod(crcmath.x2n(buf.numel() - len(head)), zlib.crc32(head)))
    return buf


def read_header(blob: torch.Tensor) -> BlobHeader:
    """Parse and sanity-check the header (reads HEADER.size bytes to the host)."""
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise BlobFormatError(f"a blob is a 1-D uint8 tensor, got {blob.dtype} {tuple(blob.shape)}")
    header = BlobHeader.unpack(blob[: HEADER.size].cpu().numpy().tobytes())
    if blob.numel() != header.total_size:
        raise BlobFormatError(f"blob has {blob.numel()} bytes, its header describes {header.total_size}")
    return header


def blob_crc(blob: torch.Tensor) -> int:
    """zlib CRC-32 of a blob with its crc32 field zeroed (host zlib for CPU blobs; device CRC + one read else)."""
    zero = b"\0\0\0\0"
    if blob.device.type == "cpu":
        data = blob.numpy()
        c = zlib.crc32(data[:CRC_OFFSET])
        c = zlib.crc32(zero, c)
        return zlib.crc32(data[CRC_OFFSET + 4 :], c)
    n = blob.numel()
    tail = crcmath.crc32_rows_reference(blob, torch.full((1,), CRC_OFFSET + 4, dtype=torch.int64, device=blob.device),
                                        [n - CRC_OFFSET - 4])
    head = zlib.crc32(zero, zlib.crc32(blob[:CRC_OFFSET].cpu().numpy()))
    return crcmath.crc32_combine(head, int(tail.item()), n - CRC_OFFSET - 4)


def verify_crc(blob: torch.Tensor, header: BlobHeader) -> None:
    got = blob_crc(blob)
    if got != header.crc32:
        raise BlobFormatError(f"blob CRC-32 mismatch (stored {header.crc32:#010x}, computed {got:#010x}): corrupted")


def chunk_table(blob: torch.Tensor, header: BlobHeader) -> list[tuple[int, int, bool]]:
    """[(offset, stored_size, stored_raw)] of each chunk of an entropy-coded blob, checked against the data area."""
    raw = blob[header.table_offset : header.data_offset].cpu().numpy().tobytes()
    entries = struct.unpack(f"<{header.n_chunks}I", raw)
    out, off = [], header.data_offset
    for e in entries:
        size, is_raw = e & ~RAW_FLAG, bool(e & RAW_FLAG)
        out.append((off, size, is_raw))
        off += size
    if off != header.total_size:
        raise BlobFormatError(f"chunk sizes add up to {off - header.data_offset} bytes, header says {header.data_size}")
    return out
