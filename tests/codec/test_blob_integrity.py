"""Blob format v2 integrity: every 1- and 2-bit error and every burst of up to 32 bits anywhere in a blob (header,
CRC field, exact rows, coded sections) is rejected (property tests). The golden fixture (tests/data/golden) is
checked by test_golden_blob.py."""

from __future__ import annotations

import pytest
import torch

from kvtc_sglang.codec import blob as blobfmt
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.errors import BlobFormatError, KVTCError
from kvtc_sglang.testing.codec_cases import exact_artifact, exact_kv

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

@pytest.fixture(scope="module")
def blob():
    art = exact_artifact(2, 2, 16, rank=24, seed=1)
    codec = KVTCCodec(art, 1, "cpu", entropy="none")
    k, v = exact_kv(art, 12, seed=1)
    b = codec.encode(k, v, 7, 2, 3, token_ids=list(range(12)))
    h = blobfmt.read_header(b)
    assert h.n_coded and h.n_head and b.numel() > blobfmt.HEADER.size + 1000
    return codec, b


def _flip(b: torch.Tensor, bits) -> torch.Tensor:
    out = b.clone()
    for i in bits:
        out[i // 8] ^= 1 << (i % 8)
    return out


def _rejected(codec, bad) -> bool:
    try:
        codec.read_header(bad, expected_tokens=12, expected_start=7, expected_token_ids=list(range(12)))
    except BlobFormatError:
        return True
    except KVTCError:
        return True
    return False


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_every_one_and_two_bit_error_is_rejected(blob, data):
    codec, b = blob
    nbits = b.numel() * 8
    i = data.draw(st.integers(0, nbits - 1))
    assert _rejected(codec, _flip(b, [i]))
    j = data.draw(st.integers(0, nbits - 1).filter(lambda x: x != i))
    assert _rejected(codec, _flip(b, [i, j]))


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_two_bit_errors_in_the_header_and_exact_rows_are_rejected(blob, data):
    codec, b = blob
    h = blobfmt.read_header(b)
    limit = (h.data_offset + 2 * 2 * 16 * 2 * 4) * 8  # the header and the first exact token's rows
    i, j = data.draw(st.lists(st.integers(0, limit - 1), min_size=2, max_size=2, unique=True))
    assert _rejected(codec, _flip(b, [i, j]))


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_bursts_of_up_to_32_bits_are_rejected(blob, data):
    codec, b = blob
    nbits = b.numel() * 8
    length = data.draw(st.integers(1, 32))
    start = data.draw(st.integers(0, nbits - length))
    pattern = data.draw(st.integers(0, (1 << length) - 1)) | 1 | (1 << (length - 1))  # burst: ends flipped
    assert _rejected(codec, _flip(b, [start + k for k in range(length) if pattern >> k & 1]))


def test_the_2_bit_errors_the_old_checksum_missed_are_rejected(blob):
    """Bit 31 of two words of equal weight parity, and bit k of two words 2^(32-k) apart: invisible to the v1
    additive checksum."""
    codec, b = blob
    off = blobfmt.HEADER.size
    for i, j in ((off * 8 + 31, off * 8 + 31 + 64), (off * 8 + 4, off * 8 + 4 + 8 * 4 * 2 ** 4)):
        if j < b.numel() * 8:
            assert _rejected(codec, _flip(b, [i, j]))
