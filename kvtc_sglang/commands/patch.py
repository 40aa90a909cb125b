"""``kvtc-sglang patch {check,apply,revert}``: apply the in-tree sglang 0.5.17 patch adding ``--kv-compress`` to
ServerArgs (``kvtc_sglang.cache.patch_tool`` parses and applies it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvtc_sglang import sglang_compat as compat
from kvtc_sglang.cache import patch_tool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("check", "apply", "revert"),
                        help="check: say whether the patch applies or is already applied; apply: patch ServerArgs "
                             "(a no-op if already applied); revert: restore the original file")
    parser.add_argument("--site-packages", type=Path, default=None, metavar="DIR",
                        help="site-packages folder holding sglang (default: the installed sglang's)")


def run(args: argparse.Namespace) -> int:
    """0: done or nothing to do; 1: the file differs from sglang 0.5.17's where the patch touches it; 2: bad setup."""
    site_packages = args.site_packages or compat.installed_sglang_site_packages()
    if site_packages is None:
        print("error: sglang is not installed here; pass --site-packages DIR", file=sys.stderr)
        return 2
    try:
        target = patch_tool.target_file(site_packages)
        patch = patch_tool.load_patch()
        text = target.read_text(encoding="utf-8")
    except (compat.SGLangVersionError, FileNotFoundError, patch_tool.PatchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state, detail = patch_tool.patch_state(text, patch)
    name = patch_tool.PATCH_NAME
    if state == patch_tool.CONFLICT:
        print(f"error: {name} does not apply to {target} and is not applied there ({detail}); the file differs "
              f"from sglang {compat.SUPPORTED_SGLANG_VERSION}'s. Reinstall sglang=={compat.SUPPORTED_SGLANG_VERSION} "
              "to get a pristine copy", file=sys.stderr)
        return 1
    if args.action == "check":
        if state == patch_tool.CLEAN:
            print(f"{target}: {name} applies cleanly (not applied yet; run `kvtc-sglang patch apply`)")
        else:
            print(f"{target}: {name} is already applied")
        return 0
    if args.action == "apply":
        if state == patch_tool.APPLIED:
            print(f"{target}: {name} is already applied; nothing to do")
            return 0
        new_text = patch_tool.apply_hunks(text, patch.hunks)
        verb = "applied"
    else:
        if state == patch_tool.CLEAN:
            print(f"{target}: {name} is not applied; nothing to revert")
            return 0
        new_text = patch_tool.apply_hunks(text, patch.hunks, reverse=True)
        verb = "reverted"
    try:
        patch_tool.write_atomic(target, new_text)
    except OSError as exc:
        print(f"error: cannot write {target}: {exc}", file=sys.stderr)
        return 2
    print(f"{target}: {name} {verb}")
    return 0
