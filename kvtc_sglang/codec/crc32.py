"""CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320; the CRC of zlib.crc32, gzip and PNG).

Host side (pure Python, exact): `crc32_host` (zlib), `multmod`/`x2n` (GF(2) arithmetic of zlib's
crc32_combine), `crc32_combine`, `conditioning(n)`.
Device side (PyTorch reference, no host sync, any device): `crc32_rows_reference`.

How a CRC is computed in parallel (the Triton kernel and the reference share the math):
    The raw CRC (initial value 0, no final xor) is linear over GF(2) and ignores leading zero bytes, and
    raw(A || B) = x^(8|B|) * raw(A) + raw(B)  (mod P, "*" = multmod, "+" = xor).
    So the payload is cut into segments S_k of at most SEG bytes, each segment's raw CRC is computed
    independently, multiplied by x^(8 d_k) (d_k = payload bytes after S_k) and all are xor-ed;
    zlib's CRC = raw(M) xor conditioning(|M|) with conditioning(n) = x^(8n) * 0xFFFFFFFF xor 0xFFFFFFFF.
Error detection (Koopman's tables for this polynomial): every burst of <= 32 bits, and every 1-, 2- and
3-bit error in messages shorter than 2^32 - 33 bits (512 MiB); blobs are refused above that size.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import torch

from kvtc_sglang.codec.transfer import to_device_async

POLY = 0xEDB88320
MASK32 = 0xFFFFFFFF
MAX_CRC_BYTES = (1 << 29) - 8  # Hamming distance >= 3 (all 1- and 2-bit errors) below 2^32 - 33 bits


def crc32_host(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """zlib.crc32 (host bytes)."""
    return zlib.crc32(data, value) & MASK32


def multmod(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial, both in the reflected representation (zlib's multmodp)."""
    p = 0
    for i in range(32):
        if a & (1 << (31 - i)):
            p ^= b
        b = (b >> 1) ^ POLY if b & 1 else b >> 1
    return p


@lru_cache(maxsize=None)
def x2n_table() -> tuple[int, ...]:
    """x^(2^k) mod P for k = 0 .. 31 (zlib's x2n_table)."""
    out, p = [], 1 << 30  # x^1
    for _ in range(32):
        out.append(p)
        p = multmod(p, p)
    return tuple(out)


def x2n(n: int, k: int = 3) -> int:
    """x^(n * 2^k) mod P; x2n(n) = x^(8n), the multiplier that appends n zero bytes."""
    table, p = x2n_table(), 1 << 31  # x^0
    while n:
        if n & 1:
            p = multmod(table[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib.crc32(A + B) from crc1 = zlib.crc32(A), crc2 = zlib.crc32(B) and len2 = len(B)."""
    return multmod(x2n(len2), crc1) ^ crc2


def conditioning(n: int) -> int:
    """zlib.crc32(M) xor raw(M) for any M of n bytes (raw: initial value 0, no final xor)."""
    return multmod(x2n(n), MASK32) ^ MASK32


@lru_cache(maxsize=None)
def byte_table() -> tuple[int, ...]:
    """The 256-entry table of the bytewise reflected CRC step: crc = T[(crc ^ b) & 0xFF] ^ (crc >> 8)."""
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        out.append(c)
    return tuple(out)


@lru_cache(maxsize=None)
def _mul_tables(c: int) -> tuple[tuple[int, ...], ...]:
    """Four 256-entry tables with multmod(c, b) = T0[b & 255] ^ T1[b >> 8 & 255] ^ T2[..] ^ T3[b >> 24]."""
    return tuple(tuple(multmod(c, v << (8 * i)) for v in range(256)) for i in range(4))


_DEVICE_TABLES: dict = {}


def _table(name: str, values, device: torch.device) -> torch.Tensor:
    key = (name, str(device))
    t = _DEVICE_TABLES.get(key)
    if t is None:
        t = _DEVICE_TABLES[key] = to_device_async(torch.tensor(values, dtype=torch.int64), device)
    return t


def _mul_const(x: torch.Tensor, c: int) -> torch.Tensor:
    """multmod(c, x) elementwise for int64 tensors holding uint32 values (device ops, no sync)."""
    t = _table(f"mul{c}", _mul_tables(c), x.device)
    return t[0][x & 0xFF] ^ t[1][(x >> 8) & 0xFF] ^ t[2][(x >> 16) & 0xFF] ^ t[3][(x >> 24) & 0xFF]


def raw_crc_right_aligned(data: torch.Tensor, seg: int = 16) -> torch.Tensor:
    """Raw CRC-32 of each row of `data` ([J, W] uint8, W a power-of-two multiple of seg): [J] int64.

    Rows hold messages right-aligned after zero bytes (leading zeros do not change a raw CRC). Segment
    CRCs are computed bytewise in parallel, then combined pairwise (log2(W / seg) levels, each a
    multiplication by one constant). Device ops only.
    """
    J, W = data.shape
    n_seg = W // seg
    if W % seg or n_seg & (n_seg - 1):
        raise ValueError(f"row width {W} must be a power-of-two multiple of {seg}")
    tab = _table("bytes", byte_table(), data.device)
    segs = data.reshape(J * n_seg, seg).to(torch.int64)
    crc = torch.zeros(J * n_seg, dtype=torch.int64, device=data.device)
    for i in range(seg):
        crc = tab[(crc ^ segs[:, i]) & 0xFF] ^ (crc >> 8)
    crc = crc.view(J, n_seg)
    length = seg
    while crc.shape[1] > 1:
        pair = crc.view(J, -1, 2)
        crc = _mul_const(pair[:, :, 0], x2n(length)) ^ pair[:, :, 1]
        length *= 2
    return crc[:, 0]


def crc32_rows_reference(flat: torch.Tensor, starts: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """zlib CRC-32 of byte ranges of a 1-D uint8 device tensor: [J] int64 (values 0 .. 2^32 - 1).

    Args:
        flat: 1-D uint8 tensor holding the messages.
        starts: [J] int64 tensor on flat's device, first byte of each message.
        lengths: the J message lengths (host ints, known without reading the device).
    """
    dev = flat.device
    J = len(lengths)
    if J == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev)
    if flat.numel() == 0:  # only empty messages
        flat = torch.zeros(1, dtype=torch.uint8, device=dev)
    seg = 16
    width = seg
    while width < max(lengths):
        width *= 2
    n = torch.tensor(lengths, dtype=torch.int64)
    cond = torch.tensor([conditioning(x) for x in lengths], dtype=torch.int64)
    host = to_device_async(torch.stack([n, cond]), dev)
    n_dev, cond_dev = host[0], host[1]
    col = torch.arange(width, device=dev, dtype=torch.int64)
    lead = width - n_dev  # leading zero bytes of each row
    idx = starts[:, None] + col[None, :] - lead[:, None]
    valid = col[None, :] >= lead[:, None]
    data = torch.where(valid, flat[idx.clamp(0, flat.numel() - 1)], torch.zeros((), dtype=torch.uint8, device=dev))
    return raw_crc_right_aligned(data, seg) ^ cond_dev
