"""End-of-run collectives that are safe to exit after.

A gloo worker thread lets go of a finished collective's tensors a moment
*after* ``wait()`` has returned to the caller. Since torch's PyObject
preservation (torch 2.13 here), dropping the last C++ reference to a tensor
that Python has seen decrefs its PyObject, which takes the GIL. If the
process is already finalizing by then (a rank that returns right after its
last collective), the thread cannot take the GIL, ``pthread_exit`` unwinds
through a ``noexcept`` destructor and the process aborts with "terminate
called without an active exception" (SIGABRT) after a run that had succeeded.
``destroy_process_group`` does not help: DDP keeps the group, and so its
worker threads, alive until interpreter teardown. About 1 run in 40 of
``train.py`` died this way on a 2-core machine.

:func:`all_gather_rows` returns only once every tensor it handed to the
backend has been released, so a rank that leaves right after it is safe from
its own gather. Tensors of earlier collectives (a comm hook's, whose release
can trail behind on a starved CPU) are out of its reach: launch/train.py
therefore also ends without interpreter teardown (``train.exit_now``).
"""

from __future__ import annotations

import time
import weakref

import torch
import torch.distributed as dist

RELEASE_TIMEOUT_S = 10.0


def wait_released(refs: list[weakref.ref], timeout: float = RELEASE_TIMEOUT_S) -> bool:
    """Sleep (GIL released) until every referent of ``refs`` is gone; False on timeout.

    A referent outlives its last Python reference exactly as long as a backend
    thread still holds it. The timeout only bounds a backend that never lets
    go (then exiting is no less safe than without this wait).
    """
    deadline = time.monotonic() + timeout
    while any(r() is not None for r in refs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def all_gather_rows(row: list[float], device: torch.device, group=None) -> list[list[float]]:
    """Every rank's ``row`` (equal lengths, float64), in rank order, as Python lists.

    Returns after the backend has released the tensors, so the caller may exit
    right away (see the module docstring).
    """
    mine = torch.tensor(row, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    rows = [t.tolist() for t in gathered]
    refs = [weakref.ref(t) for t in (mine, *gathered)]
    del mine, gathered
    wait_released(refs)
    return rows
