"""Test and benchmark helpers that ship with the package (synthetic artifacts, audits)."""
