"""GPU entropy stage with nvCOMP (`pip install nvidia-nvcomp-cu13`): batched raw DEFLATE, GDeflate, ANS.

`NvcompCoder` implements the `entropy.EntropyCoder` protocol. Every chunk of a blob is one entry of an
nvCOMP batch; all work runs on the caller's current CUDA stream (one `nvcomp.Codec` per stream and
chunk size, made on first use). Bitstreams are `BitstreamKind.RAW` (no nvCOMP header): for "deflate"
that is plain RFC 1951 raw DEFLATE, which CPU zlib reads and writes with wbits=-15, so blobs made on
the GPU decode on a CPU and the other way round.

Host synchronization: `compress` reads the compressed sizes back (the blob's chunk table needs them);
`decompress` is asynchronous (output sizes come from the blob header, the output buffers are
preallocated torch memory), unless `check_sizes=True` asks it to read the inflated sizes back and
compare them with the expected ones.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kvtc_sglang.codec.errors import BlobFormatError, EntropyCodecUnavailable

ALGORITHMS = {"deflate": "Deflate", "gdeflate": "GDeflate", "ans": "ANS"}
MAX_CHUNK_BYTES = 1 << 16


def _nvcomp():
    from nvidia import nvcomp  # noqa: PLC0415 (optional dependency)

    return nvcomp


def nvcomp_available() -> bool:
    """True when nvCOMP's Python package imports and a CUDA device is present."""
    if not torch.cuda.is_available():
        return False
    try:
        _nvcomp()
    except Exception:  # ImportError, or a missing/incompatible libnvcomp
        return False
    return True


def _stream_handle(stream: torch.cuda.Stream) -> int:
    # cudaStreamLegacy is 0x1; array interfaces reserve 0, so the legacy default stream is passed as 1
    return stream.cuda_stream or 1


