"""End-to-end correctness of the compressed tier on a real model: the same multi-turn chats sent to a
server with `--kv-compress kvtc` (KV pool small enough that conversations are compressed between turns)
and to a plain radix-cache server; greedy answers and their logprobs are compared turn by turn.

One command (launches both servers side by side, or targets two running ones):
    python -m benchmarks.serve_agreement --model-path SMOLLM2_HF_DIR \\
        --server-args "--attention-backend triton --mem-fraction-static 0.3 --max-total-tokens 4096" \\
        --kvtc-args "--kvtc-calibration ART --kvtc-window-tokens 32"
    python -m benchmarks.serve_agreement --ref-url http://127.0.0.1:30000 --test-url http://127.0.0.1:30001 \\
        --model-path DIR

Both launched servers get ``--server-args`` (the same ``--max-total-tokens``: the kvtc tier keeps its blobs in the
pool's own slots), the kvtc one also ``--kv-compress kvtc`` and ``--kvtc-args``; ``--enable-metrics`` is added.

For a model folder without a tokenizer (dummy weights, `--load-format dummy --skip-tokenizer-init`), pass
`--tokenizer none`: every human turn is then `--question-tokens` random token ids (seeded), the same on both servers.

Users take turns round-robin (every user's turn 1, then every user's turn 2, ...), so a returning
user's prefix has been pushed out of the small pool by the others. Both servers get identical prompts:
earlier turns carry the reference server's answers. Written: benchmarks/results/serving_agreement.json
(per request: cached/restored tokens, first divergence, logprob differences; summary) and .md
(`--tag T`: serving_agreement_T.json/.md).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import requests

from benchmarks.serving.argv import get_flag, split_args
from benchmarks.serving.client import cache_split
from benchmarks.serving.metrics import Snapshot
from benchmarks.serving.model import token_id_range
from benchmarks.serving.process import ServerProcess, find_free_port
from kvtc_sglang.eval.agreement import first_divergence
from kvtc_sglang.eval.conversations import read_mt_bench, read_sharegpt
from benchmarks.serving.report import fmt
from kvtc_sglang.eval.provenance import git_commit, gpu_name

HERE = Path(__file__).resolve().parent


def conversations(n_users: int, n_turns: int) -> list[list[str]]:
    """Human turns: MT-bench two-turn questions, then real ShareGPT conversations for more turns."""
    mt = [c.user_turns for c in read_mt_bench(HERE / "data" / "mt_bench_question.jsonl")]
    sg = [c.user_turns for c in read_sharegpt(HERE / "data" / "dialogstudio_sharegpt_original_example.json")
          if len(c.user_turns) >= n_turns]
    pool = ([c for c in sg] if n_turns > 2 else []) + [t for t in mt if len(t) >= min(n_turns, 2)]
    out = []
    for conv in pool:
        out.append((conv * n_turns)[:n_turns] if len(conv) < n_turns else conv[:n_turns])
        if len(out) == n_users:
            break
    return out


def generate(url: str, input_ids: list[int], max_new: int, timeout: float) -> dict:
    payload = {"input_ids": input_ids, "return_logprob": True,
               "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new}}
    t0 = time.perf_counter()
    r = requests.post(url.rstrip("/") + "/generate", json=payload, timeout=timeout)
    if r.status_code != 200:
        raise requests.HTTPError(f"HTTP {r.status_code}: {r.text[:300]}", response=r)
    out = r.json()
    meta = out["meta_info"]
    cached, device, host = cache_split(meta)
    lps = [row[0] for row in meta.get("output_token_logprobs") or []]
    ids = out.get("output_ids") or [row[1] for row in meta.get("output_token_logprobs") or []]
    return {"ids": list(ids), "logprobs": lps, "cached": cached, "device": device, "host": host,
            "seconds": time.perf_counter() - t0}


class ChatPrompts:
    """Prompts of every user's turns: real chats through the tokenizer's chat template."""

    def __init__(self, tokenizer, n_users: int, n_turns: int):
        self.tokenizer = tokenizer
        self.convs = conversations(n_users, n_turns)
        self.users = len(self.convs)
        self.history: list[list[dict]] = [[] for _ in self.convs]

    def prompt(self, user: int, turn: int) -> list[int]:
        """Token ids of ``user``'s turn ``turn`` (0-based): the history so far plus the next human turn."""
        self.history[user].append({"role": "user", "content": self.convs[user][turn]})
        text = self.tokenizer.apply_chat_template(self.history[user], add_generation_prompt=True, tokenize=False)
        return [int(t) for t in self.tokenizer(text, add_special_tokens=False).input_ids]

    def answer(self, user: int, ids: list[int]) -> None:
        """Append the reference server's answer (empty after a request error) to ``user``'s history."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""
        self.history[user].append({"role": "assistant", "content": text})


class TokenPrompts:
    """Prompts without a tokenizer: each human turn is ``question_tokens`` random ids in ``token_id_range``."""

    def __init__(self, n_users: int, vocab_size: int, question_tokens: int, seed: int = 0):
        self.rng = random.Random(seed)
        self.vocab_size, self.question_tokens = int(vocab_size), int(question_tokens)
        self.users = n_users
        self.history: list[list[int]] = [[] for _ in range(n_users)]

    def prompt(self, user: int, turn: int) -> list[int]:
        lo, hi = token_id_range(self.vocab_size)
        self.history[user] += [self.rng.randrange(lo, hi) for _ in range(self.question_tokens)]
        return list(self.history[user])

    def answer(self, user: int, ids: list[int]) -> None:
        self.history[user] += [int(t) for t in ids]


def run(ref_url: str, test_url: str, prompts, args) -> dict:
    rows = []
    errors = 0
    for turn in range(args.turns):
        for u in range(prompts.users):
            ids = prompts.prompt(u, turn)
            try:
                ref = generate(ref_url, ids, args.output_len, args.request_timeout)
                test = generate(test_url, ids, args.output_len, args.request_timeout)
            except requests.RequestException as exc:
                errors += 1
                print(f"request error (user {u}, turn {turn + 1}): {exc}")
                prompts.answer(u, [])
                continue
            div = first_divergence(ref["ids"], test["ids"])
            n = min(div, len(ref["logprobs"]), len(test["logprobs"]))
            dlp = [abs(a - b) for a, b in zip(ref["logprobs"][:n], test["logprobs"][:n])]
            rows.append({
                "user": u, "turn": turn + 1, "prompt_tokens": len(ids), "output_tokens": len(ref["ids"]),
                "test_cached": test["cached"], "test_restored": test["host"], "ref_cached": ref["cached"],
                "identical": ref["ids"] == test["ids"], "first_divergence": div,
                "agreement_before_divergence": div / max(1, len(ref["ids"])),
                "mean_abs_logprob_diff": sum(dlp) / len(dlp) if dlp else None,
                "max_abs_logprob_diff": max(dlp) if dlp else None,
            })
            prompts.answer(u, ref["ids"])
            print(f"user {u:2d} turn {turn + 1}: prompt {len(ids):5d} cached {test['cached']:5d} "
                  f"(restored {test['host']:5d}) identical={rows[-1]['identical']} divergence at {div}")
    return {"rows": rows, "errors": errors}


def summarize(rows: list[dict]) -> dict:
    def part(sel):
        if not sel:
            return {"requests": 0}
        lps = [r["mean_abs_logprob_diff"] for r in sel if r["mean_abs_logprob_diff"] is not None]
        return {"requests": len(sel), "identical_rate": sum(r["identical"] for r in sel) / len(sel),
                "agreement_before_divergence": sum(r["agreement_before_divergence"] for r in sel) / len(sel),
                "mean_abs_logprob_diff": sum(lps) / len(lps) if lps else None,
                "restored_tokens": sum(r["test_restored"] for r in sel)}
    returning = [r for r in rows if r["turn"] > 1]
    return {"first_turns": part([r for r in rows if r["turn"] == 1]), "returning_turns": part(returning),
            "returning_with_restore": part([r for r in returning if r["test_restored"] > 0])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True, help="HF model folder (with a tokenizer unless --tokenizer none)")
    ap.add_argument("--tokenizer", default="auto", help="auto (the model folder's) or none (random token-id turns)")
    ap.add_argument("--question-tokens", type=int, default=256, help="--tokenizer none: tokens per human turn")
    ap.add_argument("--tag", default="", help="name suffix of the written files (serving_agreement_TAG.json)")
    ap.add_argument("--ref-url"), ap.add_argument("--test-url")
    ap.add_argument("--server-args", default="", help="shared args of both launched servers")
    ap.add_argument("--kvtc-args", default="", help="args of the kvtc server (--kvtc-calibration DIR ...)")
    ap.add_argument("--users", type=int, default=12)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--port", type=int, default=30100)
    ap.add_argument("--python", default=sys.executable, help="python running sglang.launch_server")
    ap.add_argument("--health-timeout", type=float, default=600.0)
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    if args.tokenizer == "none":
        vocab = int(json.loads((Path(args.model_path) / "config.json").read_text())["vocab_size"])
        prompts = TokenPrompts(args.users, vocab, args.question_tokens)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model_path if args.tokenizer == "auto" else args.tokenizer)
        prompts = ChatPrompts(tok, args.users, args.turns)
    stem = f"serving_agreement_{args.tag}" if args.tag else "serving_agreement"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    servers = []
    try:
        if args.ref_url and args.test_url:
            ref_url, test_url = args.ref_url, args.test_url
        else:
            shared = split_args(args.server_args)
            for flag in ("--model-path", "--host", "--port", "--kv-compress"):
                if get_flag(shared, flag) is not None:
                    raise SystemExit(f"--server-args must not set {flag}")
            for cfg, extra, port in (("radix", [], find_free_port("127.0.0.1", args.port)),
                                     ("kvtc", ["--kv-compress", "kvtc", *split_args(args.kvtc_args)],
                                      find_free_port("127.0.0.1", args.port + 50))):
                cmd = [args.python, "-m", "sglang.launch_server", "--model-path", args.model_path, "--host",
                       "127.0.0.1", "--port", str(port), *shared, *extra, "--enable-metrics"]
                servers.append(ServerProcess(cmd, f"http://127.0.0.1:{port}", out / f"{stem}_{cfg}.log").start())
            for s in servers:
                s.wait_healthy(args.health_timeout)
            ref_url, test_url = servers[0].url, servers[1].url
        t0 = time.time()
        res = run(ref_url, test_url, prompts, args)
        flush = requests.post(test_url.rstrip("/") + "/flush_cache", timeout=60)
        time.sleep(2)
        after = Snapshot.parse(time.time(), requests.get(test_url.rstrip("/") + "/metrics", timeout=30).text
                               if flush.ok else None)
        report = {
            "model": Path(args.model_path).name, "gpu": gpu_name(), "commit": git_commit(),
            "users": args.users, "turns": args.turns, "output_len": args.output_len,
            "prompts": "random token ids" if args.tokenizer == "none" else "chat template",
            "server_args": args.server_args, "kvtc_args": args.kvtc_args, "seconds": round(time.time() - t0, 1),
            "request_errors": res["errors"], "summary": summarize(res["rows"]),
            "after_flush": {"flush_ok": flush.ok, "kv_used_tokens": after.pool.get("kv_used_tokens"),
                            "kv_evictable_tokens": after.pool.get("kv_evictable_tokens"),
                            "kvtc": {k: v for k, v in after.kvtc.items() if v is not None} or None},
            "rows": res["rows"],
        }
    finally:
        for s in servers:
            s.stop()
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    s = report["summary"]
    md = [f"# End-to-end agreement, kvtc vs plain radix ({report['model']}, {report['gpu']})", "",
          f"{args.users} users x {args.turns} turns, {args.output_len} greedy tokens per answer, "
          f"commit {report['commit']}.",
          f"Server args: `{args.server_args}`; kvtc: `{args.kvtc_args}`.", "",
          "| requests | n | identical answers | agreement before first divergence | mean abs logprob diff "
          "| restored tokens |",
          "|---|---|---|---|---|---|"]
    for name, part in s.items():
        if part["requests"]:
            md.append(f"| {name} | {part['requests']} | {part['identical_rate']:.2f} | "
                      f"{part['agreement_before_divergence']:.3f} | {fmt(part['mean_abs_logprob_diff'], 4)} | "
                      f"{part['restored_tokens']} |")
    md += ["", f"Request errors: {res['errors']}. After /flush_cache: {report['after_flush']}."]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
