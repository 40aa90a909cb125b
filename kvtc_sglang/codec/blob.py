"""The self-describing compressed blob: fixed little-endian header, chunk table, chunk data.

    offset 0      header (HEADER.size bytes, see BlobHeader; `checksum` computed with itself zeroed)
    then          chunk table: n_chunks x uint32 = stored size of each chunk; bit 31 set when the
                  chunk is stored uncompressed
    then          chunk data, back to back

The raw payload the chunks decompress into (raw_size bytes, see `payload.py`):
    exact rows     n_head + n_tail tokens, each [K row p | V row p] in the exact dtype, bit-exact
                   copies of the KV-pool rows (keys post-RoPE)
    K section      n_coded tokens: params [G_k, 2] fp16 then packed symbols, byte-plane major
    V section      the same for values

Decoding never trusts a size it has not checked: every length is checked against the buffer and
against what the caller expects (model fingerprint, token count) before anything is allocated
from it, and the checksum covers the header, the chunk table and the data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

import torch

from kvtc_sglang.codec.checksum import checksum64_int, checksum64_le_bytes
from kvtc_sglang.codec.errors import BlobFormatError
from kvtc_sglang.codec.transfer import bytes_to_device

MAGIC = b"KVTC"
FORMAT_VERSION = 1
RAW_FLAG = 1 << 31

# magic, version, header_size, flags, fingerprint, ratio, exact_dtype, coder, n_tokens, start_pos,
# n_head, n_tail, chunk_bytes, n_chunks, raw_size, data_size, checksum
HEADER = struct.Struct("<4sHHI16sHBBIIIIIIQQQ")
CHECKSUM_OFFSET = HEADER.size - 8  # the checksum is the header's last field (uint64)

EXACT_DTYPES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.uint8: 3,  # fp8 pools store their bytes as uint8
}
EXACT_DTYPE_FROM_CODE = {v: k for k, v in EXACT_DTYPES.items()}


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
    n_chunks: int
    raw_size: int
    data_size: int
    checksum: int = 0
    version: int = FORMAT_VERSION
    flags: int = 0

    @property
    def n_coded(self) -> int:
        return self.n_tokens - self.n_head - self.n_tail

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
            self.chunk_bytes, self.n_chunks, self.raw_size, self.data_size, self.checksum,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> "BlobHeader":
        if len(raw) < HEADER.size:
            raise BlobFormatError(f"blob of {len(raw)} bytes is shorter than its {HEADER.size}-byte header")
        (magic, version, hsize, flags, fp, ratio, exact_dtype, coder, n_tokens, start_pos, n_head,
         n_tail, chunk_bytes, n_chunks, raw_size, data_size, checksum) = HEADER.unpack(raw[: HEADER.size])
        if magic != MAGIC:
            raise BlobFormatError(f"not a KVTC blob (magic {magic!r})")
        if version != FORMAT_VERSION or hsize != HEADER.size:
            raise BlobFormatError(f"unsupported blob format version {version} (header {hsize} bytes); this build reads {FORMAT_VERSION}")
        h = cls(fp, ratio, exact_dtype, coder, n_tokens, start_pos, n_head, n_tail, chunk_bytes,
                n_chunks, raw_size, data_size, checksum, version, flags)
        h.check_consistency()
        return h

    def check_consistency(self) -> None:
        if self.exact_dtype not in EXACT_DTYPE_FROM_CODE:
            raise BlobFormatError(f"unknown exact dtype code {self.exact_dtype}")
        if self.n_head + self.n_tail > self.n_tokens:
            raise BlobFormatError(f"{self.n_head}+{self.n_tail} exact tokens exceed the run of {self.n_tokens}")
        if self.chunk_bytes <= 0 and self.raw_size > 0:
            raise BlobFormatError("chunk size must be positive")
        expect_chunks = -(-self.raw_size // self.chunk_bytes) if self.raw_size else 0
        if self.n_chunks != expect_chunks:
            raise BlobFormatError(f"{self.n_chunks} chunks recorded, {expect_chunks} needed for {self.raw_size} bytes")


def assemble(header: BlobHeader, stored: list[torch.Tensor], raw_flags: list[bool]) -> torch.Tensor:
    """Build the blob bytes (1-D uint8, on the chunks' device) and fill in sizes and checksum.

    Nothing here waits for the device: the header goes up asynchronously and the checksum is computed and written
    into its field (the header's last 8 bytes) on the device, so on CUDA a blob can be framed while the GPU is busy.
    """
    sizes = [int(c.numel()) for c in stored]
    table = struct.pack(f"<{len(sizes)}I", *[s | (RAW_FLAG if f else 0) for s, f in zip(sizes, raw_flags)])
    header = replace(header, n_chunks=len(stored), data_size=sum(sizes), checksum=0)
    dev = stored[0].device if stored else torch.device("cpu")
    buf = torch.cat([bytes_to_device(header.pack() + table, dev), *stored])
    buf[CHECKSUM_OFFSET:HEADER.size] = checksum64_le_bytes(buf)
    return buf


def read_header(blob: torch.Tensor) -> BlobHeader:
    """Parse and sanity-check the header (reads HEADER.size bytes to the host)."""
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise BlobFormatError(f"a blob is a 1-D uint8 tensor, got {blob.dtype} {tuple(blob.shape)}")
    header = BlobHeader.unpack(blob[: HEADER.size].cpu().numpy().tobytes())
    if blob.numel() != header.total_size:
        raise BlobFormatError(f"blob has {blob.numel()} bytes, its header describes {header.total_size}")
    return header


def verify_checksum(blob: torch.Tensor, header: BlobHeader) -> None:
    zeroed = blob.clone()
    zeroed[: HEADER.size] = torch.frombuffer(bytearray(replace(header, checksum=0).pack()), dtype=torch.uint8).to(blob.device)
    got = checksum64_int(zeroed)
    if got != header.checksum:
        raise BlobFormatError(f"blob checksum mismatch (stored {header.checksum:#018x}, computed {got:#018x}): corrupted")


def chunk_table(blob: torch.Tensor, header: BlobHeader) -> list[tuple[int, int, bool]]:
    """[(offset, stored_size, stored_raw)] of each chunk, checked against the data area."""
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
