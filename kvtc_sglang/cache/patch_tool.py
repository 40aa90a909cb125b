"""The in-tree sglang 0.5.17 patch adding ``--kv-compress`` to ServerArgs (``kvtc-sglang patch`` drives it).

The patch (``patches/sglang-0.5.17-kv-compress.patch``, an upstream-style unified diff of
``sglang/srt/server_args.py``) declares the KVTC options as ServerArgs fields, so ``sglang.Engine(kv_compress="kvtc",
kvtc_calibration=...)`` works; without it the plugin adds the same flags to the CLI only.

The diff is applied by a small pure-Python applier: hunks must match at their stated line numbers with exact context
(no offsets, no fuzz), so a file that differs from sglang 0.5.17's in any touched region is refused rather than
patched approximately. Writes are atomic (temporary file + rename) and keep the file mode.

The patch file ships in two places with identical bytes: ``patches/`` at the repository root (the canonical,
reviewable copy) and ``kvtc_sglang/patches/`` (package data, so installed wheels carry it); ``patch_file()`` finds it
from either.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kvtc_sglang import sglang_compat as compat

PATCH_NAME = f"sglang-{compat.SUPPORTED_SGLANG_VERSION}-kv-compress.patch"

CLEAN = "clean"  # the patch applies
APPLIED = "applied"  # the patch is already in the file
CONFLICT = "conflict"  # neither


class PatchError(ValueError):
    """A patch cannot be parsed, or does not apply to the file it targets."""


@dataclass
class Hunk:
    """One ``@@ -old_start,old_len +new_start,new_len @@`` block; ``lines`` keep their prefix char and newline."""

    old_start: int
    old_len: int
    new_start: int
    new_len: int
    lines: list[str] = field(default_factory=list)

    def sides(self, reverse: bool = False) -> tuple[int, list[str], list[str]]:
        """(1-based start, lines expected in the file, lines to put instead), forward or reversed."""
        old: list[str] = []
        new: list[str] = []
        for i, line in enumerate(self.lines):
            tag, body = line[0], line[1:]
            if tag == "\\":
                continue
            # "\ No newline at end of file" after a line means that line has no trailing newline.
            if i + 1 < len(self.lines) and self.lines[i + 1].startswith("\\"):
                body = body[:-1] if body.endswith("\n") else body
            if tag in (" ", "-"):
                old.append(body)
            if tag in (" ", "+"):
                new.append(body)
        if reverse:
            return self.new_start, new, old
        return self.old_start, old, new


@dataclass
class FilePatch:
    """The hunks of one file in a unified diff."""

    old_path: str
    new_path: str
    hunks: list[Hunk] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The target path with a leading ``a/``/``b/`` removed."""
        name = self.new_path if self.new_path != "/dev/null" else self.old_path
        return name[2:] if name[:2] in ("a/", "b/") else name


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def parse_unified_diff(text: str) -> list[FilePatch]:
    """Parse a unified diff (``diff -u`` / ``git diff`` output) into FilePatches; PatchError if malformed."""
    files: list[FilePatch] = []
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            old = line[4:].rstrip("\n").split("\t")[0].strip()
            new = lines[i + 1][4:].rstrip("\n").split("\t")[0].strip()
            files.append(FilePatch(old, new))
            i += 2
            continue
        match = _HUNK.match(line)
        if match:
            if not files:
                raise PatchError(f"line {i + 1}: hunk before any '---'/'+++' file header")
            old_start, old_len, new_start, new_len = (int(g) if g is not None else 1 for g in match.groups())
            hunk = Hunk(old_start, old_len, new_start, new_len)
            i += 1
            seen_old = seen_new = 0
            while i < len(lines) and (seen_old < old_len or seen_new < new_len or lines[i].startswith("\\")):
                body = lines[i]
                tag = body[:1]
                if tag not in (" ", "-", "+", "\\"):
                    raise PatchError(f"line {i + 1}: unexpected {body[:40]!r} inside a hunk")
                if tag == "\\":
                    if not hunk.lines:
                        raise PatchError(f"line {i + 1}: '\\ No newline' marker with no line before it")
                else:
                    seen_old += tag in (" ", "-")
                    seen_new += tag in (" ", "+")
                hunk.lines.append(body if body.endswith("\n") else body + "\n")
                i += 1
            if seen_old != old_len or seen_new != new_len:
                raise PatchError(f"hunk @@ -{old_start},{old_len} +{new_start},{new_len} @@ is truncated")
            files[-1].hunks.append(hunk)
            continue
        i += 1  # headers such as "diff --git" or "index" lines
    if not files or not any(f.hunks for f in files):
        raise PatchError("no file hunks found in the patch")
    return files


