"""Accuracy benchmark: KVTC at every calibrated ratio vs FP8, int4-g32 and KIVI-2bit, on prose, code and chat.

One command per table (CPU is fine):
    python benchmarks/accuracy.py --model smollm2-135m --text prose code chat      # calibrates first if needed
    python benchmarks/accuracy.py --model qwen2.5-coder-0.5b --text code
    python benchmarks/accuracy.py --mode chat --window-sizes 0 32 128             # compressed chat history

Windows mode: `--windows` windows of each text (evenly spaced, non-overlapping); each window's `--prefix`
tokens are compressed the way serving does it (4 sinks + the 128 most recent tokens exact) and the next
`--score` tokens are scored (only assistant tokens on chat). Rows (with `model` and `eval_text`) replace the
rows of the same model and text in benchmarks/results/accuracy.json; accuracy.md is rewritten from all rows.

Chat mode: every returning assistant turn of the chat evaluation conversations; the history before the user's
turn is compressed with recent window W (sinks kept), the user turn is appended exact and the answer scored.
Rows go to benchmarks/results/accuracy_chat.{json,md}.

Δppl carries a paired bootstrap 95% interval over windows (or turns).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _merge(path: Path, rows: list[dict], key) -> list[dict]:
    old = json.loads(path.read_text()) if path.is_file() else []
    new_keys = {key(r) for r in rows}
    # rows without a model name predate per-model tables (one WikiText-2 table of another protocol): dropped
    return [r for r in old if "model" in r and key(r) not in new_keys] + rows


def _windows_markdown(rows: list[dict]) -> str:
    from kvtc_sglang.eval.rate_distortion import format_rows

    out = ["# KV-cache compression accuracy\n\n",
           "Each table: its windows' prefix compressed (4 sinks + 128 most recent tokens exact), the next tokens scored "
           "(assistant tokens only on chat); Δppl with a paired bootstrap 95% interval over windows. Realized ratio = "
           "16-bit bytes of the compressed tokens over their stored bytes (PCA matrices excluded); effective = the whole "
           "prefix including its exact rows.\n"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["eval_text"]), []).append(r)
    for (model, text), rs in sorted(groups.items()):
        r0 = rs[0]
        out.append(f"\n## {model} — {text}\n\n{r0['windows']} windows of {r0['prefix']} + {r0['score']} tokens, "
                   f"{r0['tokens_scored']} tokens scored. Artifact {r0.get('artifact_id', '?')}. "
                   f"Machine: {r0.get('machine', '?')}. Commit: {r0.get('commit', '?')}.\n\n")
        out.append(format_rows(rs))
    return "".join(out)


def _chat_markdown(rows: list[dict]) -> str:
    from kvtc_sglang.eval.chat_history import format_history_rows

    out = ["# Compressed chat history: accuracy vs the recent window W\n\n",
           "Each returning assistant turn: the history before the user's turn is compressed (4 sinks exact, the last W "
           "tokens exact), the user turn is appended exact, and the answer is teacher-forced and scored. Effective ratio = "
           "16-bit bytes of the history over its stored bytes. fp8 stores the history's compressible range in fp8.\n"]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["model"], []).append(r)
    for model, rs in sorted(groups.items()):
        r0 = rs[0]
        out.append(f"\n## {model}\n\n{r0['turns']} returning turns, {r0['tokens_scored']} answer tokens scored, mean "
                   f"history {r0['mean_history_tokens']:.0f} tokens. Artifact {r0.get('artifact_id', '?')}. "
                   f"Machine: {r0.get('machine', '?')}. Commit: {r0.get('commit', '?')}.\n\n")
        out.append(format_history_rows(rs))
    return "".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, qwen2.5-coder-0.5b, or a GGUF file / HF folder")
    ap.add_argument("--artifact", default=None, help="calibration artifact dir (default: the model's artifact in the cache, calibrated on first use)")
    ap.add_argument("--mode", choices=("windows", "chat"), default="windows")
    ap.add_argument("--text", nargs="+", choices=("prose", "code", "chat"), default=["prose", "code", "chat"],
                    help="evaluation texts (windows mode)")
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows per text (windows mode)")
    ap.add_argument("--prefix", type=int, default=None, help="compressed prefix tokens per window (default: 512; 384 on chat)")
    ap.add_argument("--score", type=int, default=None, help="scored tokens per window (default: 128)")
    ap.add_argument("--ratios", type=int, nargs="+", default=None, help="KVTC plans to evaluate (default: every plan of the artifact; chat mode: 16)")
    ap.add_argument("--baselines", nargs="*", default=None, metavar="NAME",
                    help="baselines beside KVTC (windows mode; default: fp8_e4m3 int4_g32 kivi2; none: KVTC rows only)")
    ap.add_argument("--window-sizes", type=int, nargs="+", default=[0, 32, 128], help="recent-window sizes W (chat mode)")
    ap.add_argument("--max-tokens", type=int, default=2048, help="longest returning-turn sample (chat mode)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    from kvtc_sglang.models.calibration import ensure_artifact
    from kvtc_sglang.eval.baselines import BASELINES
    from kvtc_sglang.eval.eval_texts import chat_conversations
    from kvtc_sglang.eval.provenance import git_commit, machine_description
    from kvtc_sglang.eval.rate_distortion import baseline_method, evaluate_text, format_rows, kvtc_method
    from kvtc_sglang.models.registry import model_label, model_path
    from kvtc_sglang.models.smollm2 import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    label = model_label(args.model)
    path = model_path(args.model)
    model, tok = load_model(path)
    art = ensure_artifact(args.artifact, model, tok, str(path))
    machine, commit = machine_description(), git_commit()
    stamp = dict(model=label, machine=machine, commit=commit, artifact_id=art.artifact_id()[:16])
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if args.mode == "chat":
        from kvtc_sglang.eval.chat_history import evaluate_history, format_history_rows, returning_turns

        turns = returning_turns(tok, chat_conversations(), args.max_tokens)
        ratios = args.ratios or [16]
        fp8 = next(b for b in BASELINES if b.name == "fp8_e4m3")
        methods = [kvtc_method(art, r) for r in ratios]
        rows = evaluate_history(model, turns, methods, args.window_sizes)
        # fp8 as SGLang stores it: every history token in fp8 (sinks and window too, so W does not apply)
        fp8_rows = evaluate_history(model, turns, [baseline_method(fp8)], [0], sinks=0, progress=False)
        rows += [dict(r, window="all fp8") for r in fp8_rows if r["method"] != "uncompressed"]
        for r in rows:
            r.update(stamp, mode="chat")
        path_json = out / "accuracy_chat.json"
        all_rows = _merge(path_json, rows, key=lambda r: r["model"])
        path_json.write_text(json.dumps(all_rows, indent=1) + "\n")
        (out / "accuracy_chat.md").write_text(_chat_markdown(all_rows))
        print(format_history_rows(rows))
        print(f"machine: {machine}\nwrote {path_json}, accuracy_chat.md")
        return 0

    from kvtc_sglang.eval.plots import plot_accuracy

    ratios = args.ratios or sorted(art.plans)
    methods = [kvtc_method(art, r) for r in ratios]
    names = [b.name for b in BASELINES] if args.baselines is None else args.baselines
    unknown = set(names) - {b.name for b in BASELINES}
    if unknown:
        raise SystemExit(f"unknown baselines {sorted(unknown)}; choose from {[b.name for b in BASELINES]}")
    methods += [baseline_method(b) for b in BASELINES if b.name in names]
    rows = []
    for name in args.text:
        text_rows = evaluate_text(model, tok, name, methods, windows=args.windows, prefix=args.prefix,
                                  score=args.score, desc=f"{label} {name}")
        for r in text_rows:
            r.update(stamp)
        print(f"\n{label} — {name}\n" + format_rows(text_rows))
        rows += text_rows
        path_json = out / "accuracy.json"
        all_rows = _merge(path_json, text_rows, key=lambda r: (r["model"], r["eval_text"]))
        path_json.write_text(json.dumps(all_rows, indent=1) + "\n")
        (out / "accuracy.md").write_text(_windows_markdown(all_rows))
        plot_rows = [r for r in all_rows if r.get("model") == label and r.get("eval_text") == "prose"] or text_rows
        plot_accuracy(plot_rows, out / "accuracy.png")
    print(f"machine: {machine}\nwrote {out / 'accuracy.json'}, accuracy.md, accuracy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
