"""launch/common/gather.py: the end-of-run gather returns only once gloo has let go of its tensors.

A gloo worker drops a finished collective's tensors just after ``wait()``
returns; a process that exits in that moment aborts (see launch/common/gather.py).
The 2-rank test checks, many times over, that no tensor of the gather is
still held when ``all_gather_rows`` returns, which a plain ``all_gather``
does not guarantee.
"""

from __future__ import annotations

import threading
import time
import weakref

import pytest
import torch

from ranks import all_ok, run_ranks


from launch.common import gather
from launch.testbed import iface


class _Blob:
    pass


def test_wait_released_waits_for_the_holder():
    obj = _Blob()
    ref = weakref.ref(obj)
    holder = [obj]
    del obj
    threading.Timer(0.05, holder.clear).start()
    t0 = time.monotonic()
    assert gather.wait_released([ref], timeout=5)
    assert ref() is None and time.monotonic() - t0 >= 0.04


def test_wait_released_gives_up_at_the_timeout():
    obj = _Blob()
    t0 = time.monotonic()
    assert gather.wait_released([weakref.ref(obj)], timeout=0.05) is False
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("name", [None, "veth0", "x" * 15, "é"])
def test_name_round_trip(name):
    values = iface.encode_name(name, 16)
    assert len(values) == 16 and iface.decode_name(values) == name


def test_name_too_long():
    with pytest.raises(ValueError, match="longer than 16 bytes"):
        iface.encode_name("x" * 17, 16)


def _gather_many(rank, world, rounds):
    seen = []
    orig = gather.wait_released

    def recording(refs, timeout=gather.RELEASE_TIMEOUT_S):
        ok = orig(refs, timeout)
        seen.append((ok, sum(r() is not None for r in refs)))
        return ok

    gather.wait_released = recording
    rows = [gather.all_gather_rows([float(rank), float(i), 0.5], torch.device("cpu")) for i in range(rounds)]
    return rows, seen


def test_all_gather_rows_returns_released_tensors(tmp_path):
    rounds = 200
    for rank, (rows, seen) in enumerate(all_ok(run_ranks(_gather_many, 2, rounds, workdir=tmp_path))):
        assert rows == [[[0.0, float(i), 0.5], [1.0, float(i), 0.5]] for i in range(rounds)]
        assert len(seen) == rounds and all(ok and held == 0 for ok, held in seen), f"rank {rank}"
