"""The in-tree sglang 0.5.17 patch and ``kvtc-sglang patch {check,apply,revert}``.

Every test works on a COPY of the installed ``sglang/srt/server_args.py`` laid out like site-packages in a temporary
folder (with ``sglang/version.py`` or a dist-info naming the version); the shared installation is never written.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import itertools
import json
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.sglang

from kvtc_sglang import sglang_compat as compat  # noqa: E402  (imports sglang lazily)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kvtc_sglang import cli  # noqa: E402
from kvtc_sglang.cache import patch_tool, plugin  # noqa: E402
from kvtc_sglang.cache.options import KVTCOptions  # noqa: E402
from kvtc_sglang.cache.startup_checks import CalibrationModelMismatch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
from kvtc_sglang.cache.options import SERVER_ARGS_ATTRS  # noqa: E402

OPTION_FIELDS = list(SERVER_ARGS_ATTRS.values())
_module_ids = itertools.count()


def installed_server_args() -> Path:
    return compat.installed_sglang_site_packages() / compat.SERVER_ARGS_RELPATH


@pytest.fixture
def site(tmp_path) -> Path:
    """A site-packages look-alike holding a copy of sglang 0.5.17's server_args.py and sglang/version.py."""
    target = tmp_path / compat.SERVER_ARGS_RELPATH
    target.parent.mkdir(parents=True)
    shutil.copyfile(installed_server_args(), target)
    (tmp_path / "sglang" / "version.py").write_text(f'__version__ = "{compat.SUPPORTED_SGLANG_VERSION}"\n')
    return tmp_path


def run_patch(capsys, action: str, site: Path) -> tuple[int, str, str]:
    rc = cli.main(["patch", action, "--site-packages", str(site)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def load_server_args_module(path: Path):
    """Import a (patched) server_args.py copy under a private module name, beside the real one."""
    name = f"kvtc_patched_server_args_{next(_module_ids)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


@pytest.fixture
def patched_server_args(site, capsys):
    assert run_patch(capsys, "apply", site)[0] == 0
    module = load_server_args_module(site / compat.SERVER_ARGS_RELPATH)
    yield module.ServerArgs
    sys.modules.pop(module.__name__, None)


@pytest.fixture
def model_and_card(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    model.joinpath("config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30, "head_dim": 64,
        "rope_theta": 100000.0, "max_position_embeddings": 8192, "vocab_size": 49152, "torch_dtype": "bfloat16"}))
    from kvtc_sglang.testing.synthetic import save_synthetic_card

    card = save_synthetic_card(tmp_path / "card", num_layers=30, num_kv_heads=3, head_dim=64, ratios=(16, 32),
                               model={"rope": {"theta": 100000.0, "style": "neox"}})
    return model, card


# ---------------------------------------------------------------------------------------------------------------------
# The shipped patch file
# ---------------------------------------------------------------------------------------------------------------------

def test_patch_ships_identically_in_checkout_and_package():
    canonical = REPO / "patches" / patch_tool.PATCH_NAME
    packaged = REPO / "kvtc_sglang" / "patches" / patch_tool.PATCH_NAME
    assert canonical.read_bytes() == packaged.read_bytes()
    assert patch_tool.patch_file().read_bytes() == canonical.read_bytes()


def test_patch_is_one_upstream_style_diff_of_server_args():
    text = patch_tool.patch_file().read_text()
    assert text.startswith(f"--- a/{compat.SERVER_ARGS_RELPATH}\n+++ b/{compat.SERVER_ARGS_RELPATH}\n")
    patch = patch_tool.load_patch()
    assert patch.path == compat.SERVER_ARGS_RELPATH
    added = "".join(line for hunk in patch.hunks for line in hunk.lines if line.startswith("+"))
    for name in OPTION_FIELDS:
        assert f"+    {name}: A[" in added, name
    assert added.count('NS("memory")') == len(OPTION_FIELDS)
    assert "def _handle_kv_compress(self):" in added


# ---------------------------------------------------------------------------------------------------------------------
# check / apply / revert
# ---------------------------------------------------------------------------------------------------------------------

def test_check_apply_apply_revert_round_trip(site, capsys):
    target = site / compat.SERVER_ARGS_RELPATH
    original = target.read_bytes()
    mode = target.stat().st_mode

    rc, out, _ = run_patch(capsys, "check", site)
    assert rc == 0 and "applies cleanly" in out

    rc, out, _ = run_patch(capsys, "apply", site)
    assert rc == 0 and "applied" in out
    patched = target.read_bytes()
    assert patched != original and target.stat().st_mode == mode
    compile(patched, str(target), "exec")
    for name in OPTION_FIELDS:
        assert f"\n    {name}: A[".encode() in patched, name

    rc, out, _ = run_patch(capsys, "check", site)
    assert rc == 0 and "already applied" in out

    rc, out, _ = run_patch(capsys, "apply", site)
    assert rc == 0 and "nothing to do" in out
    assert target.read_bytes() == patched

    rc, out, _ = run_patch(capsys, "revert", site)
    assert rc == 0 and "reverted" in out
    assert target.read_bytes() == original

    rc, out, _ = run_patch(capsys, "revert", site)
    assert rc == 0 and "nothing to revert" in out
    assert target.read_bytes() == original


def test_version_from_dist_info_is_accepted(site, capsys):
    (site / "sglang" / "version.py").unlink()
    dist_info = site / f"sglang-{compat.SUPPORTED_SGLANG_VERSION}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.4\nName: sglang\n"
                                        f"Version: {compat.SUPPORTED_SGLANG_VERSION}\n\nbody\n")
    assert run_patch(capsys, "check", site)[0] == 0


