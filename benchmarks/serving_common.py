"""Shared parts of the serving benchmarks (serve_multiturn.py, throughput.py).

* Server configurations and their launch commands: ``radix`` (plain SGLang), ``kvtc`` (``--kv-compress kvtc``),
  ``hicache`` (``--enable-hierarchical-cache``), each also as ``<name>-nopressure`` (the same command without
  ``--max-total-tokens``, so the whole ``--mem-fraction-static`` budget goes to the KV cache).
* Equal GPU memory: every config gets the same shared server arguments. ``--max-total-tokens N`` in them is the KV
  budget of N uncompressed token slots; ``radix`` and ``hicache`` get a pool of N slots, ``kvtc`` gets a pool of
  N' = N - (store slots) plus a compressed store of exactly (N - N') slots' bytes (``--kvtc-store-budget`` in bytes),
  the same split the plugin's pool-sizing hook makes from a fraction when no token cap is given
  (``kvtc_sglang.cache.plugin.store_bytes_for``). The cap must be rewritten here because the hook sizes the store
  from the memory budget before SGLang applies the token cap: a fraction store budget under ``--max-total-tokens``
  would otherwise take a fraction of the whole free GPU memory on top of the N-slot pool.
* ``ServerProcess``: one server in its own process group, its output in a log file, started, polled until
  ``/health`` answers, and stopped by signalling the whole group (nothing is left running).
* ``ServerClient``: an aiohttp client for streaming ``/generate`` with ``input_ids`` (time to first token, cached
  tokens and their per-tier split from ``meta_info``), ``/server_info``, ``/metrics`` and ``/flush_cache``.
* Statistics (percentiles, per-run summaries), Prometheus text parsing, result files (JSON rows merged by key,
  markdown tables) and a light machine description (no torch import: the client path stays light).

SGLang 0.5.17 facts used: ``meta_info`` of every streamed chunk carries ``prompt_tokens``, ``completion_tokens``,
``cached_tokens`` and, when any token was cached, ``cached_tokens_details = {"device": d, "host": h}`` where ``h`` is
the ``host_hit_length`` part restored by ``init_load_back`` (HiCache: host memory; kvtc: decompressed blobs) and
``d`` the part already in the KV pool. ``/server_info`` returns the server arguments plus ``max_total_num_tokens``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvtc_sglang.cache.options import KVTCOptions, is_fraction, parse_bytes  # noqa: E402  (light: stdlib only)
from kvtc_sglang.eval.provenance import git_commit, gpu_name, pyplot_or_none  # noqa: E402,F401  (stdlib only)

BASE_CONFIGS = ("radix", "kvtc", "hicache")
NOPRESSURE = "-nopressure"
DEFAULT_HICACHE_ARGS = "--hicache-ratio 2"
GB = 1e9  # "per GB" in the reports is per 10^9 bytes
# flags the launcher sets itself, or that belong to one config only
_OWN_FLAGS = ("--model-path", "--host", "--port")
_CONFIG_FLAGS = {"--kv-compress": "kvtc", "--enable-hierarchical-cache": "hicache", "--radix-cache-backend": "kvtc"}
_KVTC_GAUGE_PREFIX = "sglang:kvtc_"


# ---------------------------------------------------------------------------------------------------------------------
# Command-line argument lists
# ---------------------------------------------------------------------------------------------------------------------

def split_args(text: str | Sequence[str] | None) -> list[str]:
    """A shell-quoted argument string (or an already split list) as a list; None -> []."""
    if text is None:
        return []
    return shlex.split(text) if isinstance(text, str) else list(text)


def get_flag(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` (``--flag V`` or ``--flag=V``; the last one wins); "" for a bare switch; None if absent."""
    value = None
    for i, a in enumerate(args):
        if a == flag:
            nxt = args[i + 1] if i + 1 < len(args) else None
            value = nxt if nxt is not None and not nxt.startswith("--") else ""
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1:]
    return value


