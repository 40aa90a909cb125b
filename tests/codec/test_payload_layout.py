"""codec/payload_layout.py: where exact rows and coded sections sit, and which rows a token range reads."""

from __future__ import annotations

import pytest
import torch

from kvtc_sglang.codec.payload_layout import PayloadLayout, Rows


def test_sections_follow_the_exact_rows_k_before_v():
    lay = PayloadLayout(n_head=2, n_tail=3, n_coded=7, p=64, exact_dtype=torch.bfloat16, kind_bytes=(10, 6))
    assert lay.n_exact == 5 and lay.n_tokens == 12
    assert lay.exact_bytes == 5 * 2 * 64 * 2
    assert (lay.section_offset(0), lay.section_bytes(0)) == (lay.exact_bytes, 70)
    assert (lay.section_offset(1), lay.section_bytes(1)) == (lay.exact_bytes + 70, 42)
    assert lay.raw_size == lay.exact_bytes + 70 + 42
    fp8 = PayloadLayout(1, 0, 0, 64, torch.uint8, (10, 6))
    assert fp8.exact_bytes == 128 and fp8.raw_size == 128


def test_exact_rows_view_the_payload():
    lay = PayloadLayout(1, 1, 2, 4, torch.float16, (3, 3))
    payload = torch.arange(lay.raw_size, dtype=torch.uint8)
    rows = lay.exact_rows(payload, (1, 2, 2))
    assert tuple(rows.shape) == (2, 2, 1, 2, 2) and rows.dtype == torch.float16
    assert rows.data_ptr() == payload.data_ptr()
    assert PayloadLayout(0, 0, 2, 4, torch.float16, (3, 3)).exact_rows(payload, (1, 2, 2)) is None


@pytest.mark.parametrize("n_head, n_coded, n_tail", [(2, 5, 3), (0, 4, 0), (3, 0, 2), (0, 0, 4), (4, 1, 0)])
def test_every_token_of_every_range_is_read_from_exactly_its_row(n_head, n_coded, n_tail):
    lay = PayloadLayout(n_head, n_tail, n_coded, 8, torch.bfloat16, (1, 1))
    n = lay.n_tokens
    # the row each token of the run lives in: ("exact", i) for head/tail rows, ("coded", j) for coded rows
    truth = [("exact", t) for t in range(n_head)] + [("coded", j) for j in range(n_coded)] + \
            [("exact", n_head + i) for i in range(n_tail)]
    for a in range(n + 1):
        for b in range(a, n + 1):
            got = [None] * (b - a)
            head, tail, coded = lay.token_rows(a, b)
            for part, where in ((head, "exact"), (tail, "exact"), (coded, "coded")):
                assert isinstance(part, Rows) and part.n_rows >= 0
                for i in range(part.n_rows):
                    assert got[part.idx0 + i] is None  # no token written twice
                    got[part.idx0 + i] = (where, part.row0 + i)
            assert got == truth[a:b], (a, b)
