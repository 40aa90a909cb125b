"""The entropy stage (codec/entropy.py): coders, chunking, and chunks stored raw when DEFLATE does not shrink them."""

from __future__ import annotations

import pytest
import torch

from kvtc_sglang.codec import blob as blobfmt
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.entropy import EntropyCodecUnavailable, NoEntropy, ZlibDeflate, get_entropy_coder, split_chunks
from kvtc_sglang.codec.errors import BlobFormatError
from tests.codec.codec_setup import D, H, L, bits_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_entropy_coders_available_on_cpu():
    assert isinstance(get_entropy_coder("none"), NoEntropy)
    assert isinstance(get_entropy_coder("deflate"), ZlibDeflate)
    assert isinstance(get_entropy_coder("auto", "cpu"), ZlibDeflate)
    for gpu_only in ("gdeflate", "ans"):
        with pytest.raises(EntropyCodecUnavailable, match="nvCOMP"):
            get_entropy_coder(gpu_only, "cpu")
    with pytest.raises(ValueError, match="unknown entropy coder"):
        get_entropy_coder("zstd")


def test_deflate_chunks_round_trip_and_reject_bad_sizes():
    data = torch.randint(0, 4, (10000,), dtype=torch.uint8)
    chunks = split_chunks(data, 3000)
    assert [c.numel() for c in chunks] == [3000, 3000, 3000, 1000]
    z = ZlibDeflate()
    comp = z.compress(chunks)
    assert all(c.numel() < r.numel() for c, r in zip(comp, chunks))
    assert torch.equal(torch.cat(z.decompress(comp, [3000, 3000, 3000, 1000])), data)
    with pytest.raises(BlobFormatError):
        z.decompress(comp[:1], [2999])
    with pytest.raises(BlobFormatError):
        z.decompress(comp[:1], [3001])
    with pytest.raises(BlobFormatError, match="corrupt DEFLATE"):
        z.decompress([torch.full((50,), 0xFF, dtype=torch.uint8)], [3000])


def test_incompressible_chunks_are_stored_raw_and_compressible_ones_deflated(art):
    codec = KVTCCodec(art, 16, entropy="deflate", chunk_bytes=256)
    n = 8
    g = torch.Generator().manual_seed(9)
    noise = torch.randint(0, 256, (n, L, H, D, 4), dtype=torch.uint8, generator=g).view(torch.float32).squeeze(-1)
    zeros = torch.zeros(n, L, H, D)
    blob = codec.encode(torch.cat([noise, zeros]), torch.cat([noise, zeros]), 0, n, n)  # all exact: noise then zeros
    h = blobfmt.read_header(blob)
    table = blobfmt.chunk_table(blob, h)
    raw_flags = [raw for _, _, raw in table]
    assert any(raw_flags) and not all(raw_flags)
    assert all(size == 256 for _, size, raw in table if raw)
    dec = codec.decode(blob)
    assert torch.equal(bits_of(dec.k[:n]), bits_of(noise)) and torch.equal(dec.v[n:], zeros)
