"""sglang_compat: the private members of sglang's radix tree that the tiered cache relies on are listed there, and
the installed sglang has them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvtc_sglang import sglang_compat as compat

pytestmark = pytest.mark.sglang

# KVTCRadixCache and the modules of its parts (mixins)
RADIX_CACHE_SOURCES = [Path(compat.__file__).parent / "cache" / f"{name}.py"
                       for name in ("radix_cache", "compression", "eviction", "load_back", "host_spill")]


def test_the_installed_sglang_has_every_listed_tree_internal():
    assert compat.missing_tree_internals() == []


def _private_names_used(path: Path) -> set[str]:
    """``_name`` of every ``self._name`` / ``super()._name`` in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if (isinstance(base, ast.Name) and base.id == "self") or (
                    isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super"):
                names.add(node.attr)
    return names


def test_every_private_radix_cache_member_the_cache_uses_is_listed():
    listed = (set(compat.RADIX_CACHE_OVERRIDES) | set(compat.RADIX_CACHE_PRIVATE_METHODS)
              | set(compat.RADIX_CACHE_PRIVATE_ATTRIBUTES))
    base = compat.RadixCache
    source = Path(__import__("inspect").getsourcefile(base)).read_text()
    inherited = {n for path in RADIX_CACHE_SOURCES for n in _private_names_used(path)
                 if hasattr(base, n) or f"self.{n} =" in source}
    assert inherited <= listed, f"list these in sglang_compat: {sorted(inherited - listed)}"


def test_a_missing_member_is_reported(monkeypatch):
    monkeypatch.setattr(compat, "RADIX_KEY_METHODS", compat.RADIX_KEY_METHODS + ("no_such_method",))
    monkeypatch.setitem(compat.RADIX_CACHE_OVERRIDES, "_split_node", ("self", "key", "child"))
    missing = compat.missing_tree_internals()
    assert "RadixKey.no_such_method" in missing
    assert any(m.startswith("RadixCache._split_node(") for m in missing)


def test_parser_has_flag():
    import argparse

    parser = argparse.ArgumentParser()
    assert not compat.parser_has_flag(parser, "--kv-compress")
    parser.add_argument("--kv-compress")
    assert compat.parser_has_flag(parser, "--kv-compress")
