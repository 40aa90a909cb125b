"""Compiled Triton reads no plain module globals: a number a kernel uses from its module must be a `tl.constexpr`.

The CPU interpreter (TRITON_INTERPRET=1) runs kernels as Python and accepts any global, while the compiler rejects a
non-constexpr global ("Cannot access global variable ... from within @jit'ed function"), so a kernel can pass every
CPU test and fail on its first GPU launch. This test finds such globals from the kernels' code objects, in a
subprocess that imports Triton without the interpreter (where `@triton.jit` gives `JITFunction`s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCAN = r"""
import importlib, json, pkgutil
import triton
import kvtc_sglang.codec.triton as pkg

kernels, bad = 0, []
for info in pkgutil.iter_modules(pkg.__path__):
    mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
    for name, obj in vars(mod).items():
        if not isinstance(obj, triton.runtime.jit.JITFunction) or obj.__module__ != mod.__name__:
            continue
        kernels += 1
        fn = obj.fn
        for ref in fn.__code__.co_names:
            value = fn.__globals__.get(ref)
            if isinstance(value, (bool, int, float)) and not isinstance(value, triton.language.constexpr):
                bad.append(f"{mod.__name__}.{name} reads {ref} = {value!r}")
print(json.dumps({"kernels": kernels, "bad": bad}))
"""


def test_kernels_read_only_constexpr_globals():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCAN], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["kernels"] >= 10, found  # the scan saw the codec's kernels
    assert found["bad"] == [], "non-constexpr globals in compiled kernels:\n" + "\n".join(found["bad"])
