"""Agreement across tensor-parallel ranks: every rank holds the same tree and must take the same decisions.

The per-rank quantities decisions depend on (blob slot counts, readiness of asynchronous work, local failures) are
combined with one all-reduce on the TP CPU (gloo) group per decision batch, never per node. Every call site calls the
agreement on every rank, whatever happened locally (a local exception is turned into a flag first), so no rank is
ever left waiting in a collective that another rank skipped.

With one rank (or no process group) every method is the identity and costs nothing.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


class TPAgreement:
    """Element-wise MAX/MIN agreement of small integer vectors over a TP group.

    Args:
        group: a ``torch.distributed`` ProcessGroup (gloo/CPU), an object with ``.cpu_group`` (SGLang's
            GroupCoordinator), or None (one rank).
    """

    def __init__(self, group: Any = None):
        self.group = getattr(group, "cpu_group", group)
        self.world = 1
        if self.group is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world = torch.distributed.get_world_size(group=self.group)
        self.collectives = 0  # all-reduces issued (tests and metrics)

    def max_vec(self, values: Sequence[int]) -> list[int]:
        """Element-wise maximum over the ranks (every rank passes a vector of the same length)."""
        values = [int(v) for v in values]
        if self.world <= 1 or not values:
            return values
        t = torch.tensor(values, dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        self.collectives += 1
        return [int(v) for v in t.tolist()]  # a CPU tensor: no device involved

    def min_vec(self, values: Sequence[int]) -> list[int]:
        """Element-wise minimum over the ranks."""
        return [-v for v in self.max_vec([-int(v) for v in values])]

    def max(self, value: int) -> int:
        return self.max_vec([value])[0]

    def min(self, value: int) -> int:
        return self.min_vec([value])[0]

    def any(self, flag: bool) -> bool:
        """True when any rank passes True."""
        return bool(self.max(int(bool(flag))))
