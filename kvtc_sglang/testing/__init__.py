"""Fixtures shared by the tests and the benchmarks (synthetic artifacts, plans and KV); no library module imports
this package."""
