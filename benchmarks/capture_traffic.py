"""Traffic for a calibration-capture server (``--kv-compress kvtc --kvtc-capture-dir DIR``): windows of calibration
text until the capture budget is full, so the model's own KV rows land in DIR for ``kvtc-sglang calibrate
--kv-dumps DIR``.

    python -m benchmarks.capture_traffic --url http://127.0.0.1:31000 --tokens 32768 [--window 1024] [--text]

With ``--text`` the windows are calibration-corpus text (``kvtc_sglang/data``: never the evaluation text; the
server tokenizes it), else deterministic pseudo-random token ids (a model folder without a tokenizer). Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from benchmarks.serving.model import pseudo_tokens

CORPUS = Path(__file__).resolve().parents[1] / "kvtc_sglang" / "data"
CORPUS_FILES = ("gutenberg_pride_and_prejudice.txt", "tiny_shakespeare.txt", "gutenberg_botchan.txt",
                "wikitext2_valid.txt")


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(2)
    raise SystemExit(f"{url} not healthy after {timeout_s:.0f} s")


def corpus_windows(chars: int):
    """Round-robin windows of ``chars`` characters over the calibration files."""
    texts = [(CORPUS / f).read_text(errors="replace") for f in CORPUS_FILES if (CORPUS / f).is_file()]
    offsets = [0] * len(texts)
    while True:
        for i, t in enumerate(texts):
            yield t[offsets[i]:offsets[i] + chars]
            offsets[i] = (offsets[i] + chars) % max(1, len(t) - chars)


def post(url: str, body: dict, timeout_s: float) -> dict:
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.capture_traffic", description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--tokens", type=int, default=32768, help="prompt tokens to send (the capture budget)")
    ap.add_argument("--window", type=int, default=1024, help="tokens per request")
    ap.add_argument("--text", action="store_true", help="calibration-corpus text (the server tokenizes it)")
    ap.add_argument("--vocab-size", type=int, default=128256, help="pseudo-id range without --text")
    ap.add_argument("--health-timeout", type=float, default=900.0)
    args = ap.parse_args(argv)
    url = args.url.rstrip("/")
    wait_healthy(url, args.health_timeout)
    t0, sent, i = time.monotonic(), 0, 0
    windows = corpus_windows(4 * args.window)
    while sent < args.tokens:
        body = {"sampling_params": {"max_new_tokens": 8, "temperature": 0.0}}
        if args.text:
            body["text"] = next(windows)
        else:
            body["input_ids"] = pseudo_tokens(args.window, f"capture:{i}", args.vocab_size)
        out = post(url, body, timeout_s=900.0)
        sent += int(out.get("meta_info", {}).get("prompt_tokens") or args.window)
        i += 1
    print(f"capture traffic: {i} requests, {sent} prompt tokens in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
