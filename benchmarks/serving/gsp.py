"""Workload (b): the shared-prefix workload through SGLang's own ``python -m sglang.bench_serving --dataset-name
generated-shared-prefix`` (G groups of prompts sharing a system prompt, shuffled, uniform or Zipf group popularity,
Poisson arrivals, bounded concurrency), run unmodified against the server, its per-request details turned into
the suite's records.

The tool sends text, so the server needs a tokenizer (the suite's dummy-Llama folder carries SmolLM2's), and it needs
``--tokenizer`` to size prompts. It reports no send times: the window is the whole run after its own warm-up
requests, and TTFT covers every request (``ttft_scope`` "all"; which requests reuse a group prefix is not in its
output). Where the ``datasets`` package is missing, ``shims/`` goes first on the tool's PYTHONPATH (see there).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
from pathlib import Path

SHIMS = Path(__file__).resolve().parent / "shims"


def bench_serving_cmd(*, url: str, tokenizer: str, output_file: str, num_groups: int, prompts_per_group: int,
                      system_prompt_len: int, question_len: int, output_len: int, zipf_alpha: float | None,
                      request_rate: float, max_concurrency: int, seed: int = 0, warmup_requests: int = 4,
                      python: str = sys.executable) -> list[str]:
    cmd = [python, "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", url, "--tokenizer", tokenizer,
           "--model", tokenizer, "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(num_groups),
           "--gsp-prompts-per-group", str(prompts_per_group), "--gsp-system-prompt-len", str(system_prompt_len),
           "--gsp-question-len", str(question_len), "--gsp-output-len", str(output_len),
           "--request-rate", "inf" if not math.isfinite(request_rate) else f"{request_rate:g}",
           "--max-concurrency", str(max_concurrency), "--seed", str(seed), "--warmup-requests", str(warmup_requests),
           "--flush-cache", "--cache-report", "--output-file", output_file, "--output-details", "--disable-tqdm",
           "--ready-check-timeout-sec", "0"]
    if zipf_alpha is not None:
        cmd += ["--gsp-group-distribution", "zipf", "--gsp-zipf-alpha", f"{zipf_alpha:g}"]
    return cmd


def tool_env(python: str = sys.executable) -> dict[str, str]:
    """The environment for the tool: ``shims/`` first on PYTHONPATH when ``python`` cannot import ``datasets``."""
    env = dict(os.environ)
    probe = subprocess.run([python, "-c", "import datasets"], capture_output=True, env=env)
    if probe.returncode != 0:
        env["PYTHONPATH"] = str(SHIMS) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def records_from_result(result: dict) -> list[dict]:
    """The suite's per-request records from one JSONL line of ``--output-details`` (every request measured)."""
    n = len(result.get("ttfts") or [])
    duration = float(result.get("duration") or 0.0)
    details = result.get("cached_tokens_details") or [None] * n
    cached = result.get("cached_tokens") or [0] * n
    errors = result.get("errors") or [""] * n
    out = []
    for i in range(n):
        ok = not errors[i]
        itl = (result.get("itls") or [[]] * n)[i] or []
        d = details[i] if isinstance(details[i], dict) else {}
        host = int(d.get("host") or 0) + int(d.get("storage") or 0)
        c = int(cached[i] or 0)
        out.append({"index": i, "user": None, "turn": None, "returning": True, "ok": ok, "error": errors[i] or None,
                    "prompt_tokens": int(result["input_lens"][i]), "cached_tokens": c,
                    "cached_device": int(d.get("device") or 0) if d else c, "cached_host": host,
                    "ttft_s": float(result["ttfts"][i]) if ok else None,
                    "tpot_s": (sum(itl) / len(itl)) if ok and itl else None,
                    "latency_s": None, "output_tokens": int((result.get("output_lens") or [0] * n)[i] or 0),
                    "planned_s": None, "t_send_s": 0.0, "t_end_s": duration, "queue_s": None, "measured": True})
    return out


async def run_tool(cmd: list[str], env: dict, log_path: Path, timeout_s: float) -> int:
    """Run the tool, its output in ``log_path``; the return code (124 on timeout)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            return await asyncio.wait_for(proc.wait(), timeout_s)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            return 124


def read_result(output_file: Path) -> dict | None:
    """The last JSON line the tool appended, or None."""
    if not output_file.is_file():
        return None
    lines = [ln for ln in output_file.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else None


async def measure_gsp_point(client, ctx, cmd: list[str], *, env: dict, log_path: Path, output_file: Path,
                            timeout_s: float, poll_s: float, stats_pause_s: float, slo, seed: int = 0
                            ) -> tuple[dict, list[dict]]:
    """One shared-prefix point: flush, scrape, run the tool, pause, scrape; (row fields, records).
    Raises RuntimeError when the tool fails or writes no result."""
    from .harness import Scraper, window_fields
    from .stats import summarize

    await client.flush_cache()
    await asyncio.sleep(stats_pause_s)
    scraper = Scraper(client, poll_s)
    start = await scraper.snap()
    scraper.start()
    output_file.unlink(missing_ok=True)
    try:
        rc = await run_tool(cmd, env, log_path, timeout_s)
    finally:
        await scraper.stop()
    await asyncio.sleep(stats_pause_s)
    end = await scraper.snap()
    result = read_result(output_file)
    if rc != 0 or result is None:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:]) if log_path.exists() else ""
        raise RuntimeError(f"sglang.bench_serving exited with {rc} and {'a' if result else 'no'} result; log "
                           f"{log_path}:\n{tail}")
    records = records_from_result(result)
    fields = {**summarize(records, slo=slo, seed=seed), **window_fields(ctx, start, end, [*scraper.polled, end]),
              "ttft_scope": "all requests (bench_serving reports no group membership)",
              "bench_serving": {k: result.get(k) for k in ("request_throughput", "median_ttft_ms", "p99_ttft_ms",
                                                            "median_tpot_ms", "p99_tpot_ms", "duration", "completed",
                                                            "cache_report")},
              "sent_requests": len(records), "skipped_requests": 0}
    return fields, records
