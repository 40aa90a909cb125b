"""The subcommands refuse bad inputs before any work: argparse types for counts, `calibrate --out` checked before
the model loads, missing paths named; typed library errors become one error line and exit status 2."""

from __future__ import annotations

import json
import time

import pytest

from kvtc_sglang.cli import main
from kvtc_sglang.models.calibration import CalibrationInputError, check_output_dir


@pytest.mark.parametrize("argv", [
    ["report", "--windows", "0"],
    ["report", "--windows", "-1"],
    ["report", "--windows", "two"],
    ["calibrate", "--out", "x", "--tokens", "0"],
    ["calibrate", "--out", "x", "--seq-len", "-5"],
    ["calibrate", "--out", "x", "--ratios", "16", "0"],
    ["calibrate", "--out", "x", "--tp-size", "0"],
    ["calibrate", "--out", "x", "--dp-samples", "0"],
])
def test_counts_below_one_are_rejected_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "must be >= 1" in err or "is not an integer" in err


@pytest.mark.parametrize("value", ["-0.5", "nan", "inf", "half"])
def test_layer_equalization_must_be_a_finite_non_negative_number(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", "--out", "x", "--layer-equalization", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--layer-equalization" in err
    assert "must be a finite number >= 0" in err or "is not a number" in err


def test_calibrate_refuses_an_existing_file_as_out_before_any_work(tmp_path, capsys):
    target = tmp_path / "artifact"
    target.write_text("not a directory")
    start = time.perf_counter()
    assert main(["calibrate", "--out", str(target)]) == 2
    assert time.perf_counter() - start < 5  # no model was loaded
    assert f"--out {target} is an existing file" in capsys.readouterr().err


@pytest.mark.parametrize("make, what", [
    (lambda tmp: tmp / "file" / "sub", "is a file, so the directory cannot be created"),
    (lambda tmp: "/proc/kvtc-artifact/x", "cannot write in /proc"),
])
def test_calibrate_refuses_an_out_it_cannot_write(tmp_path, make, what, capsys):
    (tmp_path / "file").write_text("")
    assert main(["calibrate", "--out", str(make(tmp_path))]) == 2
    assert what in capsys.readouterr().err


def test_output_check_accepts_new_and_existing_directories_and_leaves_nothing(tmp_path):
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()
    check_output_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CalibrationInputError):
        check_output_dir("/proc/version")


def test_calibrate_names_a_missing_model_corpus_or_dumps_folder(tmp_path, capsys):
    out = str(tmp_path / "art")
    assert main(["calibrate", "--out", out, "--model", str(tmp_path / "nope.gguf")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["calibrate", "--out", out, "--corpus", str(tmp_path / "nope.txt")]) == 2
    assert "corpus file" in capsys.readouterr().err
    assert main(["calibrate", "--out", out, "--kv-dumps", str(tmp_path / "dumps")]) == 2
    assert "--kv-dumps needs --model" in capsys.readouterr().err
    assert main(["calibrate", "--out", out, "--kv-dumps", str(tmp_path / "dumps"), "--model", str(tmp_path)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_calibrate_from_dumps_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "dumps").mkdir()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"hidden_size": 64}))
    assert main(["calibrate", "--out", str(tmp_path / "art"), "--kv-dumps", str(tmp_path / "dumps"),
                 "--model", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvtc-sglang calibrate: error: ") and "Traceback" not in err


def test_report_names_a_missing_artifact(tmp_path, capsys):
    assert main(["report", "--artifact", str(tmp_path / "none")]) == 2
    assert "--artifact" in capsys.readouterr().err
