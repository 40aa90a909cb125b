"""KVTCCodec (codec/codec.py) on the small synthetic artifact: blob round trips reconstruct exactly what the plan's
own quantizer predicts, exact (sink/window) rows are bit-exact in every pool dtype, partial decodes equal slices of
the full decode, and bad K/V inputs raise typed errors with clear messages."""

from __future__ import annotations

import pytest
import torch

from kvtc_sglang.codec import blob as blobfmt
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.entropy import EntropyCoderId
from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.rope import RopeConfig, undo_rope
from tests.codec.codec_setup import CODERS, D, H, L, P, assert_close_rel, bits_of, kv, predicted, predicted_kv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("ratio", [4, 16])
@pytest.mark.parametrize("coder", CODERS)
@pytest.mark.parametrize("chunk_bytes", [97, 1 << 16])
def test_round_trip_reconstructs_what_the_plan_predicts(art, ratio, coder, chunk_bytes):
    codec = KVTCCodec(art, ratio, entropy=coder, chunk_bytes=chunk_bytes)
    n, start, nh, nt = 23, 2, 2, 5
    k, v = kv(n)
    blob = codec.encode(k, v, start, nh, nt)
    h = blobfmt.read_header(blob)
    assert (h.n_tokens, h.start_pos, h.n_head, h.n_tail, h.ratio) == (n, start, nh, nt, ratio)
    assert h.coder == EntropyCoderId.of(coder) and h.raw_size == codec.raw_size(n, nh + nt, torch.float32)
    assert h.n_chunks == (-(-h.raw_size // chunk_bytes) if coder != "none" else 0)  # uncoded: no chunk table
    dec = codec.decode(blob, expected_tokens=n, expected_start=start)
    assert dec.k.shape == dec.v.shape == (n, L, H, D) and dec.k.dtype == torch.float32
    # exact rows: bit-exact copies
    for got, want in ((dec.k, k), (dec.v, v)):
        assert torch.equal(bits_of(got[:nh]), bits_of(want[:nh])) and torch.equal(bits_of(got[n - nt :]), bits_of(want[n - nt :]))
    # coded rows: what the plan's quantizer predicts, to float32 rounding
    ek, ev = predicted_kv(art, ratio, k[nh : n - nt], v[nh : n - nt], start + nh)
    torch.testing.assert_close(dec.k[nh : n - nt], ek, rtol=0, atol=1e-4)
    torch.testing.assert_close(dec.v[nh : n - nt], ev, rtol=0, atol=1e-4)


@pytest.mark.parametrize("ratio", [4, 16])
def test_reconstruction_error_is_bounded_by_group_scales_through_the_basis(art, ratio):
    """|x_hat - x_kept| <= sum_j |basis_ij| * (scale_j / 2 + shift rounding_j) / feature_scale_i, feature by feature,
    where x_kept reconstructs the unquantized kept coefficients; and the MSE equals the predicted MSE."""
    codec = KVTCCodec(art, ratio, entropy="none")
    m = 40
    k, v = kv(m, seed=5)
    dec = codec.decode(codec.encode(k, v, 10))
    rope = RopeConfig.from_dict(art.model["rope"])
    pos = torch.arange(10, 10 + m)
    for kind, x, got in (("k", undo_rope(k, pos, rope), undo_rope(dec.k, pos, rope)), ("v", v, dec.v)):
        x, got = x.reshape(m, P), got.reshape(m, P)
        x_hat, x_kept, bound = predicted(art, ratio, kind, x)
        assert bool(((got - x_kept).abs() <= bound + 1e-4).all())
        mse, want = float(((got - x) ** 2).sum(-1).mean()), float(((x_hat - x) ** 2).sum(-1).mean())
        assert mse == pytest.approx(want, rel=1e-3)
    # a richer plan reconstructs better than a poorer one
    dec16 = KVTCCodec(art, 16, entropy="none").decode(KVTCCodec(art, 16, entropy="none").encode(k, v, 10))
    dec4 = KVTCCodec(art, 4, entropy="none").decode(KVTCCodec(art, 4, entropy="none").encode(k, v, 10))
    assert float(((dec4.v - v) ** 2).mean()) < float(((dec16.v - v) ** 2).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exact_rows_are_bit_exact_in_every_float_dtype(art, dtype):
    n, nh, nt = 14, 4, 6
    k, v = kv(n, seed=2, dtype=dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 65504.0]).to(dtype)
    for rows in (k[:nh], v[:nh], k[n - nt :], v[n - nt :]):  # only exact rows may hold non-finite values
        rows.view(-1)[: special.numel()] = special
    codec = KVTCCodec(art, 4, entropy="deflate")
    dec = codec.decode(codec.encode(k, v, 0, nh, nt))
    assert dec.k.dtype == dtype
    for got, want in ((dec.k, k), (dec.v, v)):
        assert torch.equal(bits_of(got[:nh]), bits_of(want[:nh]))
        assert torch.equal(bits_of(got[n - nt :]), bits_of(want[n - nt :]))
    ek, ev = predicted_kv(art, 4, k[nh : n - nt], v[nh : n - nt], nh)
    assert_close_rel(dec.k[nh : n - nt], ek, dtype)
    assert_close_rel(dec.v[nh : n - nt], ev, dtype)


@pytest.mark.parametrize("coder", CODERS)
def test_token_range_decode_equals_slice_of_full_decode(art, coder):
    codec = KVTCCodec(art, 4, entropy=coder, chunk_bytes=200)
    n, nh, nt = 20, 3, 4
    k, v = kv(n, seed=6, dtype=torch.bfloat16)
    blob = codec.encode(k, v, 1, nh, nt)
    full = codec.decode(blob)
    ranges = [(0, n), (0, 0), (n, n), (0, 1), (0, nh), (nh, n - nt), (n - nt, n), (2, 5), (15, 18), (5, 6), (1, n - 1)]
    for a, b in ranges:
        part = codec.decode(blob, token_range=(a, b))
        assert part.k.shape[0] == b - a
        torch.testing.assert_close(part.k, full.k[a:b], rtol=0, atol=0)
        torch.testing.assert_close(part.v, full.v[a:b], rtol=0, atol=0)
    for bad in ((-1, 3), (3, 2), (0, n + 1)):
        with pytest.raises(ShapeError, match="token range"):
            codec.decode(blob, token_range=bad)


@pytest.mark.parametrize("n, start, nh, nt", [(1, 100, 0, 0), (6, 0, 4, 1), (1, 3, 0, 0)])
def test_run_of_exactly_one_coded_token(art, n, start, nh, nt):
    codec = KVTCCodec(art, 4, entropy="deflate")
    k, v = kv(n, seed=7)
    blob = codec.encode(k, v, start, nh, nt)
    h = blobfmt.read_header(blob)
    assert h.n_coded == 1
    dec = codec.decode(blob, expected_tokens=n, expected_start=start)
    ek, ev = predicted_kv(art, 4, k[nh : nh + 1], v[nh : nh + 1], start + nh)
    torch.testing.assert_close(dec.k[nh : nh + 1], ek, rtol=0, atol=1e-4)
    torch.testing.assert_close(dec.v[nh : nh + 1], ev, rtol=0, atol=1e-4)


@pytest.mark.parametrize("n, nh, nt", [(0, 0, 0), (4, 4, 0), (9, 4, 5), (7, 0, 7)])
@pytest.mark.parametrize("coder", CODERS)
def test_zero_coded_tokens(art, n, nh, nt, coder):
    codec = KVTCCodec(art, 16, entropy=coder)
    k, v = kv(n, seed=8, dtype=torch.float16)
    blob = codec.encode(k, v, 0, nh, nt)
    h = blobfmt.read_header(blob)
    assert h.n_coded == 0 and h.raw_size == n * 2 * P * 2
    dec = codec.decode(blob, expected_tokens=n)
    assert torch.equal(bits_of(dec.k), bits_of(k)) and torch.equal(bits_of(dec.v), bits_of(v))


def test_bad_kv_inputs_raise_shape_error(art):
    codec = KVTCCodec(art, 4)
    k, v = kv(5)
    cases = [
        ((k, v[:4]), "shape"),
        ((k, v.reshape(5, L, D, H)), "shape"),
        ((k[:, :1], v[:, :1]), "shape"),
        ((k[0], v[0]), "shape"),
        ((k, v.half()), "dtypes differ"),
        ((k.double(), v.double()), "unsupported KV dtype"),
        ((k.int(), v.int()), "unsupported KV dtype"),
    ]
    for (kk, vv), msg in cases:
        with pytest.raises(ShapeError, match=msg):
            codec.encode(kk, vv, 0)
    with pytest.raises(ShapeError, match="exact counts"):
        codec.encode(k, v, 0, 3, 3)
    with pytest.raises(ShapeError, match="exact counts"):
        codec.encode(k, v, 0, -1, 0)
    u8 = k.to(torch.float8_e4m3fn).view(torch.uint8)
    with pytest.raises(ShapeError, match="coded_view"):
        codec.encode(u8, u8, 0, 1, 1)
    blob = codec.encode(u8, u8, 0, 1, 1, coded_view=torch.float8_e4m3fn)
    with pytest.raises(ShapeError, match="fp8"):
        codec.decode(blob, out_dtype=torch.float32)


def test_fp8_blob_decoded_without_its_fp8_dtype_is_rejected(art):
    """Coded rows of an fp8 (uint8-storage) blob can only be returned in an fp8 dtype; a plain decode must not
    return float values cast to uint8 as if they were fp8 bytes."""
    codec = KVTCCodec(art, 4)
    u8 = kv(5)[0].to(torch.float8_e4m3fn).view(torch.uint8)
    blob = codec.encode(u8, u8, 0, 1, 1, coded_view=torch.float8_e4m3fn)
    with pytest.raises(ShapeError, match="fp8"):
        codec.decode(blob)
    # exact rows alone are fine as bytes
    assert torch.equal(codec.decode(blob, token_range=(0, 1)).k, u8[:1])
    dec = codec.decode(blob, out_dtype=torch.float8_e4m3fn)
    assert torch.equal(dec.k[:1].view(torch.uint8), u8[:1]) and torch.equal(dec.k[4:].view(torch.uint8), u8[4:])
