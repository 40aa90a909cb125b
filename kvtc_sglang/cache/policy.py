"""One priority order over hot and compressed nodes: what to compress, what to drop, when to stop compressing.

Every eviction candidate is an *action* on a node, with the slots it frees and the work it loses:

    action        on                                   frees        loses if the node is reused later
    EVICT_HOT     a hot leaf that has a blob           n            a restore (n * restore_cost)
    COMPRESS      a hot leaf without a blob            n - k        a restore (n * restore_cost)
    DELETE        a hot leaf not worth compressing     n            a recompute (n * recompute_cost)
    DROP          a compressed leaf                    k            recompute - restore (n * (rc - rs))
    DROP_REDUNDANT the blob of a hot node              k            a future encode (n * encode_cost)

Priority = P(reuse | age) x loss / slots freed; the lowest goes first. P(reuse | age) = exp(-age / tau), with tau
the running mean of the ages at which cached tokens were reused (``observe_reuse``); so at equal ages and costs the
order is LRU, which is the degenerate case. SGLang's eviction strategy of the server is kept as the primary key for
"priority" (higher request priority evicted last) and its LFU hit counts raise P.

A hot leaf is compressed only when its blob would not be the next thing dropped (``worth_compressing``): when its
prospective DROP priority is below the lowest DROP priority still queued, the blob would be dropped unread, so the
node is deleted instead.

Adaptive compression (``compress_enabled``): the policy tracks compressed tokens that were restored and those that
were dropped without ever being restored. When, over the last ``window_tokens`` compressed tokens that met their
fate, the restored fraction is below ``min_restored_fraction``, compression (ahead and at eviction) stops; one in
``probe_every`` candidates is still compressed so that a change of workload is noticed.
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable


class Action(enum.Enum):
    EVICT_HOT = "evict_hot"
    COMPRESS = "compress"
    DELETE = "delete"
    DROP = "drop"
    DROP_REDUNDANT = "drop_redundant"


@dataclass(frozen=True)
class Costs:
    """Relative per-token costs (only ratios matter). Defaults: prefill of a token ~10x the codec's decode of it
    (Llama-3.1-8B: ~16 GFLOP/token prefill vs ~1.4 GFLOP/token reconstruct at the 16x plan), encode ~ decode."""

    recompute: float = 10.0
    restore: float = 1.0
    encode: float = 1.0


class TierPolicy:
    """The strategy object beside the tree (testable alone: it sees only numbers and nodes' access metadata).

    Args:
        strategy: SGLang's eviction policy name ("lru", "lfu", "fifo", "mru", "filo", "priority", "slru").
        costs: relative costs.
        clock: seconds (monotonic), injectable for tests and trace replays.
        tau_s: initial reuse time scale (seconds) before any reuse was observed.
        min_restored_fraction, window_tokens, probe_every: the adaptive switch (see the module docstring).
    """

    def __init__(self, strategy: str = "lru", costs: Costs = Costs(), *, clock: Callable[[], float] = time.monotonic,
                 tau_s: float = 300.0, min_restored_fraction: float = 0.05, window_tokens: int = 1 << 16,
                 probe_every: int = 16):
        self.strategy = (strategy or "lru").lower()
        self.costs = costs
        self.clock = clock
        self.tau_s = float(tau_s)
        self._reuse_samples = 0
        self.min_restored_fraction = float(min_restored_fraction)
        self.window_tokens = int(window_tokens)
        self.probe_every = int(probe_every)
        self._fates: deque[tuple[int, bool]] = deque()  # (tokens, restored?) of compressed tokens, oldest first
        self._fate_tokens = 0
        self._fate_restored = 0
        self._probe = 0

    # ------------------------------------------------------------------ reuse statistics
    def observe_reuse(self, age_s: float) -> None:
        """A cached node was matched again ``age_s`` seconds after its last access."""
        if age_s < 0 or not math.isfinite(age_s):
            return
        self._reuse_samples += 1
        weight = 1.0 / min(self._reuse_samples, 256)  # running mean, then an EMA over ~256 reuses
        self.tau_s += weight * (max(age_s, 1e-6) - self.tau_s)

    def p_reuse(self, node: Any, now: float) -> float:
        age = max(0.0, now - float(getattr(node, "last_access_time", now)))
        p = math.exp(-age / max(self.tau_s, 1e-9))
        if self.strategy == "lfu":
            hits = max(0, int(getattr(node, "hit_count", 0)))
            p = 1.0 - (1.0 - p) ** (hits + 1)
        return p

    # ------------------------------------------------------------------ adaptive compression
    def observe_fate(self, tokens: int, restored: bool) -> None:
        """Compressed tokens were restored (True) or dropped without a restore (False)."""
        if tokens <= 0:
            return
        self._fates.append((int(tokens), bool(restored)))
        self._fate_tokens += int(tokens)
        self._fate_restored += int(tokens) if restored else 0
        while self._fates and self._fate_tokens - self._fates[0][0] >= self.window_tokens:
            n, r = self._fates.popleft()
            self._fate_tokens -= n
            self._fate_restored -= n if r else 0

    @property
    def restored_fraction(self) -> float:
        """Restored / (restored + dropped unread) over the window; 1.0 before anything met its fate."""
        return self._fate_restored / self._fate_tokens if self._fate_tokens else 1.0

    def compress_enabled(self) -> bool:
        """Whether to compress the next candidate (False while compressed tokens are rarely restored, except one
        probe in ``probe_every``)."""
        if self._fate_tokens < self.window_tokens // 4 or self.restored_fraction >= self.min_restored_fraction:
            return True
        self._probe += 1
        return self._probe % self.probe_every == 0

    # ------------------------------------------------------------------ priorities
    def _primary(self, node: Any) -> float:
        if self.strategy == "priority":
            return float(getattr(node, "priority", 0) or 0)
        return 0.0

    def _tiebreak(self, node: Any) -> float:
        """Within equal priority values, SGLang's own order of the strategy (older first for LRU)."""
        if self.strategy in ("fifo",):
            return float(getattr(node, "creation_time", 0.0))
        if self.strategy in ("mru", "filo"):
            return -float(getattr(node, "last_access_time", 0.0))
        return float(getattr(node, "last_access_time", 0.0))

    def key(self, action: Action, node: Any, n_tokens: int, frees: int, now: float | None = None) -> tuple:
        """Sort key of an action (lower goes first): (primary, priority per slot freed, tiebreak, node id)."""
        now = self.clock() if now is None else now
        c = self.costs
        loss = {Action.EVICT_HOT: c.restore, Action.COMPRESS: c.restore, Action.DELETE: c.recompute,
                Action.DROP: max(c.recompute - c.restore, 0.0), Action.DROP_REDUNDANT: c.encode}[action] * n_tokens
        value = self.p_reuse(node, now) * loss / max(frees, 1)
        return (self._primary(node), value, self._tiebreak(node), int(getattr(node, "id", 0)))

    def worth_compressing(self, node: Any, n_tokens: int, blob_slots: int, lowest_drop_key: tuple | None,
                          now: float | None = None) -> bool:
        """Compress rather than delete: its blob would not be the next thing dropped."""
        if lowest_drop_key is None:
            return True
        return self.key(Action.DROP, node, n_tokens, blob_slots, now) >= lowest_drop_key
