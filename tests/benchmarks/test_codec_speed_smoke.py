"""The codec speed benchmark runs end to end at tiny shapes on a CPU (Triton interpreter) and writes its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {"op", "impl", "rank", "tokens", "gbps", "ms", "gpu", "commit", "entropy", "ratio"}


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
    assert "| op | impl |" in (tmp_path / "codec_speed.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "codec_speed.png").stat().st_size > 0
    assert "[done in" in proc.stdout
