"""Entropy stage: lossless compression of the packed payload, chunk by chunk, behind a uint8 boundary.

The payload is cut into chunks of `chunk_bytes` bytes (the last one shorter); each chunk is
compressed independently, and stored as is when compression would not make it smaller. Chunks are
what batched GPU coders (nvCOMP) parallelize over, and what lets a blob be inflated in pieces.

Coder ids are part of the blob format:
    0 none      payload stored as is
    1 deflate   raw DEFLATE (RFC 1951, no zlib/gzip wrapper): CPU zlib (wbits=-15) and nvCOMP's
                Deflate with BitstreamKind.RAW read and write the same bitstream
    2 gdeflate  nvCOMP GDeflate (GPU only)
    3 ans       nvCOMP ANS (GPU only)
"""

from __future__ import annotations

import zlib
from enum import IntEnum
from typing import Protocol, Sequence

import torch

from kvtc_sglang.codec.errors import BlobFormatError, EntropyCodecUnavailable

DEFAULT_CHUNK_BYTES = 1 << 16


class EntropyCoderId(IntEnum):
    """The entropy coder of a blob's chunks, as the blob header stores it (one byte: never renumber)."""

    NONE = 0
    DEFLATE = 1
    GDEFLATE = 2
    ANS = 3

    @property
    def coder_name(self) -> str:
        """The coder's name: "none", "deflate", "gdeflate" or "ans" (``EntropyCoder.name``, ``--kvtc-entropy``)."""
        return self.name.lower()

    @classmethod
    def of(cls, name: str) -> "EntropyCoderId":
        """The id of a coder name; ValueError for an unknown one."""
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown entropy coder {name!r}; choose from {CODER_NAMES} or 'auto'") from None


CODER_NAMES = tuple(c.coder_name for c in EntropyCoderId)


class EntropyCoder(Protocol):
    name: str

    def compress(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each chunk: 1-D uint8 tensor -> its compressed bytes (1-D uint8, same device as input)."""

    def decompress(self, chunks: Sequence[torch.Tensor], raw_sizes: Sequence[int]) -> list[torch.Tensor]:
        """Inverse of compress; raw_sizes are the expected decompressed lengths (checked)."""


class NoEntropy:
    name = "none"

    def compress(self, chunks):
        return list(chunks)

    def decompress(self, chunks, raw_sizes):
        for c, n in zip(chunks, raw_sizes):
            if c.numel() != n:
                raise BlobFormatError(f"stored chunk has {c.numel()} bytes, expected {n}")
        return list(chunks)


class ZlibDeflate:
    """Raw DEFLATE with CPU zlib. Tensors on other devices go through host memory."""

    name = "deflate"

    def __init__(self, level: int = 6):
        self.level = level

    def compress(self, chunks):
        out = []
        for c in chunks:
            co = zlib.compressobj(self.level, zlib.DEFLATED, -15)
            data = co.compress(c.cpu().numpy().tobytes()) + co.flush()
            out.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(c.device))
        return out

    def decompress(self, chunks, raw_sizes):
        out = []
        for c, n in zip(chunks, raw_sizes):
            try:
                do = zlib.decompressobj(-15)
                data = do.decompress(c.cpu().numpy().tobytes(), n)
                if do.unconsumed_tail or not do.eof:
                    raise BlobFormatError("DEFLATE stream longer than the recorded chunk size")
            except zlib.error as e:
                raise BlobFormatError(f"corrupt DEFLATE chunk: {e}") from e
            if len(data) != n:
                raise BlobFormatError(f"DEFLATE chunk inflated to {len(data)} bytes, expected {n}")
            out.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(c.device))
        return out


def get_entropy_coder(name: str, device: torch.device | str = "cpu") -> EntropyCoder:
    """The coder for `name` on `device`.

    "auto" is chosen by measurement (benchmarks/results/codec_speed.md, H100): on CUDA devices no
    entropy stage -- nvCOMP's batched DEFLATE/GDeflate/ANS added 12-18 ms per GiB of raw KV to the
    codec's ~6 ms (decode fell from 176 to 44-62 GB/s, below a pinned host copy) for 5-12% more
    ratio; on the CPU, zlib raw DEFLATE. "deflate" on CUDA uses nvCOMP when installed, else zlib
    through host memory. GPU-only coders raise EntropyCodecUnavailable without nvCOMP or a CUDA device.
    """
    device = torch.device(device)
    if name == "auto":
        name = "none" if device.type == "cuda" else "deflate"
    if name == "none":
        return NoEntropy()
    EntropyCoderId.of(name)  # ValueError for an unknown name
    if device.type == "cuda":
        try:
            from kvtc_sglang.codec.nvcomp_coder import NvcompCoder, nvcomp_available
        except ImportError:
            nvcomp_available = lambda: False  # noqa: E731
        if nvcomp_available():
            return NvcompCoder(name)
    if name == "deflate":
        return ZlibDeflate()
    raise EntropyCodecUnavailable(
        f"entropy coder {name!r} needs nvCOMP on a CUDA device (pip install nvidia-nvcomp-cu13)"
    )


def split_chunks(payload: torch.Tensor, chunk_bytes: int) -> list[torch.Tensor]:
    """1-D uint8 payload -> views of at most chunk_bytes bytes each."""
    return [payload[i : i + chunk_bytes] for i in range(0, payload.numel(), chunk_bytes)]
