"""Command-line argument lists: read, remove and set ``--flag value`` pairs in a server's argv."""

from __future__ import annotations

import shlex
from typing import Sequence


def split_args(text: str | Sequence[str] | None) -> list[str]:
    """A shell-quoted argument string (or an already split list) as a list; None -> []."""
    if text is None:
        return []
    return shlex.split(text) if isinstance(text, str) else list(text)


def get_flag(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` (``--flag V`` or ``--flag=V``; the last one wins); "" for a bare switch; None if absent."""
    value = None
    for i, a in enumerate(args):
        if a == flag:
            nxt = args[i + 1] if i + 1 < len(args) else None
            value = nxt if nxt is not None and not nxt.startswith("--") else ""
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1:]
    return value


def without_flag(args: Sequence[str], flag: str) -> list[str]:
    """``args`` with every occurrence of ``flag`` (and its value, if it has one) removed."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a == flag:
            i += 2 if i + 1 < len(args) and not args[i + 1].startswith("--") else 1
            continue
        if not a.startswith(flag + "="):
            out.append(a)
        i += 1
    return out


def with_flag(args: Sequence[str], flag: str, value: str | int | float | None) -> list[str]:
    """``args`` with ``flag`` set to ``value`` (replacing earlier values); value None appends a bare switch."""
    out = without_flag(args, flag)
    return out + ([flag] if value is None else [flag, str(value)])
