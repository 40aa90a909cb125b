"""Kernel launch and JIT-compile accounting of the codec (metrics for serving, assertions for tests).

`LAUNCHES` counts kernel launches by name (the PyTorch route counts the launches the kernel route would
make, so both report the same numbers). `launch(kernel, grid, *args, **kwargs)` is how every codec
kernel is launched: it counts, and -- when `SpecializationLog.active` -- records the kernel's Triton
specialization key (argument types, the `== 1` / `% 16` integer and 16-byte pointer-alignment classes
of every argument not in `do_not_specialize`, and the constexpr values), computed with Triton's own
binder, so a test can prove that varying per-call values map to one compiled variant. Under the CPU
interpreter nothing compiles; the number of distinct keys is what a GPU would have compiled.

`jit_compiles()`: compiles of codec kernels so far. On a GPU it counts Triton's
`knobs.runtime.jit_post_compile_hook` calls (installed on first use, chaining any hook already set);
under the interpreter it is the number of distinct specialization keys seen while the log was active.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

_LOCK = threading.Lock()


class LaunchCounter:
    def __init__(self):
        self.by_name: Counter = Counter()
        self.total = 0

    def count(self, name: str, n: int = 1) -> None:
        self.by_name[name] += n
        self.total += n

    def snapshot(self) -> dict:
        return dict(self.by_name)


LAUNCHES = LaunchCounter()


class SpecializationLog:
    """Distinct (kernel, specialization key) pairs of launched kernels, while active."""

    def __init__(self):
        self.active = False
        self.keys: set = set()
        self._binders: dict = {}

    def key(self, kernel, args, kwargs) -> tuple:
        binder = self._binders.get(id(kernel))
        if binder is None:
            from triton.backends.compiler import BaseBackend
            from triton.runtime.jit import JITFunction, create_function_from_signature

            opts = getattr(kernel, "kwargs", None)
            if opts is not None:  # InterpretedFunction: rebuild the JITFunction it stands for
                jf = JITFunction(kernel.fn, do_not_specialize=opts.get("do_not_specialize"),
                                 do_not_specialize_on_alignment=opts.get("do_not_specialize_on_alignment"))
            else:
                jf = kernel
            binder = create_function_from_signature(jf.signature, jf.params, BaseBackend)
            self._binders[id(kernel)] = binder
        _, spec, options = binder(*args, **kwargs)
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        return (name, repr(spec), repr(sorted(options.items())))

    def record(self, kernel, args, kwargs) -> None:
        k = self.key(kernel, args, kwargs)
        with _LOCK:
            self.keys.add(k)


SPECIALIZATIONS = SpecializationLog()

# Set by kvtc_sglang.testing.sync_audit while an audit runs: observer(run) runs the launch as opaque device work
# (under the CPU interpreter a kernel reads its tensors on the host; on a GPU a launch reads nothing back).
_observer = None

_COMPILES = [0]
_HOOK_INSTALLED = [False]


def _install_compile_hook() -> None:
    if _HOOK_INSTALLED[0]:
        return
    try:
        from triton import knobs
    except ImportError:
        return
    previous = knobs.runtime.jit_post_compile_hook

    def hook(*args, **kwargs):
        fn = kwargs.get("fn")
        if str(getattr(fn, "module", "")).startswith("kvtc_sglang."):
            _COMPILES[0] += 1
        return previous(*args, **kwargs) if previous is not None else None

    knobs.runtime.jit_post_compile_hook = hook
    _HOOK_INSTALLED[0] = True


def launch(kernel, grid, *args, name: str | None = None, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), counted (and its specialization recorded when the log is active)."""
    if SPECIALIZATIONS.active:
        SPECIALIZATIONS.record(kernel, args, kwargs)
    else:
        _install_compile_hook()
    LAUNCHES.count(name or getattr(kernel, "__name__", "kernel"))
    if _observer is not None:
        _observer(lambda: kernel[grid](*args, **kwargs))
    else:
        kernel[grid](*args, **kwargs)


def jit_compiles() -> int:
    """Compiles of codec kernels so far (see the module docstring)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return len(SPECIALIZATIONS.keys)
    _install_compile_hook()
    return _COMPILES[0]
