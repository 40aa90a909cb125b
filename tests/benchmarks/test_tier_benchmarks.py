"""Smoke tests of the tier's benchmarks at tiny sizes: hot_path.py (zero syncs, launches flat in the node count) and
cache_replay.py (the compressed tier beats plain radix under pressure and matches it without)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

compat = pytest.importorskip("kvtc_sglang.sglang_compat")
pytestmark = pytest.mark.sglang

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_hot_path_rows_have_no_syncs_and_flat_launches(tmp_path, monkeypatch):
    hot_path = load("hot_path")
    monkeypatch.setattr(hot_path, "SHAPES", {"tiny": (2, 2, 16)})
    monkeypatch.setattr(hot_path, "NODES", (1, 8, 32))
    out = tmp_path / "hot_path.json"
    assert hot_path.main(["--tokens", "24", "--repeats", "1", "--shapes", "tiny", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} == {"compress", "evict", "load_back"} and len(rows) == 9
    for r in rows:
        assert r["syncs"] == 0 and r["launches"] > 0 and r["device"] == "cpu"
        assert set(r) == {"op", "impl", "device", "model_shape", "tokens", "nodes", "launches", "syncs", "host_ms",
                          "gpu_ms", "commit", "machine"}
    for op in ("compress", "evict", "load_back"):
        by_n = {r["nodes"]: r["launches"] for r in rows if r["op"] == op}
        assert by_n[32] <= 1.5 * by_n[1], (op, by_n)


def test_cache_replay_rows(tmp_path):
    replay = load("cache_replay")
    assert replay.main(["--requests", "60", "--xs", "0.5", "3", "--workloads", "multiturn", "--configs", "radix",
                        "unlimited", "kvtc-16x", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cache_replay.json").read_text())
    rows = {(r["config"], r["working_set_x"]): r for r in data["rows"]}
    assert rows["kvtc-16x", 0.5]["hit_rate"] == pytest.approx(rows["radix", 0.5]["hit_rate"])
    assert rows["kvtc-16x", 3]["hit_rate"] > rows["radix", 3]["hit_rate"] + 0.1
    assert rows["kvtc-16x", 3]["hit_rate"] <= rows["unlimited", 3]["hit_rate"] + 1e-9
    assert rows["kvtc-16x", 3]["effective_ratio"] > 8
    if importlib.util.find_spec("matplotlib") is not None:  # the plot needs the bench extra
        assert (tmp_path / "cache_replay.png").stat().st_size > 0
