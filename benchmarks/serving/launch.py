"""The ``sglang.launch_server`` command of each configuration (nothing is launched here); ``--dry-run`` prints them.

Every configuration gets: the model, ``--page-size P`` and ``--attention-backend B`` (the same for all, unless the
name carries ``@backend``), the common arguments (``--mem-fraction-static``, ``--load-format dummy``,
``--cuda-graph-max-bs``, ...; CUDA graphs stay on unless the common arguments turn them off), ``--enable-metrics``,
and ``--max-total-tokens`` sized for equal GPU bytes (``configs.equal_bytes_slots``), then its own flags.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from typing import Sequence

from .argv import get_flag
from .configs import FP4_BACKENDS, Capacity, ConfigSpec, capacity_of
from .model import ModelInfo

# flags the suite sets itself: the common arguments must not carry them
OWN_FLAGS = ("--model-path", "--host", "--port", "--max-total-tokens", "--kv-cache-dtype", "--page-size",
             "--attention-backend", "--enable-hierarchical-cache", "--hicache-ratio", "--hicache-size",
             "--kv-compress", "--kvtc-calibration", "--kvtc-ratio", "--kvtc-stats-interval", "--radix-cache-backend")


@dataclass
class LaunchPlan:
    """One server launch: its command, environment additions and capacity model."""

    config: str
    cmd: list[str]
    env: dict[str, str]
    capacity: Capacity
    log_path: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.cmd)


def check_common_args(common: Sequence[str]) -> None:
    for flag in OWN_FLAGS:
        if get_flag(common, flag) is not None:
            raise ValueError(f"the common server arguments must not set {flag}: the suite sets it per config")
    for a in common:
        if a.startswith("--kvtc-"):
            raise ValueError(f"the common server arguments must not set {a}: kvtc options are per config")


def plan_server(spec: ConfigSpec, *, model: ModelInfo, model_path: str, port: int, budget_tokens: int | None,
                common_args: Sequence[str] = (), page_size: int = 64, attention_backend: str = "triton",
                kvtc_calibration: str | None = None, kvtc_sync_audit: bool = False, host: str = "127.0.0.1",
                python: str = sys.executable, tp_size: int = 1) -> LaunchPlan:
    """The launch command of ``spec``. Raises ValueError for a config that cannot be built (kvtc without a
    calibration, fp4 on a backend without an FP4 path, a common argument that the suite owns)."""
    check_common_args(common_args)
    backend = spec.backend or attention_backend
    if spec.kv_cache_dtype in ("fp4_mx_block16", "nvfp4") and backend not in FP4_BACKENDS:
        raise ValueError(f"{spec.name}: SGLang's FP4 KV cache on Hopper runs with --attention-backend "
                         f"{'/'.join(FP4_BACKENDS)}, not {backend}")
    if spec.kind == "kvtc" and not kvtc_calibration:
        raise ValueError(f"{spec.name} needs a calibration artifact (--kvtc-calibration DIR)")
    capacity = capacity_of(spec, model, budget_tokens, page_size=page_size, tp_size=tp_size)
    cmd = [python, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", host, "--port", str(port),
           "--page-size", str(page_size), "--attention-backend", attention_backend, *common_args, "--enable-metrics"]
    if capacity.pool_slots is not None:
        cmd += ["--max-total-tokens", str(capacity.pool_slots)]
    flags = spec.flags()
    if spec.backend:  # the name's backend replaces the common one
        i = cmd.index("--attention-backend")
        del cmd[i:i + 2]
    cmd += flags
    if spec.kind == "kvtc":
        cmd += ["--kvtc-calibration", str(kvtc_calibration)]
    env = {"KVTC_SYNC_AUDIT": "1"} if spec.kind == "kvtc" and kvtc_sync_audit else {}
    notes = [capacity.describe()]
    if get_flag(cmd, "--disable-cuda-graph") is not None:
        notes.append("CUDA graphs are off (--disable-cuda-graph in the common arguments)")
    return LaunchPlan(spec.name, cmd, env, capacity, notes=notes)


def format_dry_run(plans: Sequence[LaunchPlan]) -> str:
    """The exact launch command and capacity model of each config, one block per config."""
    out = []
    for p in plans:
        out.append("# " + "; ".join(p.notes))
        out.append(p.shell)
    return "\n".join(out)
