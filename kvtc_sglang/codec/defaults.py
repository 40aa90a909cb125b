"""Defaults every layer reads (stdlib only, so the light option parsing and the model geometry can import it).

``DEFAULT_EXACT``: which tokens of a cached run stay exact (never compressed). The server options
(``--kvtc-sink-tokens``/``--kvtc-window-tokens``), the calibration card and settings, the accuracy protocol and the
command-line defaults all start from it. ``DEFAULT_ROPE_THETA``: the RoPE base of a config that states none
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
DEFAULT_ROPE_THETA = 10000.0
