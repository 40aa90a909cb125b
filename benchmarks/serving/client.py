"""aiohttp client of one SGLang server: streaming ``/generate`` with ``input_ids``, ``/server_info``, ``/metrics``
(raw text), ``/flush_cache``.

SGLang 0.5.17 facts used: every streamed chunk's ``meta_info`` carries ``prompt_tokens``, ``completion_tokens``,
``cached_tokens`` and, when any token was cached, ``cached_tokens_details = {"device": d, "host": h}`` (``h``: the
part restored by ``init_load_back``: HiCache host memory, kvtc decompressed blobs; ``storage`` for HiCache L3).
``output_ids`` are cumulative (or deltas with ``--incremental-streaming-output``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field


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
    t_last: float | None = None  # when the last output token arrived
    t_end: float = 0.0

    @property
    def output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_start

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two output tokens)."""
        if self.t_first is None or self.t_last is None or self.output_tokens < 2:
            return None
        return (self.t_last - self.t_first) / (self.output_tokens - 1)

    @property
    def latency_s(self) -> float:
        return self.t_end - self.t_start


def cache_split(meta: dict) -> tuple[int, int, int]:
    """(cached, device, restored) tokens from a ``meta_info``; without ``cached_tokens_details`` all is device."""
    cached = int(meta.get("cached_tokens") or 0)
    details = meta.get("cached_tokens_details") or None
    if isinstance(details, dict):
        device = int(details.get("device") or 0)
        host = int(details.get("host") or 0) + int(details.get("storage") or 0)
        return cached, device, host
    return cached, cached, 0


class ServerClient:
    """``async with ServerClient(url) as c: ...``."""

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

    async def generate(self, input_ids: list[int], max_new_tokens: int, *, ignore_eos: bool = True,
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
        before = len(res.output_ids)
        if completion is not None and len(ids) == int(completion):  # cumulative (SGLang's default)
            res.output_ids = list(ids)
        else:  # deltas (--incremental-streaming-output)
            res.output_ids.extend(ids)
        if len(res.output_ids) > before:
            now = time.perf_counter()
            res.t_first = now if res.t_first is None else res.t_first
            res.t_last = now
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

    async def metrics_text(self) -> str | None:
        """``/metrics`` (Prometheus text), or None when the server does not export metrics."""
        try:
            async with self.session.get(self.url + "/metrics") as resp:
                return await resp.text() if resp.status == 200 else None
        except Exception:  # noqa: BLE001
            return None

    async def flush_cache(self, tries: int = 10, wait_s: float = 1.0) -> bool:
        """Empty the server's prefix cache (SGLang refuses while requests run: retry)."""
        for _ in range(tries):
            try:
                async with self.session.post(self.url + "/flush_cache") as resp:
                    if resp.status == 200:
                        return True
            except Exception:  # noqa: BLE001
                pass
            await asyncio.sleep(wait_s)
        return False
