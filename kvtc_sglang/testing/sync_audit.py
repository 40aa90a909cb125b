"""An audit of host reads of device-side tensors ("syncs"), usable on CPU-only machines.

On CUDA a host read of device data (`.item()`, `.cpu()`, `bool(t)`, `nonzero`, a pageable host-to-device
copy, ...) makes the host wait for every kernel queued before it. On a CPU-only machine nothing waits, so
the audit tracks which tensors *would* live on the device and flags every operation that would read one
back or push pageable host memory into device work:

    with SyncAudit() as audit:
        audit.mark(pool_buffers, codec, job_tensors)      # device-side roots (objects are walked)
        codec.encode(...)
    assert not audit.violations, audit.violations

Device-side ("tainted") tensors: the marked roots, every tensor a torch function returns when one of its
inputs is device-side, tensors made by factory functions given an explicit `device=`, and what
`kvtc_sglang.codec.transfer.to_device_async` returns (the one sanctioned host -> device path: pinned and
non-blocking on CUDA). Violations:
    - `.item() .tolist() .cpu() .numpy() bool() int() float() index() repr()`, `in`, `.to("cpu")`, a copy
      into a host tensor, of a device-side tensor (`.to` counts when its target is the string "cpu": on a
      CPU-only machine a device object taken from a tensor cannot be told from a real device);
    - data-dependent shapes: `nonzero`, `argwhere`, one-argument `where`, `masked_select`, `unique`,
      `bincount`, boolean-mask indexing, `repeat_interleave` without `output_size`;
    - pageable host -> device: `torch.tensor/as_tensor(..., device=...)`, `.to(device)` of a host tensor
      outside `to_device_async`, and any operation mixing a device-side tensor with a host tensor of more
      than one element;
    - `torch.cuda.synchronize`.
`calls` counts the torch functions run (attribute reads excluded), for launch-count comparisons; codec
kernel launches (`kvtc_sglang.codec.launches.launch`) are opaque device work, counted in `launches`.
On a GPU, complement this with `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode, resolve_name

_TAG = "_kvtc_device_side"

_READS = {
    "torch.Tensor.item", "torch.Tensor.tolist", "torch.Tensor.cpu", "torch.Tensor.numpy", "torch.Tensor.__bool__",
    "torch.Tensor.__int__", "torch.Tensor.__float__", "torch.Tensor.__index__", "torch.Tensor.__repr__",
    "torch.Tensor.__str__", "torch.Tensor.__format__", "torch.Tensor.__contains__", "torch.Tensor.__array__",
    "torch.Tensor.nonzero", "torch.nonzero", "torch.argwhere", "torch.Tensor.argwhere", "torch.masked_select",
    "torch.Tensor.masked_select", "torch.unique", "torch.Tensor.unique", "torch.unique_consecutive",
    "torch.bincount", "torch.Tensor.bincount", "torch.Tensor.equal", "torch.equal", "torch.allclose",
    "torch.Tensor.allclose", "torch.cuda.synchronize",
}
_FACTORIES = {
    "torch.arange", "torch.zeros", "torch.ones", "torch.empty", "torch.full", "torch.zeros_like", "torch.ones_like",
    "torch.empty_like", "torch.full_like", "torch.randn", "torch.rand", "torch.randint", "torch.randperm",
    "torch.linspace", "torch.eye",
}
_H2D_FACTORIES = {"torch.tensor", "torch.as_tensor", "torch.asarray"}
_METADATA_PREFIXES = ("torch.Tensor.shape", "torch.Tensor.dtype", "torch.Tensor.device", "torch.Tensor.is_",
                      "torch.Tensor.data_ptr", "torch.Tensor.numel", "torch.Tensor.dim", "torch.Tensor.size",
                      "torch.Tensor.stride", "torch.Tensor.element_size", "torch.Tensor.ndim",
                      "torch.Tensor.__len__", "torch.Tensor.requires_grad", "torch.Tensor.grad",
                      "torch.Tensor.layout", "torch.Tensor.names", "torch.Tensor.storage_offset",
                      "torch.Tensor.untyped_storage", "torch.Tensor.__hash__", "torch.Tensor.__setstate__",
                      "torch.Tensor.__dict__", "torch.Tensor.__class__", "torch.Tensor._version",
                      "torch.Tensor._base", "torch.Tensor._cdata", "torch.Tensor.__reduce_ex__")


def is_device_side(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _TAG, False)


def _tensors(obj, out: list, depth: int = 0):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)) and depth < 3:
        for x in obj:
            _tensors(x, out, depth + 1)
    elif isinstance(obj, dict) and depth < 3:
        for x in obj.values():
            _tensors(x, out, depth + 1)
    return out


def _taint(obj) -> None:
    for t in _tensors(obj, []):
        try:
            setattr(t, _TAG, True)
        except (AttributeError, RuntimeError):
            pass


def _is_cpu_target(args, kwargs, *, literal: bool = False) -> bool:
    """Whether a .to() call targets the CPU; literal=True: only a "cpu" string counts (on a CPU-only machine a
    torch.device taken from a tensor, e.g. `.to(x.device)`, cannot be told from a real device)."""
    for a in list(args[1:]) + [kwargs.get("device")]:
        if isinstance(a, str if literal else (str, torch.device)) and torch.device(a).type == "cpu":
            return True
    return False


def _has_device_target(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (str, torch.device)) for a in args[1:])


def walk_tensors(root, *, skip_types: tuple = (), max_depth: int = 12) -> list[torch.Tensor]:
    """Every tensor reachable from `root` through attributes, dataclass fields, dicts, lists and tuples."""
    found, seen = [], set()

    def visit(o, d):
        if id(o) in seen or d > max_depth or isinstance(o, skip_types):
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            found.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                visit(v, d + 1)
        elif isinstance(o, (list, tuple, set, frozenset)):
            for v in o:
                visit(v, d + 1)
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            for f in dataclasses.fields(o):
                visit(getattr(o, f.name, None), d + 1)
        elif hasattr(o, "__dict__") and not isinstance(o, type) and type(o).__module__.startswith("kvtc_sglang"):
            for v in vars(o).values():
                visit(v, d + 1)

    visit(root, 0)
    return found


class SyncAudit(TorchFunctionMode):
    """Records host reads of device-side tensors while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.violations: list[str] = []
        self.calls: Counter = Counter()
        self._sanctioned = 0
        self._opaque = 0
        self.launches = 0

    # roots -------------------------------------------------------------------------------------------
    def mark(self, *roots, skip_types: tuple = ()) -> None:
        """Mark the tensors reachable from each root as device-side."""
        for r in roots:
            _taint(walk_tensors(r, skip_types=skip_types))

    # context -----------------------------------------------------------------------------------------
    def __enter__(self):
        from kvtc_sglang.codec import launches, transfer

        self._prev_observers = (transfer._observer, launches._observer)
        transfer._observer = self._observe_transfer
        launches._observer = self._observe_launch
        return super().__enter__()

    def __exit__(self, *exc):
        from kvtc_sglang.codec import launches, transfer

        transfer._observer, launches._observer = self._prev_observers
        return super().__exit__(*exc)

    def _observe_launch(self, run):
        """A codec kernel launch: opaque device work (its arguments are passed, nothing is read back)."""
        self.launches += 1
        self._opaque += 1
        try:
            run()
        finally:
            self._opaque -= 1

    def _observe_transfer(self, t, device, copy):
        self._sanctioned += 1
        try:
            out = copy(t, device)
        finally:
            self._sanctioned -= 1
        _taint(out)
        return out

    # the mode ----------------------------------------------------------------------------------------
    def _flag(self, name: str, why: str) -> None:
        self.violations.append(f"{name}: {why}")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._opaque:
            return func(*args, **kwargs)
        name = resolve_name(func) or getattr(func, "__qualname__", str(func))
        if name.startswith(_METADATA_PREFIXES) and name not in _READS:
            return func(*args, **kwargs)
        ins = _tensors(args, []) + _tensors(kwargs, [])
        dev_in = any(is_device_side(t) for t in ins)
        if not self._sanctioned:
            self._check(name, args, kwargs, ins, dev_in)
        self.calls[name] += 1
        out = func(*args, **kwargs)
        if dev_in or self._sanctioned or (name in _FACTORIES and kwargs.get("device") is not None):
            _taint(out)
        return out

    def _check(self, name, args, kwargs, ins, dev_in) -> None:
        if dev_in and name in _READS:
            self._flag(name, "reads a device-side tensor on the host")
        if name == "torch.cuda.synchronize":
            self._flag(name, "device synchronization")
        if name in ("torch.where",) and len(args) == 1:
            self._flag(name, "one-argument where (nonzero)")
        if name in ("torch.repeat_interleave", "torch.Tensor.repeat_interleave") and dev_in \
                and kwargs.get("output_size") is None:
            self._flag(name, "repeat_interleave without output_size (data-dependent size)")
        if name in ("torch.Tensor.__getitem__", "torch.Tensor.__setitem__") and dev_in:
            idx = _tensors(args[1:2], [])
            if any(t.dtype == torch.bool for t in idx):
                self._flag(name, "boolean-mask indexing (nonzero)")
        if name in _H2D_FACTORIES and kwargs.get("device") is not None:
            self._flag(name, "tensor built from host data on a device (pageable copy)")
        if name in ("torch.Tensor.to", "torch.Tensor.cuda"):
            if dev_in and _is_cpu_target(args, kwargs, literal=True):
                self._flag(name, "device-side tensor copied to the host")
            elif not dev_in and (name == "torch.Tensor.cuda" or (_has_device_target(args, kwargs)
                                                                 and not _is_cpu_target(args, kwargs))):
                self._flag(name, "host tensor moved to a device outside to_device_async")
            elif not dev_in and _has_device_target(args, kwargs) and ins and ins[0].device.type == "cpu" \
                    and _is_cpu_target(args, kwargs) and ins[0].numel() > 1:
                self._flag(name, "host tensor moved to the device outside to_device_async")
        if name == "torch.Tensor.copy_" and len(ins) >= 2:
            dst, src = ins[0], ins[1]
            if is_device_side(src) and not is_device_side(dst):
                self._flag(name, "device-side tensor copied into a host tensor")
            if is_device_side(dst) and not is_device_side(src) and src.numel() > 1:
                self._flag(name, "host tensor copied into a device-side tensor (pageable)")
        if dev_in and name not in ("torch.Tensor.copy_",):
            hosts = [t for t in ins if not is_device_side(t) and t.device.type == "cpu" and t.numel() > 1
                     and not t.is_pinned()]
            if hosts:
                self._flag(name, f"mixes a device-side tensor with a host tensor of shape {tuple(hosts[0].shape)} "
                                 "(implicit pageable host-to-device copy)")
