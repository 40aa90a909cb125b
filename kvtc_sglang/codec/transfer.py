"""Host -> device copies that do not wait for the device.

A plain ``cpu_tensor.to("cuda")`` copies from pageable memory and then synchronizes the stream, i.e. it waits
for every kernel already queued (under SGLang's overlap scheduler: the forward pass in flight). Small host
buffers the cache sends while the GPU is busy (blob headers, page ids, per-batch job tables) go through pinned
memory instead, as an asynchronous copy on the current stream that later kernels on that stream are ordered
after. This is the only sanctioned host -> device path of the codec's hot paths (the sync audit in
``kvtc_sglang.testing.sync_audit`` flags every other one).
"""

from __future__ import annotations

import torch

# Set by kvtc_sglang.testing.sync_audit while an audit runs: observer(t, device, copy) -> result.
_observer = None


def _copy(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_device_async(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a CPU -> CUDA copy is made from pinned memory without blocking the host.

    The pinned staging buffer comes from PyTorch's caching host allocator, which keeps it alive until the copy
    has run. Other device pairs are a plain ``Tensor.to``.
    """
    device = torch.device(device)
    if _observer is not None:
        return _observer(t, device, _copy)
    return _copy(t, device)


def bytes_to_device(data: bytes, device: torch.device | str) -> torch.Tensor:
    """``data`` as a 1-D uint8 tensor on ``device`` (asynchronous for CUDA, see ``to_device_async``)."""
    return to_device_async(torch.frombuffer(bytearray(data), dtype=torch.uint8), device)
