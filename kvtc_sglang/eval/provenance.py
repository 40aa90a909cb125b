"""Where a measurement was taken: the checkout's commit, the machine, and an optional matplotlib.

Stdlib only at import time, so the light benchmark clients (which never import torch) record the same provenance
as the model-side scripts: ``machine_description`` imports torch only when called.

Environment overrides (set by the GPU-box scripts, whose results are written from a copy of the checkout):
    KVTC_COMMIT: returned by ``git_commit`` as is.
    KVTC_GPU: returned by ``gpu_name`` as is.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """``$KVTC_COMMIT``, else the checkout's 12-character HEAD (+ "-dirty" with uncommitted changes to tracked files),
    else "unknown". ``repo`` defaults to the checkout holding this package."""
    if os.environ.get("KVTC_COMMIT"):
        return os.environ["KVTC_COMMIT"]
    cwd = repo or CHECKOUT
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def gpu_name() -> str:
    """``$KVTC_GPU``, else the first GPU's name from nvidia-smi (no torch import), else "cpu"."""
    if os.environ.get("KVTC_GPU"):
        return os.environ["KVTC_GPU"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "cpu"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """e.g. 'CPU: Intel Xeon ... (2 cores, 2 torch threads); torch 2.14.1, Python 3.12.3, Linux', prefixed with
    'GPU: NVIDIA H100 80GB HBM3; ' when torch sees a CUDA device. Imports torch."""
    import torch

    parts = []
    if torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name(0)}")
    parts.append(f"CPU: {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}")
    return "; ".join(parts)


def pyplot_or_none():
    """matplotlib.pyplot with the Agg backend, or None (with a message) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        print("matplotlib not installed: plots skipped (pip install matplotlib)")
        return None
