"""CRC-32 helpers (codec/crc32.py) against zlib: host combine arithmetic and the device reference."""

from __future__ import annotations

import zlib

import pytest
import torch

from kvtc_sglang.codec import crc32

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@given(st.binary(max_size=300), st.binary(max_size=300))
@settings(max_examples=200, deadline=None)
def test_combine_and_conditioning_match_zlib(a, b):
    assert crc32.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    raw = crc32.conditioning(len(a)) ^ zlib.crc32(a)  # raw CRC: initial 0, no final xor
    assert crc32.multmod(crc32.x2n(0), raw) == raw
    assert crc32.crc32_host(a) == zlib.crc32(a)


@given(st.lists(st.binary(max_size=700), min_size=1, max_size=6), st.integers(0, 40))
@settings(max_examples=60, deadline=None)
def test_device_reference_crc_of_byte_ranges_matches_zlib(msgs, gap):
    flat, starts = bytearray(), []
    for m in msgs:
        flat += b"\xa5" * gap  # junk between messages
        starts.append(len(flat))
        flat += m
    t = torch.frombuffer(flat + b"\0", dtype=torch.uint8)
    got = crc32.crc32_rows_reference(t, torch.tensor(starts), [len(m) for m in msgs])
    assert got.tolist() == [zlib.crc32(m) for m in msgs]


def test_raw_crc_ignores_leading_zeros():
    data = torch.randint(0, 256, (3, 64), dtype=torch.uint8)
    padded = torch.cat([torch.zeros(3, 64, dtype=torch.uint8), data], 1)
    assert torch.equal(crc32.raw_crc_right_aligned(data), crc32.raw_crc_right_aligned(padded))
