"""A description of the machine and checkout a measurement was taken on (recorded beside results)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit(repo: str | os.PathLike | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo or Path(__file__).resolve().parents[2],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo or Path(__file__).resolve().parents[2],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """e.g. 'CPU: Intel Xeon ... x2 threads, torch 2.14.1, Linux' or 'GPU: NVIDIA H100 80GB HBM3, ...'."""
    parts = []
    if torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name(0)}")
    parts.append(f"CPU: {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    parts.append(f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()}")
    return "; ".join(parts)
