"""Final test accuracy with a user's recipe: launch/train.py's defaults, only the sparsity changed.

    python launch/bench_accuracy.py                       # the matrix -> launch/results/bench_accuracy.{json,md}
    python launch/bench_accuracy.py --seeds 0,1,2 --out launch/results/bench_accuracy_seeds
    python launch/bench_accuracy.py --dry-run             # print the cells and exit

Each cell is one ``torchrun --standalone`` run of launch/train.py on ``--model`` (the
task's own optimizer, learning rate and batch; ``start_iter`` 2 and threelc's default
sparsity warm-up) with ``--hook threelc --transport T --sparsity S``, for every rank
count, transport, sparsity and seed; the uncompressed run (``--hook none``) of the same
rank count and seed is in the same invocation and is the baseline. A cell "keeps
accuracy" when its final test accuracy is at most ``--tolerance`` (1 point) below the
baseline's, compared seed by seed and as means over the seeds.

One final evaluation on a small test set moves by a point or more from one seed to
the next (the uncompressed runs too), so a single seed's verdict is noisy; the
report gives every seed and the means. Runs are deterministic for a given seed and
codec build (the native and pure-PyTorch codecs give the same bits), so any cell can
be rerun alone: ``torchrun --standalone --nproc-per-node <ranks> launch/train.py
<train_args>`` with the two from its record.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.bench.record import cells_to_run, new_document, output_prefix, run_all, save_json
from launch.common.runner import RunError, run_standalone
from threelc.hooks import FLAT_TRANSPORTS

SPARSITIES = (1.0, 1.5, 1.75, 1.9)


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-cnn")
    p.add_argument("--ranks", type=_csv(int), default=[2, 4], help="comma list of process counts")
    p.add_argument("--transports", type=_csv(str), default=list(FLAT_TRANSPORTS))
    p.add_argument("--sparsities", type=_csv(float), default=list(SPARSITIES))
    p.add_argument("--seeds", type=_csv(int), default=[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--tolerance", type=float, default=0.01, help="accuracy a cell may lose against none")
    p.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    p.add_argument("--out", default="launch/results/bench_accuracy", help="output prefix")
    p.add_argument("--render", default=None, metavar="JSON", help="only rewrite the .md of an earlier output")
    p.add_argument("--dry-run", action="store_true")
    return p.parse_args(argv)


def plan(a) -> list[dict]:
    cells = []
    for seed in a.seeds:  # seed outermost: a run cut short still has whole seeds
        for ranks in a.ranks:
            recipe = ["--model", a.model, "--steps", str(a.steps), "--seed", str(seed), "--no-progress"]
            cells.append({"id": f"n{ranks}-seed{seed}-none", "ranks": ranks, "seed": seed, "hook": "none",
                          "train_args": recipe + ["--hook", "none"]})
            for t in a.transports:
                for s in a.sparsities:
                    cells.append({"id": f"n{ranks}-seed{seed}-{t}-s{s:g}", "ranks": ranks, "seed": seed,
                                  "hook": "threelc", "transport": t, "sparsity": s,
                                  "train_args": recipe + ["--hook", "threelc", "--transport", t,
                                                          "--sparsity", f"{s:g}"]})
    return cells


def run_cell(cell: dict, a) -> dict:
    rec = {**cell, "status": "ok", "error": None}
    t0 = time.time()
    try:
        r = run_standalone(cell["train_args"], nproc=cell["ranks"], timeout=a.timeout)
        rec.update(final_accuracy=r["final_accuracy"], final_loss=r["final_loss"],
                   whole_run_ratio=(r.get("whole_run") or {}).get("ratio"))
    except (RunError, OSError, ValueError, KeyError) as e:  # a diverged or failed run is a result too
        rec.update(status="failed", error=str(e)[-2000:])
    rec["cell_wall_s"] = time.time() - t0
    return rec


def _baseline(doc: dict, cell: dict) -> dict | None:
    return next((b for b in doc["cells"] if b["hook"] == "none" and b["ranks"] == cell["ranks"]
                 and b["seed"] == cell["seed"] and b["status"] == "ok"), None)


def derive(doc: dict) -> None:
    """Per cell: accuracy lost against the uncompressed run of the same ranks and seed."""
    tolerance = doc["settings"]["tolerance"]
    for c in doc["cells"]:
        base = _baseline(doc, c)
        if c["hook"] == "none" or base is None:
            continue
        accuracy = c.get("final_accuracy") if c["status"] == "ok" else None
        c["accuracy_drop"] = None if accuracy is None else base["final_accuracy"] - accuracy
        c["keeps_accuracy"] = c["accuracy_drop"] is not None and c["accuracy_drop"] <= tolerance + 1e-12


def summary(doc: dict) -> list[dict]:
    """One row per (ranks, transport, sparsity): accuracies per seed, means, and the verdicts."""
    s, rows = doc["settings"], []
    for ranks in s["ranks"]:
        none = [c for c in doc["cells"] if c["ranks"] == ranks and c["hook"] == "none" and c["status"] == "ok"]
        for t in s["transports"]:
            for sp in s["sparsities"]:
                group = [c for c in doc["cells"] if c["ranks"] == ranks and c.get("transport") == t
                         and c.get("sparsity") == sp]
                if not group:
                    continue
                ok = [c for c in group if c.get("accuracy_drop") is not None]
                row = {"ranks": ranks, "transport": t, "sparsity": sp,
                       "accuracies": [c.get("final_accuracy") if c["status"] == "ok" else None for c in group],
                       "seeds_kept": sum(c.get("keeps_accuracy", False) for c in group), "seeds": len(group),
                       "whole_run_ratio": statistics.mean(c["whole_run_ratio"] for c in ok) if ok else None}
                if ok and len(ok) == len(group) and none:
                    row["mean_accuracy"] = statistics.mean(c["final_accuracy"] for c in ok)
                    row["mean_drop"] = statistics.mean(c["accuracy_drop"] for c in ok)
                    row["keeps_on_mean"] = row["mean_drop"] <= s["tolerance"] + 1e-12
                rows.append(row)
    return rows


def _points(tolerance: float) -> str:
    return f"{100 * tolerance:g} point" + ("" if tolerance == 0.01 else "s")


def _pct(x) -> str:
    return "failed" if x is None else f"{100 * x:.2f}%"


def markdown(doc: dict) -> str:
    s = doc["settings"]
    seeds = ", ".join(map(str, s["seeds"]))
    lines = [f"# launch/bench_accuracy.py: {s['model']}, final test accuracy, {s['steps']} steps", "",
             f"`{doc['command']}` — {doc['started']}, {doc['machine']}, git {doc['git_commit']}", "",
             f"train.py's defaults with only `--hook threelc --transport T --sparsity S` added; seeds {seeds}. "
             f"Bold: more than {_points(s['tolerance'])} below the uncompressed run (on the mean over seeds). "
             "Whole-run traffic: bytes over every step (fp32 start and warm-up included), fp32 / 3LC.", ""]
    rows = summary(doc)
    for ranks in s["ranks"]:
        none = [c for c in doc["cells"] if c["ranks"] == ranks and c["hook"] == "none"]
        if not none:
            continue
        accs = [c.get("final_accuracy") if c["status"] == "ok" else None for c in none]
        mean = statistics.mean(a for a in accs if a is not None) if any(a is not None for a in accs) else None
        lines += [f"## {ranks} ranks: uncompressed {' / '.join(map(_pct, accs))}"
                  + (f" (mean {_pct(mean)})" if len(accs) > 1 else ""), "",
                  "| transport | sparsity | accuracy per seed | mean | vs none (points) | seeds within "
                  "| whole-run traffic |",
                  "|---|---:|---|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["ranks"] == ranks):
            drop = r.get("mean_drop")
            vs = "—" if drop is None else f"{round(-100 * drop, 2) + 0.0:+.2f}"  # + 0.0: no "-0.00"
            mean_cell = _pct(r.get("mean_accuracy")) if "mean_accuracy" in r else "—"
            if r.get("keeps_on_mean") is False:
                mean_cell, vs = f"**{mean_cell}**", f"**{vs}**"
            ratio = "—" if r["whole_run_ratio"] is None else f"{r['whole_run_ratio']:.1f}x"
            lines.append(f"| {r['transport']} | {r['sparsity']:g} | {' / '.join(map(_pct, r['accuracies']))} "
                         f"| {mean_cell} | {vs} | {r['seeds_kept']}/{r['seeds']} | {ratio} |")
        lines.append("")
    kept = [r for r in rows if r.get("keeps_on_mean")]
    lines.append(f"{len(kept)} of {len(rows)} cells within {_points(s['tolerance'])} of uncompressed on the mean; "
                 f"{sum(r['seeds_kept'] for r in rows)} of {sum(r['seeds'] for r in rows)} single runs.")
    return "\n".join(lines)


def write(doc: dict, out: Path, final: bool) -> None:
    derive(doc)
    save_json(doc, out)
    if final:
        out.with_suffix(".md").write_text(markdown(doc) + "\n")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    cells = cells_to_run(a, plan, write)
    if cells is None:
        return 0
    out = output_prefix(a.out)
    settings = {k: v for k, v in vars(a).items() if k not in ("render", "dry_run", "out", "timeout")}
    doc = new_document("launch/bench_accuracy.py", argv, settings)
    run_all("bench_accuracy", doc, cells, lambda cell: run_cell(cell, a), lambda d, final: write(d, out, final),
            lambda r: f"final accuracy {r['final_accuracy']:.4f}" if r["status"] == "ok" else r["error"][-200:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
