"""A user's recipe at high sparsity: launch/train.py's defaults with only the sparsity changed.

digits-cnn, 2 ranks, 300 steps, constant learning rate 0.05 with momentum 0.9,
compression from the third step, seeds 0, 1 and 2. One run's final accuracy on the 359
test images moves by a point or more from seed to seed (the uncompressed runs' too), and
CPU kernels differ between machines, so a single run's verdict can flip from one machine
to the next. The assertions are therefore on the mean over the three seeds against the
uncompressed runs' mean: launch/bench_accuracy.py's rule, whose cells these are.

- allgather, allreduce and sharded at s = 1.9 and sharded at s = 1.75: within 1 point
  (the target). Sharded at s = 1.9 lost 1.39 points before its server's scale was capped
  (transports.server_scale_cap); with the unbounded scale it diverged (12%).
- every cell sends far fewer bytes over the whole run, warm-up included.

About two minutes: fifteen torchruns of ~8 s each.
"""

from __future__ import annotations

import pytest

from launch import bench_accuracy

SEEDS = "0,1,2"
# (transport, sparsity): the accuracy the seed mean may lose, whole-run traffic at least.
# allreduce's lanes cost 2 bits a value at 2 ranks, so its floor is lower.
CELLS = {("allgather", 1.9): (0.01, 20), ("allreduce", 1.9): (0.01, 8), ("sharded", 1.75): (0.01, 20),
         ("sharded", 1.9): (0.01, 20)}


def _args(transports: str, sparsity: float):
    return bench_accuracy.parse_args(["--ranks", "2", "--seeds", SEEDS, "--transports", transports,
                                      "--sparsities", f"{sparsity:g}"])


def _run(a) -> list[dict]:
    return [bench_accuracy.run_cell(cell, a) for cell in bench_accuracy.plan(a)]


@pytest.fixture(scope="module")
def uncompressed() -> list[dict]:
    cells = _run(_args("", 1.0))  # no transports: only the baselines
    assert [c["status"] for c in cells] == ["ok"] * 3, cells
    return cells


@pytest.mark.parametrize("transport,sparsity", list(CELLS), ids=lambda v: str(v))
def test_the_mean_over_seeds_keeps_accuracy(uncompressed, transport, sparsity):
    tolerance, least_ratio = CELLS[transport, sparsity]
    a = _args(transport, sparsity)
    compressed = [c for c in _run(a) if c["hook"] == "threelc"]
    doc = {"settings": {**vars(a), "tolerance": tolerance}, "cells": uncompressed + compressed}
    bench_accuracy.derive(doc)
    (row,) = bench_accuracy.summary(doc)
    baseline = [c["final_accuracy"] for c in uncompressed]
    assert "mean_drop" in row, (row, [c.get("error") for c in compressed])  # a run failed
    assert row["keeps_on_mean"], (transport, sparsity, row["accuracies"], baseline, row["mean_drop"])
    assert row["whole_run_ratio"] >= least_ratio, (transport, sparsity, row["whole_run_ratio"])
