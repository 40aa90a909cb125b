"""The payload layout: where every byte of a compressed run of tokens lives. Host arithmetic only.

The payload of a run of n tokens at positions start_pos .. start_pos + n - 1, of which the first n_head
(attention sinks) and the last n_tail (recent window) are stored exact and the n_coded = n - n_head - n_tail
in between are transform-coded, is one byte string of `nbytes` bytes:

    offset 0            exact area: (n_head + n_tail) tokens, token-major; token e holds 2L rows of
                        row_bytes = H*D*esize bytes: [K layer 0 .. K layer L-1, V layer 0 .. V layer L-1],
                        bit-exact copies of the pool rows (keys post-RoPE). Head tokens first, then tail tokens.
    exact_bytes         K sections, one per feature block b of K: n_coded tokens x bytes_per_token(K, b),
                        byte-plane major (byte j of token t at section offset j * n_coded + t); a token's
                        record is [4*G fp16 (shift, scale) pairs | packed symbols] (`payload.BlockCoder`)
    ...                 V sections, the same for the blocks of V
    nbytes              end (sections back to back, no padding)

The same bytes are the payload of a framed blob (`blob.py`) and the content of a blob stored in KV-pool rows:
payload byte o lives in blob row o // row_bytes at byte o % row_bytes, blob row j in pool slot
`slots[j // 2L]`, buffer `j % 2L` (`pool_rows.PoolRows`). Because exact token e fills exactly blob rows
e*2L .. e*2L + 2L - 1, every exact row of the payload *is* one blob row, so exact rows move between pool
slots and blob rows as whole-row copies, and a partial restore reads only the exact rows it needs.

Sections are not padded: kernels never receive a section (or any slice of the payload) as a pointer; they
address payload bytes through the row table with integer offsets they are not specialized on, so no
alignment can cause a recompile, and the payload has no bytes that the codec does not write.

Two views of the same arithmetic live here: `PayloadLayout` (per-kind totals, the rows of a token range; what the
reference codec and the per-node Triton codec index) and `BlobLayout` (per-block sections, blob rows, pool slots
and pages; what the batched pool codec and the cache's blob storage use). `payload_layout()` builds a BlobLayout;
tests/codec/test_batched_codec.py checks that both place every part at the same offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.kinds import KINDS


@dataclass(frozen=True)
class SectionSpec:
    """One coded section: kind ("k"/"v"), feature block index, payload byte offset and size."""

    kind: str
    block: int
    offset: int
    nbytes: int
    bytes_per_token: int


@dataclass(frozen=True)
class BlobLayout:
    """Where the bytes of one run of tokens live in its payload (see the module docstring).

    Attributes:
        n_tokens, n_head, n_tail, n_coded: token counts (n_coded = n_tokens - n_head - n_tail).
        n_layers: L. esize: bytes per element of the pool rows (the exact rows' element size).
        row_bytes: H * D * esize, bytes of one pool row = one blob row.
        exact_bytes: (n_head + n_tail) * 2L * row_bytes.
        sections: the coded sections in payload order (K blocks, then V blocks).
        nbytes: payload bytes, what the blob's pool rows (or a framed blob's data) must hold.
    """

    n_tokens: int
    n_head: int
    n_tail: int
    n_coded: int
    n_layers: int
    esize: int
    row_bytes: int
    exact_bytes: int
    sections: tuple[SectionSpec, ...]
    nbytes: int

    @property
    def n_exact(self) -> int:
        return self.n_head + self.n_tail

    @property
    def rows_per_slot(self) -> int:
        """Blob rows one pool slot holds (2L: K and V of every layer)."""
        return 2 * self.n_layers

    @property
    def n_rows(self) -> int:
        """Blob rows the payload occupies (the last one may be partly unused)."""
        return -(-self.nbytes // self.row_bytes)

    @property
    def n_slots(self) -> int:
        """Pool slots the payload occupies (page_size 1)."""
        return -(-self.n_rows // self.rows_per_slot)

    def n_pages(self, page_size: int) -> int:
        """Pool pages of `page_size` slots the payload occupies (what the allocator must hand out)."""
        if page_size <= 0:
            raise ShapeError(f"page size must be positive, got {page_size}")
        return -(-self.n_slots // page_size)

    def tail_waste_bytes(self, page_size: int) -> int:
        """Bytes of the allocated pages the payload does not use."""
        return self.n_pages(page_size) * page_size * self.rows_per_slot * self.row_bytes - self.nbytes

    def exact_row(self, token: int, kind: int, layer: int) -> int:
        """Blob row of exact token `token` (0 .. n_exact-1, head first), kind 0 = K / 1 = V, layer."""
        return token * self.rows_per_slot + kind * self.n_layers + layer

    def section(self, kind: str, block: int) -> SectionSpec:
        for s in self.sections:
            if s.kind == kind and s.block == block:
                return s
        raise KeyError(f"no section ({kind}, {block})")

    def clip_range(self, a: int, b: int) -> "TokenRange":
        """The parts of tokens [a, b) of the run: exact head, coded middle, exact tail (see TokenRange)."""
        if not (0 <= a <= b <= self.n_tokens):
            raise ShapeError(f"token range [{a}, {b}) outside a run of {self.n_tokens} tokens")
        head_n = max(0, min(b, self.n_head) - a)
        coded_lo, coded_hi = max(a, self.n_head), min(b, self.n_head + self.n_coded)
        tail_lo = max(a, self.n_head + self.n_coded)
        tail_n = max(0, b - tail_lo)
        return TokenRange(
            a=a, b=b,
            head_row0=a, head_n=head_n,
            coded_tok0=coded_lo - self.n_head, coded_n=max(0, coded_hi - coded_lo), coded_dst0=coded_lo - a,
            tail_row0=self.n_head + tail_lo - (self.n_head + self.n_coded), tail_n=tail_n, tail_dst0=tail_lo - a,
        )


@dataclass(frozen=True)
class TokenRange:
    """Tokens [a, b) of a run split by storage (indices are into the run / the exact area / the section):

    head: exact rows head_row0 .. head_row0 + head_n - 1, written to destination tokens 0 .. head_n - 1;
    coded: section tokens coded_tok0 .. + coded_n - 1, to destination tokens coded_dst0 ..;
    tail: exact rows tail_row0 .. + tail_n - 1, to destination tokens tail_dst0 ...
    """

    a: int
    b: int
    head_row0: int
    head_n: int
    coded_tok0: int
    coded_n: int
    coded_dst0: int
    tail_row0: int
    tail_n: int
    tail_dst0: int


def payload_layout(n_tokens: int, n_head: int, n_tail: int, *, n_layers: int, row_bytes: int, esize: int,
                   bytes_per_token: dict[str, tuple[int, ...]]) -> BlobLayout:
    """The BlobLayout of a run (host arithmetic, no device work).

    Args:
        bytes_per_token: {"k": (bytes per coded token of block 0, ...), "v": (...)} of the plan in use.
    Raises ShapeError on negative or inconsistent counts.
    """
    n_tokens, n_head, n_tail = int(n_tokens), int(n_head), int(n_tail)
    if n_tokens < 0 or n_head < 0 or n_tail < 0 or n_head + n_tail > n_tokens:
        raise ShapeError(f"exact counts {n_head}+{n_tail} do not fit a run of {n_tokens} tokens")
    m = n_tokens - n_head - n_tail
    exact = (n_head + n_tail) * 2 * n_layers * row_bytes
    sections, off = [], exact
    for kind in KINDS:
        for b, bpt in enumerate(bytes_per_token[kind]):
            sections.append(SectionSpec(kind, b, off, m * bpt, bpt))
            off += m * bpt
    return BlobLayout(n_tokens, n_head, n_tail, m, n_layers, esize, row_bytes, exact, tuple(sections), off)

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
