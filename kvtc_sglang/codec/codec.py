"""The reference KVTC codec (PyTorch, CPU or CUDA): a run of tokens' K/V <-> one blob.

Plan/run: `KVTCCodec(artifact, ratio, device)` prepares device tensors once; `encode` and `decode`
run per token run. Keys are RoPE-undone at their absolute positions before the transform and
re-RoPE'd after it; sink tokens (the first `n_head` of the run) and window tokens (the last
`n_tail`) are stored as bit-exact copies of their KV-pool rows.

Shapes: k, v are [n, L, H, D] (tokens first, this rank's heads), any float dtype (the pool dtype);
features are the row-major flattening [n, p], p = L*H*D.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvtc_sglang.codec import blob as blobfmt
from kvtc_sglang.codec.artifact import CalibrationArtifact
from kvtc_sglang.codec.entropy import (
    DEFAULT_CHUNK_BYTES,
    EntropyCoder,
    EntropyCoderId,
    NoEntropy,
    get_entropy_coder,
    split_chunks,
)
from kvtc_sglang.codec.errors import BlobFormatError, ShapeError
from kvtc_sglang.codec.kinds import KINDS, Kind
from kvtc_sglang.codec.payload import KindCoder
from kvtc_sglang.codec.payload_layout import PayloadLayout
from kvtc_sglang.codec.rope import RopeConfig, apply_rope, undo_rope


@dataclass
class DecodedKV:
    k: torch.Tensor  # [n, L, H, D]
    v: torch.Tensor  # [n, L, H, D]
    header: blobfmt.BlobHeader


class KVTCCodec:
    """Reference encoder/decoder for one calibration artifact and one target ratio."""

    def __init__(
        self,
        artifact: CalibrationArtifact,
        ratio: int = 16,
        device: torch.device | str = "cpu",
        entropy: str | EntropyCoder = "auto",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        self.artifact = artifact
        self.ratio = int(ratio)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.shape = (artifact.num_layers, artifact.num_kv_heads, artifact.head_dim)
        self.p = artifact.p
        plans = artifact.plan(self.ratio)
        self.kinds = {kind: KindCoder(artifact.blocks[kind], plans.for_kind(kind), self.p, self.device, artifact.clip.get(kind))
                      for kind in KINDS}
        self.rope = RopeConfig.from_dict(artifact.model["rope"])
        self.coder = get_entropy_coder(entropy, self.device) if isinstance(entropy, str) else entropy
        self.chunk_bytes = int(chunk_bytes)
        self.fingerprint = artifact.fingerprint16

    # ------------------------------------------------------------------ sizes
    def coded_bytes_per_token(self) -> int:
        """Packed bytes of one compressed token (K + V), before the entropy stage."""
        return self.kinds["k"].bytes_per_token + self.kinds["v"].bytes_per_token

    def payload_layout(self, n_head: int, n_tail: int, n_coded: int, exact_dtype: torch.dtype) -> PayloadLayout:
        """The raw payload layout of a run with these token counts under this codec's plan."""
        kind_bytes = (self.kinds["k"].bytes_per_token, self.kinds["v"].bytes_per_token)
        return PayloadLayout(n_head, n_tail, n_coded, self.p, exact_dtype, kind_bytes)

    def header_layout(self, h: blobfmt.BlobHeader) -> PayloadLayout:
        """The raw payload layout a blob header describes."""
        return self.payload_layout(h.n_head, h.n_tail, h.n_coded, blobfmt.EXACT_DTYPE_FROM_CODE[h.exact_dtype])

    def raw_size(self, n_tokens: int, n_exact: int, exact_dtype: torch.dtype) -> int:
        """Bytes of the raw payload of ``n_tokens`` tokens, ``n_exact`` of them exact rows of ``exact_dtype``."""
        return self.payload_layout(n_exact, 0, n_tokens - n_exact, exact_dtype).raw_size

    # ------------------------------------------------------------------ encode
    def _check_kv(self, k: torch.Tensor, v: torch.Tensor) -> int:
        if k.shape != v.shape or k.dim() != 4 or tuple(k.shape[1:]) != self.shape:
            raise ShapeError(f"expected k, v of shape [n, {', '.join(map(str, self.shape))}], got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.dtype != v.dtype:
            raise ShapeError(f"k and v dtypes differ: {k.dtype} vs {v.dtype}")
        if k.dtype not in blobfmt.EXACT_DTYPES:
            raise ShapeError(f"unsupported KV dtype {k.dtype}")
        return k.shape[0]

    def encode(self, k: torch.Tensor, v: torch.Tensor, start_pos: int, n_head: int = 0, n_tail: int = 0,
               coded_view: torch.dtype | None = None, token_ids=None) -> torch.Tensor:
        """Compress a run of tokens at positions [start_pos, start_pos + n).

        Args:
            k, v: [n, L, H, D] keys (post-RoPE, as the pool stores them) and values, pool dtype.
            n_head, n_tail: leading / trailing tokens stored exact.
            coded_view: for uint8 (fp8-storage) rows, the fp8 dtype to read coded rows as.
            token_ids: the run's n token ids (host ints); their hash is bound into the header.
        Returns:
            blob: 1-D uint8 tensor on the codec's device (format version 2, blob.py).
        """
        n = self._check_kv(k, v)
        if n_head < 0 or n_tail < 0 or n_head + n_tail > n:
            raise ShapeError(f"exact counts {n_head}+{n_tail} do not fit a run of {n} tokens")
        k = k.to(self.device)
        v = v.to(self.device)
        m = n - n_head - n_tail
        parts = []
        if n_head + n_tail:
            ex = torch.cat([torch.stack([k[:n_head], v[:n_head]], 1), torch.stack([k[n - n_tail :], v[n - n_tail :]], 1)])
            parts.append(ex.contiguous().view(torch.uint8).flatten())
        if m:
            kc, vc = k[n_head : n - n_tail], v[n_head : n - n_tail]
            if k.dtype == torch.uint8:
                if coded_view is None:
                    raise ShapeError("uint8 (fp8-storage) rows need coded_view, the fp8 dtype they hold")
                kc, vc = kc.view(coded_view), vc.view(coded_view)
            pos = torch.arange(start_pos + n_head, start_pos + n_head + m, device=self.device)
            kx = undo_rope(kc.float(), pos, self.rope).reshape(m, self.p)
            vx = vc.float().reshape(m, self.p)
            parts.append(self.kinds["k"].encode(kx))
            parts.append(self.kinds["v"].encode(vx))
        payload = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=self.device)
        return self.frame(payload, k.dtype, n, start_pos, n_head, n_tail, token_ids=token_ids)

    def header(self, exact_dtype: torch.dtype, coder: int, n: int, start_pos: int, n_head: int, n_tail: int,
               raw_size: int, n_chunks: int = 0, data_size: int | None = None, token_ids=None) -> blobfmt.BlobHeader:
        """The (format 2) header of a blob of this codec (fingerprint, plan) over a raw payload of ``raw_size`` bytes;
        ``token_ids`` (host ints), when given, are bound into it (`blob.token_hash`). `blob.frame`/`assemble` fill in
        sizes and the CRC."""
        return blobfmt.BlobHeader(
            fingerprint=self.fingerprint, ratio=self.ratio, exact_dtype=blobfmt.EXACT_DTYPES[exact_dtype],
            coder=int(coder), n_tokens=n, start_pos=int(start_pos), n_head=n_head, n_tail=n_tail,
            chunk_bytes=self.chunk_bytes, n_chunks=n_chunks, raw_size=raw_size,
            data_size=raw_size if data_size is None else data_size,
            token_hash=blobfmt.token_hash(token_ids) if token_ids is not None else 0,
            flags=blobfmt.FLAG_TOKENS_BOUND if token_ids is not None else 0,
        )

    def frame(self, payload: torch.Tensor, exact_dtype: torch.dtype, n: int, start_pos: int, n_head: int,
              n_tail: int, *, token_ids=None, payload_crc=None) -> torch.Tensor:
        """Header (+ entropy stage and chunk table when a coder is used) + CRC-32 around a raw payload -> blob.

        With no entropy coder the blob is the header followed by the payload (one copy, no per-chunk work, no
        host sync); otherwise chunks that do not shrink are stored as they are.
        """
        if token_ids is not None and len(token_ids) != n:
            raise ShapeError(f"{len(token_ids)} token ids for a run of {n} tokens")
        header = self.header(exact_dtype, EntropyCoderId.NONE, n, start_pos, n_head, n_tail, payload.numel(),
                             token_ids=token_ids)
        if self.coder.name == "none":
            return blobfmt.frame(header, payload, payload_crc)
        chunks = split_chunks(payload, self.chunk_bytes)
        comp = self.coder.compress(chunks)
        stored, flags = [], []
        for raw, c in zip(chunks, comp):
            use_raw = c.numel() >= raw.numel()
            stored.append(raw if use_raw else c)
            flags.append(use_raw)
        return blobfmt.assemble(replace(header, coder=EntropyCoderId.of(self.coder.name)), stored, flags)

    # ------------------------------------------------------------------ decode
    def read_header(self, blob: torch.Tensor, expected_tokens: int | None = None, expected_start: int | None = None,
                    expected_token_ids=None) -> blobfmt.BlobHeader:
        """Parse, verify (CRC-32) and check a blob against this codec and the caller's expectations.

        expected_token_ids: the token ids the caller restores; the blob must be bound to exactly these.
        """
        h = blobfmt.read_header(blob)
        if h.fingerprint != self.fingerprint:
            raise BlobFormatError("blob was encoded with another calibration artifact (fingerprint mismatch)")
        if h.ratio != self.ratio:
            raise BlobFormatError(f"blob uses the {h.ratio}x plan, this codec the {self.ratio}x plan")
        if expected_tokens is not None and h.n_tokens != expected_tokens:
            raise BlobFormatError(f"blob holds {h.n_tokens} tokens, caller expects {expected_tokens}")
        if expected_start is not None and h.start_pos != expected_start:
            raise BlobFormatError(f"blob starts at position {h.start_pos}, caller expects {expected_start}")
        want_raw = self.header_layout(h).raw_size
        if h.raw_size != want_raw:
            raise BlobFormatError(f"blob payload is {h.raw_size} bytes, {want_raw} expected for its token counts")
        blobfmt.verify_crc(blob, h)
        if expected_token_ids is not None:
            if not h.tokens_bound:
                raise BlobFormatError("blob is not bound to token ids, caller expects specific tokens")
            if len(expected_token_ids) != h.n_tokens or blobfmt.token_hash(expected_token_ids) != h.token_hash:
                raise BlobFormatError("blob was made from other token ids than the caller restores")
        return h

    def _coder_for(self, coder_id: int) -> EntropyCoder:
        if coder_id == EntropyCoderId.of(self.coder.name):
            return self.coder
        try:
            coder = EntropyCoderId(coder_id)
        except ValueError:
            raise BlobFormatError(f"unknown entropy coder id {coder_id}") from None
        return NoEntropy() if coder == EntropyCoderId.NONE else get_entropy_coder(coder.coder_name, self.device)

    def payload(self, blob: torch.Tensor, h: blobfmt.BlobHeader) -> torch.Tensor:
        """The raw payload (1-D uint8) of a verified blob: a view of an uncoded blob's data (no copy), or the
        inflated chunks of an entropy-coded one."""
        if h.coder == 0:
            return blob[h.data_offset :]
        table = blobfmt.chunk_table(blob, h)
        sizes = [min(h.chunk_bytes, h.raw_size - i * h.chunk_bytes) for i in range(h.n_chunks)]
        coded = [(i, blob[o : o + s]) for i, (o, s, raw) in enumerate(table) if not raw]
        out: list[torch.Tensor | None] = [None] * h.n_chunks
        for i, (o, s, raw) in enumerate(table):
            if raw:
                if s != sizes[i]:
                    raise BlobFormatError(f"stored chunk {i} has {s} bytes, expected {sizes[i]}")
                out[i] = blob[o : o + s]
        if coded:
            dec = self._coder_for(h.coder).decompress([c for _, c in coded], [sizes[i] for i, _ in coded])
            for (i, _), d in zip(coded, dec):
                out[i] = d.to(blob.device)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8, device=blob.device)

    def decode(
        self,
        blob: torch.Tensor,
        *,
        expected_tokens: int | None = None,
        expected_start: int | None = None,
        token_range: tuple[int, int] | None = None,
        out_dtype: torch.dtype | None = None,
        expected_token_ids=None,
    ) -> DecodedKV:
        """Decompress a blob (or the tokens [a, b) of it) back to K/V.

        Returns k, v of shape [b - a, L, H, D] in out_dtype (default: the dtype the blob was made
        from). Exact tokens come back bit-identical; raises BlobFormatError on any inconsistency.
        """
        blob = blob.to(self.device)
        h = self.read_header(blob, expected_tokens, expected_start, expected_token_ids)
        a, b = token_range if token_range is not None else (0, h.n_tokens)
        if not (0 <= a <= b <= h.n_tokens):
            raise ShapeError(f"token range [{a}, {b}) outside a run of {h.n_tokens} tokens")
        exact_dtype = blobfmt.EXACT_DTYPE_FROM_CODE[h.exact_dtype]
        out_dtype = out_dtype or exact_dtype
        if out_dtype == torch.uint8 and max(a, h.n_head) < min(b, h.n_tokens - h.n_tail):
            raise ShapeError("coded rows of an fp8 (uint8-storage) blob need out_dtype=<the pool's fp8 dtype>")
        payload = self.payload(blob, h)
        L, H, D = self.shape
        layout = self.header_layout(h)
        ex_src = payload
        if payload.storage_offset() % exact_dtype.itemsize:  # a blob view at an odd offset: realign the exact rows
            ex_src = payload[: layout.exact_bytes].clone()
        exact = layout.exact_rows(ex_src, self.shape)
        if exact is not None and exact_dtype != out_dtype:
            if exact_dtype == torch.uint8:
                if out_dtype.itemsize != 1:
                    raise ShapeError(f"exact rows are fp8 bytes; cannot return them as {out_dtype}")
                exact = exact.view(out_dtype)
            else:
                exact = exact.to(out_dtype)
        k = torch.empty(b - a, L, H, D, dtype=out_dtype, device=self.device)
        v = torch.empty_like(k)
        # token index t in the run -> exact row (head), coded row, or exact row (tail)
        m = h.n_coded
        head, tail, coded = layout.token_rows(a, b)
        for part in (head, tail):
            if part.n_rows:
                rows = slice(part.row0, part.row0 + part.n_rows)
                k[part.idx0 : part.idx0 + part.n_rows] = exact[rows, 0]
                v[part.idx0 : part.idx0 + part.n_rows] = exact[rows, 1]
        if coded.n_rows:
            o_k, o_v = layout.section_offset(Kind.K), layout.section_offset(Kind.V)
            sec_k = payload[o_k : o_k + layout.section_bytes(Kind.K)]
            sec_v = payload[o_v : o_v + layout.section_bytes(Kind.V)]
            rows = slice(coded.row0, coded.row0 + coded.n_rows)
            out = slice(coded.idx0, coded.idx0 + coded.n_rows)
            kx = self.kinds["k"].decode(sec_k, m, rows).view(-1, L, H, D)
            first = h.start_pos + h.n_head + coded.row0
            pos = torch.arange(first, first + coded.n_rows, device=self.device)
            k[out] = apply_rope(kx, pos, self.rope).to(out_dtype)
            v[out] = self.kinds["v"].decode(sec_v, m, rows).view(-1, L, H, D).to(out_dtype)
        return DecodedKV(k, v, h)
