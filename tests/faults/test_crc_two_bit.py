"""The CRC-32 the tier relies on detects every 1- and 2-bit error and every burst of up to 32 bits (property tests
of the device-side computation, ``codec.crc32.crc32_rows_reference``: what a blob's payload CRC is at encode and what
the host copy and ``--kvtc-verify always`` are checked against).

The framed blob format (header, CRC field, payload) has the same properties tested on whole blobs by CODEC in
tests/codec/test_blob_integrity.py; this file checks the payload CRC itself: exhaustively for every 2-bit error of
a short payload, and by property tests at random positions of payloads up to 64 KiB, with the errors placed
anywhere (including across the 16-byte segments the parallel computation combines).
"""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtc_sglang.codec.crc32 import crc32_rows_reference


def device_crcs(messages: torch.Tensor) -> list[int]:
    """CRC-32 of each row of a [J, n] uint8 tensor, computed by the device path (one batch)."""
    j, n = messages.shape
    starts = torch.arange(j, dtype=torch.int64) * n
    return crc32_rows_reference(messages.reshape(-1), starts, [n] * j).tolist()


def flipped(message: torch.Tensor, bit_positions) -> torch.Tensor:
    out = message.clone()
    for p in bit_positions:
        out[p // 8] ^= 1 << (p % 8)
    return out


def test_every_two_bit_error_of_a_short_payload_is_detected():
    """All 1- and 2-bit errors of a 40-byte payload (51,360 messages), in batches through the device path."""
    g = torch.Generator().manual_seed(0)
    message = torch.randint(0, 256, (40,), dtype=torch.uint8, generator=g)
    n_bits = message.numel() * 8
    good = zlib.crc32(message.numpy().tobytes())
    assert device_crcs(message[None])[0] == good
    pairs = torch.combinations(torch.arange(n_bits), r=2)
    singles = torch.arange(n_bits)[:, None].expand(-1, 2)  # the same bit twice: flipped once below
    for chunk in torch.cat([pairs, singles]).split(8192):
        batch = message.repeat(len(chunk), 1)
        rows = torch.arange(len(chunk))
        batch[rows, chunk[:, 0] // 8] ^= (1 << (chunk[:, 0] % 8)).to(torch.uint8)
        second = chunk[:, 1] != chunk[:, 0]
        batch[rows[second], chunk[second, 1] // 8] ^= (1 << (chunk[second, 1] % 8)).to(torch.uint8)
        crcs = torch.tensor(device_crcs(batch))
        assert not bool((crcs == good).any())


@settings(max_examples=150, deadline=None)
@given(size=st.integers(1, 1 << 16), data=st.data())
def test_random_two_bit_errors_anywhere_are_detected(size, data):
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    message = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    n_bits = size * 8
    first = data.draw(st.integers(0, n_bits - 1))
    second = data.draw(st.integers(0, n_bits - 1))
    bits = {first, second}
    both = torch.stack([message, flipped(message, bits)])
    good, bad = device_crcs(both)
    assert good == zlib.crc32(message.numpy().tobytes())
    assert bad != good, bits


@settings(max_examples=150, deadline=None)
@given(size=st.integers(4, 1 << 14), data=st.data())
def test_bursts_up_to_32_bits_are_detected(size, data):
    seed = data.draw(st.integers(0, 2 ** 31 - 1))
    message = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    length = data.draw(st.integers(1, 32))
    start = data.draw(st.integers(0, size * 8 - length))
    pattern = data.draw(st.integers(0, (1 << length) - 1)) | 1 | (1 << (length - 1))  # both ends flipped
    bits = [start + i for i in range(length) if pattern >> i & 1]
    good, bad = device_crcs(torch.stack([message, flipped(message, bits)]))
    assert bad != good, (start, length, pattern)


def test_the_tier_host_check_uses_the_same_crc():
    """The tier compares host copies with zlib.crc32 of the bytes: equal to the device CRC of the payload."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 256, (5, 1000), dtype=torch.uint8, generator=g)
    assert device_crcs(rows) == [zlib.crc32(r.numpy().tobytes()) for r in rows]


@pytest.mark.parametrize("size", [1, 15, 16, 17, 4096, 4097])
def test_segment_boundaries(size):
    message = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    for bits in ({0}, {size * 8 - 1}, {0, size * 8 - 1}, {min(127, size * 8 - 1), min(128, size * 8 - 1)}):
        good, bad = device_crcs(torch.stack([message, flipped(message, bits)]))
        assert bad != good, bits