class NvcompCoder:
    """Batched nvCOMP coder for one algorithm ("deflate", "gdeflate" or "ans").

    Args:
        name: coder name (``entropy.EntropyCoderId.coder_name``).
        device: CUDA device (default: the current one).
        algorithm_type: nvCOMP's speed/ratio level for Deflate/GDeflate (0..5, None = nvCOMP's default).
        check_sizes: after decompressing, read the inflated sizes back and raise BlobFormatError on a
            mismatch (synchronizes the stream).
    """

    def __init__(self, name: str = "deflate", *, device: torch.device | str | None = None,
                 algorithm_type: int | None = None, check_sizes: bool = False):
        if name not in ALGORITHMS:
            raise ValueError(f"nvCOMP coder must be one of {sorted(ALGORITHMS)}, got {name!r}")
        if not nvcomp_available():
            raise EntropyCodecUnavailable(f"entropy coder {name!r} needs nvCOMP and a CUDA device "
                                          "(pip install nvidia-nvcomp-cu13)")
        self.name = name
        self.device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.algorithm_type = algorithm_type
        self.check_sizes = check_sizes
        self._nv = _nvcomp()
        self._codecs: dict = {}
        self._dec_align: dict = {}
        self._sync_free: bool | None = None  # whether decode with a size-built config works (None: untried)

    # ------------------------------------------------------------------ helpers
    def _current_stream_handle(self) -> int:
        return _stream_handle(torch.cuda.current_stream(self.device))

    def _codec(self, chunk_bytes: int):
        """(nvcomp.Codec bound to the current stream, stream handle)."""
        handle = self._current_stream_handle()
        key = (handle, chunk_bytes)
        codec = self._codecs.get(key)
        if codec is None:
            nv = self._nv
            kw = dict(algorithm=ALGORITHMS[self.name], device_id=self.device.index, cuda_stream=handle,
                      uncomp_chunk_size=chunk_bytes, bitstream_kind=nv.BitstreamKind.RAW)
            if self.algorithm_type is not None and self.name != "ans":
                kw["algorithm_type"] = int(self.algorithm_type)
            codec = self._codecs[key] = nv.Codec(**kw)
        return codec, handle

    def _batch(self, tensors: Sequence[torch.Tensor], handle: int):
        return self._nv.as_arrays(list(tensors), cuda_stream=handle)

    def _as_bytes(self, array) -> torch.Tensor:
        """A torch view of an nvCOMP output array (through __cuda_array_interface__; the view keeps
        `array` alive). Callers copy it into torch-owned memory before `array` goes away."""
        t = torch.as_tensor(array, device=self.device)
        if t.dtype != torch.uint8:
            t = t.view(torch.uint8)
        return t.reshape(-1)

    def _decompress_alignment(self, codec, key) -> int:
        align = self._dec_align.get(key)
        if align is None:
            try:
                align = int(codec.get_required_decompression_alignment())
            except (AttributeError, RuntimeError, TypeError):
                align = 16
            self._dec_align[key] = max(1, align)
        return self._dec_align[key]

    def _check_input(self, chunks: Sequence[torch.Tensor]) -> None:
        for c in chunks:
            if c.dtype != torch.uint8 or c.dim() != 1 or c.device != self.device:
                raise ValueError(f"nvCOMP chunks must be 1-D uint8 tensors on {self.device}, got {c.dtype} "
                                 f"{tuple(c.shape)} on {c.device}")

    # ------------------------------------------------------------------ protocol
    def compress(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each chunk (1-D uint8 on the device, <= 64 KiB) -> its compressed bytes (views of one buffer)."""
        if not chunks:
            return []
        self._check_input(chunks)
        chunk_bytes = max(MAX_CHUNK_BYTES, max(c.numel() for c in chunks))
        codec, handle = self._codec(chunk_bytes)
        src = [c if c.is_contiguous() else c.contiguous() for c in chunks]
        out = codec.encode(self._batch(src, handle))
        views = [self._as_bytes(out[i]) for i in range(len(src))]
        flat = torch.cat(views)  # into torch-owned memory while `out` is alive
        return list(flat.split([v.numel() for v in views]))

    def decompress(self, chunks: Sequence[torch.Tensor], raw_sizes: Sequence[int]) -> list[torch.Tensor]:
        """Inverse of compress; raw_sizes are the expected inflated lengths (from the blob header)."""
        if len(chunks) != len(raw_sizes):
            raise ValueError(f"{len(chunks)} chunks but {len(raw_sizes)} sizes")
        if not chunks:
            return []
        self._check_input(chunks)
        raw_sizes = [int(s) for s in raw_sizes]
        chunk_bytes = max(MAX_CHUNK_BYTES, max(raw_sizes))
        codec, handle = self._codec(chunk_bytes)
        align = self._decompress_alignment(codec, (handle, chunk_bytes))
        src = list(chunks)
        if any(c.data_ptr() % align for c in src):
            src = self._aligned_copies(src, align)
        offsets, total = [], 0
        for s in raw_sizes:
            offsets.append(total)
            total += -(-s // align) * align
        flat = torch.empty(total, dtype=torch.uint8, device=self.device)
        outs = [flat[o : o + s] for o, s in zip(offsets, raw_sizes)]
        src_batch, out_batch = self._batch(src, handle), self._batch(outs, handle)
        res = None
        if self._sync_free is not False:
            # a config built from the known sizes makes decode free of header parsing and host syncs
            try:
                cfg = codec.decompression_config(codec.compression_config(raw_sizes))
                res = codec.decode(src_batch, out=out_batch, decompression_config=cfg)
                self._sync_free = True
            except Exception as e:  # an nvCOMP build without this path: parse the streams instead
                if self._sync_free:
                    raise BlobFormatError(f"nvCOMP could not decode a {self.name} chunk: {e}") from e
                self._sync_free = False
        if res is None:
            try:
                res = codec.decode(src_batch, out=out_batch)
            except (ValueError, RuntimeError) as e:
                raise BlobFormatError(f"nvCOMP could not decode a {self.name} chunk: {e}") from e
        if self.check_sizes:
            got = [int(s) for s in res.buffer_sizes]
            if got != raw_sizes:
                raise BlobFormatError(f"{self.name} chunks inflated to {got[:4]}..., expected {raw_sizes[:4]}...")
        return outs

    def _aligned_copies(self, chunks: Sequence[torch.Tensor], align: int) -> list[torch.Tensor]:
        """Copies of the chunks at `align`-byte aligned offsets of one buffer (one concatenation)."""
        parts, offsets, total = [], [], 0
        for c in chunks:
            offsets.append(total)
            pad = -c.numel() % align
            parts.append(c)
            if pad:
                parts.append(torch.zeros(pad, dtype=torch.uint8, device=self.device))
            total += c.numel() + pad
        flat = torch.cat(parts)
        return [flat[o : o + c.numel()] for o, c in zip(offsets, chunks)]
