"""The reference codec on a small synthetic artifact: blob round trips reconstruct exactly what the plan's own
quantizer predicts, exact (sink/window) rows are bit-exact in every pool dtype, partial decodes equal slices of the
full decode, the pool codec writes only its slots, and every bad input raises its typed error with a clear message.

Synthetic model: L=2 layers, H=2 KV heads, D=16 (p=64 per kind), two feature blocks (one layer each) per kind with
random orthonormal float16 bases, non-trivial means and feature scales, and two plans: 4x (mixed widths, size-1 and
size-16 groups, a dropped gap) and 16x (one block of each kind with an empty plan: every coordinate dropped).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtc_sglang.codec import blob as blobfmt
from kvtc_sglang.codec.artifact import (
    CARD_NAME,
    TENSORS_NAME,
    CalibrationArtifact,
    FeatureBlock,
    RatioPlans,
    check_artifact_matches,
    load_artifact,
    read_card,
)
from kvtc_sglang.codec.codec import KVTCCodec, exact_token_counts
from kvtc_sglang.codec.entropy import (
    CODER_IDS,
    EntropyCodecUnavailable,
    NoEntropy,
    ZlibDeflate,
    get_entropy_coder,
    split_chunks,
)
from kvtc_sglang.codec.errors import BlobFormatError, CalibrationMismatchError, ShapeError
from kvtc_sglang.codec.plan import BitPlan, Group
from kvtc_sglang.codec.pool_codec import PoolCodec
from kvtc_sglang.codec.quantize import dequantize_groups, group_params, quantize_groups
from kvtc_sglang.codec.rope import RopeConfig, apply_rope, undo_rope

pytestmark = pytest.mark.usefixtures("one_torch_thread")

L, H, D = 2, 2, 16
P = L * H * D
PB = H * D  # features of one block (one layer)
CODERS = ("none", "deflate")
# relative tolerance of a decoded (coded) row against the float32 reconstruction, by output dtype
TOL = {torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float8_e4m3fn: 2.0 ** -3}

PLANS = {
    4: {
        "k": [
            [Group(0, 1, 8), Group(1, 1, 4), Group(2, 1, 2), Group(3, 1, 8), Group(16, 16, 4)],
            [Group(0, 16, 8), Group(16, 1, 2), Group(17, 1, 4), Group(18, 1, 8)],
        ],
        "v": [[Group(0, 16, 8), Group(16, 16, 2)], [Group(0, 1, 4), Group(16, 16, 8)]],
    },
    16: {"k": [[Group(0, 16, 2)], []], "v": [[Group(0, 1, 8)], [Group(0, 16, 2)]]},
}


def make_artifact(seed: int = 0, fingerprint: str = "ab" * 32) -> CalibrationArtifact:
    g = torch.Generator().manual_seed(seed)
    blocks = {}
    for kind in ("k", "v"):
        blocks[kind] = []
        for b in range(L):
            q, _ = torch.linalg.qr(torch.randn(PB, PB, generator=g, dtype=torch.float64))
            mean = torch.randn(PB, generator=g) * 0.5
            scale = 0.5 + 1.5 * torch.rand(PB, generator=g)
            blocks[kind].append(FeatureBlock(b, b + 1, b * PB, PB, mean, q.to(torch.float16), scale))
    plans = {
        ratio: RatioPlans(ratio, *(tuple(BitPlan(tuple(gs), PB, float(ratio)) for gs in per[kind]) for kind in ("k", "v")))
        for ratio, per in PLANS.items()
    }
    rope = RopeConfig(head_dim=D, rotary_dim=D, theta=10000.0, style="neox")
    model = {"name": "synthetic-l2h2d16", "fingerprint": fingerprint, "num_layers": L, "num_kv_heads": H,
             "num_kv_heads_per_rank": H, "head_dim": D, "rope": rope.to_dict()}
    return CalibrationArtifact(model=model, blocks=blocks, plans=plans)


@pytest.fixture(scope="module")
def art():
    return make_artifact()


def kv(n: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, L, H, D, generator=g) * 2 + 0.5
    v = torch.randn(n, L, H, D, generator=g)
    return k.to(dtype), v.to(dtype)


def predicted(art: CalibrationArtifact, ratio: int, kind: str, x: torch.Tensor):
    """What the plan's own quantizer predicts for features x [m, p] (keys RoPE-undone), computed independently of
    payload.py. Returns (x_hat, x_kept, bound): the reconstruction, the reconstruction from the unquantized kept
    coefficients, and the elementwise bound on |x_hat - x_kept| (per-group scale/2 + shift rounding through the basis)."""
    x_hat, x_kept, bound = (torch.empty_like(x) for _ in range(3))
    for blk, plan in zip(art.blocks[kind], art.plan(ratio).for_kind(kind)):
        xb = x[:, blk.offset : blk.offset + blk.p].float()
        r = plan.rank
        basis = blk.basis[:, :r].float()
        s = blk.scale.float()[:, None]
        d = (xb - blk.mean.float()) @ (s * basis)
        dh, kept, qb = torch.zeros_like(d), torch.zeros_like(d), torch.zeros_like(d)
        for gr in plan.groups:
            sl = slice(gr.start, gr.start + gr.size)
            sh, sc = group_params(d[:, sl], gr.bits)
            dh[:, sl] = dequantize_groups(quantize_groups(d[:, sl], sh, sc, gr.bits), sh, sc)
            kept[:, sl] = d[:, sl]
            shift_err = (sh.float() - d[:, sl].amin(-1)).clamp_min(0)
            qb[:, sl] = (sc.float() / 2 + shift_err)[:, None] + 1e-5 * d[:, sl].abs().amax(-1, keepdim=True)
        dec = (basis / s).T
        sl = slice(blk.offset, blk.offset + blk.p)
        x_hat[:, sl] = dh @ dec + blk.mean
        x_kept[:, sl] = kept @ dec + blk.mean
        bound[:, sl] = qb @ dec.abs()
    return x_hat, x_kept, bound


def predicted_kv(art, ratio, k, v, start_pos):
    """Decoded K/V [m, L, H, D] float32 that the coded rows k, v (pool layout, keys post-RoPE) should give."""
    m = k.shape[0]
    rope = RopeConfig.from_dict(art.model["rope"])
    pos = torch.arange(start_pos, start_pos + m)
    kx = undo_rope(k.float(), pos, rope).reshape(m, P)
    kh, _, _ = predicted(art, ratio, "k", kx)
    vh, _, _ = predicted(art, ratio, "v", v.float().reshape(m, P))
    return apply_rope(kh.view(m, L, H, D), pos, rope), vh.view(m, L, H, D)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, dtype):
    scale = want.float().abs().amax().clamp_min(1.0)
    err = (got.float() - want.float()).abs().amax()
    assert float(err) <= TOL[dtype] * float(scale), (float(err), TOL[dtype] * float(scale))


# --- round trips ----------------------------------------------------------------------------------------------------

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
    assert h.coder == CODER_IDS[coder] and h.raw_size == codec.raw_size(n, nh + nt, torch.float32)
    assert h.n_chunks == (-(-h.raw_size // chunk_bytes) if coder != "none" else 0)
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


def _pool(num_slots: int, dtype, seed: int, fp8=None):
    g = torch.Generator().manual_seed(seed)
    bufs = []
    for _ in range(2 * L):
        x = torch.randn(num_slots, H, D, generator=g)
        bufs.append(x.to(fp8).view(torch.uint8) if fp8 is not None else x.to(dtype))
    return bufs[:L], bufs[L:]


def _poison(bufs):
    for b in bufs:
        b.fill_(0xFF if b.dtype == torch.uint8 else float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "fp8"])
def test_pool_codec_round_trip_writes_only_the_given_slots(art, dtype):
    fp8 = torch.float8_e4m3fn if dtype == "fp8" else None
    kb, vb = _pool(64, dtype, seed=3, fp8=fp8)
    if fp8 is not None:  # exact rows are copied as bytes, whatever they hold (0x7F is NaN in e4m3fn)
        kb[0][5, 0, :4] = torch.tensor([0x7F, 0x80, 0x01, 0xFE], dtype=torch.uint8)
    slots = torch.tensor([5, 17, 3, 40, 41, 42, 9, 60, 22, 11, 0, 33], dtype=torch.int64)
    n, nh, nt = slots.numel(), 2, 3
    pc = PoolCodec(KVTCCodec(art, 4, entropy="deflate"), kv_dtype=fp8)
    blob = pc.encode_slots(kb, vb, slots, start_pos=0, n_head=nh, n_tail=nt)
    kd, vd = _pool(64, dtype, seed=4, fp8=fp8)
    _poison(kd + vd)
    dst = torch.tensor([50, 1, 2, 8, 13, 21, 34, 55, 44, 45, 46, 47], dtype=torch.int64)
    pc.decode_into(blob, kd, vd, dst, expected_tokens=n, expected_start=0)
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[dst] = False
    for src, out in ((kb, kd), (vb, vd)):
        for layer in range(L):
            assert bool((bits_of(out[layer][untouched]) == 0xFF).all() if fp8 else out[layer][untouched].isnan().all())
            exact = torch.cat([torch.arange(nh), torch.arange(n - nt, n)])
            assert torch.equal(bits_of(out[layer][dst[exact]]), bits_of(src[layer][slots[exact]]))
    # coded rows: the prediction, rounded to the pool dtype
    coded = slice(nh, n - nt)
    logical = (lambda b: b.view(fp8).float()) if fp8 else (lambda b: b.float())
    k = torch.stack([logical(b[slots[coded]]) for b in kb], 1)
    v = torch.stack([logical(b[slots[coded]]) for b in vb], 1)
    ek, ev = predicted_kv(art, 4, k, v, nh)
    gk = torch.stack([logical(b[dst[coded]]) for b in kd], 1)
    gv = torch.stack([logical(b[dst[coded]]) for b in vd], 1)
    assert_close_rel(gk, ek, fp8 or dtype)
    assert_close_rel(gv, ev, fp8 or dtype)
    # a partial decode into fewer slots writes those with the same rows, and nothing else
    first = [b.clone() for b in kd + vd]
    _poison(kd + vd)
    poisoned = [b.clone() for b in kd + vd]
    pc.decode_into(blob, kd, vd, dst[:4], token_range=(3, 7))
    for got, full, poison in zip(kd + vd, first, poisoned):
        assert torch.equal(bits_of(got[dst[:4]]), bits_of(full[dst[3:7]]))
        assert torch.equal(bits_of(got[dst[4:]]), bits_of(poison[dst[4:]]))


def test_pool_codec_rejects_bad_pools_and_bad_blobs_before_writing(art):
    kb, vb = _pool(16, torch.float32, seed=1)
    slots = torch.arange(6)
    pc = PoolCodec(KVTCCodec(art, 4, entropy="none"))
    blob = pc.encode_slots(kb, vb, slots, 0, 1, 1)
    kd, vd = _pool(16, torch.float32, seed=2)
    before = [b.clone() for b in kd + vd]
    bad = blob.clone()
    bad[-1] ^= 1
    with pytest.raises(BlobFormatError, match="CRC"):
        pc.decode_into(bad, kd, vd, slots)
    with pytest.raises(ShapeError, match="slots"):
        pc.decode_into(blob, kd, vd, slots[:5])
    with pytest.raises(BlobFormatError, match="tokens"):
        pc.decode_into(blob, kd, vd, slots, expected_tokens=7)
    assert all(torch.equal(a, b) for a, b in zip(before, kd + vd))
    with pytest.raises(ShapeError, match="layers"):
        pc.encode_slots(kb[:1], vb, slots, 0, 1, 1)
    with pytest.raises(ShapeError, match="rows"):
        pc.encode_slots([b[:, :1] for b in kb], [b[:, :1] for b in vb], slots, 0, 1, 1)
    with pytest.raises(ShapeError, match="int64"):
        pc.encode_slots(kb, vb, slots.int(), 0, 1, 1)
    u8 = [b.to(torch.float8_e4m3fn).view(torch.uint8) for b in kb]
    with pytest.raises(ShapeError, match="kv_dtype"):
        pc.encode_slots(u8, u8, slots, 0, 1, 1)


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


def test_exact_token_counts():
    assert exact_token_counts(0, 1000, 4, 128, True) == (4, 128)
    assert exact_token_counts(0, 1000, 4, 128, False) == (4, 0)
    assert exact_token_counts(2, 1000, 4, 128, False) == (2, 0)
    assert exact_token_counts(10, 1000, 4, 128, True) == (0, 128)
    assert exact_token_counts(0, 3, 4, 128, True) == (3, 0)
    assert exact_token_counts(0, 50, 4, 128, True) == (4, 46)


# --- entropy stage --------------------------------------------------------------------------------------------------

def test_entropy_coders_available_on_cpu():
    assert isinstance(get_entropy_coder("none"), NoEntropy)
    assert isinstance(get_entropy_coder("deflate"), ZlibDeflate)
    assert isinstance(get_entropy_coder("auto", "cpu"), ZlibDeflate)
    for gpu_only in ("gdeflate", "ans"):
        with pytest.raises(EntropyCodecUnavailable, match="nvCOMP"):
            get_entropy_coder(gpu_only, "cpu")
    with pytest.raises(ValueError, match="unknown entropy coder"):
        get_entropy_coder("zstd")


def test_deflate_chunks_round_trip_and_reject_bad_sizes():
    data = torch.randint(0, 4, (10000,), dtype=torch.uint8)
    chunks = split_chunks(data, 3000)
    assert [c.numel() for c in chunks] == [3000, 3000, 3000, 1000]
    z = ZlibDeflate()
    comp = z.compress(chunks)
    assert all(c.numel() < r.numel() for c, r in zip(comp, chunks))
    assert torch.equal(torch.cat(z.decompress(comp, [3000, 3000, 3000, 1000])), data)
    with pytest.raises(BlobFormatError):
        z.decompress(comp[:1], [2999])
    with pytest.raises(BlobFormatError):
        z.decompress(comp[:1], [3001])
    with pytest.raises(BlobFormatError, match="corrupt DEFLATE"):
        z.decompress([torch.full((50,), 0xFF, dtype=torch.uint8)], [3000])


def test_incompressible_chunks_are_stored_raw_and_compressible_ones_deflated(art):
    codec = KVTCCodec(art, 16, entropy="deflate", chunk_bytes=256)
    n = 8
    g = torch.Generator().manual_seed(9)
    noise = torch.randint(0, 256, (n, L, H, D, 4), dtype=torch.uint8, generator=g).view(torch.float32).squeeze(-1)
    zeros = torch.zeros(n, L, H, D)
    blob = codec.encode(torch.cat([noise, zeros]), torch.cat([noise, zeros]), 0, n, n)  # all exact: noise then zeros
    h = blobfmt.read_header(blob)
    table = blobfmt.chunk_table(blob, h)
    raw_flags = [raw for _, _, raw in table]
    assert any(raw_flags) and not all(raw_flags)
    assert all(size == 256 for _, size, raw in table if raw)
    dec = codec.decode(blob)
    assert torch.equal(bits_of(dec.k[:n]), bits_of(noise)) and torch.equal(dec.v[n:], zeros)


def test_blob_inside_a_larger_buffer_decodes_the_same(art):
    """A store may keep blobs back to back in one byte arena: a blob view at an odd offset decodes identically."""
    codec = KVTCCodec(art, 4, entropy="none")
    for n, nh, nt in ((1, 0, 0), (7, 2, 1)):
        k, v = kv(n, seed=14, dtype=torch.float16)
        blob = codec.encode(k, v, 5, nh, nt)
        arena = torch.zeros(blob.numel() + 10, dtype=torch.uint8)
        arena[7 : 7 + blob.numel()] = blob
        a, b = codec.decode(blob), codec.decode(arena[7 : 7 + blob.numel()])
        assert torch.equal(bits_of(a.k), bits_of(b.k)) and torch.equal(bits_of(a.v), bits_of(b.v))


def test_blob_of_none_coder_is_header_and_raw_payload(art):
    """Layout documented in blob.py: an 88-byte header, no chunk table, then the raw payload, which is the exact
    rows [K row | V row] per token followed by the K and V sections; the header's CRC-32 is zlib's over the blob
    with the field zeroed."""
    codec = KVTCCodec(art, 4, entropy="none", chunk_bytes=1000)
    n, nh, nt = 9, 2, 1
    k, v = kv(n, seed=10)
    blob = codec.encode(k, v, 0, nh, nt, token_ids=list(range(100, 109)))
    h = blobfmt.read_header(blob)
    assert bytes(blob[:4].tolist()) == b"KVTC" and struct.unpack("<H", bytes(blob[4:6].tolist()))[0] == 2
    assert blobfmt.HEADER.size == 88 and h.data_offset == 88 and h.n_chunks == 0
    assert h.tokens_bound and h.token_hash == blobfmt.token_hash(list(range(100, 109)))
    raw = bytearray(blob.numpy().tobytes())
    raw[blobfmt.CRC_OFFSET : blobfmt.CRC_OFFSET + 4] = b"\0\0\0\0"
    assert h.crc32 == zlib.crc32(bytes(raw))
    payload = blob[h.data_offset :]
    assert payload.numel() == h.raw_size == blob.numel() - h.data_offset
    ex = torch.cat([torch.stack([k[:nh], v[:nh]], 1), torch.stack([k[n - nt :], v[n - nt :]], 1)])
    ex_bytes = ex.numel() * 4
    assert torch.equal(payload[:ex_bytes], ex.contiguous().view(torch.uint8).flatten())
    kbytes = codec.kinds["k"].section_bytes(n - nh - nt)
    assert payload.numel() - ex_bytes == kbytes + codec.kinds["v"].section_bytes(n - nh - nt)
    assert codec.coded_bytes_per_token() == sum(pl.layout.bytes_per_token for pl in art.plan(4).k + art.plan(4).v)


def test_token_binding_and_start_position_are_checked(art):
    codec = KVTCCodec(art, 4, entropy="none")
    k, v = kv(6, seed=3)
    ids = [5, 9, 11, 2, 2, 7]
    blob = codec.encode(k, v, 12, 1, 1, token_ids=ids)
    codec.decode(blob, expected_start=12, expected_token_ids=ids)
    for other in ([5, 9, 11, 2, 2, 8], ids[::-1], ids[:5]):
        with pytest.raises(BlobFormatError, match="other token ids"):
            codec.decode(blob, expected_token_ids=other)
    with pytest.raises(BlobFormatError, match="position 12, caller expects 13"):
        codec.decode(blob, expected_start=13, expected_token_ids=ids)
    unbound = codec.encode(k, v, 12, 1, 1)
    with pytest.raises(BlobFormatError, match="not bound"):
        codec.decode(unbound, expected_token_ids=ids)
    with pytest.raises(ShapeError, match="token ids"):
        codec.encode(k, v, 12, 1, 1, token_ids=ids[:4])


def test_version_1_blobs_are_refused_with_a_clear_error(art):
    codec = KVTCCodec(art, 4, entropy="none")
    blob = codec.encode(*kv(4), 0, 1, 1)
    v1 = blob.clone()
    v1[4:6] = torch.tensor([1, 0], dtype=torch.uint8)
    with pytest.raises(BlobFormatError, match="version 1 .* no longer read.*re-encode"):
        codec.decode(v1)
    with pytest.raises(BlobFormatError, match="version 1"):
        blobfmt.BlobHeader.unpack(v1[:80].numpy().tobytes())  # a v1 header is 80 bytes: refused by its version


def test_framing_an_uncoded_payload_makes_no_per_chunk_work(art, monkeypatch):
    """coder none: one copy of the payload, no chunk split, no concatenation, no entropy calls."""
    codec = KVTCCodec(art, 4, entropy="none", chunk_bytes=64)
    k, v = kv(40, seed=2)
    calls = []
    monkeypatch.setattr(torch, "cat", lambda *a, **kw: (calls.append("cat"), _CAT(*a, **kw))[1])
    monkeypatch.setattr("kvtc_sglang.codec.codec.split_chunks", lambda *a: calls.append("split"))
    payload = _CAT([torch.zeros(0, dtype=torch.uint8)])  # warm
    blob = codec.frame(torch.arange(5000).to(torch.uint8), torch.float32, 10, 0, 10, 0)
    assert calls == [] and blob.numel() == 88 + 5000
    h = codec.read_header.__self__ and blobfmt.read_header(blob)
    assert torch.equal(codec.payload(blob, h), torch.arange(5000).to(torch.uint8))
    assert codec.payload(blob, h).data_ptr() == blob.data_ptr() + 88  # a view, not a copy
    del payload


_CAT = torch.cat


# --- bad blobs ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_blob(art):
    codec = KVTCCodec(art, 4, entropy="deflate", chunk_bytes=300)
    k, v = kv(10, seed=11)
    return codec, codec.encode(k, v, 0, 2, 3)


def test_truncated_blob_raises_blob_format_error(small_blob):
    codec, blob = small_blob
    for cut in (0, 3, 40, 87, 88, 89, blob.numel() - 1):
        with pytest.raises(BlobFormatError, match="bytes|header"):
            codec.decode(blob[:cut].clone())
    with pytest.raises(BlobFormatError, match="bytes"):
        codec.decode(torch.cat([blob, torch.zeros(1, dtype=torch.uint8)]))


def test_every_flipped_byte_is_detected(small_blob):
    codec, blob = small_blob
    h = blobfmt.read_header(blob)
    for i in range(blob.numel()):
        bad = blob.clone()
        bad[i] ^= 0x10
        with pytest.raises(BlobFormatError) as exc:
            codec.decode(bad)
        if i >= blobfmt.HEADER.size:  # table and data: only the CRC can tell
            assert "CRC" in str(exc.value), (i, str(exc.value))
    assert h.data_offset < blob.numel()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=6))
def test_random_corruptions_raise_blob_format_error(small_blob, edits):
    codec, blob = small_blob
    bad = blob.clone()
    for pos, xor in edits:
        bad[pos % bad.numel()] ^= xor
    if torch.equal(bad, blob):
        return
    with pytest.raises(BlobFormatError):
        codec.decode(bad)


def test_not_a_blob_raises(small_blob):
    codec, blob = small_blob
    bad = blob.clone()
    bad[:4] = torch.tensor(list(b"KVTX"), dtype=torch.uint8)
    with pytest.raises(BlobFormatError, match="not a KVTC blob"):
        codec.decode(bad)
    with pytest.raises(BlobFormatError, match="1-D uint8"):
        codec.decode(blob.view(torch.int8))
    with pytest.raises(BlobFormatError, match="1-D uint8"):
        codec.decode(blob[:88].view(2, 44))


def _rebuild(blob: torch.Tensor, payload: torch.Tensor | None = None, **header_changes) -> torch.Tensor:
    """A blob with a changed header and/or raw payload and a VALID CRC (uncoded)."""
    h = blobfmt.read_header(blob)
    assert h.coder == 0, "rebuild needs a blob of the 'none' coder"
    if payload is None:
        payload = blob[h.data_offset :]
    h = replace(h, **header_changes)
    if h.version != blobfmt.FORMAT_VERSION:  # frame() writes the current version: patch it in afterwards
        out = blobfmt.frame(replace(h, version=blobfmt.FORMAT_VERSION), payload)
        out[4:6] = torch.tensor(list(struct.pack("<H", h.version)), dtype=torch.uint8)
        return out
    return blobfmt.frame(h, payload)


def test_wrong_version_raises(art):
    codec = KVTCCodec(art, 4, entropy="none")
    blob = codec.encode(*kv(6), 0, 1, 1)
    with pytest.raises(BlobFormatError, match="version 3"):
        codec.decode(_rebuild(blob, version=3))


def test_blob_from_another_artifact_raises(art):
    other = make_artifact(seed=1)
    assert other.fingerprint16 != art.fingerprint16
    blob = KVTCCodec(other, 4).encode(*kv(6), 0, 1, 1)
    with pytest.raises(BlobFormatError, match="another calibration artifact"):
        KVTCCodec(art, 4).decode(blob)


def test_wrong_ratio_and_caller_expectations_raise(art, small_blob):
    codec, blob = small_blob
    with pytest.raises(BlobFormatError, match="4x plan.*16x plan"):
        KVTCCodec(art, 16).decode(blob)
    with pytest.raises(BlobFormatError, match="holds 10 tokens, caller expects 11"):
        codec.decode(blob, expected_tokens=11)
    with pytest.raises(BlobFormatError, match="starts at position 0, caller expects 4"):
        codec.decode(blob, expected_start=4)
    codec.decode(blob, expected_tokens=10, expected_start=0)


def test_crafted_blobs_with_valid_checksums_are_rejected(art):
    codec = KVTCCodec(art, 4, entropy="none", chunk_bytes=128)
    n, nh = 8, 2
    k, v = kv(n, seed=12)
    blob = codec.encode(k, v, 0, nh, 0)
    h = blobfmt.read_header(blob)
    payload = blob[h.data_offset :].clone()
    with pytest.raises(BlobFormatError, match="exceed the run"):
        codec.decode(_rebuild(blob, n_head=6, n_tail=6))
    with pytest.raises(BlobFormatError, match="payload is"):
        codec.decode(_rebuild(blob, n_tokens=n + 1))
    with pytest.raises(BlobFormatError, match="exact dtype"):
        codec.decode(_rebuild(blob, exact_dtype=9))
    with pytest.raises(BlobFormatError, match="payload is"):
        codec.decode(_rebuild(blob, exact_dtype=blobfmt.EXACT_DTYPES[torch.float16]))
    with pytest.raises(BlobFormatError, match="entropy coder id"):
        # a chunk flagged compressed with an unknown coder id
        hh = replace(h, coder=7, chunk_bytes=128)
        chunks = split_chunks(payload, 128)
        codec.decode(blobfmt.assemble(hh, chunks, [False] + [True] * (len(chunks) - 1)))
    with pytest.raises(BlobFormatError, match="corrupt DEFLATE|DEFLATE"):
        hh = replace(h, coder=CODER_IDS["deflate"], chunk_bytes=128)
        chunks = split_chunks(payload, 128)
        codec.decode(blobfmt.assemble(hh, chunks, [False] + [True] * (len(chunks) - 1)))
    # non-finite quantization parameters: the first K param (fp16 shift of group 0, token 0) set to inf / nan.
    # K section is byte-plane major per block: byte j of every coded token, then byte j+1 ...
    ex_bytes = nh * 2 * P * 4
    m = n - nh
    for hi_byte in (0x7C, 0x7E):  # +inf, nan
        bad = payload.clone()
        bad[ex_bytes + 0 * m] = 0x00
        bad[ex_bytes + 1 * m] = hi_byte
        with pytest.raises(BlobFormatError, match="non-finite"):
            codec.decode(_rebuild(blob, bad))
    codec.decode(_rebuild(blob, payload))  # the untouched rebuild is fine


def test_chunk_table_inconsistent_with_data_raises(art):
    codec = KVTCCodec(art, 16, entropy="none", chunk_bytes=100)
    blob = codec.encode(*kv(3), 0, 3, 0)
    h = blobfmt.read_header(blob)
    payload = blob[h.data_offset :]
    hh = replace(h, coder=CODER_IDS["deflate"], chunk_bytes=100)
    chunks = split_chunks(payload, 100)
    chunks = [chunks[0][:-1], torch.cat([chunks[0][-1:], chunks[1]])] + chunks[2:]  # sizes 99, 101, ...
    bad = blobfmt.assemble(hh, chunks, [True] * len(chunks))  # a valid CRC over an inconsistent table
    with pytest.raises(BlobFormatError, match="stored chunk 0 has 99 bytes"):
        codec.decode(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e6])
def test_non_finite_or_out_of_fp16_coded_values_never_decode_silently(art, value):
    """The encoder does not validate coded rows; a value the fp16 group parameters cannot hold (non-finite, or a
    size-1 group beyond fp16 range) must make the decoder reject the blob rather than return garbage."""
    codec = KVTCCodec(art, 4, entropy="none")
    k, v = kv(5, seed=13)
    v[2].fill_(value)
    blob = codec.encode(k, v, 0, 1, 1)
    with pytest.raises(BlobFormatError, match="non-finite"):
        codec.decode(blob)


# --- bad K/V inputs -------------------------------------------------------------------------------------------------

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


# --- artifacts ------------------------------------------------------------------------------------------------------

def test_artifact_save_load_round_trip(art, tmp_path):
    card_file = art.save(tmp_path)
    assert card_file == tmp_path / CARD_NAME and (tmp_path / TENSORS_NAME).is_file()
    back = load_artifact(tmp_path)
    assert back.artifact_id() == art.artifact_id() and back.fingerprint16 == art.fingerprint16
    assert back.p == art.p == P and back.model == art.model
    for kind in ("k", "v"):
        for a, b in zip(art.blocks[kind], back.blocks[kind]):
            assert (a.layer_start, a.layer_end, a.offset, a.p) == (b.layer_start, b.layer_end, b.offset, b.p)
            assert torch.equal(a.basis, b.basis) and torch.equal(a.mean, b.mean) and torch.equal(a.scale, b.scale)
    for r in art.plans:
        for kind in ("k", "v"):
            got, want = back.plan(r).for_kind(kind), art.plan(r).for_kind(kind)
            assert [(pl.groups, pl.p, pl.target_ratio) for pl in got] == [(pl.groups, pl.p, pl.target_ratio) for pl in want]
    # a blob made with the saved artifact decodes with the loaded one, identically
    k, v = kv(9)
    blob = KVTCCodec(art, 4).encode(k, v, 0, 1, 2)
    a, b = KVTCCodec(art, 4).decode(blob), KVTCCodec(back, 4).decode(blob)
    assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    card = json.loads(card_file.read_text())
    assert card["tensors"]["file"] == TENSORS_NAME and card["tensors"]["bytes"] == (tmp_path / TENSORS_NAME).stat().st_size
    # both files are plain files readable like any other the user writes (a server may run as another user)
    assert (tmp_path / TENSORS_NAME).stat().st_mode & 0o777 == card_file.stat().st_mode & 0o777
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_tensors_raise_calibration_mismatch(art, tmp_path):
    art.save(tmp_path)
    (tmp_path / TENSORS_NAME).unlink()
    with pytest.raises(CalibrationMismatchError, match="missing.*kvtc-sglang calibrate"):
        load_artifact(tmp_path)


def test_stale_tensors_raise_calibration_mismatch(art, tmp_path):
    art.save(tmp_path)
    t = torch.load(tmp_path / TENSORS_NAME)
    t["k.0.mean"] = t["k.0.mean"] + 1
    torch.save(t, tmp_path / TENSORS_NAME)
    with pytest.raises(CalibrationMismatchError, match="sha256"):
        load_artifact(tmp_path)


@pytest.mark.parametrize("version", [0, 2, None])
def test_card_format_version_mismatch_raises(art, tmp_path, version):
    card_file = art.save(tmp_path)
    card = json.loads(card_file.read_text())
    card["format_version"] = version
    card_file.write_text(json.dumps(card))
    with pytest.raises(CalibrationMismatchError, match="format version"):
        load_artifact(tmp_path)


def test_missing_or_unreadable_card_raises(tmp_path):
    with pytest.raises(CalibrationMismatchError, match="no calibration card"):
        read_card(tmp_path)
    (tmp_path / CARD_NAME).write_text("{not json")
    with pytest.raises(CalibrationMismatchError, match="unreadable"):
        read_card(tmp_path)


def test_card_plan_needing_more_rank_than_the_basis_raises(art, tmp_path):
    card_file = art.save(tmp_path)
    card = json.loads(card_file.read_text())
    card["kinds"]["v"]["blocks"][1]["rank"] = 16
    t = torch.load(tmp_path / TENSORS_NAME)
    t["v.1.basis"] = t["v.1.basis"][:, :16].contiguous()
    torch.save(t, tmp_path / TENSORS_NAME)
    card["tensors"]["sha256"] = None
    card_file.write_text(json.dumps(card))
    with pytest.raises(CalibrationMismatchError, match="needs rank 32"):
        load_artifact(tmp_path)


def test_missing_ratio_raises(art):
    with pytest.raises(CalibrationMismatchError, match=r"no plan for ratio 8; available: \[4, 16\]"):
        KVTCCodec(art, 8)


def test_check_artifact_matches_names_every_difference(art):
    fp = art.model["fingerprint"]
    check_artifact_matches(art, num_layers=L, num_kv_heads=H, head_dim=D, fingerprint=fp)
    with pytest.raises(CalibrationMismatchError) as exc:
        check_artifact_matches(art, num_layers=30, num_kv_heads=3, head_dim=64, fingerprint="cd" * 32, tp_size=2, tp_rank=1)
    msg = str(exc.value)
    for name in ("num_layers: model 30, calibration 2", "num_kv_heads", "head_dim", "tp_size", "tp_rank", "fingerprint",
                 "kvtc-sglang calibrate"):
        assert name in msg, msg
    with pytest.raises(CalibrationMismatchError, match="head_dim: model 8"):
        check_artifact_matches(art, num_layers=L, num_kv_heads=H, head_dim=8)


def test_tp_rank_artifact_counts_its_own_heads(art):
    tp = CalibrationArtifact(model={**{k: v for k, v in art.model.items() if k != "num_kv_heads_per_rank"}, "num_kv_heads": 4},
                             blocks=art.blocks, plans=art.plans, tp_size=2, tp_rank=1)
    assert tp.num_kv_heads == 2 and tp.p == P
    check_artifact_matches(tp, num_layers=L, num_kv_heads=2, head_dim=D, tp_size=2, tp_rank=1)
    assert tp.artifact_id() != art.artifact_id()
