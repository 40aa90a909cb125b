"""Calibration capture: a radix cache that records the KV rows of finished requests.

With `--kv-compress kvtc --kvtc-capture-dir DIR`, the server runs a plain radix cache that, when a
request finishes, copies the K/V rows of its sequence from the KV pool (all layers, this rank's KV
heads, as the pool stores them: keys post-RoPE) to host memory and writes them to
`DIR/tp{size}-rank{rank}/seq{i}.pt` ({"k", "v": [n, L, H, D] in the pool dtype, "start": 0}), until
`capture_tokens` tokens were written; then it writes `DONE` there and records nothing more.
`kvtc-sglang calibrate --kv-dumps DIR --model <model-path> --out <artifact>` calibrates from the files,
so any model the server can run (dummy weights included) is calibrated from its own KV cache.

Only sequences of at least `MIN_SEQUENCE_TOKENS` are recorded (the calibration skips sink tokens and
needs positions spread over the context).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from kvtc_sglang import sglang_compat as compat
from kvtc_sglang.cache.options import KVTCOptions
from kvtc_sglang.codec.artifact import rank_dir_name
from kvtc_sglang.models.identity import CAPTURE_IDENTITY_FILE

logger = logging.getLogger(__name__)

MIN_SEQUENCE_TOKENS = 64


def capture_rank_dir(root: str | os.PathLike, tp_size: int, tp_rank: int) -> Path:
    return Path(root) / rank_dir_name(tp_size, tp_rank)


def write_weights_identity(ctx: Any, out_dir: Path) -> None:
    """Write the weights signature of the rank's KV heads of the loaded model to ``out_dir/CAPTURE_IDENTITY_FILE``,
    so that a card calibrated from this capture can be checked against the served weights; nothing (one log line)
    when there is none (dummy weights, quantized or unrecognized projections)."""
    from kvtc_sglang.cache.startup_checks import served_weights_signature

    if str(getattr(ctx.server_args, "load_format", "auto")) == "dummy":
        reason = "the server loads random weights (--load-format dummy)"
    else:
        sig = served_weights_signature(getattr(getattr(ctx.tp_worker, "model_runner", None), "model", None))
        if isinstance(sig, dict):
            path = Path(out_dir) / CAPTURE_IDENTITY_FILE
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"weights_signature": sig}) + "\n")
            os.replace(tmp, path)
            return
        reason = sig
    logger.warning("KVTC capture: no weights signature recorded in %s (%s); a card made from this capture is not "
                   "checked against the served weights", out_dir, reason)


class KVCaptureRadixCache(compat.RadixCache):
    """sglang's RadixCache plus a recorder of finished requests' KV rows (see module docstring)."""

    def __init__(self, params: Any, out_dir: Path, capture_tokens: int):
        super().__init__(params)
        self.pool = compat.kv_pool_of(params.token_to_kv_pool_allocator)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.capture_tokens = int(capture_tokens)
        self.captured_tokens = 0
        self.files = 0

    @classmethod
    def from_build_context(cls, ctx: Any, options: KVTCOptions) -> "KVCaptureRadixCache":
        from kvtc_sglang.cache.startup_checks import attention_tp

        tp = attention_tp(ctx.server_args)
        out = capture_rank_dir(options.capture_dir, tp, int(ctx.tp_rank) % tp)
        logger.info("KVTC capture: recording up to %d tokens of finished requests to %s", options.capture_tokens, out)
        cache = cls(ctx.params, out, options.capture_tokens)
        write_weights_identity(ctx, out)
        return cache

    @property
    def done(self) -> bool:
        return self.captured_tokens >= self.capture_tokens

    def record(self, kv_indices: torch.Tensor) -> None:
        """Write the pool rows `kv_indices` (int64 [n], positions 0..n-1 of one sequence) to a file."""
        n = int(kv_indices.numel())
        if self.done or n < MIN_SEQUENCE_TOKENS:
            return
        idx = kv_indices.to(device=self.pool.k_buffer[0].device, dtype=torch.int64)
        k = torch.stack([b[idx] for b in self.pool.k_buffer], dim=1).cpu()
        v = torch.stack([b[idx] for b in self.pool.v_buffer], dim=1).cpu()
        store_dtype = self.pool.k_buffer[0].dtype
        logical = self.pool.dtype if store_dtype == torch.uint8 else store_dtype
        if store_dtype == torch.uint8:
            k, v = k.view(logical), v.view(logical)
        path = self.out_dir / f"seq{self.files:05d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"k": k, "v": v, "start": 0}, tmp)
        os.replace(tmp, path)
        self.files += 1
        self.captured_tokens += n
        if self.done:
            (self.out_dir / "DONE").write_text(f"{self.captured_tokens} tokens in {self.files} files\n")
            logger.info("KVTC capture: %d tokens written to %s; calibrate with `kvtc-sglang calibrate --kv-dumps %s`",
                        self.captured_tokens, self.out_dir, self.out_dir.parent)

    def cache_finished_req(self, req: Any, is_insert: bool = True, *, kv_len_to_handle: int) -> None:
        if not self.done and req.req_pool_idx is not None:
            n = min(int(kv_len_to_handle), len(req.origin_input_ids) + len(req.output_ids))
            self.record(self.req_to_token_pool.req_to_token[req.req_pool_idx, :n])
        super().cache_finished_req(req, is_insert, kv_len_to_handle=kv_len_to_handle)
