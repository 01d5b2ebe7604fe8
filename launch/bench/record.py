"""The result document of a benchmark that runs a list of cells, and how it is written.

Used by launch/bench_tta.py, launch/bench_accuracy.py and launch/bench/report.py. A
benchmark appends each finished cell to ``doc["cells"]`` and saves the document at once,
so a run stopped midway keeps every cell it finished.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from launch.common.runner import REPO


def new_document(script: str, argv: list[str], settings: dict) -> dict:
    """The command that reproduces the run, its settings, the machine and commit, no cells yet."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    # Uncommitted changes to the code a benchmark runs (results aside) are not what the commit holds: say so.
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "threelc", "hooks", "launch",
                            ":(exclude)launch/results"], cwd=REPO, capture_output=True).returncode
    commit += "+uncommitted" if dirty == 1 else ""
    return {"command": " ".join(["python", script, *argv]), "settings": settings,
            "machine": f"{platform.node()}, {os.cpu_count()} CPUs", "git_commit": commit,
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "cells": []}


def output_prefix(out: str) -> Path:
    """``--out`` as a path without suffix, relative to the repository unless absolute."""
    return Path(out) if Path(out).is_absolute() else REPO / out


def save_json(doc: dict, out: Path) -> None:
    """Write ``out``.json by replacing it whole: a reader never sees half a document."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, out.with_suffix(".json"))


def run_all(name: str, doc: dict, cells: list[dict], run_cell: Callable[[dict], dict],
            write: Callable[[dict, bool], None], outcome: Callable[[dict], str]) -> None:
    """Run ``cells`` in order, appending each record to ``doc`` and writing it at once.

    ``write(doc, final)`` saves the document (``final`` once, after the last cell);
    ``outcome(record)`` is what the progress line says of a finished cell.
    """
    start = time.time()
    for i, cell in enumerate(cells):
        print(f"[{name}] {i + 1}/{len(cells)} {cell['id']} ...", file=sys.stderr, flush=True)
        record = run_cell(cell)
        print(f"[{name}]   {outcome(record)} ({record['cell_wall_s']:.0f} s)", file=sys.stderr, flush=True)
        doc["cells"].append(record)
        write(doc, False)
    doc["wall_s"] = time.time() - start
    write(doc, True)
    print(f"[{name}] {len(cells)} cells in {doc['wall_s'] / 60:.1f} min", file=sys.stderr)


def cells_to_run(a, plan: Callable, write: Callable[[dict, Path, bool], None]) -> list[dict] | None:
    """``plan(a)``'s cells, or None where ``--render`` (rewrite an earlier output's reports) or
    ``--dry-run`` (print the cells) did all there was to do."""
    if a.render:
        write(json.loads(Path(a.render).read_text()), Path(a.render).with_suffix(""), True)
        return None
    cells = plan(a)
    if a.dry_run:
        for c in cells:
            print(c["id"], " ".join(c["train_args"]))
        return None
    return cells
