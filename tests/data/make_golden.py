"""Write the golden blob fixture (tests/data/golden_v2.kvtc) of the current blob format.

    PYTHONPATH=. python tests/data/make_golden.py

Inputs are exact-arithmetic (kvtc_sglang.testing.codec_cases.exact_artifact/exact_kv), so the bytes do not depend
on the machine's BLAS; tests/codec/test_blob_integrity.py checks that the codec still reads the file and writes
it byte for byte. Rerun this script (and bump blob.FORMAT_VERSION) only when the format changes on purpose.
"""

from __future__ import annotations

from pathlib import Path

import torch

GOLDEN_NAME = "golden_v2.kvtc"
ARGS = dict(n=24, start_pos=40, n_head=2, n_tail=4, token_ids=[(7 * i + 3) % 50257 for i in range(24)])


def golden_inputs():
    from kvtc_sglang.codec.codec import KVTCCodec
    from kvtc_sglang.testing.codec_cases import exact_artifact, exact_kv

    art = exact_artifact(2, 2, 16, rank=24, seed=11)
    codec = KVTCCodec(art, 1, "cpu", entropy="none")
    k, v = exact_kv(art, ARGS["n"], dtype=torch.bfloat16, seed=11)
    return codec, k, v, ARGS


def golden_blob() -> torch.Tensor:
    codec, k, v, a = golden_inputs()
    return codec.encode(k, v, a["start_pos"], a["n_head"], a["n_tail"], token_ids=a["token_ids"])


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / GOLDEN_NAME
    blob = golden_blob()
    out.write_bytes(blob.numpy().tobytes())
    print(f"wrote {out} ({blob.numel()} bytes)")
