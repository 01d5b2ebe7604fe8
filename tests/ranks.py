"""Run a function on N gloo ranks in fresh processes, with a deadline instead of a hang."""

from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(Exception):
    """A rank raised; ``str()`` holds its traceback."""


def _entry(fn, rank, world_size, workdir, args, pg_timeout):
    out = Path(workdir)
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        result = fn(rank, world_size, *args)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 - reported to the parent
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
        os._exit(0)  # skip interpreter teardown: a wedged gloo thread must not keep us alive


def run_ranks(fn, world_size, *args, workdir, timeout=180, pg_timeout=60):
    """``fn(rank, world_size, *args)`` on each rank; returns results or ``RankFailed`` per rank.

    Raises ``TimeoutError`` (after killing every rank) if they do not all finish in time.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, str(workdir), args, pg_timeout))
             for rank in range(world_size)]
    for p in procs:
        p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    for p in procs:
        p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        raise TimeoutError(f"ranks {hung} did not finish within {timeout} s")
    results = []
    for rank in range(world_size):
        err, out = workdir / f"rank{rank}.err", workdir / f"rank{rank}.pt"
        if err.exists():
            results.append(RankFailed(err.read_text()))
        elif not out.exists():
            results.append(RankFailed(f"rank {rank} exited with code {procs[rank].exitcode} and no result"))
        else:
            results.append(torch.load(out, weights_only=False))
    return results


def all_ok(results):
    failures = [r for r in results if isinstance(r, RankFailed)]
    if failures:
        raise AssertionError("a rank failed:\n" + str(failures[0]))
    return results
