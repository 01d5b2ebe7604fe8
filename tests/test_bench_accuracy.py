"""launch/bench_accuracy.py: the plan, the verdict arithmetic and the committed results.

The matrix itself takes an hour of torchruns; these tests check what is computed rather
than measured, on synthetic cells and on the committed JSON, so a change to the report
that would contradict the README's table fails here.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest

from launch import bench_accuracy

RESULTS = Path(__file__).resolve().parents[1] / "launch" / "results" / "bench_accuracy.json"


def _doc(cells, seeds=(0, 1)):
    settings = {"model": "m", "ranks": [2], "transports": ["allgather"], "sparsities": [1.9], "seeds": list(seeds),
                "steps": 300, "tolerance": 0.01}
    return {"command": "x", "started": "t", "machine": "m", "git_commit": "c", "settings": settings, "cells": cells}


def _cell(seed, accuracy, hook="threelc", status="ok", ratio=40.0):
    cell = {"id": f"{hook}{seed}", "ranks": 2, "seed": seed, "hook": hook, "status": status}
    if hook == "threelc":
        cell.update(transport="allgather", sparsity=1.9)
    if status == "ok":
        cell.update(final_accuracy=accuracy, final_loss=0.1, whole_run_ratio=ratio)
    else:
        cell["error"] = "diverged"
    return cell


def test_plan_puts_the_baseline_of_each_ranks_and_seed_first_and_seeds_outermost():
    a = bench_accuracy.parse_args(["--ranks", "2,4", "--seeds", "0,1", "--transports", "sharded",
                                   "--sparsities", "1.0,1.9"])
    cells = bench_accuracy.plan(a)
    assert [c["id"] for c in cells] == [
        "n2-seed0-none", "n2-seed0-sharded-s1", "n2-seed0-sharded-s1.9",
        "n4-seed0-none", "n4-seed0-sharded-s1", "n4-seed0-sharded-s1.9",
        "n2-seed1-none", "n2-seed1-sharded-s1", "n2-seed1-sharded-s1.9",
        "n4-seed1-none", "n4-seed1-sharded-s1", "n4-seed1-sharded-s1.9"]
    # Only the hook's arguments differ from the recipe: the user's defaults otherwise.
    assert cells[2]["train_args"] == ["--model", "digits-cnn", "--steps", "300", "--seed", "0", "--no-progress",
                                      "--hook", "threelc", "--transport", "sharded", "--sparsity", "1.9"]


def test_each_seed_is_judged_against_its_own_baseline_and_the_mean_against_the_mean():
    # Seed 0 loses 1.5 points, seed 1 gains 0.3: the mean loses 0.6 points, within 1.
    doc = _doc([_cell(0, 0.980, "none"), _cell(0, 0.965), _cell(1, 0.970, "none"), _cell(1, 0.973)])
    bench_accuracy.derive(doc)
    assert [c.get("keeps_accuracy") for c in doc["cells"]] == [None, False, None, True]
    (row,) = bench_accuracy.summary(doc)
    assert row["seeds_kept"] == 1 and row["mean_drop"] == pytest.approx(0.006) and row["keeps_on_mean"]
    md = bench_accuracy.markdown(doc)
    assert "| allgather | 1.9 | 96.50% / 97.30% | 96.90% | -0.60 | 1/2 | 40.0x |" in md
    assert "1 of 1 cells within 1 point of uncompressed on the mean; 1 of 2 single runs." in md


def test_a_cell_beyond_the_tolerance_is_bold_and_a_failed_run_counts_against_it():
    doc = _doc([_cell(0, 0.99, "none"), _cell(0, 0.97)], seeds=(0,))
    bench_accuracy.derive(doc)
    assert "| allgather | 1.9 | 97.00% | **97.00%** | **-2.00** | 0/1 | 40.0x |" in bench_accuracy.markdown(doc)
    failed = _doc([_cell(0, 0.99, "none"), _cell(0, None, status="failed")], seeds=(0,))
    bench_accuracy.derive(failed)
    (row,) = bench_accuracy.summary(failed)
    assert row["seeds_kept"] == 0 and "keeps_on_mean" not in row
    assert "| allgather | 1.9 | failed | — | — | 0/1 | — |" in bench_accuracy.markdown(failed)


def test_committed_results_are_what_the_report_derives():
    if not RESULTS.exists():
        pytest.skip(f"no committed {RESULTS.name}")
    doc = json.loads(RESULTS.read_text())
    again = copy.deepcopy(doc)
    bench_accuracy.derive(again)
    assert again["cells"] == doc["cells"]
    assert RESULTS.with_suffix(".md").read_text() == bench_accuracy.markdown(doc) + "\n"
    planned = bench_accuracy.plan(argparse.Namespace(**doc["settings"]))
    assert [c["train_args"] for c in planned] == [c["train_args"] for c in doc["cells"]]
