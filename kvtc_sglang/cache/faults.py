"""Fault injection: named points in the compressed tier (and hooks the codec calls) that tests can arm.

A point is a string naming a place where real failures happen (a device allocation, a kernel launch, an entropy
coder call, the processing of an acknowledgement). Production code calls ``hit(point)`` there; it is a dictionary
lookup that does nothing unless a test armed the point::

    from kvtc_sglang.cache import faults

    with faults.armed("tier.compress.launch", "oom", times=1):
        cache.step()            # the batched encode launch raises torch.OutOfMemoryError once

Kinds of injected failure (``KINDS``):
    oom       torch.OutOfMemoryError ("CUDA out of memory"), what a device allocation raises
    entropy   EntropyCodecUnavailable, what a missing GPU entropy coder raises
    blob      BlobFormatError, what a corrupted or foreign blob raises
    error     RuntimeError, any other exception

A point can also be armed to "complete with failure" instead of raising: ``failed(point)`` returns True while armed
(used for asynchronous stages that report their outcome at acknowledgement time, e.g. a device-side flag).

Points of the tier are listed in ``TIER_POINTS``; the codec may call ``hit`` with its own names (``CODEC_POINTS``).
The registry is process-local (each TP rank arms its own), which is how tests make one rank fail alone.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from kvtc_sglang.codec.errors import BlobFormatError, EntropyCodecUnavailable

# Points the tier calls, in the order a node meets them.
TIER_POINTS = (
    "tier.compress.launch",    # batched encode of compress-ahead nodes, before the codec is called
    "tier.compress.complete",  # the encode ran but its completion reports failure (checked at the ack)
    "tier.compress.ack",       # processing of an acknowledged encode
    "tier.evict.encode",       # encode at eviction time (in place or into free slots)
    "tier.evict.free",         # freeing slots / dropping blobs during evict
    "tier.load.check",         # host-side checks of a load-back (token binding, layout)
    "tier.load.begin",         # the decode's first stage, launched by init_load_back
    "tier.load.layers",        # the layer-wise decode launched when a prefill batch forms
    "tier.load.ack",           # processing of an acknowledged load
    "tier.spill.launch",       # device -> host copy of a blob
    "tier.spill.ack",          # processing of an acknowledged spill (the host-side CRC check)
    "tier.spill.promote",      # host -> device copy at load-back
)
# Names the codec may call (it is free to add more).
CODEC_POINTS = ("codec.encode", "codec.decode_begin", "codec.decode_layers")

KINDS = ("oom", "entropy", "blob", "error")


class InjectedFault(RuntimeError):
    """Marker mixed into every injected exception (``isinstance(exc, InjectedFault)`` tells tests it was theirs)."""


class InjectedOOM(torch.OutOfMemoryError, InjectedFault):
    pass


class InjectedEntropyError(EntropyCodecUnavailable, InjectedFault):
    pass


class InjectedBlobError(BlobFormatError, InjectedFault):
    pass


class InjectedError(InjectedFault):
    pass


_EXCEPTIONS: dict[str, Callable[[str], BaseException]] = {
    "oom": lambda p: InjectedOOM(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at {p})"),
    "entropy": lambda p: InjectedEntropyError(f"nvCOMP is not available (injected at {p})"),
    "blob": lambda p: InjectedBlobError(f"blob failed its checks (injected at {p})"),
    "error": lambda p: InjectedError(f"injected failure at {p}"),
}


@dataclass
class _Arm:
    kind: str
    times: int | None      # remaining triggers; None = every time
    every: int             # trigger on every n-th eligible call
    calls: int = 0
    fired: int = 0


_lock = threading.Lock()
_armed: dict[str, _Arm] = {}
_counts: dict[str, int] = {}


def arm(point: str, kind: str = "error", *, times: int | None = 1, every: int = 1) -> None:
    """Make ``point`` fail: raise (``hit``) or report failure (``failed``) on every ``every``-th call, ``times``
    times (None: without end). ``kind`` is one of KINDS."""
    if kind not in KINDS:
        raise ValueError(f"fault kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if every < 1 or (times is not None and times < 1):
        raise ValueError(f"every must be >= 1 and times >= 1 or None, got every={every}, times={times}")
    with _lock:
        _armed[point] = _Arm(kind, times, every)


def disarm(point: str | None = None) -> None:
    """Disarm one point, or every point (None)."""
    with _lock:
        if point is None:
            _armed.clear()
        else:
            _armed.pop(point, None)


@contextlib.contextmanager
def armed(point: str, kind: str = "error", *, times: int | None = 1, every: int = 1) -> Iterator[None]:
    """``arm`` for the duration of a ``with`` block."""
    arm(point, kind, times=times, every=every)
    try:
        yield
    finally:
        disarm(point)


def fired(point: str) -> int:
    """How many times ``point`` has triggered since the process started (or ``reset_counts``)."""
    return _counts.get(point, 0)


def reset_counts() -> None:
    _counts.clear()


def _trigger(point: str) -> str | None:
    if not _armed:  # the production fast path
        return None
    with _lock:
        a = _armed.get(point)
        if a is None:
            return None
        a.calls += 1
        if a.calls % a.every:
            return None
        a.fired += 1
        if a.times is not None and a.fired >= a.times:
            del _armed[point]
        _counts[point] = _counts.get(point, 0) + 1
        return a.kind


def hit(point: str) -> None:
    """Raise the armed exception at ``point``; nothing when it is not armed."""
    kind = _trigger(point)
    if kind is not None:
        raise _EXCEPTIONS[kind](point)


def failed(point: str) -> bool:
    """True when ``point`` is armed (and consumes one trigger): the caller treats the stage as failed."""
    return _trigger(point) is not None
