"""The layering the README promises, checked on the import graph (AST, no imports executed).

    codec            imports nothing else of the project (sglang and the upper layers least of all); of its modules
                     only the dispatcher (codec/dispatch.py) reaches into codec.triton, which may import the codec
    models           may import the codec
    eval             may import the codec, models and sglang_compat (never the cache or the commands)
    cache            may import the codec, sglang_compat and models.geometry (never eval or the commands)
    commands         on top: may import any library module; nothing in the library imports it
    testing          fixtures for tests and benchmarks; nothing in the library imports it
    sglang_compat    the only module that imports sglang; imports nothing else of the project
    benchmarks       (once a package) may import kvtc_sglang; kvtc_sglang never imports benchmarks

and no import cycles between modules (imports inside functions included).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = "kvtc_sglang"
DISPATCHER = "kvtc_sglang.codec.dispatch"


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module (a project module when it is one, else the dotted name as written)
    line: int
    lazy: bool  # inside a function or class body

    def __str__(self) -> str:
        return f"{self.source}:{self.line} imports {self.target}{' (lazily)' if self.lazy else ''}"


def _modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    mods = {}
    for package in packages:
        base = root / package
        if not (base / "__init__.py").is_file():
            continue
        for path in sorted(base.rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph(root: Path, packages: tuple[str, ...] = (LIB, "benchmarks")) -> tuple[dict[str, Path], list[Edge]]:
    """Every import statement of every module of ``packages`` (folders with an ``__init__.py`` under ``root``)."""
    mods = _modules(root, packages)
    edges = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]

        def visit(node: ast.AST, lazy: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        edges.append(Edge(name, alias.name, child.lineno, lazy))
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                        base = ".".join(parts + ([base] if base else []))
                    for alias in child.names:
                        sub = f"{base}.{alias.name}"
                        edges.append(Edge(name, sub if sub in mods else base, child.lineno, lazy))
                visit(child, inner)

        visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return mods, edges


def layer(module: str) -> str:
    """The layer of a project module: codec.triton, codec, models, eval, cache, commands, testing, compat, top, or
    benchmarks."""
    parts = module.split(".")
    if parts[0] == "benchmarks":
        return "benchmarks"
    if module == "kvtc_sglang.sglang_compat":
        return "compat"
    if len(parts) >= 3 and parts[1] == "codec" and parts[2] == "triton":
        return "codec.triton"
    return parts[1] if len(parts) > 1 and parts[1] in ("codec", "models", "eval", "cache", "commands", "testing") \
        else "top"


ALLOWED = {  # layer -> the project layers its modules may import (besides their own)
    "codec": {"codec"},
    "codec.triton": {"codec", "codec.triton"},
    "models": {"codec"},
    "eval": {"codec", "models", "compat"},
    "cache": {"codec", "compat"},
    "compat": set(),
    "testing": {"codec", "models"},
    "commands": {"codec", "codec.triton", "models", "eval", "cache", "compat"},
    "top": {"commands"},
    "benchmarks": {"codec", "codec.triton", "models", "eval", "cache", "commands", "compat", "testing", "top"},
}
EXCEPTIONS = {  # (importing layer, imported module): allowed beyond ALLOWED
    ("cache", "kvtc_sglang.models.geometry"),  # stdlib-only model geometry, shared with the startup checks
    ("cache", "kvtc_sglang.models.identity"),  # torch-only model identity (fingerprint, tokenizer, weights sketch)
}


def _project_module(target: str, mods: dict[str, Path]) -> str | None:
    """The project module (or package) an import names, or None for a third-party/stdlib import."""
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def violations(root: Path) -> list[str]:
    """Every import that breaks a layer rule of the module docstring, as readable lines."""
    mods, edges = import_graph(root)
    bad = []
    for e in edges:
        src = layer(e.source)
        top = e.target.split(".")[0]
        if top == "sglang" and src != "compat":
            bad.append(f"{e}: only sglang_compat imports sglang")
        if top in ("benchmarks", "serving_common") and src != "benchmarks":
            bad.append(f"{e}: the library never imports the benchmarks")
        target = _project_module(e.target, mods)
        if target is None:
            continue
        dst = layer(target)
        if src == "codec" and dst == "codec.triton":
            if e.source != DISPATCHER:
                bad.append(f"{e}: only {DISPATCHER} reaches into codec.triton")
        elif not (dst == src or dst in ALLOWED[src] or (src, target) in EXCEPTIONS):
            bad.append(f"{e}: {src} may not import {dst}")
    return bad


def cycles(root: Path) -> list[list[str]]:
    """Strongly connected components (more than one module) of the module import graph, lazy imports included."""
    mods, edges = import_graph(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for e in edges:
        target = _project_module(e.target, mods)
        # a package's __init__ importing its own submodule, or a module naming its parent package, is no cycle
        if target and target != e.source and not e.source.startswith(target + "."):
            graph[e.source].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def test_every_import_follows_the_layer_rules():
    assert violations(ROOT) == []


def test_no_import_cycles_between_modules():
    assert cycles(ROOT) == []


def test_the_graph_sees_the_library():
    """The checks above walk the real tree: the codec, the cache and the commands are there with their imports."""
    mods, edges = import_graph(ROOT)
    for name in ("kvtc_sglang.codec.codec", "kvtc_sglang.cache.radix_cache", "kvtc_sglang.commands.calibrate",
                 DISPATCHER, "kvtc_sglang.codec.triton.pool_codec"):
        assert name in mods
    assert any(e.source == "kvtc_sglang.cache.radix_cache" and e.target == "kvtc_sglang.codec.interfaces"
               for e in edges)
    assert any(e.source == DISPATCHER and e.target == "kvtc_sglang.codec.triton.pool_codec" and e.lazy
               for e in edges)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def toy_tree(tmp_path):
    """A small tree that follows every rule."""
    _write(tmp_path, {
        "kvtc_sglang/__init__.py": "", "kvtc_sglang/sglang_compat.py": "import sglang\n",
        "kvtc_sglang/codec/__init__.py": "", "kvtc_sglang/codec/core.py": "import torch\n",
        "kvtc_sglang/codec/dispatch.py": "from kvtc_sglang.codec.triton import kernels\n",
        "kvtc_sglang/codec/triton/__init__.py": "",
        "kvtc_sglang/codec/triton/kernels.py": "from kvtc_sglang.codec import core\n",
        "kvtc_sglang/cache/__init__.py": "",
        "kvtc_sglang/cache/tree.py": "from kvtc_sglang import sglang_compat\nfrom ..codec import core\n",
        "kvtc_sglang/commands/__init__.py": "", "kvtc_sglang/commands/run.py": "from kvtc_sglang.cache import tree\n",
    })
    return tmp_path


def test_the_checks_accept_a_tree_that_follows_the_rules(toy_tree):
    assert violations(toy_tree) == [] and cycles(toy_tree) == []


@pytest.mark.parametrize("rel, text, expected", [
    ("kvtc_sglang/codec/core.py", "def f():\n    from kvtc_sglang.cache import tree\n", "codec may not import cache"),
    ("kvtc_sglang/codec/core.py", "import sglang.srt\n", "only sglang_compat imports sglang"),
    ("kvtc_sglang/codec/core.py", "from kvtc_sglang.codec.triton import kernels\n", "only kvtc_sglang.codec.dispatch"),
    ("kvtc_sglang/cache/tree.py", "from kvtc_sglang.commands import run\n", "cache may not import commands"),
    ("kvtc_sglang/cache/tree.py", "import benchmarks.x\n", "never imports the benchmarks"),
])
def test_the_checks_catch_an_upward_import(toy_tree, rel, text, expected):
    (toy_tree / rel).write_text(text)
    assert any(expected in v for v in violations(toy_tree)), violations(toy_tree)


def test_the_checks_catch_a_cycle(toy_tree):
    (toy_tree / "kvtc_sglang/codec/core.py").write_text("def f():\n    from kvtc_sglang.codec import dispatch\n")
    assert cycles(toy_tree) == [["kvtc_sglang.codec.core", "kvtc_sglang.codec.dispatch",
                                 "kvtc_sglang.codec.triton.kernels"]]
