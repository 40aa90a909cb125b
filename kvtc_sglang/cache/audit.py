"""Audits of the tier's hot path: host reads of device-side tensors (syncs) and kernel launches.

``SyncAudit`` is a torch function mode that counts every operation which makes the host wait for the device:
reading a tensor's value (``.item``, ``.tolist``, ``.cpu``/``.to("cpu")``/``.numpy``, ``bool()``/``int()``/
``float()``/``__index__``), data-dependent output shapes (``nonzero``, ``unique``, ``masked_select``, indexing with a
boolean mask), copies into non-pinned host memory, and explicit ``synchronize`` calls (patched while the audit is
active). A tensor counts as device-side when it lives on an accelerator; on CPU, where nothing is a device, the
audit runs *strict*: every tensor counts unless it is marked host-side with ``mark_host`` (the tier marks the small
CPU tensors it uses for TP agreement and pinned host mirrors), so the CPU tests see every read that would be a sync on
a GPU. Code that is allowed to read (test doubles, debug checks) runs inside ``exempt()``.

``LaunchCounter`` is a torch dispatch mode counting the aten operations that run kernels (view and metadata
operations excluded): on a GPU each is a kernel launch, so this is the number the tier must keep independent of how
many nodes a step handles.

In a server, ``KVTC_SYNC_AUDIT=1`` makes the tier run its hot path under ``SyncAudit`` and export the count
(``host_syncs``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_AUDIT_ENV = "KVTC_SYNC_AUDIT"

_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
    torch.unique, torch.Tensor.unique, torch.masked_select, torch.Tensor.masked_select, torch.argwhere,
    torch.Tensor.__complex__, torch.unique_consecutive,
}
_local = threading.local()


def sync_audit_enabled() -> bool:
    return os.environ.get(SYNC_AUDIT_ENV, "0") not in ("", "0", "false", "False")


def mark_host(t: torch.Tensor) -> torch.Tensor:
    """Mark a CPU tensor as host-side data (reading it is not a device sync). Returns it."""
    t._kvtc_host = True  # noqa: SLF001
    return t


def _device_side(t: Any, strict_cpu: bool) -> bool:
    if not isinstance(t, torch.Tensor):
        return False
    if t.device.type != "cpu":
        return True
    return strict_cpu and not getattr(t, "_kvtc_host", False) and not t.is_pinned()


@contextlib.contextmanager
def exempt() -> Iterator[None]:
    """Reads inside this block are not counted (test doubles, debug-only checks)."""
    depth = getattr(_local, "exempt", 0)
    _local.exempt = depth + 1
    try:
        yield
    finally:
        _local.exempt = depth


class SyncAudit(TorchFunctionMode):
    """Counts host syncs (see the module docstring). ``counts`` maps an operation name to its count; ``total``.

    Args:
        strict_cpu: count reads of CPU tensors too (default: True when CUDA is not available).
        raise_on_sync: raise RuntimeError at the first sync (a debugging aid).
    """

    def __init__(self, strict_cpu: bool | None = None, raise_on_sync: bool = False):
        super().__init__()
        self.strict_cpu = (not torch.cuda.is_available()) if strict_cpu is None else strict_cpu
        self.raise_on_sync = raise_on_sync
        self.counts: Counter = Counter()
        self._patched: list = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _count(self, name: str) -> None:
        if getattr(_local, "exempt", 0):
            return
        self.counts[name] += 1
        if self.raise_on_sync:
            raise RuntimeError(f"host sync on the tier's hot path: {name}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not getattr(_local, "exempt", 0):
            self._inspect(func, args, kwargs)
        return func(*args, **kwargs)

    def _inspect(self, func, args, kwargs) -> None:
        first = args[0] if args else None
        if func in _READS:
            if _device_side(first, self.strict_cpu):
                self._count(getattr(func, "__name__", str(func)))
            return
        name = getattr(func, "__name__", "")
        if name in ("to", "copy_") and isinstance(first, torch.Tensor):
            self._inspect_copy(name, first, args, kwargs)
        elif name == "__getitem__" and isinstance(first, torch.Tensor) and len(args) > 1:
            index = args[1]
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts) and \
                    _device_side(first, self.strict_cpu):
                self._count("__getitem__[bool mask]")

    def _inspect_copy(self, name: str, first: torch.Tensor, args, kwargs) -> None:
        if name == "copy_":
            src = args[1] if len(args) > 1 else kwargs.get("src")
            if isinstance(src, torch.Tensor) and first.device.type == "cpu" and src.device.type != "cpu" \
                    and not first.is_pinned():
                self._count("copy_ to pageable host")
            return
        target = None
        for a in list(args[1:]) + list(kwargs.values()):
            if isinstance(a, (str, torch.device)):
                target = torch.device(a)
        if target is not None and target.type == "cpu" and first.device.type != "cpu":
            self._count("to(cpu)")
        elif target is not None and target.type != "cpu" and first.device.type == "cpu" \
                and not first.is_pinned() and not kwargs.get("non_blocking", False):
            self._count("to(device) from pageable host")

    def __enter__(self):
        if torch.cuda.is_available():
            for owner, attr in ((torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"),
                                (torch.cuda.Stream, "synchronize")):
                original = getattr(owner, attr)

                def patched(*a, _original=original, _attr=attr, **kw):
                    self._count(f"{_attr}()")
                    return _original(*a, **kw)

                setattr(owner, attr, patched)
                self._patched.append((owner, attr, original))
        return super().__enter__()

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched.clear()
        return super().__exit__(*exc)


# aten operations that only make views or read metadata: no kernel runs
_NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "alias", "as_strided", "slice", "select", "t", "transpose", "permute",
    "expand", "unsqueeze", "squeeze", "detach", "lift_fresh", "_to_copy_noop", "unbind", "split", "chunk",
    "narrow", "view_as", "empty", "empty_strided", "_reshape_alias", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_pinned", "_local_scalar_dense", "diagonal", "movedim", "split_with_sizes",
    "resize_", "set_", "clone_noop",
}


class LaunchCounter(TorchDispatchMode):
    """Counts aten operations that run a kernel (``count``; ``ops`` by name)."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.rstrip("_") if hasattr(func, "overloadpacket") else str(func)
        if name not in _NO_KERNEL and not getattr(_local, "exempt", 0):
            self.count += 1
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))
