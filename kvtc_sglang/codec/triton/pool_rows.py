"""`PoolRows`: a KV pool planned once as one space of byte rows that kernels address without the host.

SGLang's MHA pool holds 2L per-layer buffers [num_slots, H, D] (K of layers 0..L-1, then V). Every
buffer row (one slot of one buffer) has row_bytes = H * D * esize bytes. A *row address* names one of them:

    address a < n_pool_rows (= num_slots * 2L):   slot a // 2L, buffer a % 2L  (buffer b < L: k[b], else v[b - L])
    address a >= n_pool_rows:                     row a - n_pool_rows of the scratch area (optional, planned
                                                  with the pool: `scratch_rows` rows of row_bytes bytes)

and resolves to the byte address `base + byte_offsets[buffer] + slot * row_bytes` (scratch:
`base + byte_offsets[2L] + row * row_bytes`), where `base` is k[0]'s first byte and `byte_offsets` a
device table made once here. So a blob stored in pool slots `s_0, s_1, ...` has row table
`rows_of_slots(slots)`: blob row j at address s_{j // 2L} * 2L + j % 2L.

Plan once per pool (`make_pool_rows`, called by the codec's `pool_rows`): shapes, dtypes, devices and
strides are checked here and never again per call; the only device work is one pinned copy of the offset
table. Pool buffers are never reallocated by SGLang, so a PoolRows stays valid for the server's lifetime.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.transfer import to_device_async
from kvtc_sglang.codec.triton.common import PoolView, pool_view, pow2_factor, value_code

CRC_SEGMENT_MAX = 256  # bytes of one CRC segment (a power of two dividing row_bytes, at most this)


@dataclass(frozen=True, eq=False)
class PoolRows:
    """One KV pool as a row space (see the module docstring). Built by `make_pool_rows`.

    Attributes:
        view: the per-layer buffers as a PoolView (base pointer + element offsets [2, L]), what the
            feature-gather and reconstruct kernels index.
        n_layers, n_heads, head_dim: L, H, D. store_dtype: the buffers' dtype; kv_dtype: the logical fp8
            dtype of uint8 storage (None otherwise). esize: bytes per element.
        row_bytes: H * D * esize. n_slots: rows per buffer. n_pool_rows: n_slots * 2L.
        byte_offsets: shape [2L + 1], int64, on the pool's device: byte offset of each buffer (and of the
            scratch area, entry 2L) from `base_u8`.
        base_u8: k[0] viewed as uint8 (the byte base every address is relative to).
        rows_u8: 2L (+1 with scratch) uint8 views [rows, row_bytes] of the buffers and scratch (the
            PyTorch route indexes these).
        scratch: uint8 [scratch_rows, row_bytes] or None; scratch_rows: its row count.
        crc_segment: bytes per CRC segment, a power of two dividing row_bytes (segments never straddle rows).
    """

    view: PoolView
    n_layers: int
    n_heads: int
    head_dim: int
    store_dtype: torch.dtype
    kv_dtype: torch.dtype | None
    esize: int
    row_bytes: int
    n_slots: int
    n_pool_rows: int
    byte_offsets: torch.Tensor
    byte_offsets_host: tuple[int, ...]
    base_u8: torch.Tensor
    rows_u8: tuple
    scratch: torch.Tensor | None
    scratch_rows: int
    crc_segment: int

    @property
    def device(self) -> torch.device:
        return self.base_u8.device

    @property
    def rows_per_slot(self) -> int:
        return 2 * self.n_layers

    @property
    def scratch_base(self) -> int:
        """Row address of scratch row 0."""
        return self.n_pool_rows

    @property
    def value_code(self) -> int:
        return value_code(self.store_dtype, self.kv_dtype)

    def rows_of_slots(self, slots: torch.Tensor, n_rows: int | None = None) -> torch.Tensor:
        """Row addresses of a blob held in pool `slots` ([k] int64, device): [n_rows] int64 (device ops only).

        Blob row j lives in slot slots[j // 2L], buffer j % 2L; n_rows defaults to all 2L * k rows.
        """
        nb = self.rows_per_slot
        if n_rows is None:
            n_rows = slots.numel() * nb
        if n_rows > slots.numel() * nb:
            raise ShapeError(f"{n_rows} blob rows do not fit {slots.numel()} slots of {nb} rows")
        rows = slots[:, None] * nb + torch.arange(nb, device=slots.device, dtype=torch.int64)[None, :]
        return rows.reshape(-1)[:n_rows]

    def scratch_addresses(self, first: int, count: int) -> torch.Tensor:
        """Row addresses of scratch rows first .. first + count - 1: [count] int64 on the pool's device."""
        if first < 0 or first + count > self.scratch_rows:
            raise ShapeError(f"scratch rows [{first}, {first + count}) outside the {self.scratch_rows} planned")
        return torch.arange(self.n_pool_rows + first, self.n_pool_rows + first + count, device=self.device,
                            dtype=torch.int64)


def make_pool_rows(k_buffers, v_buffers, *, kv_dtype: torch.dtype | None = None, scratch_rows: int = 0,
                   shape: tuple[int, int, int] | None = None) -> PoolRows:
    """Plan a pool: check its buffers once and build its row space.

    Args:
        k_buffers, v_buffers: L per-layer buffers each, [num_slots, H, D], contiguous, one dtype and device
            (bf16/fp16/fp32, or uint8 holding fp8 values: then kv_dtype is the fp8 dtype).
        scratch_rows: rows of a scratch area planned with the pool (in-place compression encodes into it).
        shape: (L, H, D) the codec expects (checked when given).
    Raises ShapeError on any mismatch.
    """
    view = pool_view(k_buffers, v_buffers, kv_dtype=kv_dtype)
    k, v = view.k, view.v
    L = len(k)
    n_slots, H, D = (int(x) for x in k[0].shape)
    if shape is not None and (L, H, D) != tuple(shape):
        raise ShapeError(f"pool is [L={L}, H={H}, D={D}], the codec's calibration [{', '.join(map(str, shape))}]")
    if any(b.shape[0] != n_slots for b in k + v):
        raise ShapeError("pool buffers disagree on the number of slots")
    if view.store_dtype == torch.uint8:
        value_code(torch.uint8, kv_dtype)  # raises without an fp8 kv_dtype
    esize = k[0].element_size()
    row_bytes = H * D * esize
    dev = k[0].device
    base = k[0].data_ptr()
    scratch = None
    if scratch_rows:
        scratch = torch.zeros(int(scratch_rows), row_bytes, dtype=torch.uint8, device=dev)
    offsets = [b.data_ptr() - base for b in k + v]
    if scratch is not None:
        offsets.append(scratch.data_ptr() - base)
    else:
        offsets.append(0)
    table = to_device_async(torch.tensor(offsets, dtype=torch.int64), dev)
    rows_u8 = tuple(b.view(torch.uint8).view(n_slots, row_bytes) for b in k + v)
    if scratch is not None:
        rows_u8 = rows_u8 + (scratch,)
    seg = min(CRC_SEGMENT_MAX, pow2_factor(row_bytes))
    return PoolRows(
        view=view, n_layers=L, n_heads=H, head_dim=D, store_dtype=view.store_dtype, kv_dtype=kv_dtype, esize=esize,
        row_bytes=row_bytes, n_slots=n_slots, n_pool_rows=n_slots * 2 * L, byte_offsets=table,
        byte_offsets_host=tuple(offsets), base_u8=k[0].view(torch.uint8), rows_u8=rows_u8, scratch=scratch,
        scratch_rows=int(scratch_rows), crc_segment=seg,
    )
