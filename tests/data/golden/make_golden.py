"""Regenerate the frozen golden blob fixture in this folder (tests/codec/test_golden_blob.py reads it).

    python tests/data/golden/make_golden.py            # from the repository root, with the package importable

Run it only when the blob or card format changes on purpose (and FORMAT_VERSION / CARD_FORMAT_VERSION with it):
the test fails as soon as an encoder or decoder produces other bytes than these files, or when the format
versions differ from the ones recorded in golden.json. Regenerate, review the diff of golden.json, commit.

Writes (about 20 KB in all):
    card.json, tensors.pt   a tiny calibration artifact: L=2 layers, H=1 KV head, D=16 (p = 32 features per kind),
                            one block per kind with a signed-Hadamard basis, one plan (ratio key 8) mixing 8/4/2-bit
                            groups of sizes 1 and 16 with dropped coordinates, a clipped K group type
    kv.pt                   the encoder's input: {"k", "v": [24, 2, 1, 16] bfloat16}, keys post-RoPE, positions 2..25
    blob.bin                KVTCCodec(artifact, 8, entropy="none", chunk_bytes=256).encode(k, v, start_pos=2,
                            n_head=2, n_tail=3): several chunks, exact sink and window rows, coded rows
    blob_deflate.bin        the same with entropy="deflate" (raw DEFLATE chunks; only decoded by the test, since
                            another zlib may compress to other bytes)
    expected.pt             the reference decode of blob.bin: {"k", "v": [24, 2, 1, 16] bfloat16}
    golden.json             the settings above, both format versions and the sha256 of every file
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from kvtc_sglang.codec import blob as blobfmt
from kvtc_sglang.codec.artifact import CARD_FORMAT_VERSION, CalibrationArtifact, FeatureBlock, RatioPlans
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.plan import BitPlan, Group
from kvtc_sglang.codec.rope import RopeConfig, apply_rope

HERE = Path(__file__).resolve().parent
L, H, D = 2, 1, 16
P = L * H * D
RATIO = 8
N, START, N_HEAD, N_TAIL = 24, 2, 2, 3
CHUNK_BYTES = 256


def signed_hadamard(seed: int) -> torch.Tensor:
    """[P, P] float16: a Hadamard matrix with shuffled rows and columns, scaled to orthonormal columns."""
    h = torch.ones(1, 1)
    while h.shape[0] < P:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(seed)
    return (h[torch.randperm(P, generator=g)][:, torch.randperm(P, generator=g)] / math.sqrt(P)).to(torch.float16)


def make_artifact() -> CalibrationArtifact:
    g = torch.Generator().manual_seed(7)
    blocks = {}
    for i, kind in enumerate(("k", "v")):
        mean = (0.1 * torch.randn(P, generator=g)).float()
        scale = (0.5 + torch.rand(P, generator=g)).float()
        blocks[kind] = [FeatureBlock(0, L, 0, P, mean, signed_hadamard(11 + i), scale)]
    k_plan = BitPlan((Group(0, 1, 8), Group(1, 1, 4), Group(2, 1, 2), Group(16, 16, 4)), P, float(RATIO))
    v_plan = BitPlan((Group(0, 16, 8), Group(16, 16, 2)), P, float(RATIO))
    rope = RopeConfig(head_dim=D, rotary_dim=D, theta=10000.0, style="neox")
    model = {"name": "golden-l2h1d16", "fingerprint": "golden-l2h1d16", "num_layers": L, "num_kv_heads": H,
             "num_kv_heads_per_rank": H, "head_dim": D, "rope": rope.to_dict()}
    return CalibrationArtifact(model=model, blocks=blocks, plans={RATIO: RatioPlans(RATIO, (k_plan,), (v_plan,))},
                               clip={"k": {(16, 4): 2.5}})


def make_kv(artifact: CalibrationArtifact) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank keys and values in the artifact's span plus noise; keys RoPE'd at positions START.."""
    g = torch.Generator().manual_seed(3)
    out = []
    for kind in ("k", "v"):
        b = artifact.blocks[kind][0]
        coef = torch.randn(N, P, generator=g) * torch.linspace(3.0, 0.1, P)
        x = (coef @ b.basis.float().T) / b.scale + b.mean + 0.01 * torch.randn(N, P, generator=g)
        out.append(x.view(N, L, H, D))
    rope = RopeConfig.from_dict(artifact.model["rope"])
    k = apply_rope(out[0], torch.arange(START, START + N), rope)
    return k.to(torch.bfloat16), out[1].to(torch.bfloat16)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    torch.manual_seed(0)
    art = make_artifact()
    art.save(HERE)
    k, v = make_kv(art)
    torch.save({"k": k, "v": v}, HERE / "kv.pt")
    codec = KVTCCodec(art, RATIO, "cpu", entropy="none", chunk_bytes=CHUNK_BYTES)
    blob = codec.encode(k, v, START, N_HEAD, N_TAIL)
    (HERE / "blob.bin").write_bytes(blob.numpy().tobytes())
    deflate = KVTCCodec(art, RATIO, "cpu", entropy="deflate", chunk_bytes=CHUNK_BYTES).encode(k, v, START, N_HEAD, N_TAIL)
    (HERE / "blob_deflate.bin").write_bytes(deflate.numpy().tobytes())
    dec = codec.decode(blob, expected_tokens=N, expected_start=START)
    torch.save({"k": dec.k, "v": dec.v}, HERE / "expected.pt")
    files = ("card.json", "tensors.pt", "kv.pt", "blob.bin", "blob_deflate.bin", "expected.pt")
    manifest = {
        "blob_format_version": blobfmt.FORMAT_VERSION, "card_format_version": CARD_FORMAT_VERSION,
        "ratio": RATIO, "entropy": "none", "chunk_bytes": CHUNK_BYTES, "n_tokens": N, "start_pos": START,
        "n_head": N_HEAD, "n_tail": N_TAIL, "kv_dtype": "bfloat16",
        "sha256": {name: sha256(HERE / name) for name in files},
    }
    (HERE / "golden.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {', '.join(files)} and golden.json to {HERE} "
          f"({sum((HERE / f).stat().st_size for f in files)} bytes)")


if __name__ == "__main__":
    main()
