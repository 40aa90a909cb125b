"""The codec speed benchmark runs end to end at tiny shapes on a CPU (Triton interpreter) and writes its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {"op", "impl", "rank", "tokens", "gbps", "ms", "gpu", "commit", "entropy", "ratio", "plan", "nodes", "launches"}


def test_codec_speed_smoke_writes_checked_rows(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "codec_speed.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "codec_speed.json").read_text())
    rows = data["rows"]
    assert rows and all(ROW_KEYS <= set(r) for r in rows)
    ops = {(r["op"], r["impl"], r["entropy"]) for r in rows}
    for op in ("encode", "decode"):
        assert (op, "triton", "none") in ops and (op, "torch-reference", "none+blob") in ops
    assert {("recompute", "flop-derived", None), ("h2d_copy", "torch-pinned", None)} <= ops
    assert all(c["ok"] for c in data["meta"]["checks"].values())
    assert {r["rank"] for r in rows if r["op"] == "encode"} == {32, 64}
    batched = [r for r in rows if r["impl"] == "triton-batched"]
    assert {(r["op"], r["nodes"], r["plan"]) for r in batched} == {
        (op, nodes, plan) for op in ("encode", "decode", "decode_layerwise") for nodes in (1, 4) for plan in ("r32", "r64")}
    for op in ("encode", "decode", "decode_layerwise"):  # one batched call: launches independent of the node count
        for plan in ("r32", "r64"):
            assert len({r["launches"] for r in batched if r["op"] == op and r["plan"] == plan}) == 1
    assert all(r["check"] == "ok" and r["ms"] > 0 for r in batched)
    assert all(v["after_warmup"] == 0 for v in data["meta"]["batched_compiles"].values())
    assert "| op | impl |" in (tmp_path / "codec_speed.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "codec_speed.png").stat().st_size > 0
    assert "[done in" in proc.stdout


def test_plan_ranks_option_reads_the_cards_8_16_32_plans(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("codec_speed", ROOT / "benchmarks" / "codec_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    card = ROOT / "calibration_artifacts" / "smollm2-135m-instruct"
    ranks = mod.card_plan_ranks(str(card))
    plans = json.loads((card / "card.json").read_text())["plans"]
    assert set(ranks) == {8, 16, 32}
    assert ranks[16] == (max(b["rank"] for b in plans["16"]["k"]), max(b["rank"] for b in plans["16"]["v"]))
    args = mod.parse_args(["--plan-ranks", str(card / "card.json"), "--nodes", "1,2"])
    assert args.card_ranks == ranks and args.nodes == [1, 2]
    (tmp_path / "card.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a calibration card"):
        mod.card_plan_ranks(str(tmp_path))