def without_flag(args: Sequence[str], flag: str) -> list[str]:
    """``args`` with every occurrence of ``flag`` (and its value, if it has one) removed."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == flag:
            i += 2 if i + 1 < len(args) and not args[i + 1].startswith("--") else 1
            continue
        if not a.startswith(flag + "="):
            out.append(a)
        i += 1
    return out


def with_flag(args: Sequence[str], flag: str, value: str | None) -> list[str]:
    """``args`` with ``flag`` set to ``value`` (replacing earlier values); value None appends a bare switch."""
    out = without_flag(args, flag)
    return out + ([flag] if value is None else [flag, str(value)])


# ---------------------------------------------------------------------------------------------------------------------
# Model geometry (from config.json; no torch)
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    """What the benchmarks need from a model folder's config.json."""

    path: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str  # config dtype string, e.g. "bfloat16", "float32"
    has_tokenizer: bool
    max_context: int | None = None  # max_position_embeddings

    @property
    def label(self) -> str:
        return Path(self.path.rstrip("/")).name or self.path

    def kv_bytes_per_token(self, server_args: Sequence[str] = ()) -> int:
        """KV-pool bytes of one token slot on one TP rank (all layers, K and V), as SGLang sizes an MHA pool.

        ``--kv-cache-dtype auto`` follows the model dtype, where ``--dtype auto`` turns float32 configs into
        float16 (SGLang's ``_get_and_verify_dtype``); fp8 caches take one byte per element.
        """
        tp = int(get_flag(server_args, "--tp-size") or get_flag(server_args, "--tp") or 1)
        kv_dtype = (get_flag(server_args, "--kv-cache-dtype") or "auto").lower()
        if kv_dtype == "auto":
            dtype = (get_flag(server_args, "--dtype") or "auto").lower()
            itemsize = 4 if dtype in ("float32", "float") else 2
        elif kv_dtype.startswith("fp8"):
            itemsize = 1
        elif kv_dtype in ("bfloat16", "bf16", "float16", "fp16", "half"):
            itemsize = 2
        else:
            raise ValueError(f"--kv-cache-dtype {kv_dtype}: the benchmark cannot size this KV pool format")
        heads = max(1, self.num_kv_heads // tp)
        return 2 * self.num_layers * heads * self.head_dim * itemsize


def read_model_info(model_path: str | None) -> ModelInfo | None:
    """Geometry of a local model folder (config.json), or None when there is no such folder."""
    if not model_path:
        return None
    folder = Path(model_path)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg
    heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or int(cfg["hidden_size"]) // heads
    has_tok = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    return ModelInfo(path=str(model_path), num_layers=int(cfg["num_hidden_layers"]),
                     num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=int(head_dim),
                     vocab_size=int(cfg.get("vocab_size") or 32000),
                     dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32"), has_tokenizer=has_tok,
                     max_context=cfg.get("max_position_embeddings"))


def token_id_range(vocab_size: int) -> tuple[int, int]:
    """[low, high) of the pseudo-random prompt token ids: clear of the low ids and the special tokens at the top."""
    return max(1, vocab_size // 64), max(2, vocab_size * 15 // 16)


def pseudo_tokens(n: int, key: str, vocab_size: int) -> list[int]:
    """``n`` deterministic pseudo-random token ids for ``key`` (same key -> same ids, in every process)."""
    low, high = token_id_range(vocab_size)
    rng = random.Random(key)  # str seeds hash with sha512: stable across processes
    return [rng.randrange(low, high) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------------
# Server configurations and launch plans
# ---------------------------------------------------------------------------------------------------------------------

def parse_configs(text: str) -> list[str]:
    """``"kvtc,radix,hicache,radix-nopressure"`` -> list; ValueError names the allowed ones."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    allowed = [*BASE_CONFIGS, *(b + NOPRESSURE for b in BASE_CONFIGS)]
    bad = [c for c in names if c not in allowed]
    if bad or not names:
        raise ValueError(f"--configs: unknown {bad or text!r}; choose from {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--configs lists a config twice: {text!r}")
    return names


def base_config(name: str) -> str:
    return name[: -len(NOPRESSURE)] if name.endswith(NOPRESSURE) else name


@dataclass
class LaunchPlan:
    """One server launch: its command and how its KV memory is split.

    kv_budget_tokens: the shared ``--max-total-tokens`` (uncompressed token slots every config gets), None when the
        pool takes whatever ``--mem-fraction-static`` leaves (equal for all configs, kvtc's store carved out of it).
    pool_tokens: this server's KV pool slots (kvtc: the budget minus the slots its compressed store takes).
    store_bytes: the kvtc compressed store per TP rank (bytes), or None when it is a fraction of the free memory.
    """

    config: str
    cmd: list[str]
    kv_budget_tokens: int | None
    pool_tokens: int | None
    store_bytes: int | None
    kv_bytes_per_token: int | None
    note: str
    log_path: str | None = None


def kvtc_split(budget_tokens: int, store_budget: str, kv_bytes_per_token: int) -> tuple[int, int]:
    """Split a budget of ``budget_tokens`` slots into (pool tokens, store bytes) like the plugin's sizing hook.

    A fraction f gives the pool floor(N * (1 - f)) slots and the store the remaining slots' bytes; a byte size B gives
    the store B bytes and the pool N - ceil(B / bytes per token) slots.
    """
    if is_fraction(store_budget):
        from fractions import Fraction

        pool = math.floor(budget_tokens * (1 - Fraction(store_budget.strip())))
        store = (budget_tokens - pool) * kv_bytes_per_token
    else:
        store = parse_bytes(store_budget, what="--kvtc-store-budget", allow_fraction=False)
        pool = budget_tokens - (store + kv_bytes_per_token - 1) // kv_bytes_per_token
    if pool < 1 or store < 1:
        raise ValueError(f"--kvtc-store-budget {store_budget} leaves pool {pool} tokens / store {store} bytes out of "
                         f"--max-total-tokens {budget_tokens}")
    return pool, store


def plan_server(config: str, *, model_path: str, host: str, port: int, server_args: Sequence[str],
                kvtc_args: Sequence[str] = (), hicache_args: Sequence[str] = (), model: ModelInfo | None = None,
                python: str = sys.executable, enable_metrics: bool = True) -> LaunchPlan:
    """The ``sglang.launch_server`` command of one config (nothing is launched).

    Raises ValueError for a config that cannot be built: shared arguments that carry a per-config or launcher flag,
    kvtc without ``--kvtc-calibration``, or a kvtc token cap on a model whose bytes per token are unknown.
    """
    base = base_config(config)
    if base not in BASE_CONFIGS:
        raise ValueError(f"unknown config {config!r}")
    shared = list(server_args)
    for flag in _OWN_FLAGS:
        if get_flag(shared, flag) is not None:
            raise ValueError(f"--server-args must not set {flag}: the launcher sets it")
    for flag, owner in _CONFIG_FLAGS.items():
        if get_flag(shared, flag) is not None:
            raise ValueError(f"--server-args must not set {flag} (it would apply to every config); "
                             f"it belongs to the {owner} config's own arguments")
    budget = get_flag(shared, "--max-total-tokens")
    budget_tokens = int(budget) if budget else None
    if config.endswith(NOPRESSURE):
        shared = without_flag(shared, "--max-total-tokens")
        budget_tokens = None
    bpt = model.kv_bytes_per_token(shared) if model is not None else None
    pool_tokens, store_bytes = budget_tokens, None
    extra: list[str] = []
    if base == "kvtc":
        extra = ["--kv-compress", "kvtc", *kvtc_args]
        if not get_flag(extra, "--kvtc-calibration"):
            raise ValueError("the kvtc config needs a calibration artifact: --kvtc-args '--kvtc-calibration DIR'")
        store_budget = get_flag(extra, "--kvtc-store-budget") or KVTCOptions().store_budget
        if budget_tokens is not None:
            if bpt is None:
                raise ValueError("kvtc under --max-total-tokens needs the model's config.json (bytes per token) to "
                                 "give the compressed store the same memory; pass a local --model-path")
            # the plugin carves the store out of the --max-total-tokens slots; this only reports the split
            pool_tokens, store_bytes = kvtc_split(budget_tokens, store_budget, bpt)
        elif not is_fraction(store_budget):
            store_bytes = parse_bytes(store_budget, what="--kvtc-store-budget", allow_fraction=False)
    elif base == "hicache":
        extra = ["--enable-hierarchical-cache", *hicache_args]
    cmd = [python, "-m", "sglang.launch_server", "--model-path", str(model_path), "--host", host, "--port", str(port),
           *shared, *extra]
    if enable_metrics and get_flag(cmd, "--enable-metrics") is None:
        cmd.append("--enable-metrics")
    mem = get_flag(shared, "--mem-fraction-static") or "SGLang's default"
    if budget_tokens is not None:
        size = f" x {bpt} B = {budget_tokens * bpt / 2**30:.3f} GiB" if bpt else ""
        note = f"KV budget {budget_tokens} token slots{size} (same --mem-fraction-static {mem} for every config)"
        if base == "kvtc":
            note += f"; kvtc: pool {pool_tokens} slots + compressed store {store_bytes} B"
        elif base == "hicache":
            note += "; hicache: device pool of that size plus its host pool (host memory, not GPU)"
    else:
        note = (f"KV pool: whatever --mem-fraction-static {mem} leaves, equal for every config"
                + ("; kvtc takes its compressed store out of it" if base == "kvtc" else ""))
    return LaunchPlan(config=config, cmd=cmd, kv_budget_tokens=budget_tokens, pool_tokens=pool_tokens,
                      store_bytes=store_bytes, kv_bytes_per_token=bpt, note=note)


# ---------------------------------------------------------------------------------------------------------------------
# Server processes
# ---------------------------------------------------------------------------------------------------------------------

class ServerStartError(RuntimeError):
    """A launched server exited or did not become healthy in time (its process group has been stopped)."""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port(host: str, start: int, tries: int = 200) -> int:
    for port in range(start, start + tries):
        if port_is_free(host, port):
            return port
    raise RuntimeError(f"no free TCP port in [{start}, {start + tries}) on {host}")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, read from /proc; [pgid] or [] where /proc is absent."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields_after_comm = stat[stat.rfind(")") + 2:].split()
        if len(fields_after_comm) > 2 and fields_after_comm[0] != "Z" and int(fields_after_comm[2]) == pgid:
            out.append(int(entry.name))
    return out


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class ServerProcess:
    """A server command in its own process group (session), its stdout+stderr in ``log_path``.

    ``start()`` launches, ``wait_healthy()`` polls ``GET {url}/health`` until it answers 200, ``stop()`` sends SIGTERM
    to the whole group, then SIGKILL to what is left after ``grace_s``, and waits until no process of the group runs.
    Use as a context manager: the group is stopped however the block ends.
    """

    def __init__(self, cmd: Sequence[str], url: str, log_path: str | os.PathLike, *, env: dict | None = None,
                 health_path: str = "/health"):
        self.cmd = list(cmd)
        self.url = url.rstrip("/")
        self.log_path = Path(log_path)
        self.env = env
        self.health_path = health_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(self.log_path, "w") as log:
            log.write("$ " + shlex.join(self.cmd) + "\n")
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def wait_healthy(self, timeout_s: float, *, poll_s: float = 1.0, log: Callable[[str], None] = print) -> float:
        """Seconds until ``/health`` answered 200. On exit or timeout: stop the group, raise ServerStartError."""
        assert self.proc is not None, "start() first"
        t0 = time.monotonic()
        next_note = t0 + 30
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.stop()
                raise ServerStartError(f"server exited with code {rc} before becoming healthy; log {self.log_path}, "
                                       f"last lines:\n{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=5) as resp:
                    if resp.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, OSError):
                pass
            now = time.monotonic()
            if now - t0 > timeout_s:
                self.stop()
                raise ServerStartError(f"server not healthy after {timeout_s:.0f} s ({self.url}{self.health_path}); "
                                       f"stopped it. Log {self.log_path}, last lines:\n{tail(self.log_path)}")
            if now >= next_note:
                log(f"  ... waiting for {self.url} ({now - t0:.0f} s)")
                next_note = now + 30
            time.sleep(poll_s)

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop every process of the group (idempotent)."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 15.0)):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self.proc.poll()
                if self.proc.returncode is not None and not group_members(pgid):
                    return
                time.sleep(0.2)
        self.proc.poll()

    def __enter__(self) -> "ServerProcess":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_port_free(host: str, port: int, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_is_free(host, port):
            return True
        time.sleep(0.5)
    return False


def install_sigterm_exit() -> None:
    """Turn SIGTERM (e.g. from ``timeout``) into SystemExit so ``finally`` blocks stop the launched servers."""
    def _exit(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


# ---------------------------------------------------------------------------------------------------------------------
# HTTP client
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class GenResult:
    """One ``/generate`` call. Times are ``time.perf_counter()`` seconds; token counts from ``meta_info``."""

    ok: bool = False
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cached_device: int = 0
    cached_host: int = 0
    output_ids: list[int] = field(default_factory=list)
    t_start: float = 0.0
    t_first: float | None = None
    t_end: float = 0.0

    @property
    def output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_start

    @property
    def latency_s(self) -> float:
        return self.t_end - self.t_start


def cache_split(meta: dict) -> tuple[int, int, int]:
    """(cached, device, host) tokens from a ``meta_info``; without ``cached_tokens_details`` all cached is device."""
    cached = int(meta.get("cached_tokens") or 0)
    details = meta.get("cached_tokens_details") or None
    if isinstance(details, dict):
        device = int(details.get("device") or 0)
        host = int(details.get("host") or 0) + int(details.get("storage") or 0)
        return cached, device, host
    return cached, cached, 0


class ServerClient:
    """aiohttp session against one SGLang server. ``async with ServerClient(url) as c: ...``."""

    def __init__(self, url: str, request_timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self.session = None

    async def __aenter__(self) -> "ServerClient":
        import aiohttp

        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=None))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def generate(self, input_ids: list[int], max_new_tokens: int, *, ignore_eos: bool = False,
                       timeout_s: float | None = None) -> GenResult:
        """Streaming greedy ``/generate``; never raises for server or network errors (``ok=False, error=...``)."""
        import aiohttp

        payload = {"input_ids": list(input_ids), "stream": True,
                   "sampling_params": {"temperature": 0.0, "max_new_tokens": int(max_new_tokens),
                                       "ignore_eos": bool(ignore_eos)}}
        res = GenResult(prompt_tokens=len(input_ids))
        res.t_start = time.perf_counter()
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.request_timeout_s)
        finished = False
        try:
            async with self.session.post(self.url + "/generate", json=payload, timeout=timeout) as resp:
                if resp.status != 200:
                    res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    return res
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        for line in event.split(b"\n"):
                            if not line.startswith(b"data:"):
                                continue
                            data = line[5:].strip()
                            if data == b"[DONE]":
                                finished = True
                                continue
                            msg = json.loads(data)
                            if "error" in msg:
                                err = msg["error"]
                                res.error = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                                continue
                            self._absorb(res, msg)
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError, OSError) as exc:
            res.error = f"{type(exc).__name__}: {exc}"
        finally:
            res.t_end = time.perf_counter()
        if res.error is None and not finished:
            res.error = "stream ended before [DONE]"
        res.ok = res.error is None
        return res

    @staticmethod
    def _absorb(res: GenResult, msg: dict) -> None:
        meta = msg.get("meta_info") or {}
        ids = msg.get("output_ids") or []
        completion = meta.get("completion_tokens")
        # cumulative output_ids (SGLang's default) or deltas (--incremental-streaming-output)
        if completion is not None and len(ids) == int(completion):
            res.output_ids = list(ids)
        else:
            res.output_ids.extend(ids)
        if res.t_first is None and res.output_ids:
            res.t_first = time.perf_counter()
        if "prompt_tokens" in meta:
            res.prompt_tokens = int(meta["prompt_tokens"])
        if "cached_tokens" in meta:
            res.cached_tokens, res.cached_device, res.cached_host = cache_split(meta)
        reason = meta.get("finish_reason")
        if isinstance(reason, dict) and reason.get("type") == "abort":
            res.error = f"aborted: {reason.get('message', reason)}"

    async def get_json(self, path: str) -> dict | None:
        try:
            async with self.session.get(self.url + path) as resp:
                return await resp.json(content_type=None) if resp.status == 200 else None
        except Exception:  # noqa: BLE001 - optional endpoints: any failure means "not available"
            return None

    async def server_info(self) -> dict:
        """``/server_info`` (``/get_server_info`` on older servers); {} when neither answers."""
        for path in ("/server_info", "/get_server_info"):
            info = await self.get_json(path)
            if info:
                return info
        return {}

    async def metrics(self) -> dict[str, list[tuple[dict, float]]] | None:
        """Parsed ``/metrics`` (Prometheus text), or None when the server does not export metrics."""
        try:
            async with self.session.get(self.url + "/metrics") as resp:
                if resp.status != 200:
                    return None
                return parse_prometheus(await resp.text())
        except Exception:  # noqa: BLE001
            return None

    async def flush_cache(self, tries: int = 10) -> bool:
        """Empty the server's prefix cache (SGLang refuses while requests run: retry)."""
        for _ in range(tries):
            try:
                async with self.session.post(self.url + "/flush_cache") as resp:
                    if resp.status == 200:
                        return True
            except Exception:  # noqa: BLE001
                pass
            await asyncio.sleep(1.0)
        return False


# ---------------------------------------------------------------------------------------------------------------------
# Prometheus metrics
# ---------------------------------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict, float]]]:
    """``{metric name: [(labels, value), ...]}`` from Prometheus text exposition (comments skipped)."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.setdefault(m.group(1), []).append((labels, value))
    return out


def metric(samples: dict | None, name: str, *, reduce: str = "rank0") -> float | None:
    """One value of metric ``name``: "rank0" (the ``tp_rank="0"`` sample, else the first) or "sum" over samples."""
    if not samples or name not in samples:
        return None
    rows = samples[name]
    if reduce == "sum":
        return sum(v for _, v in rows)
    for labels, v in rows:
        if labels.get("tp_rank", "0") == "0":
            return v
    return rows[0][1]


def kvtc_gauges(samples: dict | None) -> dict[str, float]:
    """The ``sglang:kvtc_*`` gauges of TP rank 0 (every rank holds the same tokens; bytes are per rank, like the
    pool size they are compared with)."""
    return {name[len(_KVTC_GAUGE_PREFIX):]: metric(samples, name)
            for name in (samples or {}) if name.startswith(_KVTC_GAUGE_PREFIX)}


@dataclass
class MetricsSample:
    """What one ``/metrics`` scrape says about the cache (None = not exported)."""

    t: float
    kv_evictable_tokens: float | None
    kv_used_tokens: float | None
    hicache_host_used_tokens: float | None
    kvtc: dict[str, float]

    @classmethod
    def from_samples(cls, t: float, samples: dict | None) -> "MetricsSample":
        return cls(t=t, kv_evictable_tokens=metric(samples, "sglang:kv_evictable_tokens"),
                   kv_used_tokens=metric(samples, "sglang:kv_used_tokens"),
                   hicache_host_used_tokens=metric(samples, "sglang:hicache_host_used_tokens"),
                   kvtc=kvtc_gauges(samples))

    def gpu_held_tokens(self) -> float | None:
        """Tokens whose KV the GPU holds: pool slots in use or cached (evictable + used) + kvtc compressed tokens."""
        pool = None
        if self.kv_evictable_tokens is not None or self.kv_used_tokens is not None:
            pool = (self.kv_evictable_tokens or 0) + (self.kv_used_tokens or 0)
        elif "hot_tokens" in self.kvtc:
            pool = self.kvtc["hot_tokens"]
        if pool is None:
            return None
        return pool + self.kvtc.get("compressed_tokens", 0.0)


_LOG_FIELDS = {
    "hot_tokens": r"tokens hot=(\d+)", "compressed_tokens": r"compressed=(\d+) host=", "host_tokens": r" host=(\d+) \|",
    "num_blobs": r"(\d+) blobs", "realized_ratio": r"ratio ([\d.]+)x", "compress_count": r"compress (\d+) \(",
    "decompress_count": r"decompress (\d+) \(", "decompress_tokens": r"decompress \d+ \((\d+) tok",
    "integrity_failures": r"integrity failures (\d+)", "drops": r"drops (\d+)"}


def kvtc_from_log(path: str | os.PathLike) -> dict[str, float]:
    """The last ``KVTC: tokens hot=...`` summary line of a server log (``KVTCStats.summary_line``), parsed; {} if
    there is none. The same numbers as the gauges, for servers whose /metrics lacks them."""
    try:
        lines = [ln for ln in Path(path).read_text(errors="replace").splitlines() if "KVTC: tokens hot=" in ln]
    except OSError:
        return {}
    if not lines:
        return {}
    out = {}
    for key, pattern in _LOG_FIELDS.items():
        m = re.search(pattern, lines[-1])
        if m:
            out[key] = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    return out


class MetricsPoller:
    """Scrapes ``/metrics`` every ``interval_s`` seconds in the background while a run goes on."""

    def __init__(self, client: ServerClient, interval_s: float = 5.0):
        self.client = client
        self.interval_s = interval_s
        self.samples: list[MetricsSample] = []
        self._task = None
        self.available = True

    async def scrape(self) -> MetricsSample | None:
        samples = await self.client.metrics()
        if samples is None:
            self.available = False
            return None
        s = MetricsSample.from_samples(time.perf_counter(), samples)
        self.samples.append(s)
        return s

    async def _loop(self) -> None:
        while True:
            await self.scrape()
            if not self.available:
                return
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        if self.interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self.available:
            await self.scrape()


def cache_memory_report(samples: list[MetricsSample], *, pool_tokens: int | None, kv_bytes_per_token: int | None,
                        store_bytes: int | None) -> dict[str, Any]:
    """Cached tokens per GB of GPU KV memory, and the last kvtc gauges.

    cached_tokens_per_gb = max over scrapes of (pool slots holding KV: ``sglang:kv_evictable_tokens`` +
    ``sglang:kv_used_tokens``, plus kvtc's ``compressed_tokens`` in the GPU store) / (KV GPU bytes / 1e9), where
    KV GPU bytes = ``max_total_num_tokens`` x bytes per token + compressed-store capacity (``store_capacity_bytes``
    gauge, else the planned store size). HiCache host tokens and kvtc host-tier tokens are not GPU memory and are
    reported apart.
    """
    out: dict[str, Any] = {"cached_tokens_per_gb": None, "gpu_cached_tokens_peak": None, "kv_gpu_bytes": None}
    held = [s.gpu_held_tokens() for s in samples]
    held = [h for h in held if h is not None]
    kvtc_last = next((s.kvtc for s in reversed(samples) if s.kvtc), {})
    store = kvtc_last.get("store_capacity_bytes") or store_bytes or 0
    if pool_tokens and kv_bytes_per_token:
        out["kv_gpu_bytes"] = int(pool_tokens * kv_bytes_per_token + store)
    if held:
        out["gpu_cached_tokens_peak"] = int(max(held))
        if out["kv_gpu_bytes"]:
            out["cached_tokens_per_gb"] = round(max(held) / (out["kv_gpu_bytes"] / GB), 1)
    host = [s.hicache_host_used_tokens for s in samples if s.hicache_host_used_tokens is not None]
    if host:
        out["hicache_host_tokens_peak"] = int(max(host))
    if kvtc_last:
        out["kvtc"] = {k: (round(v, 4) if isinstance(v, float) and not v.is_integer() else int(v))
                       for k, v in sorted(kvtc_last.items())}
        peak = max((s.kvtc.get("compressed_tokens", 0) for s in samples), default=0)
        out["kvtc_compressed_tokens_peak"] = int(peak)
        out["kvtc_realized_ratio"] = out["kvtc"].get("realized_ratio")
        out["kvtc_load_backs"] = out["kvtc"].get("decompress_count")
        out["kvtc_integrity_failures"] = out["kvtc"].get("integrity_failures")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------------

def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default); None if
    there are no values."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000.0 * x, 3)


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 5) if den else None


def summarize(records: Sequence[dict], duration_s: float) -> dict[str, Any]:
    """Metrics of one measured run from its per-request records.

    Records need ``ok``, ``turn`` (1 = first turn of a conversation), ``ttft_s``, ``latency_s``, ``prompt_tokens``,
    ``cached_tokens``, ``cached_device``, ``cached_host``, ``output_tokens``. Failed requests count only in
    ``errors``. Returning turns are turn >= 2. Hit rates are cached / prompt tokens summed over requests; the device
    and host (HiCache host memory, or kvtc decompressed) parts add up to the total.
    """
    ok = [r for r in records if r["ok"]]
    ret = [r for r in ok if r["turn"] >= 2]
    first = [r for r in ok if r["turn"] == 1]
    ttft_ret = [r["ttft_s"] for r in ret if r["ttft_s"] is not None]
    prompt = sum(r["prompt_tokens"] for r in ok)
    out_tok = sum(r["output_tokens"] for r in ok)
    d = max(duration_s, 1e-9)
    return {
        "requests": len(records), "errors": len(records) - len(ok), "returning_requests": len(ret),
        "duration_s": round(duration_s, 3),
        "ttft_p50_ms": _ms(percentile(ttft_ret, 50)), "ttft_p99_ms": _ms(percentile(ttft_ret, 99)),
        "ttft_mean_ms": _ms(sum(ttft_ret) / len(ttft_ret)) if ttft_ret else None,
        "ttft_first_p50_ms": _ms(percentile([r["ttft_s"] for r in first if r["ttft_s"] is not None], 50)),
        "ttft_all_p50_ms": _ms(percentile([r["ttft_s"] for r in ok if r["ttft_s"] is not None], 50)),
        "latency_p50_ms": _ms(percentile([r["latency_s"] for r in ok], 50)),
        "req_per_s": round(len(ok) / d, 4), "tok_per_s": round(out_tok / d, 2),
        "input_tok_per_s": round(prompt / d, 2), "total_tok_per_s": round((prompt + out_tok) / d, 2),
        "prompt_tokens": prompt, "output_tokens": out_tok, "cached_tokens": sum(r["cached_tokens"] for r in ok),
        "hit_rate": _ratio(sum(r["cached_tokens"] for r in ok), prompt),
        "hit_rate_device": _ratio(sum(r["cached_device"] for r in ok), prompt),
        "hit_rate_host": _ratio(sum(r["cached_host"] for r in ok), prompt),
        "hit_rate_returning": _ratio(sum(r["cached_tokens"] for r in ret), sum(r["prompt_tokens"] for r in ret)),
        "restored_requests": sum(1 for r in ok if r["cached_host"] > 0),
        "ttft_returning_cdf_ms": [_ms(percentile(ttft_ret, q)) for q in range(101)] if ttft_ret else [],
    }


def record_of(res: GenResult, t0: float, **extra: Any) -> dict[str, Any]:
    """A per-request record (times relative to ``t0``) from a GenResult."""
    return {**extra, "ok": res.ok, "error": res.error, "prompt_tokens": res.prompt_tokens,
            "cached_tokens": res.cached_tokens, "cached_device": res.cached_device, "cached_host": res.cached_host,
            "ttft_s": None if res.ttft_s is None else round(res.ttft_s, 6), "latency_s": round(res.latency_s, 6),
            "output_tokens": res.output_tokens, "t_start_s": round(res.t_start - t0, 6),
            "t_end_s": round(res.t_end - t0, 6)}


# ---------------------------------------------------------------------------------------------------------------------
# Warm-up
# ---------------------------------------------------------------------------------------------------------------------

async def warm_up(client: ServerClient, *, vocab_size: int, requests: int, prompt_len: int, fill_tokens: int,
                  timeout_s: float, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Requests that are not measured: the first compiles the server's kernels (minutes on a fresh box), a repeat
    with a longer prompt takes the prefix-hit path, a small concurrent batch the batched path; with
    ``fill_tokens`` > 0, prompts totalling that many tokens push the first ones out of the pool (kvtc compresses,
    HiCache writes to host) and the first is sent again (decompress / load back). Then the prefix cache is flushed.

    Raises RuntimeError when the first request fails (the server cannot serve).
    """
    t0 = time.perf_counter()
    info: dict[str, Any] = {"requests": 0, "errors": 0}
    if requests <= 0 and fill_tokens <= 0:
        return info

    async def one(ids: list[int]) -> GenResult:
        r = await client.generate(ids, 4, ignore_eos=True, timeout_s=timeout_s)
        info["requests"] += 1
        info["errors"] += 0 if r.ok else 1
        return r

    base = pseudo_tokens(prompt_len, "warmup:0", vocab_size)
    if requests > 0:
        first = await one(base)
        if not first.ok:
            raise RuntimeError(f"warm-up request failed: {first.error}")
        log(f"  warm-up: first request {first.latency_s:.1f} s (kernel compilation included)")
        if requests > 1:
            await one(base + pseudo_tokens(16, "warmup:ext", vocab_size))
        batch = [pseudo_tokens(prompt_len // 2, f"warmup:b{i}", vocab_size) for i in range(max(0, requests - 2))]
        await asyncio.gather(*(one(ids) for ids in batch))
    if fill_tokens > 0:
        n = max(2, math.ceil(fill_tokens / prompt_len))
        prompts = [pseudo_tokens(prompt_len, f"warmup:fill{i}", vocab_size) for i in range(n)]
        for i in range(0, n, 4):
            await asyncio.gather(*(one(ids) for ids in prompts[i:i + 4]))
        again = await one(prompts[0])
        info["fill_prompts"], info["fill_restored_tokens"] = n, again.cached_host
        log(f"  warm-up: filled {n} x {prompt_len} tokens, first prompt again: cached {again.cached_tokens} "
            f"(device {again.cached_device}, restored {again.cached_host})")
    info["flushed"] = await client.flush_cache()
    if not info["flushed"]:
        log("  warning: /flush_cache failed after warm-up; the measured run starts with the warm-up prompts cached")
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


# ---------------------------------------------------------------------------------------------------------------------
# The benchmarks' shared command line, server preparation and launch loop
# ---------------------------------------------------------------------------------------------------------------------

RESTORED_TIER = {"kvtc": "compressed store (decompressed)", "hicache": "host memory (loaded back)", "radix": "none"}


def add_target_args(ap) -> None:
    """Options choosing the server(s), shared by both benchmarks."""
    g = ap.add_argument_group("target")
    g.add_argument("--url", help="a running server (one config); otherwise --configs are launched")
    g.add_argument("--config-label", help="config name for --url rows (default: read from /server_info)")
    g.add_argument("--configs", help="configs to launch in turn: kvtc,radix,hicache[,radix-nopressure,...]")
    g.add_argument("--model-path", help="model folder (launch; tokenizer and config.json for prompts)")
    g.add_argument("--model-label", help="model name in the rows (default: the model folder's name)")
    g.add_argument("--server-args", default="", help="shared arguments of every launched server, one quoted string "
                                                     "(write --server-args='--flag' when it holds no space)")
    g.add_argument("--kvtc-args", default="", help="extra arguments of the kvtc config (--kvtc-calibration DIR "
                                                   "[--kvtc-ratio R --kvtc-store-budget F ...])")
    g.add_argument("--hicache-args", default=DEFAULT_HICACHE_ARGS, help="extra arguments of the hicache config "
                                                                        "(default %(default)r)")
    g.add_argument("--kv-budget-tokens", type=int, help="KV budget the working-set multipliers refer to (default: "
                                                        "--max-total-tokens of --server-args, or the server's pool)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=30000, help="first port tried for launched servers")
    g.add_argument("--python", default=sys.executable, help="python running sglang.launch_server")
    g.add_argument("--health-timeout", type=float, default=600.0, help="seconds to wait for /health")
    w = ap.add_argument_group("warm-up and measurement")
    w.add_argument("--request-timeout", type=float, default=600.0)
    w.add_argument("--warmup-requests", type=int, help="unmeasured requests before the fill (default 3)")
    w.add_argument("--warmup-prompt-len", type=int, default=1024)
    w.add_argument("--warmup-fill", type=float, help="warm-up fill in multiples of the pool (default 1.25; 0: "
                                                     "none); skipped above --warmup-fill-max")
    w.add_argument("--warmup-fill-max", type=int, default=200_000, help="largest pool (tokens) to fill")
    w.add_argument("--warmup-timeout", type=float, default=900.0, help="per warm-up request (first compiles)")
    w.add_argument("--metrics-interval", type=float, help="seconds between /metrics scrapes (default 5)")
    w.add_argument("--no-plots", action="store_true")
    w.add_argument("--smoke", action="store_true", help="tiny sizes (a check that everything runs)")


def check_target_args(ap, args) -> None:
    if bool(args.url) == bool(args.configs):
        ap.error("give exactly one of --url and --configs")
    if args.configs and not args.model_path:
        ap.error("--configs needs --model-path")


def config_label_from_info(info: dict) -> str:
    if info.get("radix_cache_backend") == "kvtc" or info.get("kv_compress") == "kvtc":
        return "kvtc"
    if info.get("enable_hierarchical_cache"):
        return "hicache"
    return "radix"


@dataclass
class ServerContext:
    """What a measurement needs to know about the server it runs against (after warm-up)."""

    label: str
    info: dict
    model: ModelInfo | None
    pool_tokens: int | None  # the server's max_total_num_tokens
    budget_tokens: int | None  # the common KV budget (working-set multipliers refer to it)
    vocab_size: int
    kv_bytes_per_token: int | None
    max_context: int | None  # longest prompt + output sent to every config
    plan: LaunchPlan | None
    base_row: dict


async def prepare_server(client: ServerClient, args, *, label: str | None, plan: LaunchPlan | None,
                         model: ModelInfo | None, log: Callable[[str], None] = print) -> ServerContext:
    """Read ``/server_info``, warm the server up (see ``warm_up``) and describe it. ``args`` carries the options of
    ``add_target_args``."""
    info = await client.server_info()
    label = label or args.config_label or config_label_from_info(info)
    if model is None and info.get("model_path"):
        model = read_model_info(info["model_path"])
    pool_tokens = info.get("max_total_num_tokens")
    budget = (plan.kv_budget_tokens if plan else None) or args.kv_budget_tokens
    if budget is None and plan is None:
        budget = pool_tokens
        if label.startswith("kvtc"):
            log("warning: the KV budget is read from a kvtc server's (shrunk) pool; pass --kv-budget-tokens to give "
                "every config the same workload")
    vocab = model.vocab_size if model else int(info.get("vocab_size") or 32000)
    bpt = (plan.kv_bytes_per_token if plan else None) or (
        model.kv_bytes_per_token(split_args(args.server_args)) if model else None)
    # one prompt limit for every config (kvtc's pool is smaller than the budget): the model's context and the
    # KV budget, else what this server accepts
    limits = [x for x in (model.max_context if model else None, budget) if x]
    max_context = min(limits) - 1 if limits else info.get("max_req_input_len")
    fill = 0
    if args.warmup_fill > 0 and pool_tokens and pool_tokens <= args.warmup_fill_max:
        fill = int(args.warmup_fill * pool_tokens)
    warm = await warm_up(client, vocab_size=vocab, requests=args.warmup_requests, prompt_len=args.warmup_prompt_len,
                         fill_tokens=fill, timeout_s=args.warmup_timeout, log=log)
    base_row = {
        "config": label, "model": args.model_label or (model.label if model else str(info.get("model_path"))),
        "gpu": gpu_name(), "commit": git_commit(), "kv_budget_tokens": budget, "pool_tokens": pool_tokens,
        "kv_bytes_per_token": bpt, "store_bytes": plan.store_bytes if plan else None,
        "memory_note": plan.note if plan else "server started outside the benchmark (see its own arguments)",
        "server_cmd": shlex.join(plan.cmd) if plan else None,
        "restored_tier": RESTORED_TIER.get(base_config(label), "host"), "warmup": warm, "smoke": bool(args.smoke),
    }
    return ServerContext(label, info, model, pool_tokens, budget, vocab, bpt, max_context, plan, base_row)


async def measured_run(client: ServerClient, ctx: ServerContext, interval_s: float, run: Callable) -> tuple:
    """``await run()`` with ``/metrics`` scraped before, every ``interval_s`` seconds during, and after it.

    Returns (run's result, cache_memory_report of the scrapes)."""
    poller = MetricsPoller(client, interval_s)
    await poller.scrape()
    poller.start()
    try:
        result = await run()
    finally:
        await poller.stop()
    mem = cache_memory_report(poller.samples, pool_tokens=ctx.pool_tokens, kv_bytes_per_token=ctx.kv_bytes_per_token,
                              store_bytes=ctx.plan.store_bytes if ctx.plan else None)
    if "kvtc" not in mem and ctx.plan is not None and ctx.plan.log_path:
        logged = kvtc_from_log(ctx.plan.log_path)
        if logged:
            mem["kvtc"] = {**logged, "source": "server log"}
    return result, mem


def run_configs(args, *, measure: Callable[[str, LaunchPlan | None], list[dict]],
                report: Callable[[list[dict]], Any], model: ModelInfo | None) -> list[str]:
    """``--url``: ``report(measure(url, None))`` for the one running server; otherwise :func:`run_launched`.
    Returns the configs that failed (always none in URL mode: its errors propagate)."""
    if args.url:
        report(measure(args.url, None))
        return []
    return run_launched(args, measure=measure, report=report, model=model)


def run_launched(args, *, measure: Callable[[str, LaunchPlan], list[dict]], report: Callable[[list[dict]], Any],
                 model: ModelInfo | None, log: Callable[[str], None] = print) -> list[str]:
    """Launch each of ``args.configs`` in turn, ``measure(url, plan)`` it, ``report(rows)`` after each config, and
    stop the server (its whole process group) before the next. Every command is built (and checked) before the
    first launch. Returns the configs that failed (server start, warm-up or run)."""
    configs = parse_configs(args.configs)
    shared = split_args(args.server_args)
    kw = dict(model_path=args.model_path, host=args.host, server_args=shared, kvtc_args=split_args(args.kvtc_args),
              hicache_args=split_args(args.hicache_args), model=model, python=args.python)
    for c in configs:
        plan_server(c, port=args.port, **kw)
    shared_budget = get_flag(shared, "--max-total-tokens")
    if getattr(args, "multipliers", None) and not (shared_budget or args.kv_budget_tokens):
        raise SystemExit("--working-set-multipliers with launched servers needs --max-total-tokens in --server-args "
                         "(the KV budget) or --kv-budget-tokens")
    failures = []
    for c in configs:
        port = find_free_port(args.host, args.port)
        plan = plan_server(c, port=port, **kw)
        if plan.kv_budget_tokens is None:  # -nopressure runs get the pressured runs' workload
            plan.kv_budget_tokens = args.kv_budget_tokens or (int(shared_budget) if shared_budget else None)
        url = f"http://{args.host}:{port}"
        log(f"[{c}] {plan.note}\n[{c}] $ {shlex.join(plan.cmd)}")
        plan.log_path = str(Path(args.out_dir) / "logs" / f"server_{c}.log")
        server = ServerProcess(plan.cmd, url, plan.log_path)
        try:
            server.start()
            log(f"[{c}] healthy after {server.wait_healthy(args.health_timeout):.0f} s (log {server.log_path})")
            report(measure(url, plan))
        except (ServerStartError, RuntimeError, OSError, ValueError) as exc:
            failures.append(c)
            log(f"[{c}] FAILED: {exc}")
        finally:
            server.stop()
            wait_port_free(args.host, port)
    return failures


# ---------------------------------------------------------------------------------------------------------------------
# Result files and machine
# ---------------------------------------------------------------------------------------------------------------------

def merge_rows(path: str | os.PathLike, rows: Sequence[dict], key: Sequence[str]) -> list[dict]:
    """Write ``rows`` into the JSON list at ``path``: a row replaces an existing one with the same ``key`` values,
    other existing rows stay. Returns the merged list. Raises ValueError (and writes nothing) when the existing
    file is not a JSON list."""
    path = Path(path)
    old: list[dict] = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); move it away or fix it") from None
        if not isinstance(old, list):
            raise ValueError(f"{path} does not hold a list of rows; move it away or fix it")
    new_keys = {tuple(r.get(k) for k in key) for r in rows}
    merged = [r for r in old if tuple(r.get(k) for k in key) not in new_keys] + list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, path)
    return merged


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) < 1 and value != 0:
            return f"{value:.3f}"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table: ``columns`` = [(header, row key)]."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k)) for _, k in columns) + " |")
    return "\n".join(lines)


def progress(total: int, desc: str):
    """A tqdm bar on stderr (refreshing at most every 2 s when stderr is not a terminal), or a no-op object."""
    try:
        from tqdm import tqdm
    except ImportError:
        class _Null:
            def update(self, n=1): pass
            def set_postfix_str(self, s): pass
            def close(self): pass
        return _Null()
    return tqdm(total=total, desc=desc, file=sys.stderr, mininterval=0.2 if sys.stderr.isatty() else 2.0,
                dynamic_ncols=True)

