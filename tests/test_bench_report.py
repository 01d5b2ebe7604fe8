"""The committed network-benchmark results are what the code renders from their JSON.

launch/results/bench_net.{json,md} come from one ``sudo python launch/bench_net.py`` run
(an hour on the testbed, not run here). These tests re-derive everything that is
computed rather than measured: the plan's cells, the per-cell ratios, the goals,
the transport choice check and the Markdown, so a change to the report code or
to the plan that would contradict the published figures fails here.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from launch import bench_net
from launch.bench import plan as bench_plan
from launch.bench import report as bench_report

RESULTS = REPO / "launch" / "results" / "bench_net.json"


@pytest.fixture(scope="module")
def doc():
    return json.loads(RESULTS.read_text())


def test_plan_matches_the_cells_that_ran(doc):
    planned = bench_plan.plan(argparse.Namespace(**doc["settings"]))
    assert [c["id"] for c in planned] == [c["id"] for c in doc["cells"]]
    assert [c["train_args"] for c in planned] == [c["train_args"] for c in doc["cells"]]


def test_derived_fields_are_reproduced(doc):
    cells = copy.deepcopy(doc["cells"])
    for c in cells:  # keep what was measured, drop what derive() computes
        del c["metrics"]
    bench_report.derive(cells, doc["settings"].get("tta_slack", 0.01))
    assert cells == doc["cells"]


def test_goals_and_transport_choice_are_reproduced(doc):
    assert bench_report.goals(doc["cells"], argparse.Namespace(**doc["settings"])) == doc["goals"]
    assert bench_report.auto_transport_eval(doc["cells"]) == doc["auto_transport"]


def test_render_reproduces_the_markdown(doc, tmp_path):
    copy_path = tmp_path / "bench_net.json"
    shutil.copy(RESULTS, copy_path)
    assert bench_net.main(["--render", str(copy_path)]) == 0
    assert (tmp_path / "bench_net.md").read_text() == (REPO / "launch" / "results" / "bench_net.md").read_text()
    assert json.loads(copy_path.read_text())["goals"] == doc["goals"]
