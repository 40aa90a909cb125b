"""The blob checksum (codec/checksum.py) against its definition."""

from __future__ import annotations

import pytest
import torch

from kvtc_sglang.codec.checksum import checksum64_int

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _checksum_reference(data: bytes) -> int:
    data = data + b"\0" * (-len(data) % 4)
    a = b = 0
    for i in range(len(data) // 4):
        w = int.from_bytes(data[4 * i : 4 * i + 4], "little")
        a = (a + w) % 2**32
        b = (b + w * (i % 65521 + 1)) % 2**32
    return b << 32 | a


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1000, 262149])
def test_checksum_matches_its_definition(n):
    g = torch.Generator().manual_seed(n)
    buf = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    assert checksum64_int(buf) == _checksum_reference(bytes(buf.tolist()))


def test_checksum_detects_swapped_words():
    buf = torch.arange(16, dtype=torch.uint8)
    swapped = torch.cat([buf[4:8], buf[:4], buf[8:]])
    assert checksum64_int(buf) != checksum64_int(swapped)
