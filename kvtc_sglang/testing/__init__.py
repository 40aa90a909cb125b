"""Fixtures shared by the tests and the benchmarks (synthetic artifacts, plans and KV, small pools) and the host-sync
audit; no library module imports this package."""
