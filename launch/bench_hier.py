"""Issue 12's benchmark: hierarchical 3LC against flat 3LC, DDP, fp16 and PowerSGD on netlab.

    sudo flock /tmp/threelc_timing.lock python launch/bench_hier.py            # 2 and 4 nodes x 2
    sudo python launch/bench_hier.py --nodes 2 --repeats 1 --out launch/results/x.json  # one layout

Every cell runs launch/train.py (mlp-wide) in ``--nodes`` namespaces of
``--procs-per-node`` processes, joined by ``--rate`` links, and records the bytes
that crossed the shaped veths during the measured steps (all nodes' transmit
counters) and rank 0's mean step time. Writes ``--out`` (JSON) and the same table as
Markdown next to it; the cells of one layout run back to back, ``--repeats`` times round
robin, so their ratios are comparable. All cells run the same steps, start-up all-reduces included, before the
measured window.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.testbed.lab import run_lab

FLAT = ("allgather", "sharded")
VARIANTS = [("none", []), ("fp16", []), ("powersgd", ["--powersgd-rank", "2"])] + [
    (f"threelc-{t}", ["--transport", t]) for t in (*FLAT, "hierarchical")]


def cell_args(variant: str, extra: list[str], a) -> list[str]:
    hook = variant.split("-")[0]
    args = ["--model", a.model, "--hook", hook, "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps),
            "--seed", "0", "--threads", "1", "--dist-timeout", "300", *extra]
    if hook == "threelc":
        args += ["--sparsity", f"{a.sparsity:g}", "--sparsity-warmup", "0"]
    return args


def cell(nodes: int, variant: str, runs: list[dict]) -> dict:
    """One table row from the repeats of one (layout, hook): means, and every repeat's step time."""
    times = [r["train"]["mean_step_time_s"] for r in runs]
    last = runs[-1]["train"]
    return {"nodes": nodes, "variant": variant, "world_size": last["world_size"],
            "link_bytes_per_step": statistics.fmean(r["wire"]["tx_bytes_per_step_steady"] for r in runs),
            "step_time_s": statistics.fmean(times), "step_times_s": times,
            "hook_bytes_sent_per_step_rank0": statistics.fmean(r["train"]["bytes_per_step"] for r in runs),
            "measured_steps": last["measured_steps"], "final_loss": last["final_loss"]}


def summarise(cells: list[dict]) -> dict:
    """Per layout: hierarchical against the best flat 3LC cell (bytes and time judged separately)."""
    out = {}
    for nodes in sorted({c["nodes"] for c in cells}):
        row = {c["variant"]: c for c in cells if c["nodes"] == nodes}
        hier = row.get("threelc-hierarchical")
        flat = [row[f"threelc-{t}"] for t in FLAT if f"threelc-{t}" in row]
        if hier is None or not flat:
            continue
        fewest = min(flat, key=lambda c: c["link_bytes_per_step"])
        fastest = min(flat, key=lambda c: c["step_time_s"])
        psgd = row.get("powersgd")
        out[str(nodes)] = {
            "fewest_bytes_flat": fewest["variant"], "fastest_flat": fastest["variant"],
            "bytes_vs_best_flat": hier["link_bytes_per_step"] / fewest["link_bytes_per_step"],
            "time_vs_best_flat": hier["step_time_s"] / fastest["step_time_s"],
            "time_vs_powersgd": hier["step_time_s"] / psgd["step_time_s"] if psgd else None,
            "bytes_target_met": hier["link_bytes_per_step"] <= 0.5 * fewest["link_bytes_per_step"],
            "time_target_met": hier["step_time_s"] < fastest["step_time_s"]
            and (psgd is None or hier["step_time_s"] < psgd["step_time_s"]),
        }
    return out


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"# Hierarchical 3LC on netlab ({s['model']}, {s['procs_per_node']} processes per node, "
             f"{s['rate']} between nodes, 3LC s = {s['sparsity']:g})", "",
             f"Command: `{doc['command']}`", "",
             "| nodes x procs | hook | MB across links / step | step time (s), mean | each run (s) |",
             "|---|---|---:|---:|---|"]
    for c in doc["cells"]:
        lines.append(f"| {c['nodes']} x {s['procs_per_node']} | {c['variant']} | {c['link_bytes_per_step'] / 1e6:.3f} "
                     f"| {c['step_time_s']:.3f} | {' / '.join(f'{t:.3f}' for t in c.get('step_times_s', []))} |")
    lines += ["", "| nodes | bytes vs fewest-bytes flat 3LC | time vs fastest flat 3LC | time vs PowerSGD r2 "
              "| bytes <= 1/2 | faster than both |", "|---|---:|---:|---:|---|---|"]
    for nodes, v in doc["summary"].items():
        psgd = f"{v['time_vs_powersgd']:.2f}" if v["time_vs_powersgd"] is not None else "-"
        lines.append(f"| {nodes} | {v['bytes_vs_best_flat']:.2f} ({v['fewest_bytes_flat']}) "
                     f"| {v['time_vs_best_flat']:.2f} ({v['fastest_flat']}) | {psgd} "
                     f"| {'yes' if v['bytes_target_met'] else 'no'} | {'yes' if v['time_target_met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--procs-per-node", type=int, default=2)
    p.add_argument("--rate", default="100mbit")
    p.add_argument("--model", default="mlp-wide")
    # 15 measured steps: 3LC's payloads grow over the first steps as the residuals fill,
    # and a few steps on 2 shared cores are too noisy to rank hooks by.
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup-steps", type=int, default=5, help="steps before the measured window")
    p.add_argument("--repeats", type=int, default=2, help="runs of every cell, round robin; times averaged")
    p.add_argument("--sparsity", type=float, default=1.9)
    p.add_argument("--variants", nargs="+", default=[v for v, _ in VARIANTS])
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default="launch/results/bench_hier.json")
    a = p.parse_args(argv)
    cells = []
    for nodes in a.nodes:
        runs: dict[str, list[dict]] = {}
        for repeat in range(a.repeats):  # round robin: a slow spell of the machine hits every hook alike
            for variant, extra in VARIANTS:
                if variant not in a.variants:
                    continue
                started = time.time()
                res = run_lab(cell_args(variant, extra, a), nodes=nodes, rate=a.rate, timeout=a.timeout,
                              procs_per_node=a.procs_per_node)
                runs.setdefault(variant, []).append(res)
                print(f"[bench_hier] {nodes}x{a.procs_per_node} {variant} #{repeat + 1}: "
                      f"{res['wire']['tx_bytes_per_step_steady'] / 1e6:.3f} MB/step across links, "
                      f"{res['train']['mean_step_time_s']:.3f} s/step ({time.time() - started:.0f} s)",
                      file=sys.stderr, flush=True)
        cells += [cell(nodes, variant, results) for variant, results in runs.items()]
    doc = {"settings": {"model": a.model, "procs_per_node": a.procs_per_node, "rate": a.rate, "steps": a.steps,
                        "warmup_steps": a.warmup_steps, "sparsity": a.sparsity,
                        "repeats": a.repeats},
           "command": "python launch/bench_hier.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "cells": cells, "summary": summarise(cells)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
