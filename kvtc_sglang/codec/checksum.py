"""A position-sensitive 64-bit checksum of a byte buffer, computed the same way on CPU and GPU.

The buffer (zero-padded to a multiple of 4 bytes) is read as little-endian uint32 words w_i:
    a = sum(w_i)                      mod 2**32
    b = sum(w_i * (i mod 65521 + 1))  mod 2**32
    checksum = b << 32 | a
Each summed term is below 2**32, so int64 sums are exact for any buffer under 8 GiB. Detects any
single corrupted word, swapped words and (with the blob header's length checks) truncation.
"""

from __future__ import annotations

import torch

_MOD = 1 << 32
_PERIOD = 65521


def checksum64(buf: torch.Tensor) -> torch.Tensor:
    """buf: 1-D uint8 tensor (any device) -> 0-dim int64 tensor on the same device (no host sync)."""
    n = buf.numel()
    pad = (-n) % 4
    if pad:
        buf = torch.cat([buf, torch.zeros(pad, dtype=torch.uint8, device=buf.device)])
    b4 = buf.view(-1, 4).to(torch.int64)
    w = b4[:, 0] | (b4[:, 1] << 8) | (b4[:, 2] << 16) | (b4[:, 3] << 24)
    weights = torch.arange(w.numel(), device=buf.device, dtype=torch.int64) % _PERIOD + 1
    a = w.sum() % _MOD
    b = ((w * weights) % _MOD).sum() % _MOD
    return (b << 32) | a


def checksum64_int(buf: torch.Tensor) -> int:
    """Host integer of checksum64 (synchronizes with the device)."""
    return int(checksum64(buf).item()) & ((1 << 64) - 1)


def checksum64_le_bytes(buf: torch.Tensor) -> torch.Tensor:
    """The checksum as its 8 little-endian bytes: 1-D uint8 tensor on buf's device (no host sync)."""
    c = checksum64(buf)
    shifts = torch.arange(0, 64, 8, device=buf.device, dtype=torch.int64)
    return ((c >> shifts) & 0xFF).to(torch.uint8)
