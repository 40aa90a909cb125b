"""ReferencePoolCodec (codec/pool_codec.py): pool rows in, blob out, and back into exactly the given slots."""

from __future__ import annotations

import pytest
import torch

from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.errors import BlobFormatError, ShapeError
from kvtc_sglang.codec.pool_codec import ReferencePoolCodec
from tests.codec.codec_setup import D, H, L, assert_close_rel, bits_of, predicted_kv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    pc = ReferencePoolCodec(KVTCCodec(art, 4, entropy="deflate"), kv_dtype=fp8)
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
    pc = ReferencePoolCodec(KVTCCodec(art, 4, entropy="none"))
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
