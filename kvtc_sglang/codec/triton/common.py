"""Shared pieces of the Triton codec: the reference switch, argument checks, pool views, dtype codes.

Dimension glossary as in `kvtc_sglang.codec`: L layers, H KV heads of this rank, D head_dim,
HD = H*D elements per pool row, p = L*H*D features per kind, r rank, n tokens.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.kinds import Kind

REFERENCE_ENV = "KVTC_REFERENCE"

# Codes of element types the kernels read and write (constexpr arguments).
DT_F32, DT_F16, DT_BF16, DT_E4M3, DT_E5M2 = 0, 1, 2, 3, 4
_FLOAT_CODES = {torch.float32: DT_F32, torch.float16: DT_F16, torch.bfloat16: DT_BF16}
_FP8_CODES = {torch.float8_e4m3fn: DT_E4M3, torch.float8_e5m2: DT_E5M2}


def use_reference(flag: bool | None = None) -> bool:
    """True when work must go to the PyTorch references: `flag` if given, else env KVTC_REFERENCE=1."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(REFERENCE_ENV, "0") == "1"


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_usable(device: torch.device) -> bool:
    """Whether Triton kernels can run on tensors of `device` (CUDA, or any device under the interpreter)."""
    return torch.device(device).type == "cuda" or interpreting()


def require_kernels(device: torch.device) -> None:
    """Raise ShapeError when Triton kernels cannot run on `device` (CPU without the interpreter)."""
    if not kernels_usable(device):
        raise ShapeError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before importing triton), got "
                         f"{device}; pass reference=True or set KVTC_REFERENCE=1 for the PyTorch route")


def check_tensor(name: str, t: torch.Tensor, *, dtype=None, dim: int | None = None, device=None,
                 contiguous: bool = False) -> None:
    """Raise ShapeError naming `name` when t is not a tensor of the expected dtype/rank/device."""
    if not isinstance(t, torch.Tensor):
        raise ShapeError(f"{name} must be a tensor, got {type(t).__name__}")
    if dtype is not None:
        allowed = dtype if isinstance(dtype, tuple) else (dtype,)
        if t.dtype not in allowed:
            raise ShapeError(f"{name} must have dtype {' or '.join(map(str, allowed))}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ShapeError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ShapeError(f"{name} is on {t.device}, expected {device}")
    if contiguous and not t.is_contiguous():
        raise ShapeError(f"{name} must be contiguous")


def value_code(dtype: torch.dtype, fp8: torch.dtype | None = None) -> int:
    """Kernel code of the values a tensor of `dtype` holds (uint8 storage holds `fp8` bytes)."""
    if dtype == torch.uint8:
        if fp8 not in _FP8_CODES:
            raise ShapeError(f"uint8 (fp8-storage) pool rows need kv_dtype float8_e4m3fn or float8_e5m2, got {fp8}")
        return _FP8_CODES[fp8]
    if dtype not in _FLOAT_CODES:
        raise ShapeError(f"unsupported element type {dtype}")
    return _FLOAT_CODES[dtype]


@dataclass(frozen=True)
class PoolView:
    """Per-layer K/V pool buffers as one base pointer plus element offsets (what the kernels index).

    Attributes:
        k, v: per-layer buffers, each [num_slots, H, D] contiguous, all of one dtype (the store dtype).
        base: k[0]; every buffer is addressed as base + offsets[kind, layer] elements.
        offsets: shape [2, len(k)], dtype int64, on the buffers' device.
        layer0: model layer index of k[0] (0 for a whole pool, `layer` for a one-layer view).
        kv_dtype: logical fp8 dtype of uint8 storage (None otherwise).
        aligned: every offset is a multiple of 16 elements (lets kernels use 16-byte accesses).
    """

    k: tuple
    v: tuple
    base: torch.Tensor
    offsets: torch.Tensor
    layer0: int
    kv_dtype: torch.dtype | None
    aligned: bool

    @property
    def n_layers(self) -> int:
        return len(self.k)

    @property
    def store_dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def row_elems(self) -> int:
        return self.base.shape[1] * self.base.shape[2]

    @property
    def value_code(self) -> int:
        return value_code(self.store_dtype, self.kv_dtype)

    def buffers(self, kind: int) -> tuple:
        return self.k if kind == Kind.K else self.v


_VIEWS: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_VIEW_CACHE_SIZE = 512


def pool_view(k_buffers, v_buffers, *, layer0: int = 0, kv_dtype: torch.dtype | None = None) -> PoolView:
    """A PoolView of the buffers; the offsets table is cached per set of buffer addresses.

    Pool buffers are never reallocated, so after the first call for a pool (or a layer) no host to
    device copy happens. Raises ShapeError on mismatched shapes, dtypes, devices or layouts.
    """
    k, v = tuple(k_buffers), tuple(v_buffers)
    if not k or len(k) != len(v):
        raise ShapeError(f"need the same non-zero number of K and V buffers, got {len(k)} and {len(v)}")
    ref = k[0]
    for b in k + v:
        check_tensor("pool buffer", b, dtype=ref.dtype, dim=3, device=ref.device)
        if tuple(b.shape[1:]) != tuple(ref.shape[1:]):
            raise ShapeError(f"pool buffers disagree on [H, D]: {tuple(b.shape[1:])} vs {tuple(ref.shape[1:])}")
        if b.stride(2) != 1 or b.stride(1) != b.shape[2] or b.stride(0) != b.shape[1] * b.shape[2]:
            raise ShapeError("pool buffers must be contiguous [num_slots, H, D]")
    esize = ref.element_size()
    key = (ref.device, ref.dtype, layer0, tuple(b.data_ptr() for b in k + v))
    entry = _VIEWS.get(key)
    if entry is None:
        deltas = []
        for b in k + v:
            d = b.data_ptr() - ref.data_ptr()
            if d % esize:
                raise ShapeError("pool buffers are not aligned to their element size")
            deltas.append(d // esize)
        aligned = ref.data_ptr() % 16 == 0 and all(d % 16 == 0 for d in deltas)
        entry = (torch.tensor(deltas, dtype=torch.int64).view(2, len(k)).to(ref.device), aligned)
        _VIEWS[key] = entry
        if len(_VIEWS) > _VIEW_CACHE_SIZE:
            _VIEWS.popitem(last=False)
    else:
        _VIEWS.move_to_end(key)
    return PoolView(k, v, ref, entry[0], int(layer0), kv_dtype, entry[1])


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def pow2_factor(x: int) -> int:
    """Largest power of two dividing x (x > 0)."""
    return x & -x


def round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m
