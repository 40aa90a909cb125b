"""Where things sit in a blob's raw payload, and which payload rows a token range of the blob reads.

The raw payload (the bytes the entropy stage compresses; see blob.py) of a run of n tokens with n_head leading and
n_tail trailing exact tokens is, in order:

    exact rows   [n_head + n_tail, 2, L, H, D] in the exact dtype (the pool's store dtype): the head tokens' K and V
                 rows, then the tail tokens'
    K section    n_coded * kind_bytes[0] bytes (n_coded = n - n_head - n_tail)
    V section    n_coded * kind_bytes[1] bytes

``PayloadLayout`` holds that arithmetic for the reference codec (``codec.KVTCCodec``) and the kernel path
(``triton.pool_codec.TritonPoolCodec``) alike; ``token_rows`` maps the tokens [a, b) of the run onto the exact head
rows, the exact tail rows and the coded rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class Rows(NamedTuple):
    """``n_rows`` consecutive rows from ``row0`` of one part of the payload, for the output tokens from ``idx0``."""

    row0: int
    n_rows: int
    idx0: int


class TokenRows(NamedTuple):
    """The rows a token range [a, b) of a run reads: exact head rows, exact tail rows (both indexing the exact rows,
    tail rows after the head rows) and coded rows (indexing the n_coded coded tokens). ``idx0`` counts from a."""

    head: Rows
    tail: Rows
    coded: Rows


@dataclass(frozen=True)
class PayloadLayout:
    """The byte layout of one raw payload.

    Attributes:
        n_head, n_tail: exact tokens at the start / end of the run.
        n_coded: coded tokens between them.
        p: features per token and kind (L * H * D).
        exact_dtype: dtype of the exact rows (the pool's store dtype: bf16/fp16/fp32, or uint8 for fp8 pools).
        kind_bytes: packed bytes of one coded token, per kind (K, V).
    """

    n_head: int
    n_tail: int
    n_coded: int
    p: int
    exact_dtype: torch.dtype
    kind_bytes: tuple[int, int]

    @property
    def n_exact(self) -> int:
        return self.n_head + self.n_tail

    @property
    def n_tokens(self) -> int:
        return self.n_exact + self.n_coded

    @property
    def exact_bytes(self) -> int:
        """Bytes of the exact rows: n_exact * 2 (K, V) * p * itemsize."""
        return self.n_exact * 2 * self.p * self.exact_dtype.itemsize

    def section_bytes(self, kind: int) -> int:
        """Bytes of the coded section of ``kind`` (0 = K, 1 = V)."""
        return self.n_coded * self.kind_bytes[kind]

    def section_offset(self, kind: int) -> int:
        """Offset of the coded section of ``kind`` (0 = K, 1 = V) in the payload."""
        return self.exact_bytes + (self.section_bytes(0) if kind == 1 else 0)

    @property
    def raw_size(self) -> int:
        """Bytes of the whole payload."""
        return self.exact_bytes + self.section_bytes(0) + self.section_bytes(1)

    def exact_rows(self, payload: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor | None:
        """The exact rows of ``payload`` (1-D uint8) as a view of shape [n_exact, 2, L, H, D] in the exact dtype;
        None when the run has none."""
        if not self.n_exact:
            return None
        return payload[: self.exact_bytes].view(self.exact_dtype).view(self.n_exact, 2, *shape)

    def token_rows(self, a: int, b: int) -> TokenRows:
        """The payload rows holding tokens [a, b) of the run (0 <= a <= b <= n_tokens, checked by the caller)."""
        tail_start = self.n_head + self.n_coded
        head_hi = min(b, self.n_head)
        tail_lo = max(a, tail_start)
        c_lo, c_hi = max(a, self.n_head), min(b, tail_start)
        return TokenRows(
            head=Rows(a, max(0, head_hi - a), 0),
            tail=Rows(self.n_head + tail_lo - tail_start, max(0, b - tail_lo), tail_lo - a),
            coded=Rows(c_lo - self.n_head, max(0, c_hi - c_lo), c_lo - a),
        )
