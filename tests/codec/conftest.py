"""Fixtures of the codec tests (helpers in codec_setup.py)."""

from __future__ import annotations

import pytest

from tests.codec.codec_setup import make_artifact


@pytest.fixture(scope="module")
def art():
    """The synthetic L=2, H=2, D=16 artifact with its 4x and 16x plans (see codec_setup.py)."""
    return make_artifact()
