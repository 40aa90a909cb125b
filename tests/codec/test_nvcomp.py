"""nvCOMP entropy stage: raw DEFLATE interchange with CPU zlib, GDeflate/ANS round trips, blobs across devices.

The `gpu` tests need CUDA and nvCOMP (`from nvidia import nvcomp`) and are skipped otherwise. One CPU
test drives NvcompCoder's batching code (chunk views, output carving, alignment staging, the sync-free
decode config and its fallback) through a stand-in for the nvcomp module built on zlib.
"""

from __future__ import annotations

import random
import types
import zlib

import pytest
import torch

from kvtc_sglang.codec import nvcomp_coder
from kvtc_sglang.codec.blob import chunk_table
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.entropy import EntropyCoderId, ZlibDeflate, split_chunks
from kvtc_sglang.codec.nvcomp_coder import NvcompCoder, nvcomp_available
from kvtc_sglang.testing.synthetic import dp_like_plan, synthetic_artifact, synthetic_kv

needs_nvcomp = pytest.mark.skipif(not nvcomp_available(), reason="needs CUDA and nvCOMP")


def _artifact(device):
    L, H, D = 4, 2, 64
    pb = L * H * D
    return synthetic_artifact(L, H, D, {1: [(dp_like_plan(pb, 256, 1), dp_like_plan(pb, 192, 1))]}, seed=3, device=device)


def _payloads(device) -> list[torch.Tensor]:
    """A real codec payload (exact rows + packed sections), plus zeros, random bytes and text."""
    art = _artifact(device)
    k, v = synthetic_kv(art, 600, 10, dtype=torch.bfloat16, device=device, seed=random.randrange(1 << 30))
    codec = KVTCCodec(art, 1, device, entropy="none")
    blob = codec.encode(k, v, 10, 4, 32)
    real = codec.payload(blob, codec.read_header(blob))
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    text = torch.frombuffer(bytearray(b"the quick brown fox jumps over the lazy dog. " * 3000), dtype=torch.uint8)
    return [real, torch.zeros(100_000, dtype=torch.uint8, device=device),
            torch.randint(0, 256, (70_001,), generator=g, dtype=torch.uint8).to(device), text.to(device)]


def _zlib_raw(data: bytes, level: int, strategy: int) -> bytes:
    co = zlib.compressobj(level, zlib.DEFLATED, -15, 9, strategy)
    return co.compress(data) + co.flush()


def _inflate(data: bytes, n: int) -> bytes:
    do = zlib.decompressobj(-15)
    out = do.decompress(data, n)
    assert do.eof and not do.unconsumed_tail and not do.unused_data
    return out


@pytest.mark.parametrize("level,strategy", [(1, zlib.Z_DEFAULT_STRATEGY), (6, zlib.Z_DEFAULT_STRATEGY),
                                            (9, zlib.Z_FILTERED), (6, zlib.Z_HUFFMAN_ONLY), (6, zlib.Z_RLE),
                                            (0, zlib.Z_DEFAULT_STRATEGY)])
@pytest.mark.gpu
@needs_nvcomp
def test_zlib_raw_deflate_inflates_on_nvcomp(level, strategy):
    coder = NvcompCoder("deflate", check_sizes=True)
    for payload in _payloads("cuda"):
        chunks = split_chunks(payload, 1 << 16)
        comp = [torch.frombuffer(bytearray(_zlib_raw(c.cpu().numpy().tobytes(), level, strategy)), dtype=torch.uint8)
                .to("cuda") for c in chunks]
        out = coder.decompress(comp, [c.numel() for c in chunks])
        assert torch.equal(torch.cat(out), payload)


@pytest.mark.gpu
@needs_nvcomp
@pytest.mark.parametrize("algorithm_type", [None, 0, 5])
def test_nvcomp_raw_deflate_inflates_with_zlib(algorithm_type):
    coder = NvcompCoder("deflate", algorithm_type=algorithm_type)
    for payload in _payloads("cuda"):
        chunks = split_chunks(payload, 1 << 16)
        comp = coder.compress(chunks)
        assert all(c.device.type == "cuda" and c.dtype == torch.uint8 for c in comp)
        for raw, z in zip(chunks, comp):
            assert _inflate(z.cpu().numpy().tobytes(), raw.numel()) == raw.cpu().numpy().tobytes()
        got = ZlibDeflate().decompress([z.cpu() for z in comp], [c.numel() for c in chunks])
        assert torch.equal(torch.cat(got), payload.cpu())


@pytest.mark.gpu
@needs_nvcomp
@pytest.mark.parametrize("name", ["deflate", "gdeflate", "ans"])
def test_nvcomp_round_trip(name):
    coder = NvcompCoder(name, check_sizes=True)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # a non-default stream: codecs bind to the current stream
        for payload in _payloads("cuda"):
            chunks = split_chunks(payload, 1 << 16)
            comp = coder.compress(chunks)
            # compressed chunks at unaligned offsets of one buffer, as inside a blob
            packed = torch.cat([torch.zeros(3, dtype=torch.uint8, device="cuda"), *comp])
            views, off = [], 3
            for c in comp:
                views.append(packed[off : off + c.numel()])
                off += c.numel()
            out = coder.decompress(views, [c.numel() for c in chunks])
            assert torch.equal(torch.cat(out), payload)
    stream.synchronize()


