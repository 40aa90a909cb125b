"""Streams, events and ordering of the tier's asynchronous codec work.

On CUDA the tier owns two side streams: ``compress`` (low priority: encodes ahead of eviction, host spills) and
``load`` (high priority: layer-wise decodes of load-backs). Every launch on a side stream

* records a start event on the caller's current stream (SGLang's schedule stream) and makes the side stream wait on
  it, so the side work sees every slot allocation, free and in-place compression the scheduler queued before it;
* makes the side stream wait on the event of the latest forward launch (``on_forward_launched``, recorded by a hook
  after ``Scheduler.run_batch``). With CUDA graphs on, SGLang orders its schedule stream only after a graph's
  read-done event, so a decode graph may still be writing KV of a just-finished request; this wait is what orders
  the tier's KV reads and writes after the forward that writes them;
* records a finish event; the caller keeps the tensors it used alive (``record_stream``) and acknowledges the work by
  polling ``event.query()`` (never waiting).

Work queued on the current stream (in-place compression during ``evict``) also waits on the latest forward event
first (``on_current``).

On CPU there are no streams and the same code runs in one of two modes:
    inline    the work runs at launch and completes at once (what a CPU server does);
    deferred  the work is queued and runs, in launch order per stream, only when ``run_pending`` is called (tests use
              this to interleave completions with other operations, and to catch any release of memory before the
              work that reads it has run: deferred work reads the pool when it runs, not when it was launched).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

COMPRESS = "compress"
LOAD = "load"
STREAMS = (COMPRESS, LOAD)


class DoneEvent:
    """An event that has completed (inline CPU work)."""

    def query(self) -> bool:
        return True


class DeferredEvent:
    """Completion of deferred CPU work: True once ``TransferEngine.run_pending`` ran it. ``error`` holds the
    exception the work raised (the caller's acknowledgement turns it into a contained failure)."""

    def __init__(self):
        self.done = False
        self.error: BaseException | None = None

    def query(self) -> bool:
        return self.done


@dataclass
class Op:
    """One launched batch of asynchronous work, acknowledged in launch order per stream.

    Attributes:
        kind: what it is ("encode", "load", "spill").
        stream: COMPRESS or LOAD.
        finish: its finish event (``query()`` never blocks).
        items: what the tier needs at the ack (nodes, blobs, ...).
        keep: tensors that must stay alive until the work completed.
        failed: the launch or the work failed on this rank (the ack turns it into an agreed drop).
    """

    kind: str
    stream: str
    finish: Any
    items: list = field(default_factory=list)
    keep: list = field(default_factory=list)
    failed: bool = False
    consumer_index: int = -1
    done: set = field(default_factory=set)  # indices of items already acknowledged
    logged: bool = False  # this rank already logged the failure
    polled: bool = False  # its completion was seen (local checks done)
    ack_error: BaseException | None = None  # processing its acknowledgement failed on this rank
    ack_failed: bool = False  # ... on some rank (agreed)


class TransferEngine:
    """Side streams, forward ordering and launch bookkeeping (see the module docstring).

    Args:
        device: the KV pool's device.
        mode: "auto" (CUDA streams on a CUDA device, inline on CPU), "inline" or "deferred" (CPU only).
    """

    def __init__(self, device: torch.device | str, mode: str = "auto"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if mode == "auto":
            mode = "cuda" if self.cuda else "inline"
        if mode not in ("cuda", "inline", "deferred"):
            raise ValueError(f"transfer mode must be auto, inline or deferred, got {mode!r}")
        if mode == "cuda" and not self.cuda:
            raise ValueError("transfer mode 'cuda' needs a CUDA device")
        if mode != "cuda" and self.cuda:
            raise ValueError("on a CUDA device the transfer mode is 'auto'")
        self.mode = mode
        self.streams: dict[str, Any] = {}
        if self.cuda:
            low, high = torch.cuda.Stream.priority_range()
            self.streams[COMPRESS] = torch.cuda.Stream(self.device, priority=low)
            self.streams[LOAD] = torch.cuda.Stream(self.device, priority=high)
        self.forward_event: Any = None
        self._pending: dict[str, list[tuple[Callable[[], None], DeferredEvent]]] = {s: [] for s in STREAMS}
        self.launches = 0

    # ------------------------------------------------------------------ forward ordering
    def on_forward_launched(self, event: Any) -> None:
        """The event recorded on SGLang's forward stream right after the latest forward launch."""
        self.forward_event = event

    def _wait_forward(self, stream: Any) -> None:
        if self.forward_event is not None:
            stream.wait_event(self.forward_event)

    @contextlib.contextmanager
    def on_current(self) -> Iterator[None]:
        """Context for KV work queued on the current stream: ordered after the latest forward."""
        if self.cuda:
            self._wait_forward(torch.cuda.current_stream(self.device))
        yield

    def record_current(self) -> Any:
        """An event marking the current stream's position (already completed on CPU)."""
        if not self.cuda:
            return DoneEvent()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    # ------------------------------------------------------------------ launches
    def launch(self, stream: str, work: Callable[[], None], keep: Sequence[torch.Tensor] = (),
               defer: bool = True) -> Any:
        """Run ``work`` on side stream ``stream`` after everything queued so far on the current stream and after the
        latest forward; returns its finish event. On CPU, inline or deferred (see the module docstring);
        ``defer=False`` runs the Python of ``work`` now in every mode (its exceptions reach the caller; on CUDA its
        kernels still go to the side stream)."""
        self.launches += 1
        if self.mode == "inline" or (self.mode == "deferred" and not defer):
            work()
            return DoneEvent()
        if self.mode == "deferred":
            event = DeferredEvent()
            self._pending[stream].append((work, event))
            return event
        side = self.streams[stream]
        start = torch.cuda.Event()
        start.record(torch.cuda.current_stream(self.device))
        side.wait_event(start)
        self._wait_forward(side)
        with torch.cuda.stream(side):
            work()
            finish = torch.cuda.Event()
            finish.record(side)
        for t in keep:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(side)
        return finish

    def launch_layered(self, counter: Any, begin: Callable[[], None], layer_groups: Sequence[range],
                       run_group: Callable[[range], None]) -> tuple[int, Any]:
        """Run a layer-wise decode on the load stream, signalling SGLang's ``LayerDoneCounter`` per layer so that
        attention of layer i waits only for layer i. Returns (consumer index for the batch, finish event).

        ``begin()`` runs first, then ``run_group(g)`` for each group of layers; after a group, each of its layers is
        marked complete. Without a counter (CPU, or all three of the counter's slots still busy) the whole decode
        runs on the load stream and the current stream waits for it (a device-side wait): consumer index -1.
        """
        def whole() -> None:
            begin()
            for group in layer_groups:
                run_group(group)

        if not self.cuda:
            return -1, self.launch(LOAD, whole)
        if counter is None or not self._counter_slot_free(counter):
            finish = self.launch(LOAD, whole)
            torch.cuda.current_stream(self.device).wait_event(finish)
            return -1, finish
        self.launches += 1
        pid = counter.update_producer()
        ring = counter.events[pid]
        side = self.streams[LOAD]
        ring.start_event.record(torch.cuda.current_stream(self.device))
        side.wait_event(ring.start_event)
        self._wait_forward(side)
        with torch.cuda.stream(side):
            begin()
            for group in layer_groups:
                run_group(group)
                for layer in group:
                    ring.complete(layer)
            finish = torch.cuda.Event()
            finish.record(side)
        return pid, finish

    @staticmethod
    def _counter_slot_free(counter: Any) -> bool:
        nxt = (counter.producer_index + 1) % counter.num_counters
        return bool(counter.events[nxt].finish_event.query())

    # ------------------------------------------------------------------ deferred CPU work
    def pending(self, stream: str | None = None) -> int:
        """Deferred work items not run yet (on one stream, or all)."""
        if stream is None:
            return sum(len(q) for q in self._pending.values())
        return len(self._pending[stream])

    def run_pending(self, stream: str | None = None, count: int | None = None) -> int:
        """Run deferred work in launch order (one stream, or all streams one after the other); returns how many
        items ran."""
        ran = 0
        for name in ([stream] if stream is not None else list(STREAMS)):
            queue = self._pending[name]
            while queue and (count is None or ran < count):
                work, event = queue.pop(0)
                try:
                    work()
                except Exception as exc:  # noqa: BLE001 - reported through the event, as a device error would be
                    event.error = exc
                event.done = True
                ran += 1
        return ran

    @staticmethod
    def ready_prefix(ops: Sequence[Op]) -> int:
        """How many ops, from the oldest, have completed (polling only)."""
        n = 0
        for op in ops:
            if not op.finish.query():
                break
            n += 1
        return n


def host_buffer(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host tensor an asynchronous device->host copy can target (pinned when the device is CUDA)."""
    return torch.zeros(tuple(shape), dtype=dtype, pin_memory=device.type == "cuda")
