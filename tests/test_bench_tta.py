"""launch/bench_tta.py: the plan, the time-to-target arithmetic and the committed results.

The full benchmark needs root and half an hour on the testbed; these tests check what
is computed rather than measured, on synthetic cells and on the committed JSON, so a
change to the report that would contradict the README's figures fails here.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest

from launch import bench_tta

RESULTS = Path(__file__).resolve().parents[1] / "launch" / "results" / "bench_tta.json"


def _cell(variant, curve, bytes_per_step, hook=None):
    steps, train_s, loss = curve[-1]
    return {"id": variant, "nodes": 2, "model": "m", "variant": variant, "hook": hook or variant.split("-")[0],
            "status": "ok", "curve": [list(p) for p in curve], "final_loss": loss,
            "loss_at_steps": next(l for s, _, l in curve if s >= 20), "step_time_s": train_s / steps,
            "wire_bytes_per_step": bytes_per_step}


def test_plan_gives_none_the_recipe_steps_and_the_others_the_factor():
    a = bench_tta.parse_args(["--nodes", "2", "--models", "charlm", "--sparsities", "1.9"])
    cells = bench_tta.plan(a)
    steps = {c["variant"]: int(c["train_args"][c["train_args"].index("--steps") + 1]) for c in cells}
    assert steps["none"] == 300 and steps["fp16"] == 900 and steps["threelc-sharded-s1.9"] == 900
    assert [c["variant"] for c in cells] == ["none", "fp16", "powersgd", "threelc-allreduce-s1.9",
                                             "threelc-allgather-s1.9", "threelc-sharded-s1.9"]
    assert all("--sparsity" not in c["train_args"] for c in cells if c["hook"] != "threelc")
    blocked = bench_tta.plan(bench_tta.parse_args(["--nodes", "2", "--models", "charlm", "--sparsities", "1.9",
                                                    "--transports", "allgather", "--scale-blocks", "0,1024"]))
    assert [c["variant"] for c in blocked][3:] == ["threelc-allgather-s1.9", "threelc-allgather-s1.9-b1024"]
    assert "--scale-block" not in blocked[3]["train_args"]
    assert blocked[4]["train_args"][-2:] == ["--scale-block", "1024"]


def test_time_to_target_is_the_first_evaluation_at_or_below_it():
    doc = {"settings": {"slack": 0.02, "steps": 20, "run_factor": 2, "nodes": [2], "models": ["m"],
                        "rate": "100mbit"},
           "command": "x", "started": "t", "machine": "m", "git_commit": "c",
           "cells": [_cell("none", [(10, 2.0, 1.5), (20, 4.0, 1.0)], 1000.0),
                     # reaches 1.02 at 3.0 s, dips to 1.0 at 4.0 s, and back above it later
                     _cell("threelc-allgather-s1.9", [(10, 1.0, 1.4), (20, 2.0, 1.1), (30, 3.0, 1.01),
                                                      (40, 4.0, 0.99)], 25.0, "threelc"),
                     _cell("fp16", [(10, 2.5, 1.6), (20, 5.0, 1.3), (40, 10.0, 1.2)], 500.0)]}
    bench_tta.derive(doc)
    none, tlc, fp16 = doc["cells"]
    assert none["time_to_target_s"] == 4.0 and none["speedup_vs_none"] == 1.0
    assert tlc["time_to_target_s"] == 4.0 and tlc["time_to_slack_s"] == 3.0
    assert tlc["loss_vs_none"] == pytest.approx(1.1) and tlc["traffic_ratio"] == 40.0
    assert fp16["time_to_target_s"] is None and fp16["time_to_slack_s"] is None and "speedup_vs_none" not in fp16
    md = bench_tta.markdown(doc)
    assert "| threelc-allgather-s1.9 | 1.1000 | 1.100 | 4.0 | 1.00 | 3.0 | 0.9900 |" in md
    assert "| fp16 | 1.3000 | 1.300 | — | — | — |" in md


@pytest.mark.parametrize("results", sorted(RESULTS.parent.glob("bench_tta*.json")), ids=lambda p: p.stem)
def test_committed_results_are_what_the_report_derives(results):
    if not results.exists():
        pytest.skip(f"no committed {results.name}")
    doc = json.loads(results.read_text())
    again = copy.deepcopy(doc)
    bench_tta.derive(again)
    assert again["cells"] == doc["cells"]
    assert (results.with_suffix(".md").read_text() == bench_tta.markdown(doc) + "\n")
    planned = bench_tta.plan(argparse.Namespace(**{"scale_blocks": [0], **doc["settings"]}))  # older JSON: no blocks
    assert [c["train_args"] for c in planned] == [c["train_args"] for c in doc["cells"]]
