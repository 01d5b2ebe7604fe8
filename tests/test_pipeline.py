"""The communication thread: jobs start in order, each finishes after the next one started."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from threelc.hooks.pipeline import CommPipeline, Deferred

CPU = torch.device("cpu")


class Gate:
    """A collective in flight that completes when the test says so."""

    def __init__(self):
        self.event = threading.Event()

    def done(self) -> bool:
        return self.event.is_set()


def bucket_job(log: list, name: str, gate: Gate | None = None, issues_collectives: bool = False):
    def job():
        log.append(f"start {name}")

        def finish():
            log.append(f"finish {name}")
            return torch.tensor([float(len(name))])

        return Deferred(finish, (gate,) if gate else (), issues_collectives)
    return job


def test_next_bucket_starts_before_the_previous_one_finishes():
    log, pipeline = [], CommPipeline()
    gate = Gate()
    first = pipeline.submit(bucket_job(log, "b0", gate), CPU, flush=False)
    second = pipeline.submit(bucket_job(log, "b1"), CPU, flush=True)
    assert second.wait().item() == 2.0 and first.wait().item() == 2.0
    pipeline.close()
    # b0's transfer never completed on its own: b1 started first, then b0 was finished.
    assert log == ["start b0", "start b1", "finish b0", "finish b1"]


def test_a_lone_bucket_finishes_once_its_transfer_completes():
    log, pipeline = [], CommPipeline()
    gate = Gate()
    future = pipeline.submit(bucket_job(log, "b0", gate), CPU, flush=False)
    assert not future.done()
    gate.event.set()  # the thread polls the transfer while no job is queued
    future.wait()
    pipeline.close()
    assert log == ["start b0", "finish b0"]


def test_a_bucket_whose_finish_issues_collectives_waits_for_the_next_start():
    """Finishing it by timing would let node peers take start and finish in different orders (a deadlock)."""
    log, pipeline = [], CommPipeline()
    gate = Gate()
    gate.event.set()  # its transfer is done and nothing is queued: a plain bucket would finish now
    first = pipeline.submit(bucket_job(log, "b0", gate, issues_collectives=True), CPU, flush=False)
    time.sleep(0.2)  # time for the thread to finish it, were it to go by timing
    assert log == ["start b0"] and not first.done()
    second = pipeline.submit(bucket_job(log, "b1", issues_collectives=True), CPU, flush=True)
    assert second.wait().item() == 2.0 and first.wait().item() == 2.0
    pipeline.close()
    assert log == ["start b0", "start b1", "finish b0", "finish b1"]


def test_errors_reach_their_own_future_and_the_thread_goes_on():
    pipeline = CommPipeline()

    def broken():
        raise RuntimeError("start failed")

    def broken_finish():
        return Deferred(lambda: (_ for _ in ()).throw(ValueError("finish failed")))

    a = pipeline.submit(broken, CPU, flush=False)
    b = pipeline.submit(broken_finish, CPU, flush=False)
    c = pipeline.submit(lambda: torch.ones(1), CPU)  # a plain value is a finished job
    with pytest.raises(RuntimeError, match="start failed"):
        a.wait()
    with pytest.raises(ValueError, match="finish failed"):
        b.wait()
    assert c.wait().item() == 1.0
    pipeline.close()
