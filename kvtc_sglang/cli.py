"""`kvtc-sglang` command line: one subcommand per job.

Each subcommand lives in its own module of ``kvtc_sglang.commands`` exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so ``kvtc-sglang --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "calibrate": ("kvtc_sglang.commands.calibrate", "calibrate KVTC (PCA bases + bit plans) on a model's real KV cache"),
    "report": ("kvtc_sglang.commands.report", "calibrate (or load) the shipped model and print its compression/accuracy report"),
    "patch": ("kvtc_sglang.commands.patch", "check/apply/revert the in-tree sglang 0.5.17 patch adding --kv-compress to ServerArgs"),
    "convert-gguf": ("kvtc_sglang.commands.convert_gguf", "convert a GGUF model (default: SmolLM2-135M-Instruct) into an HF safetensors folder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtc-sglang", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"kvtc-sglang {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
