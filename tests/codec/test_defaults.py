"""codec/defaults.py: the exact-token policy every layer reads."""

from __future__ import annotations

import pytest

from kvtc_sglang.codec.defaults import ExactPolicy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_exact_token_counts():
    policy = ExactPolicy(4, 128)
    assert policy.counts(0, 1000, True) == (4, 128)
    assert policy.counts(0, 1000, False) == (4, 0)
    assert policy.counts(2, 1000, False) == (2, 0)
    assert policy.counts(10, 1000, True) == (0, 128)
    assert policy.counts(0, 3, True) == (3, 0)
    assert policy.counts(0, 50, True) == (4, 46)
