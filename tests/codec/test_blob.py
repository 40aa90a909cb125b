"""The blob format (codec/blob.py): layout, and every truncated, corrupted or crafted blob rejected with
BlobFormatError before anything is decoded."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtc_sglang.codec import blob as blobfmt
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.entropy import EntropyCoderId, split_chunks
from kvtc_sglang.codec.errors import BlobFormatError, ShapeError
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


def test_blob_of_none_coder_is_header_and_raw_payload(art):
    """Layout documented in blob.py: an 88-byte header, no chunk table, then the raw payload, which is the exact
    rows [K row | V row] per token followed by the K and V sections; the header's CRC-32 is zlib's over the blob
    with the field zeroed."""
    codec = KVTCCodec(art, 4, entropy="none", chunk_bytes=1000)
    n, nh, nt = 9, 2, 1
    k, v = kv(n, seed=10)
    blob = codec.encode(k, v, 0, nh, nt, token_ids=list(range(100, 109)))
    h = blobfmt.read_header(blob)
    assert bytes(blob[:4].tolist()) == b"KVTC" and struct.unpack("<H", bytes(blob[4:6].tolist()))[0] == 2
    assert blobfmt.HEADER.size == 88 and h.data_offset == 88 and h.n_chunks == 0
    assert h.tokens_bound and h.token_hash == blobfmt.token_hash(list(range(100, 109)))
    raw = bytearray(blob.numpy().tobytes())
    raw[blobfmt.CRC_OFFSET : blobfmt.CRC_OFFSET + 4] = b"\0\0\0\0"
    assert h.crc32 == zlib.crc32(bytes(raw))
    payload = blob[h.data_offset :]
    assert payload.numel() == h.raw_size == blob.numel() - h.data_offset
    ex = torch.cat([torch.stack([k[:nh], v[:nh]], 1), torch.stack([k[n - nt :], v[n - nt :]], 1)])
    ex_bytes = ex.numel() * 4
    assert torch.equal(payload[:ex_bytes], ex.contiguous().view(torch.uint8).flatten())
    kbytes = codec.kinds["k"].section_bytes(n - nh - nt)
    assert payload.numel() - ex_bytes == kbytes + codec.kinds["v"].section_bytes(n - nh - nt)
    assert codec.coded_bytes_per_token() == sum(pl.layout.bytes_per_token for pl in art.plan(4).k + art.plan(4).v)


def test_token_binding_and_start_position_are_checked(art):
    codec = KVTCCodec(art, 4, entropy="none")
    k, v = kv(6, seed=3)
    ids = [5, 9, 11, 2, 2, 7]
    blob = codec.encode(k, v, 12, 1, 1, token_ids=ids)
    codec.decode(blob, expected_start=12, expected_token_ids=ids)
    for other in ([5, 9, 11, 2, 2, 8], ids[::-1], ids[:5]):
        with pytest.raises(BlobFormatError, match="other token ids"):
            codec.decode(blob, expected_token_ids=other)
    with pytest.raises(BlobFormatError, match="position 12, caller expects 13"):
        codec.decode(blob, expected_start=13, expected_token_ids=ids)
    unbound = codec.encode(k, v, 12, 1, 1)
    with pytest.raises(BlobFormatError, match="not bound"):
        codec.decode(unbound, expected_token_ids=ids)
    with pytest.raises(ShapeError, match="token ids"):
        codec.encode(k, v, 12, 1, 1, token_ids=ids[:4])


def test_version_1_blobs_are_refused_with_a_clear_error(art):
    codec = KVTCCodec(art, 4, entropy="none")
    blob = codec.encode(*kv(4), 0, 1, 1)
    v1 = blob.clone()
    v1[4:6] = torch.tensor([1, 0], dtype=torch.uint8)
    with pytest.raises(BlobFormatError, match="version 1 .* no longer read.*re-encode"):
        codec.decode(v1)
    with pytest.raises(BlobFormatError, match="version 1"):
        blobfmt.BlobHeader.unpack(v1[:80].numpy().tobytes())  # a v1 header is 80 bytes: refused by its version


def test_framing_an_uncoded_payload_makes_no_per_chunk_work(art, monkeypatch):
    """coder none: one copy of the payload, no chunk split, no concatenation, no entropy calls."""
    codec = KVTCCodec(art, 4, entropy="none", chunk_bytes=64)
    k, v = kv(40, seed=2)
    calls = []
    monkeypatch.setattr(torch, "cat", lambda *a, **kw: (calls.append("cat"), _CAT(*a, **kw))[1])
    monkeypatch.setattr("kvtc_sglang.codec.codec.split_chunks", lambda *a: calls.append("split"))
    payload = _CAT([torch.zeros(0, dtype=torch.uint8)])  # warm
    blob = codec.frame(torch.arange(5000).to(torch.uint8), torch.float32, 10, 0, 10, 0)
    assert calls == [] and blob.numel() == 88 + 5000
    h = codec.read_header.__self__ and blobfmt.read_header(blob)
    assert torch.equal(codec.payload(blob, h), torch.arange(5000).to(torch.uint8))
    assert codec.payload(blob, h).data_ptr() == blob.data_ptr() + 88  # a view, not a copy
    del payload


_CAT = torch.cat


@pytest.fixture(scope="module")
def small_blob(art):
    codec = KVTCCodec(art, 4, entropy="deflate", chunk_bytes=300)
    k, v = kv(10, seed=11)
    return codec, codec.encode(k, v, 0, 2, 3)


def test_truncated_blob_raises_blob_format_error(small_blob):
    codec, blob = small_blob
    for cut in (0, 3, 40, 87, 88, 89, blob.numel() - 1):
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
        if i >= blobfmt.HEADER.size:  # table and data: only the CRC can tell
            assert "CRC" in str(exc.value), (i, str(exc.value))
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
        codec.decode(blob[:88].view(2, 44))


def _rebuild(blob: torch.Tensor, payload: torch.Tensor | None = None, **header_changes) -> torch.Tensor:
    """A blob with a changed header and/or raw payload and a VALID CRC (uncoded)."""
    h = blobfmt.read_header(blob)
    assert h.coder == 0, "rebuild needs a blob of the 'none' coder"
    if payload is None:
        payload = blob[h.data_offset :]
    h = replace(h, **header_changes)
    if h.version != blobfmt.FORMAT_VERSION:  # frame() writes the current version: patch it in afterwards
        out = blobfmt.frame(replace(h, version=blobfmt.FORMAT_VERSION), payload)
        out[4:6] = torch.tensor(list(struct.pack("<H", h.version)), dtype=torch.uint8)
        return out
    return blobfmt.frame(h, payload)


def test_wrong_version_raises(art):
    codec = KVTCCodec(art, 4, entropy="none")
    blob = codec.encode(*kv(6), 0, 1, 1)
    with pytest.raises(BlobFormatError, match="version 3"):
        codec.decode(_rebuild(blob, version=3))


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


def test_crafted_blobs_with_valid_crcs_are_rejected(art):
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
        hh = replace(h, coder=7, chunk_bytes=128)
        chunks = split_chunks(payload, 128)
        codec.decode(blobfmt.assemble(hh, chunks, [False] + [True] * (len(chunks) - 1)))
    with pytest.raises(BlobFormatError, match="corrupt DEFLATE|DEFLATE"):
        hh = replace(h, coder=EntropyCoderId.of("deflate"), chunk_bytes=128)
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
    payload = blob[h.data_offset :]
    hh = replace(h, coder=EntropyCoderId.of("deflate"), chunk_bytes=100)
    chunks = split_chunks(payload, 100)
    chunks = [chunks[0][:-1], torch.cat([chunks[0][-1:], chunks[1]])] + chunks[2:]  # sizes 99, 101, ...
    bad = blobfmt.assemble(hh, chunks, [True] * len(chunks))  # a valid CRC over an inconsistent table
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