@pytest.mark.parametrize("action", ["check", "apply", "revert"])
def test_another_sglang_version_is_refused(site, capsys, action):
    (site / "sglang" / "version.py").write_text('__version__ = "0.5.16"\n')
    target = site / compat.SERVER_ARGS_RELPATH
    before = target.read_bytes()
    rc, out, err = run_patch(capsys, action, site)
    assert rc == 2
    assert "0.5.16" in err and compat.SUPPORTED_SGLANG_VERSION in err
    assert target.read_bytes() == before


def test_unknown_version_is_refused(site, capsys):
    (site / "sglang" / "version.py").unlink()
    rc, _, err = run_patch(capsys, "check", site)
    assert rc == 2 and "cannot tell the sglang version" in err


def test_a_locally_modified_file_is_refused(site, capsys):
    target = site / compat.SERVER_ARGS_RELPATH
    text = target.read_text()
    needle = "        # Validate cache settings.\n        self._handle_cache_compatibility()\n"
    assert text.count(needle) == 1
    target.write_text(text.replace(needle, "        # Validate cache settings (edited).\n"
                                           "        self._handle_cache_compatibility()\n"))
    before = target.read_bytes()
    for action in ("check", "apply", "revert"):
        rc, _, err = run_patch(capsys, action, site)
        assert rc == 1 and "does not apply" in err
    assert target.read_bytes() == before


def test_missing_target_file_is_a_setup_error(site, capsys):
    (site / compat.SERVER_ARGS_RELPATH).unlink()
    rc, _, err = run_patch(capsys, "check", site)
    assert rc == 2 and "does not exist" in err


# ---------------------------------------------------------------------------------------------------------------------
# The patched ServerArgs
# ---------------------------------------------------------------------------------------------------------------------

def test_patched_server_args_declares_the_options_in_namespace_memory(patched_server_args):
    from sglang.srt.arg_groups.arg_utils import namespace_of

    names = [f.name for f in dataclasses.fields(patched_server_args)]
    for name in OPTION_FIELDS:
        assert name in names, name
    namespaces = namespace_of(patched_server_args)
    assert all(namespaces[name] == "memory" for name in OPTION_FIELDS)
    defaults = {f.name: f.default for f in dataclasses.fields(patched_server_args) if f.name in OPTION_FIELDS}
    assert KVTCOptions.from_server_args(type("D", (), defaults)) == KVTCOptions()


def test_patched_server_args_selects_the_backend_from_python_and_cli(patched_server_args, model_and_card):
    model, card = model_and_card
    sa = patched_server_args(model_path=str(model), device="cpu", kv_compress="kvtc", kvtc_calibration=str(card),
                             kvtc_ratio=32)
    assert sa.radix_cache_backend == "kvtc"
    options = KVTCOptions.from_server_args(sa)
    assert options == KVTCOptions(kv_compress="kvtc", calibration=str(card), ratio=32.0)
    # What the plugin's __post_init__ hook does once the patch is in sglang: validate and select.
    plugin.finalize_server_args(sa, options)

    import argparse

    parser = argparse.ArgumentParser()
    patched_server_args.add_cli_args(parser)
    plugin.add_cli_flags(parser)  # the plugin adds nothing to a patched parser
    args = parser.parse_args(["--model-path", str(model), "--device", "cpu", "--kv-compress", "kvtc",
                              "--kvtc-calibration", str(card), "--kvtc-store-budget", "2GiB"])
    sa = patched_server_args.from_cli_args(args)
    assert sa.radix_cache_backend == "kvtc" and sa.kvtc_store_budget == "2GiB"


