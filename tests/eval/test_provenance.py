"""eval/provenance.py: commit and machine descriptions recorded beside results."""

from __future__ import annotations

import subprocess
import sys

from kvtc_sglang.eval import provenance


def test_git_commit_names_the_checkout_or_the_override(monkeypatch, tmp_path):
    monkeypatch.delenv("KVTC_COMMIT", raising=False)
    commit = provenance.git_commit()
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=provenance.CHECKOUT, capture_output=True,
                          text=True)
    if head.returncode == 0:
        assert commit.removesuffix("-dirty") == head.stdout.strip()
    assert provenance.git_commit(tmp_path) == "unknown"  # not a checkout
    monkeypatch.setenv("KVTC_COMMIT", "abc123")
    assert provenance.git_commit() == "abc123"


def test_gpu_name_override_and_machine_description(monkeypatch):
    monkeypatch.setenv("KVTC_GPU", "Some GPU")
    assert provenance.gpu_name() == "Some GPU"
    desc = provenance.machine_description()
    assert "CPU: " in desc and "torch " in desc and "Python " in desc


def test_importing_provenance_and_loaders_does_not_import_torch():
    code = ("import sys; import kvtc_sglang.eval.provenance, kvtc_sglang.eval.conversations, "
            "kvtc_sglang.eval.agreement; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
