"""launch/bench_hier.py: repeats averaged into one row, targets judged against the best flat cell; the committed table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.bench_hier import cell, markdown, summarise

RESULTS = Path(__file__).resolve().parent.parent / "launch" / "results"


def run(step_s: float, link_bytes: float) -> dict:
    """What run_lab returns, reduced to the fields the benchmark reads."""
    return {"train": {"mean_step_time_s": step_s, "bytes_per_step": 1000, "world_size": 4, "measured_steps": 15,
                      "final_loss": 2.0},
            "wire": {"tx_bytes_per_step_steady": link_bytes}}


def test_repeats_average_into_one_row():
    row = cell(2, "threelc-hierarchical", [run(0.3, 100.0), run(0.5, 120.0)])
    assert row["step_time_s"] == pytest.approx(0.4) and row["step_times_s"] == [0.3, 0.5]
    assert row["link_bytes_per_step"] == pytest.approx(110.0)


def test_targets_use_fewest_bytes_and_fastest_flat_cells_separately():
    cells = [cell(2, "threelc-allgather", [run(0.2, 400.0)]), cell(2, "threelc-sharded", [run(0.3, 200.0)]),
             cell(2, "powersgd", [run(0.25, 50.0)])]
    summary = summarise(cells + [cell(2, "threelc-hierarchical", [run(0.21, 100.0)])])["2"]
    assert summary["fewest_bytes_flat"] == "threelc-sharded" and summary["fastest_flat"] == "threelc-allgather"
    assert summary["bytes_vs_best_flat"] == pytest.approx(0.5) and summary["bytes_target_met"]
    assert summary["time_vs_best_flat"] == pytest.approx(1.05) and not summary["time_target_met"]
    faster = summarise(cells + [cell(2, "threelc-hierarchical", [run(0.19, 101.0)])])["2"]
    assert faster["time_target_met"] and not faster["bytes_target_met"]


@pytest.mark.parametrize("name", ["bench_hier", "bench_hier_2x4"])
def test_committed_tables_match_their_json(name):
    doc = json.loads((RESULTS / f"{name}.json").read_text())
    assert summarise(doc["cells"]) == doc["summary"]
    assert (RESULTS / f"{name}.md").read_text() == markdown(doc)