@pytest.mark.parametrize("kwargs, message", [
    ({"disable_radix_cache": True}, "remove --disable-radix-cache"),
    ({"enable_hierarchical_cache": True}, "mutually exclusive"),
    ({"radix_cache_backend": "flexkv"}, "--radix-cache-backend flexkv was given"),
    ({"kvtc_calibration": None}, "kvtc-sglang calibrate --model <model-path> --out <dir>"),
    ({"kvtc_window_tokens": -1}, "must be >= 0"),
    ({"kvtc_ratio": 0}, "--kvtc-ratio must be > 0"),
])
def test_patched_server_args_validates_its_options(patched_server_args, model_and_card, kwargs, message):
    model, card = model_and_card
    fields = dict(model_path=str(model), device="cpu", kv_compress="kvtc", kvtc_calibration=str(card))
    fields.update(kwargs)
    with pytest.raises(ValueError, match=message):
        patched_server_args(**fields)


def test_plugin_checks_the_card_of_a_patched_server_args(patched_server_args, model_and_card):
    model, card = model_and_card
    data = json.loads((card / "card.json").read_text())
    data["model"]["head_dim"] = 128
    (card / "card.json").write_text(json.dumps(data))
    sa = patched_server_args(model_path=str(model), device="cpu", kv_compress="kvtc", kvtc_calibration=str(card))
    with pytest.raises(CalibrationModelMismatch, match="head_dim is 128 in the card but 64"):
        plugin._post_init_hook(None, sa)


# ---------------------------------------------------------------------------------------------------------------------
# The unified-diff applier
# ---------------------------------------------------------------------------------------------------------------------

def make_diff(a: list[str], b: list[str]) -> str:
    return "".join(difflib.unified_diff(a, b, "a/f.py", "b/f.py", n=3))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["x\n", "y\n", "z\n", "def f():\n", "    pass\n", "\n"]), max_size=40),
       st.lists(st.sampled_from(["x\n", "y\n", "w\n", "    return 1\n", "\n"]), max_size=40))
def test_applier_round_trips_difflib_diffs(a, b):
    text = make_diff(a, b)
    if not text:
        return
    [file_patch] = patch_tool.parse_unified_diff(text)
    assert patch_tool.apply_hunks("".join(a), file_patch.hunks) == "".join(b)
    assert patch_tool.apply_hunks("".join(b), file_patch.hunks, reverse=True) == "".join(a)


def test_applier_handles_no_newline_at_end_of_file():
    diff = ("--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n-b\n\\ No newline at end of file\n+c\n"
            "\\ No newline at end of file\n")
    [file_patch] = patch_tool.parse_unified_diff(diff)
    assert patch_tool.apply_hunks("a\nb", file_patch.hunks) == "a\nc"
    assert patch_tool.apply_hunks("a\nc", file_patch.hunks, reverse=True) == "a\nb"


def test_applier_requires_exact_context_at_the_stated_line():
    [file_patch] = patch_tool.parse_unified_diff(make_diff(["a\n", "b\n", "c\n"], ["a\n", "B\n", "c\n"]))
    with pytest.raises(patch_tool.PatchError, match="does not match"):
        patch_tool.apply_hunks("z\na\nb\nc\n", file_patch.hunks)  # shifted by one line: refused, not fuzzed


@pytest.mark.parametrize("text, message", [
    ("", "no file hunks"),
    ("@@ -1 +1 @@\n-a\n+b\n", "before any"),
    ("--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n-b\n", "truncated"),
    ("--- a/f\n+++ b/f\n@@ -1,2 +1,2 @@\n a\n?b\n+c\n", "unexpected"),
])
def test_parser_rejects_malformed_diffs(text, message):
    with pytest.raises(patch_tool.PatchError, match=message):
        patch_tool.parse_unified_diff(text)
