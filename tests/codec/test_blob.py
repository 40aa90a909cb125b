"""The blob format (codec/blob.py): layout, and every truncated, corrupted or crafted blob rejected with
BlobFormatError before anything is decoded."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtc_sglang.codec import blob as blobfmt
from kvtc_sglang.codec.checksum import checksum64_int
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.entropy import EntropyCoderId, split_chunks
from kvtc_sglang.codec.errors import BlobFormatError
from tests.codec.codec_setup import P, bits_of, kv, make_artifact

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_blob_inside_a_larger_buffer_decodes_the_same(art):
    """A store may keep blobs back to back in one byte arena: a blob view at an odd offset decodes identically."""
    codec = KVTCCodec(art, 4, entropy="none")
    for n, nh, nt in ((1, 0, 0), (7, 2, 1)):
        k, v = kv(n, seed=14, dtype=torch.float16)
        blob = codec.encode(k, v, 5, nh, nt)
        arena = torch.zeros(blob.numel() + 10, dtype=torch.uint8)
        arena[7 : 7 + blob.numel()] = blob
        a, b = codec.decode(blob), codec.decode(arena[7 : 7 + blob.numel()])
        assert torch.equal(bits_of(a.k), bits_of(b.k)) and torch.equal(bits_of(a.v), bits_of(b.v))


def test_blob_of_none_coder_is_header_table_and_raw_payload(art):
    """Layout documented in blob.py: header, chunk table (bit 31 = stored raw), then the raw payload, which is the
    exact rows [K row | V row] per token followed by the K and V sections."""
    codec = KVTCCodec(art, 4, entropy="none", chunk_bytes=1000)
    n, nh, nt = 9, 2, 1
    k, v = kv(n, seed=10)
    blob = codec.encode(k, v, 0, nh, nt)
    h = blobfmt.read_header(blob)
    assert bytes(blob[:4].tolist()) == b"KVTC" and struct.unpack("<H", bytes(blob[4:6].tolist()))[0] == blobfmt.FORMAT_VERSION
    assert blobfmt.HEADER.size == 80 and h.data_offset == 80 + 4 * h.n_chunks
    table = struct.unpack(f"<{h.n_chunks}I", bytes(blob[80 : h.data_offset].tolist()))
    assert all(e & blobfmt.RAW_FLAG for e in table)
    payload = blob[h.data_offset :]
    assert payload.numel() == h.raw_size == blob.numel() - h.data_offset
    ex = torch.cat([torch.stack([k[:nh], v[:nh]], 1), torch.stack([k[n - nt :], v[n - nt :]], 1)])
    ex_bytes = ex.numel() * 4
    assert torch.equal(payload[:ex_bytes], ex.contiguous().view(torch.uint8).flatten())
    kbytes = codec.kinds["k"].section_bytes(n - nh - nt)
    assert payload.numel() - ex_bytes == kbytes + codec.kinds["v"].section_bytes(n - nh - nt)
    assert codec.coded_bytes_per_token() == sum(pl.layout.bytes_per_token for pl in art.plan(4).k + art.plan(4).v)


@pytest.fixture(scope="module")
def small_blob(art):
    codec = KVTCCodec(art, 4, entropy="deflate", chunk_bytes=300)
    k, v = kv(10, seed=11)
    return codec, codec.encode(k, v, 0, 2, 3)


def test_truncated_blob_raises_blob_format_error(small_blob):
    codec, blob = small_blob
    for cut in (0, 3, 40, 79, 80, 81, blob.numel() - 1):
        with pytest.raises(BlobFormatError, match="bytes|header"):
            codec.decode(blob[:cut].clone())
    with pytest.raises(BlobFormatError, match="bytes"):
        codec.decode(torch.cat([blob, torch.zeros(1, dtype=torch.uint8)]))


def test_every_flipped_byte_is_detected(small_blob):
    codec, blob = small_blob
    h = blobfmt.read_header(blob)
    for i in range(blob.numel()):
        bad = blob.clone()
        bad[i] ^= 0x10
        with pytest.raises(BlobFormatError) as exc:
            codec.decode(bad)
        if i >= blobfmt.HEADER.size:  # table and data: only the checksum can tell
            assert "checksum" in str(exc.value), (i, str(exc.value))
    assert h.data_offset < blob.numel()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=6))
def test_random_corruptions_raise_blob_format_error(small_blob, edits):
    codec, blob = small_blob
    bad = blob.clone()
    for pos, xor in edits:
        bad[pos % bad.numel()] ^= xor
    if torch.equal(bad, blob):
        return
    with pytest.raises(BlobFormatError):
        codec.decode(bad)


def test_not_a_blob_raises(small_blob):
    codec, blob = small_blob
    bad = blob.clone()
    bad[:4] = torch.tensor(list(b"KVTX"), dtype=torch.uint8)
    with pytest.raises(BlobFormatError, match="not a KVTC blob"):
        codec.decode(bad)
    with pytest.raises(BlobFormatError, match="1-D uint8"):
        codec.decode(blob.view(torch.int8))
    with pytest.raises(BlobFormatError, match="1-D uint8"):
        codec.decode(blob[:80].view(2, 40))


def _rebuild(blob: torch.Tensor, payload: torch.Tensor | None = None, **header_changes) -> torch.Tensor:
    """A blob with a changed header and/or raw payload and a VALID checksum (chunks stored raw)."""
    h = blobfmt.read_header(blob)
    if payload is None:
        table = blobfmt.chunk_table(blob, h)
        assert all(raw for _, _, raw in table), "rebuild needs a blob of the 'none' coder"
        payload = blob[h.data_offset :]
    h = replace(h, **header_changes)
    chunks = split_chunks(payload, h.chunk_bytes)
    return blobfmt.assemble(replace(h, raw_size=payload.numel()), chunks, [True] * len(chunks))


def test_wrong_version_raises(art):
    codec = KVTCCodec(art, 4, entropy="none")
    blob = codec.encode(*kv(6), 0, 1, 1)
    with pytest.raises(BlobFormatError, match="version 2"):
        codec.decode(_rebuild(blob, version=2))


def test_blob_from_another_artifact_raises(art):
    other = make_artifact(seed=1)
    assert other.fingerprint16 != art.fingerprint16
    blob = KVTCCodec(other, 4).encode(*kv(6), 0, 1, 1)
    with pytest.raises(BlobFormatError, match="another calibration artifact"):
        KVTCCodec(art, 4).decode(blob)


def test_wrong_ratio_and_caller_expectations_raise(art, small_blob):
    codec, blob = small_blob
    with pytest.raises(BlobFormatError, match="4x plan.*16x plan"):
        KVTCCodec(art, 16).decode(blob)
    with pytest.raises(BlobFormatError, match="holds 10 tokens, caller expects 11"):
        codec.decode(blob, expected_tokens=11)
    with pytest.raises(BlobFormatError, match="starts at position 0, caller expects 4"):
        codec.decode(blob, expected_start=4)
    codec.decode(blob, expected_tokens=10, expected_start=0)


def test_crafted_blobs_with_valid_checksums_are_rejected(art):
    codec = KVTCCodec(art, 4, entropy="none", chunk_bytes=128)
    n, nh = 8, 2
    k, v = kv(n, seed=12)
    blob = codec.encode(k, v, 0, nh, 0)
    h = blobfmt.read_header(blob)
    payload = blob[h.data_offset :].clone()
    with pytest.raises(BlobFormatError, match="exceed the run"):
        codec.decode(_rebuild(blob, n_head=6, n_tail=6))
    with pytest.raises(BlobFormatError, match="payload is"):
        codec.decode(_rebuild(blob, n_tokens=n + 1))
    with pytest.raises(BlobFormatError, match="exact dtype"):
        codec.decode(_rebuild(blob, exact_dtype=9))
    with pytest.raises(BlobFormatError, match="payload is"):
        codec.decode(_rebuild(blob, exact_dtype=blobfmt.EXACT_DTYPES[torch.float16]))
    with pytest.raises(BlobFormatError, match="entropy coder id"):
        # a chunk flagged compressed with an unknown coder id
        hh = replace(h, coder=7)
        chunks = split_chunks(payload, 128)
        codec.decode(blobfmt.assemble(hh, chunks, [False] + [True] * (len(chunks) - 1)))
    with pytest.raises(BlobFormatError, match="corrupt DEFLATE|DEFLATE"):
        hh = replace(h, coder=EntropyCoderId.of("deflate"))
        chunks = split_chunks(payload, 128)
        codec.decode(blobfmt.assemble(hh, chunks, [False] + [True] * (len(chunks) - 1)))
    # non-finite quantization parameters: the first K param (fp16 shift of group 0, token 0) set to inf / nan.
    # K section is byte-plane major per block: byte j of every coded token, then byte j+1 ...
    ex_bytes = nh * 2 * P * 4
    m = n - nh
    for hi_byte in (0x7C, 0x7E):  # +inf, nan
        bad = payload.clone()
        bad[ex_bytes + 0 * m] = 0x00
        bad[ex_bytes + 1 * m] = hi_byte
        with pytest.raises(BlobFormatError, match="non-finite"):
            codec.decode(_rebuild(blob, bad))
    codec.decode(_rebuild(blob, payload))  # the untouched rebuild is fine


def test_chunk_table_inconsistent_with_data_raises(art):
    codec = KVTCCodec(art, 16, entropy="none", chunk_bytes=100)
    blob = codec.encode(*kv(3), 0, 3, 0)
    h = blobfmt.read_header(blob)
    table = list(struct.unpack(f"<{h.n_chunks}I", bytes(blob[80 : h.data_offset].tolist())))
    table[0] -= 1
    table[1] += 1
    bad = blob.clone()
    bad[80 : h.data_offset] = torch.tensor(list(struct.pack(f"<{h.n_chunks}I", *table)), dtype=torch.uint8)
    bad[:80] = torch.tensor(list(replace(h, checksum=0).pack()), dtype=torch.uint8)
    bad[:80] = torch.tensor(list(replace(h, checksum=checksum64_int(bad)).pack()), dtype=torch.uint8)
    with pytest.raises(BlobFormatError, match="stored chunk 0 has 99 bytes"):
        codec.decode(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e6])
def test_non_finite_or_out_of_fp16_coded_values_never_decode_silently(art, value):
    """The encoder does not validate coded rows; a value the fp16 group parameters cannot hold (non-finite, or a
    size-1 group beyond fp16 range) must make the decoder reject the blob rather than return garbage."""
    codec = KVTCCodec(art, 4, entropy="none")
    k, v = kv(5, seed=13)
    v[2].fill_(value)
    blob = codec.encode(k, v, 0, 1, 1)
    with pytest.raises(BlobFormatError, match="non-finite"):
        codec.decode(blob)
