"""The fault tests run the tier over tests/cache's harness, with its single-torch-thread setting."""

from tests.cache.conftest import _one_torch_thread  # noqa: F401 (the autouse fixture, registered here too)
