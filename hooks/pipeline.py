"""One ordered communication thread per hook state.

DDP calls a comm hook once per bucket, in the same bucket order on every rank. 3LC
needs several *dependent* collectives per bucket (agree, exchange sizes, exchange
payloads). Chaining them from future callbacks, as PyTorch's PowerSGD hook does,
lets two buckets' collectives interleave differently on different ranks, which hangs
or mismatches on gloo. Here every bucket's whole exchange runs as one job on a single
thread, jobs in submission order, so all ranks issue identical collective sequences
while backward goes on computing the next buckets.
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


class CommPipeline:
    """Runs submitted jobs one at a time, in order, and hands back their futures."""

    def __init__(self, name: str = "threelc-comm"):
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._streams: dict[torch.device, object] = {}

    def submit(self, job: Callable[[], torch.Tensor], device: torch.device) -> torch.futures.Future:
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
        self._jobs.put((job, future, ready, device))
        return future

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, future, ready, device = item
            try:
                if ready is None:
                    future.set_result(job())
                    continue
                stream = self._streams.setdefault(device, torch.cuda.Stream(device))
                with torch.cuda.stream(stream):
                    stream.wait_event(ready)
                    future.set_result(job())
            except BaseException as error:  # noqa: BLE001 - the future carries it to backward()
                future.set_exception(error)

    def close(self, timeout: float | None = None) -> None:
        """Let the thread finish the queued jobs and stop (a later submit starts a new one)."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)
        self._thread = None
        _RUNNING.discard(self)
