"""Defaults every layer reads (stdlib only, so the light option parsing and the model geometry can import it).

``DEFAULT_EXACT``: which tokens of a cached run stay exact (never compressed): 4 sinks and the 128 most recent tokens,
the codec's setting. The calibration card and settings, the accuracy protocol and the command-line defaults start from
it. ``SERVING_EXACT``: the compressed tier's default (``--kvtc-sink-tokens``/``--kvtc-window-tokens``): 4 sinks, no
recent window (see its comment for the measurement behind it). ``DEFAULT_ROPE_THETA``: the RoPE base of a config that states none
(transformers' and SGLang's default).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExactPolicy:
    """Tokens stored as bit-exact copies of their KV rows.

    Attributes:
        sink_tokens: positions below this of every sequence (attention sinks); never compressed, never calibrated on.
        window_tokens: the most recent tokens at the end of a cached sequence.
    """

    sink_tokens: int = 4
    window_tokens: int = 128

    def counts(self, start_pos: int, n: int, at_sequence_end: bool) -> tuple[int, int]:
        """(n_head, n_tail): tokens of a run [start_pos, start_pos + n) that stay exact: the sinks among its positions
        and, when the run ends a cached sequence, its last ``window_tokens`` tokens (after the sinks)."""
        n_head = max(0, min(n, self.sink_tokens - start_pos))
        n_tail = min(self.window_tokens, n - n_head) if at_sequence_end else 0
        return n_head, n_tail


DEFAULT_EXACT = ExactPolicy()
# The tier keeps no recent window by default. benchmarks/results/accuracy_chat.md (SmolLM2-135M-Instruct, 57
# returning chat turns, 16x plan, history compressed with its last W tokens exact): W = 0 stores the history at
# 15.24x effective for +0.94% ppl [+0.57, +1.29]; W = 32 at 7.03x for +0.91%; W = 128 at 2.70x for +0.59%, barely
# above fp8's 2.00x (+0.19%) in capacity. A chat turn adds a few hundred tokens per node, so a 128-token window keeps
# most of every node exact and leaves the tier little more room than fp8.
SERVING_EXACT = ExactPolicy(window_tokens=0)
DEFAULT_ROPE_THETA = 10000.0
