"""Accuracy evaluation of compressed KV caches on a real model (perplexity, greedy agreement)."""
