"""One ordered communication thread per hook state, two buckets in flight.

DDP calls a comm hook once per bucket, in the same bucket order on every rank. 3LC
needs several *dependent* collectives per bucket (agree, exchange sizes, exchange
payloads). Chaining them from future callbacks, as PyTorch's PowerSGD hook does,
lets two buckets' collectives interleave differently on different ranks, which hangs
or mismatches on gloo. Here every bucket runs as a job on a single thread, jobs in
submission order, so all ranks issue identical collective sequences while backward
goes on computing the next buckets.

A job runs its bucket up to the last collective, which it leaves in flight, and hands
back a ``Deferred`` for the rest. The thread then starts the next bucket (if one is
queued) before finishing the previous one, so bucket k+1's encoding overlaps bucket
k's transfer and bucket k's decoding overlaps bucket k+1's transfer. When no job is
queued and bucket k's transfer is done, bucket k finishes first: which comes first then
depends on timing, which differs between ranks. That is safe when finishing only waits
for collectives already issued. A ``Deferred`` whose finish issues collectives of its
own (the hierarchical transport's node all-gather) is marked ``issues_collectives`` and
always finishes after the next job starts (or on a flush): a rank finishing bucket k
first (waiting in the all-gather for its node peer) and a peer starting bucket k+1
first (waiting in the reduce-scatter for that rank) would wait on each other for ever.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Callable

import torch

# Pipelines with a live thread. At interpreter exit each is closed (its thread joined)
# before torch's C++ runtime is torn down: a daemon thread still inside torch at that
# point aborts the process ("terminate called without an active exception").
_RUNNING: "weakref.WeakSet[CommPipeline]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for pipeline in list(_RUNNING):
        pipeline.close(timeout=30.0)


class Deferred:
    """The rest of one bucket's exchange once its last collective is in flight.

    ``done()`` polls the collectives it waits for (as ``Pending.done`` does); ``finish()`` waits for them, decodes,
    stores the residuals and returns the average. The pipeline starts the next bucket
    before it finishes this one, so the codec work of one overlaps the transfer of the other.
    """

    def __init__(self, finish: Callable[[], object], pending: tuple = (), issues_collectives: bool = False):
        self._finish, self._pending = finish, pending
        self.issues_collectives = issues_collectives  # finished only after the next job starts

    def done(self) -> bool:
        return all(p.done() for p in self._pending)

    def finish(self) -> torch.Tensor:
        return self._finish()

    def wrapped(self, wrapper: Callable[[Callable[[], object]], object]) -> "Deferred":
        """The same exchange, its ``finish`` run as ``wrapper(finish)``."""
        return Deferred(lambda: wrapper(self._finish), self._pending, self.issues_collectives)

    @classmethod
    def of(cls, value) -> "Deferred":
        return cls(lambda: value)


# While a bucket's transfer is in flight and no job is queued, the thread checks on
# both this often: short enough to start a late bucket promptly, long enough not to
# take CPU from backward.
POLL_SECONDS = 0.001


class CommPipeline:
    """Runs submitted jobs one at a time, in order, and hands back their futures.

    A job returns a ``Deferred`` (``done()``, ``finish()``); its future completes with
    what ``finish()`` returns. ``flush=True`` finishes a job before taking the next one
    (the last bucket of a step: nothing comes after it to overlap with).
    """

    def __init__(self, name: str = "threelc-comm"):
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._streams: dict[torch.device, object] = {}

    def submit(self, job: Callable[[], object], device: torch.device, flush: bool = True) -> torch.futures.Future:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
            _RUNNING.add(self)
        if device.type == "cuda":
            # The job must see the gradients the caller's stream produced; the future
            # records the job stream's work so DDP's consumer waits for it in turn.
            future = torch.futures.Future(devices=[device])
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        else:
            future, ready = torch.futures.Future(), None
        self._jobs.put((job, future, ready, device, flush))
        return future

    def _in_stream(self, device, ready, fn):
        if device.type != "cuda":
            return fn()
        stream = self._streams.setdefault(device, torch.cuda.Stream(device))
        with torch.cuda.stream(stream):
            if ready is not None:
                stream.wait_event(ready)
            return fn()

    def _complete(self, pending) -> None:
        deferred, future, device = pending
        try:
            future.set_result(self._in_stream(device, None, deferred.finish))
        except BaseException as error:  # noqa: BLE001 - the future carries it to backward()
            future.set_exception(error)

    def _run(self) -> None:
        pending = None  # (deferred, future, device) of the job started last, not yet finished
        while True:
            if pending is None or pending[0].issues_collectives:
                item = self._jobs.get()  # for the latter, finishing now would depend on timing
            else:
                try:
                    item = self._jobs.get(timeout=0 if pending[0].done() else POLL_SECONDS)
                except queue.Empty:
                    if pending[0].done():
                        self._complete(pending)
                        pending = None
                    continue
            if item is None:
                if pending is not None:
                    self._complete(pending)
                return
            job, future, ready, device, flush = item
            try:
                result = self._in_stream(device, ready, job)
                started = (result if isinstance(result, Deferred) else Deferred.of(result), future, device)
            except BaseException as error:  # noqa: BLE001
                future.set_exception(error)
                started = None
            if pending is not None:
                self._complete(pending)
            pending = started
            if pending is not None and flush:
                self._complete(pending)
                pending = None

    def close(self, timeout: float | None = None) -> None:
        """Let the thread finish the queued jobs and stop (a later submit starts a new one)."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)
        self._thread = None
        _RUNNING.discard(self)
