"""Typed options of the compressed KV tier, read from SGLang's ServerArgs.

The same options arrive two ways: as ``--kv-compress``/``--kvtc-*`` flags added to SGLang's parser by the plugin
(then carried as plain attributes on ServerArgs), or as ServerArgs dataclass fields once the in-tree patch
(``kvtc-sglang patch apply``) is applied. Both use the attribute names in ``SERVER_ARGS_ATTRS``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any

from kvtc_sglang.codec.defaults import SERVING_EXACT, ExactPolicy

KV_COMPRESS_CHOICES = ("none", "kvtc")
ENTROPY_CHOICES = ("auto", "deflate", "gdeflate", "ans", "none")

# KVTCOptions field -> ServerArgs attribute (and CLI flag: "--" + attribute with "-" for "_").
SERVER_ARGS_ATTRS = {
    "kv_compress": "kv_compress",
    "calibration": "kvtc_calibration",
    "ratio": "kvtc_ratio",
    "store_budget": "kvtc_store_budget",
    "host_spill": "kvtc_host_spill",
    "sink_tokens": "kvtc_sink_tokens",
    "window_tokens": "kvtc_window_tokens",
    "entropy": "kvtc_entropy",
    "min_compress_tokens": "kvtc_min_compress_tokens",
    "capture_dir": "kvtc_capture_dir",
    "capture_tokens": "kvtc_capture_tokens",
    "stats_interval_s": "kvtc_stats_interval",
    "compress_ahead_watermark": "kvtc_compress_ahead_watermark",
    "compress_ahead_tokens": "kvtc_compress_ahead_tokens",
    "verify": "kvtc_verify",
}
VERIFY_CHOICES = ("device", "always")
NO_CAP = ("", "none", "off")

_UNITS = {
    "b": 1,
    "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
    "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4,
}
_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[a-zA-Z]*)\s*$")


def _parse_size(text: str, what: str) -> tuple[str, float]:
    """Split a size string into ("bytes", value) or ("fraction", value); ValueError on bad syntax."""
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string such as '2GiB', '512MB', '1073741824' or '0.25', got {text!r}")
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{what}={text!r} is not a size: use bytes ('1073741824'), a unit "
                         f"({', '.join(u for u in _UNITS if u != 'b').upper()}, e.g. '2GiB', '512MB') or a "
                         f"fraction of the KV pool memory in (0, 1) such as '0.25'")
    num, unit = match.group("num"), match.group("unit").lower()
    if unit:
        if unit not in _UNITS:
            raise ValueError(f"{what}={text!r}: unknown unit {match.group('unit')!r}; use one of "
                             "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)")
        return "bytes", float(num) * _UNITS[unit]
    if "." in num:
        return "fraction", float(num)
    return "bytes", float(int(num))


def parse_bytes(text: str, total_kv_bytes: int | None = None, *, what: str = "store budget",
                allow_fraction: bool = True) -> int:
    """Turn a size string into a byte count.

    Args:
        text: bytes ("1073741824"), bytes with a unit ("2GiB", "512MB", "1.5GB"; KB/MB/GB/TB are powers of 1000,
            KiB/MiB/GiB/TiB powers of 1024), or a fraction in (0, 1) of ``total_kv_bytes`` ("0.25"; a number with a
            decimal point and no unit).
        total_kv_bytes: the KV memory a fraction refers to; required when ``text`` is a fraction.
        what: names the option in error messages.
        allow_fraction: False for sizes that cannot be a fraction (e.g. the host spill size).

    Returns:
        The size in bytes, rounded down to an integer (>= 0).
    """
    kind, value = _parse_size(text, what)
    if kind == "fraction":
        if not allow_fraction:
            raise ValueError(f"{what}={text!r}: give a byte size (e.g. '8GiB' or '0' to disable), not a fraction")
        if not 0.0 < value < 1.0:
            raise ValueError(f"{what}={text!r}: a fraction of the KV pool memory must be in (0, 1)")
        if total_kv_bytes is None:
            raise ValueError(f"{what}={text!r} is a fraction of the KV pool memory, but that size is not known here")
        if total_kv_bytes < 0:
            raise ValueError(f"total KV memory must be >= 0 bytes, got {total_kv_bytes}")
        return int(math.floor(value * total_kv_bytes))
    if not math.isfinite(value):
        raise ValueError(f"{what}={text!r} is not a finite size")
    return int(math.floor(value))


def is_fraction(text: str) -> bool:
    """Whether a size string is a fraction of the KV pool memory (vs. an absolute byte size)."""
    return _parse_size(text, "size")[0] == "fraction"


@dataclass(frozen=True)
class KVTCOptions:
    """Options of the compressed KV tier (one per server; identical on every TP rank).

    Attributes:
        kv_compress: "none" (plain radix cache) or "kvtc" (compressed tier on).
        calibration: path of the calibration artifact (a directory holding ``card.json``, or the card itself);
            made by ``kvtc-sglang calibrate --model <model-path> --out <dir>``. Required with "kvtc".
        ratio: target compression ratio; must name one of the bit plans in the calibration card (e.g. 8, 16, 32, 64).
        store_budget: optional cap on the KV-pool memory blobs may hold together: bytes ("2GiB", "512MB",
            "1073741824") or a fraction in (0, 1) of the KV pool memory ("0.25"); None (default) = no cap, blobs take
            pool slots as the workload needs them. The pool itself is sized exactly as without the tier.
        host_spill: bytes of pinned host memory for blobs pushed out of the store ("0" disables host spill).
        sink_tokens: leading positions of every sequence that are never compressed (attention sinks).
        window_tokens: most recent tokens at the end of a cached sequence that are never compressed (default 0:
            ``codec.defaults.SERVING_EXACT`` says why).
        entropy: lossless stage after quantization: "auto" (GPU DEFLATE when nvCOMP is available, else none),
            "deflate", "gdeflate", "ans" or "none".
        min_compress_tokens: smallest run of compressible tokens (after removing sink and window tokens) worth
            turning into a blob; shorter runs are evicted as usual. Default 32: a multi-turn chat adds one radix node
            per turn, often only a few hundred tokens of which the last window_tokens stay exact, and a larger minimum
            turns most of those nodes into plain evictions (measured with benchmarks/cpu_multiturn.py: a minimum of
            256 compressed 3 of 36 turns and halved the prefix hit rate).
        capture_dir: calibration capture mode: instead of compressing, the cache writes the K/V rows of every
            finished request (up to ``capture_tokens`` tokens per TP rank) to this directory, for
            ``kvtc-sglang calibrate --kv-dumps <dir>``; no calibration artifact is needed in this mode.
        capture_tokens: tokens to capture per TP rank in capture mode.
        stats_interval_s: seconds between two stats log lines / Prometheus gauge refreshes.
        compress_ahead_watermark: pool occupancy (used / total slots, in [0, 1]) from which finished requests' nodes
            are compressed ahead of eviction (0 = always, 1 = never ahead: only at eviction).
        compress_ahead_tokens: most tokens encoded ahead per scheduler step.
        verify: "device" (default: a blob in pool slots is not re-checked before a load; blobs crossing the host
            boundary are CRC-checked) or "always" (every load-back checks the blob's CRC-32 first, one device sync per
            load-back: a debugging mode).
    """

    kv_compress: str = "none"
    calibration: str | None = None
    ratio: float = 16.0
    store_budget: str | None = None
    host_spill: str = "0"
    sink_tokens: int = SERVING_EXACT.sink_tokens
    window_tokens: int = SERVING_EXACT.window_tokens
    entropy: str = "auto"
    min_compress_tokens: int = 32
    capture_dir: str | None = None
    capture_tokens: int = 65536
    stats_interval_s: float = 30.0
    compress_ahead_watermark: float = 0.75
    compress_ahead_tokens: int = 32768
    verify: str = "device"

    @property
    def enabled(self) -> bool:
        return self.kv_compress == "kvtc"

    @property
    def exact_policy(self) -> ExactPolicy:
        """The sink/window tokens kept exact, as an ExactPolicy."""
        return ExactPolicy(self.sink_tokens, self.window_tokens)

    @property
    def capturing(self) -> bool:
        """Calibration capture mode (no compression; K/V rows of finished requests are written to capture_dir)."""
        return self.enabled and self.capture_dir is not None

    @classmethod
    def from_server_args(cls, server_args: Any) -> "KVTCOptions":
        """Read the options from a ServerArgs (plugin attributes or patched fields) or an argparse namespace.

        Missing attributes take the defaults; values are coerced to the field types (so ``store_budget=1 << 30`` from
        Python works), but not validated: call ``validate()``.
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            attr = SERVER_ARGS_ATTRS[f.name]
            if hasattr(server_args, attr):
                values[f.name] = getattr(server_args, attr)
        return cls.from_values(**values)

    @classmethod
    def from_values(cls, **values: Any) -> "KVTCOptions":
        """Build options from field values, coercing types; ValueError names the field that cannot be converted."""
        defaults = cls()
        out: dict[str, Any] = {}
        for f in fields(cls):
            value = values.pop(f.name, getattr(defaults, f.name))
            out[f.name] = _coerce(f.name, value)
        if values:
            raise ValueError(f"unknown KVTC option(s): {', '.join(sorted(values))}")
        return cls(**out)

    def to_server_args_attrs(self) -> dict[str, Any]:
        """``{ServerArgs attribute: value}`` for every option."""
        return {SERVER_ARGS_ATTRS[f.name]: getattr(self, f.name) for f in fields(self)}

    def non_default_fields(self) -> list[str]:
        """Names of the options that differ from their defaults."""
        defaults = type(self)()
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(defaults, f.name)]

    def store_cap_bytes(self, total_kv_bytes: int | None = None) -> int | None:
        """The cap on pool bytes held by blobs, or None (no cap). A fraction needs ``total_kv_bytes``."""
        if self.store_budget is None or self.store_budget.strip().lower() in NO_CAP:
            return None
        return parse_bytes(self.store_budget, total_kv_bytes, what="--kvtc-store-budget")

    def host_spill_bytes(self) -> int:
        return parse_bytes(self.host_spill, what="--kvtc-host-spill", allow_fraction=False)

    def validate(self) -> "KVTCOptions":
        """Check every value; raise ValueError naming the CLI flag and the allowed range. Returns self."""
        if self.kv_compress not in KV_COMPRESS_CHOICES:
            raise ValueError(f"--kv-compress must be one of {', '.join(KV_COMPRESS_CHOICES)}, got {self.kv_compress!r}")
        if self.entropy not in ENTROPY_CHOICES:
            raise ValueError(f"--kvtc-entropy must be one of {', '.join(ENTROPY_CHOICES)}, got {self.entropy!r}")
        if not (math.isfinite(self.ratio) and self.ratio > 0):
            raise ValueError(f"--kvtc-ratio must be a positive number (a plan of the calibration card), "
                             f"got {self.ratio!r}")
        for name, flag, low in (("sink_tokens", "--kvtc-sink-tokens", 0), ("window_tokens", "--kvtc-window-tokens", 0),
                                ("min_compress_tokens", "--kvtc-min-compress-tokens", 1),
                                ("capture_tokens", "--kvtc-capture-tokens", 1)):
            value = getattr(self, name)
            if value < low:
                raise ValueError(f"{flag} must be >= {low}, got {value}")
        if self.store_budget is not None and self.store_budget.strip().lower() not in NO_CAP:
            budget_kind, budget = _parse_size(self.store_budget, "--kvtc-store-budget")
            if budget_kind == "fraction":
                if not 0.0 < budget < 1.0:
                    raise ValueError(f"--kvtc-store-budget={self.store_budget!r}: a fraction of the KV pool memory "
                                     "must be in (0, 1)")
            elif budget < 1:
                raise ValueError(f"--kvtc-store-budget={self.store_budget!r}: a cap on the blobs' pool memory must "
                                 "be positive (or 'none')")
        if self.verify not in VERIFY_CHOICES:
            raise ValueError(f"--kvtc-verify must be one of {', '.join(VERIFY_CHOICES)}, got {self.verify!r}")
        if not (math.isfinite(self.stats_interval_s) and self.stats_interval_s > 0):
            raise ValueError(f"--kvtc-stats-interval must be a positive number of seconds, got "
                             f"{self.stats_interval_s!r}")
        if not 0.0 <= self.compress_ahead_watermark <= 1.0:
            raise ValueError(f"--kvtc-compress-ahead-watermark must be in [0, 1], got {self.compress_ahead_watermark}")
        if self.compress_ahead_tokens < 0:
            raise ValueError(f"--kvtc-compress-ahead-tokens must be >= 0, got {self.compress_ahead_tokens}")
        parse_bytes(self.host_spill, what="--kvtc-host-spill", allow_fraction=False)
        if self.calibration is not None and not self.calibration.strip():
            raise ValueError("--kvtc-calibration must be a path, got an empty string")
        if self.capture_dir is not None and not self.capture_dir.strip():
            raise ValueError("--kvtc-capture-dir must be a path, got an empty string")
        return self


def _coerce(name: str, value: Any) -> Any:
    try:
        if name in ("kv_compress", "entropy", "verify"):
            if not isinstance(value, str):
                raise TypeError
            return value.strip().lower()
        if name in ("stats_interval_s", "compress_ahead_watermark"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if name in ("calibration", "capture_dir"):
            return None if value is None else str(value)
        if name == "ratio":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if name in ("store_budget", "host_spill"):
            if value is None and name == "store_budget":
                return None
            if isinstance(value, str):
                return value.strip()
            if isinstance(value, bool):
                raise TypeError
            if isinstance(value, int):
                return str(value)
            if isinstance(value, float):
                # 2147483648.0 -> "2147483648" (bytes); 0.25 -> "0.25" (a fraction)
                return str(int(value)) if value.is_integer() else repr(value)
            raise TypeError
        # integer token counts
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError
        return int(value)
    except (TypeError, ValueError):
        flag = "--" + SERVER_ARGS_ATTRS[name].replace("_", "-")
        raise ValueError(f"{flag}: cannot use {value!r} ({type(value).__name__})") from None