@pytest.mark.gpu
@needs_nvcomp
def test_blob_made_with_nvcomp_decodes_on_cpu_with_zlib_and_back():
    art = _artifact("cuda")
    k, v = synthetic_kv(art, 500, 7, dtype=torch.bfloat16, device="cuda", seed=random.randrange(1 << 30))
    gpu = KVTCCodec(art, 1, "cuda", entropy=NvcompCoder("deflate"))
    cpu = KVTCCodec(art, 1, "cpu", entropy="deflate")
    assert gpu.coder.name == "deflate" and isinstance(gpu.coder, NvcompCoder)
    blob_g = gpu.encode(k, v, 7, 4, 64)
    h = gpu.read_header(blob_g)
    assert h.coder == EntropyCoderId.of("deflate")
    assert any(not raw for _, _, raw in chunk_table(blob_g, h))  # the entropy stage compressed something
    blob_c = cpu.encode(k.cpu(), v.cpu(), 7, 4, 64)
    pay_g = gpu.payload(blob_g, h)
    assert torch.equal(cpu.payload(blob_g.cpu(), cpu.read_header(blob_g.cpu())), pay_g.cpu())
    pay_c = cpu.payload(blob_c, cpu.read_header(blob_c))
    assert torch.equal(gpu.payload(blob_c.cuda(), gpu.read_header(blob_c.cuda())).cpu(), pay_c)
    dec_c = cpu.decode(blob_g.cpu())
    dec_g = gpu.decode(blob_g)
    torch.testing.assert_close(dec_c.k.float(), dec_g.k.float().cpu(), rtol=2.0**-7, atol=1e-2)
    torch.testing.assert_close(dec_c.v.float(), dec_g.v.float().cpu(), rtol=2.0**-7, atol=1e-2)


# ----------------------------------------------------------------------------------------------- batching glue
class _FakeArray:
    def __init__(self, t: torch.Tensor):
        self.t = t

    def __dlpack__(self, stream=None, **kw):
        return self.t.__dlpack__()

    def __dlpack_device__(self):
        return self.t.__dlpack_device__()


class _FakeBatch:
    def __init__(self, tensors):
        self.items = [_FakeArray(t) for t in tensors]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    @property
    def buffer_sizes(self):
        return [a.t.numel() for a in self.items]


class _FakeCodec:
    """Raw DEFLATE through zlib with nvCOMP's batch calling convention; records what it was given."""

    calls: list = []

    def __init__(self, **kw):
        assert kw["bitstream_kind"] == "RAW" and kw["algorithm"] == "Deflate"
        self.kw = kw

    def encode(self, batch):
        return _FakeBatch([torch.frombuffer(bytearray(_zlib_raw(a.t.numpy().tobytes(), 6, 0)), dtype=torch.uint8)
                           for a in batch.items])

    def compression_config(self, sizes):
        return list(sizes)

    def decompression_config(self, cfg):
        if _FakeCodec.reject_config:
            raise RuntimeError("no sync-free config in this build")
        return cfg

    def get_required_decompression_alignment(self):
        return 8

    def decode(self, batch, out=None, decompression_config=None):
        _FakeCodec.calls.append(decompression_config is not None)
        for src, dst in zip(batch.items, out.items):
            assert src.t.data_ptr() % 8 == 0 and dst.t.data_ptr() % 8 == 0
            data = _inflate(src.t.numpy().tobytes(), dst.t.numel())
            dst.t.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return out


@pytest.mark.parametrize("reject_config", [False, True])
def test_batching_glue_with_a_stand_in_nvcomp(monkeypatch, reject_config):
    fake = types.SimpleNamespace(Codec=_FakeCodec, BitstreamKind=types.SimpleNamespace(RAW="RAW"),
                                 as_arrays=lambda ts, cuda_stream=None: _FakeBatch(ts))
    _FakeCodec.reject_config, _FakeCodec.calls = reject_config, []
    monkeypatch.setattr(nvcomp_coder, "_nvcomp", lambda: fake)
    monkeypatch.setattr(nvcomp_coder, "nvcomp_available", lambda: True)
    monkeypatch.setattr(NvcompCoder, "_current_stream_handle", lambda self: 7)
    coder = NvcompCoder("deflate", device="cpu")
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    payload = torch.cat([torch.zeros(50_000, dtype=torch.uint8), torch.randint(0, 4, (150_001,), generator=g, dtype=torch.uint8)])
    chunks = split_chunks(payload, 1 << 16)
    comp = coder.compress(chunks)
    assert [_inflate(c.numpy().tobytes(), r.numel()) for c, r in zip(comp, chunks)] == \
        [r.numpy().tobytes() for r in chunks]
    blob_area = torch.cat([torch.zeros(5, dtype=torch.uint8), *comp])  # unaligned chunk starts
    views, off = [], 5
    for c in comp:
        views.append(blob_area[off : off + c.numel()])
        off += c.numel()
    for _ in range(2):
        out = coder.decompress(views, [c.numel() for c in chunks])
        assert torch.equal(torch.cat(out), payload)
    assert _FakeCodec.calls == ([False, False] if reject_config else [True, True])