def apply_hunks(text: str, hunks: list[Hunk], *, reverse: bool = False) -> str:
    """Apply (or, with ``reverse``, undo) hunks to ``text`` with exact context at the stated lines.

    Raises PatchError naming the first hunk whose expected lines are not in the file where the diff says.
    """
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    cursor = 0  # index into lines of the first line not yet copied
    for hunk in hunks:
        start, expected, replacement = hunk.sides(reverse)
        index = start - 1 if expected else start  # a pure insertion's start names the line it follows
        if index < cursor:
            raise PatchError(f"hunk at line {start} overlaps the previous hunk")
        if lines[index:index + len(expected)] != expected:
            got = lines[index] if index < len(lines) else "<end of file>"
            raise PatchError(f"hunk at line {start} does not match the file (line {index + 1} is {got.rstrip()!r})")
        out.extend(lines[cursor:index])
        out.extend(replacement)
        cursor = index + len(expected)
    out.extend(lines[cursor:])
    return "".join(out)


def patch_file() -> Path:
    """The shipped patch: package data of an installed wheel, or ``patches/`` of a source checkout."""
    package_copy = Path(__file__).resolve().parents[1] / "patches" / PATCH_NAME
    checkout_copy = Path(__file__).resolve().parents[2] / "patches" / PATCH_NAME
    for candidate in (package_copy, checkout_copy):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{PATCH_NAME} is missing from this kvtc-sglang installation (looked in "
                            f"{package_copy.parent} and {checkout_copy.parent}); reinstall kvtc-sglang")


def load_patch(path: Path | None = None) -> FilePatch:
    """The single-file patch of ServerArgs."""
    path = path or patch_file()
    files = parse_unified_diff(path.read_text(encoding="utf-8"))
    if len(files) != 1 or files[0].path != compat.SERVER_ARGS_RELPATH:
        raise PatchError(f"{path} must patch exactly {compat.SERVER_ARGS_RELPATH}, it patches "
                         f"{', '.join(f.path for f in files)}")
    return files[0]


def patch_state(text: str, patch: FilePatch) -> tuple[str, str]:
    """``(CLEAN | APPLIED | CONFLICT, detail)`` of ``patch`` on a file's ``text``."""
    try:
        apply_hunks(text, patch.hunks)
        return CLEAN, ""
    except PatchError as forward:
        try:
            apply_hunks(text, patch.hunks, reverse=True)
            return APPLIED, ""
        except PatchError:
            return CONFLICT, str(forward)


def target_file(site_packages: Path) -> Path:
    """The ServerArgs source under ``site_packages`` after checking that the sglang there is the supported release."""
    site_packages = Path(site_packages)
    version = compat.sglang_version_in(site_packages)
    if version is None:
        raise compat.SGLangVersionError(
            f"cannot tell the sglang version in {site_packages} (no sglang-*.dist-info/METADATA, sglang/_version.py or "
            f"sglang/version.py naming one); the patch is for sglang {compat.SUPPORTED_SGLANG_VERSION} only")
    compat.check_sglang_version(version, where=f"sglang in {site_packages}")
    target = site_packages / compat.SERVER_ARGS_RELPATH
    if not target.is_file():
        raise FileNotFoundError(f"{target} does not exist; is {site_packages} the site-packages folder holding sglang?")
    return target


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path``'s contents with ``text`` through a temporary file and a rename, keeping its mode."""
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
