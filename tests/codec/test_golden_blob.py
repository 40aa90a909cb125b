"""The frozen golden blob (tests/data/golden/, made by its make_golden.py): today's encoder must write exactly those
bytes and today's decoders must read them back, so an encoder and a decoder that drift together still fail here.

A deliberate format change bumps blob.FORMAT_VERSION (or CARD_FORMAT_VERSION); the first test then fails until the
fixture is regenerated with ``python tests/data/golden/make_golden.py``. The Triton kernels decode the same blob in
tests/codec/test_triton_kernels.py (``test_golden_blob_decodes_with_the_kernels``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from kvtc_sglang.codec import blob as blobfmt
from kvtc_sglang.codec.artifact import CARD_FORMAT_VERSION, load_artifact
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.errors import BlobFormatError
from kvtc_sglang.codec.pool_codec import ReferencePoolCodec

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
MANIFEST = json.loads((GOLDEN / "golden.json").read_text())
REGENERATE = "regenerate it with `python tests/data/golden/make_golden.py` (see its docstring)"


def _blob(name: str = "blob.bin") -> torch.Tensor:
    return torch.frombuffer(bytearray((GOLDEN / name).read_bytes()), dtype=torch.uint8)


@pytest.fixture(scope="module")
def golden():
    art = load_artifact(GOLDEN)
    kv = torch.load(GOLDEN / "kv.pt", weights_only=True)
    expected = torch.load(GOLDEN / "expected.pt", weights_only=True)
    codec = KVTCCodec(art, MANIFEST["ratio"], "cpu", entropy=MANIFEST["entropy"], chunk_bytes=MANIFEST["chunk_bytes"])
    return codec, kv, expected


def test_the_fixture_is_of_this_builds_formats():
    assert (MANIFEST["blob_format_version"], MANIFEST["card_format_version"]) == (
        blobfmt.FORMAT_VERSION, CARD_FORMAT_VERSION), f"the blob or card format changed: {REGENERATE}"
    for name, digest in MANIFEST["sha256"].items():
        assert hashlib.sha256((GOLDEN / name).read_bytes()).hexdigest() == digest, f"{name} was edited: {REGENERATE}"


def test_encoding_the_golden_input_writes_the_golden_bytes(golden):
    codec, kv, _ = golden
    m = MANIFEST
    blob = codec.encode(kv["k"], kv["v"], m["start_pos"], m["n_head"], m["n_tail"])
    assert blob.numel() == _blob().numel() and torch.equal(blob, _blob()), f"the encoder's bytes changed: {REGENERATE}"


def test_the_pool_codec_writes_the_golden_bytes_from_pool_rows(golden):
    codec, kv, _ = golden
    m = MANIFEST
    n = m["n_tokens"]
    slots = torch.randperm(64)[:n]
    k_buf = [torch.zeros(64, *kv["k"].shape[2:], dtype=torch.bfloat16) for _ in range(kv["k"].shape[1])]
    v_buf = [torch.zeros_like(b) for b in k_buf]
    for layer, (kb, vb) in enumerate(zip(k_buf, v_buf)):
        kb[slots], vb[slots] = kv["k"][:, layer], kv["v"][:, layer]
    pool_codec = ReferencePoolCodec(codec)
    assert torch.equal(pool_codec.encode_slots(k_buf, v_buf, slots, m["start_pos"], m["n_head"], m["n_tail"]), _blob())


@pytest.mark.parametrize("name", ["blob.bin", "blob_deflate.bin"])
def test_decoding_the_golden_blob_gives_the_golden_rows(golden, name):
    codec, kv, expected = golden
    m = MANIFEST
    dec = codec.decode(_blob(name), expected_tokens=m["n_tokens"], expected_start=m["start_pos"])
    assert dec.k.dtype == torch.bfloat16 and tuple(dec.k.shape) == tuple(expected["k"].shape)
    # one bf16 rounding step of slack for float differences between machines; a decoder bug moves rows by far more
    torch.testing.assert_close(dec.k, expected["k"], rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(dec.v, expected["v"], rtol=2 ** -7, atol=1e-3)
    # exact sink and window rows come back bit-identical to the encoder's input
    n, nh, nt = m["n_tokens"], m["n_head"], m["n_tail"]
    for part in (slice(0, nh), slice(n - nt, n)):
        assert torch.equal(dec.k[part], kv["k"][part]) and torch.equal(dec.v[part], kv["v"][part])
    # and the coded rows are near the input (the plan drops coordinates, so not equal)
    assert (dec.v.float() - kv["v"].float()).abs().mean() < 0.25 * kv["v"].float().abs().mean()


def test_a_token_range_of_the_golden_blob_decodes_to_its_slice(golden):
    codec, _, expected = golden
    dec = codec.decode(_blob(), token_range=(1, 22))
    torch.testing.assert_close(dec.k, expected["k"][1:22], rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(dec.v, expected["v"][1:22], rtol=2 ** -7, atol=1e-3)


def test_a_flipped_byte_of_the_golden_blob_is_refused(golden):
    codec, _, _ = golden
    blob = _blob()
    blob[blob.numel() // 2] ^= 0x10
    with pytest.raises(BlobFormatError):
        codec.decode(blob)
