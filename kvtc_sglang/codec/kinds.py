"""The two tensors of a token's KV cache.

``Kind.K`` (keys: RoPE is undone before the transform and redone after it) and ``Kind.V`` (values). The int is the
order everywhere a payload or a kernel indexes them (the K section comes first); ``key`` ("k"/"v") is the name in
artifacts, cards and tensor files.
"""

from __future__ import annotations

from enum import IntEnum


class Kind(IntEnum):
    K = 0
    V = 1

    @property
    def key(self) -> str:
        """"k" or "v": the kind's name in cards, tensor files and ``CalibrationArtifact.blocks``."""
        return self.name.lower()


KINDS = tuple(kind.key for kind in Kind)  # ("k", "v")
