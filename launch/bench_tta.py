"""Time-to-accuracy on shaped links: how soon each hook reaches the uncompressed run's loss.

    sudo python launch/bench_tta.py                 # the matrix -> launch/results/bench_tta.{json,md,png}
    sudo python launch/bench_tta.py --quick         # 2 nodes, digits-cnn, 3 hooks, 60 steps -> launch/results/raw/
    sudo python launch/bench_tta.py --dry-run       # print the cells and exit
    sudo python launch/bench_tta.py --models charlm --scale-blocks 0,1024 --out launch/results/bench_tta_blocks

Each cell is one launch/netlab.py run (one node namespace per rank, each node's
egress shaped with ``tbf`` to ``--rate``) of launch/train.py with the task's
own recipe (learning rate, optimizer, batch) and only the hook's arguments
changed: ``none`` (DDP's fp32 all-reduce), ``fp16``, ``powersgd`` (rank 2, the
whole model in one bucket) and 3LC at each sparsity multiplier on each
transport, with threelc's default sparsity warm-up (and, with ``--scale-blocks``,
one scale per that many elements: ``ThreeLCState(scale_block=...)``, cells
``-b<block>``).  Rank 0 evaluates the test loss every ``--eval-every`` steps and records the training seconds spent so
far (evaluations excluded).  ``none`` runs ``--steps`` (train.py's 300); every
other hook runs ``--run-factor`` times as many, so a hook with cheaper steps has
room to reach the target later in steps but sooner in time (the learning rate
is constant, so the first ``--steps`` follow the same recipe either way).

The targets of a (nodes, model) group come from its ``none`` cell: its final
test loss, and that loss + ``--slack`` (2 %).  A cell's time to a target is the
training seconds at its first evaluation at or below it (— when it never gets
there), next to its loss after ``--steps`` (the same steps as ``none``).
Traffic is what crossed the shaped links per step over the whole run (fp32
steps, warm-up and rendezvous included), as a ratio to ``none``'s.  Needs root (netlab).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.bench.record import cells_to_run, new_document, output_prefix, run_all, save_json
from threelc.hooks import FLAT_TRANSPORTS

MODELS = ("charlm", "digits-cnn")
BASELINES = ("none", "fp16", "powersgd")
SPARSITIES = (1.0, 1.5, 1.9)
QUICK = {"nodes": [2], "models": ["digits-cnn"], "baselines": ["none"], "sparsities": [1.9],
         "transports": ["allgather"], "steps": 60, "run_factor": 2}


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=_csv(int), default=None, help="comma list (default 2,4)")
    p.add_argument("--rate", default="100mbit", help="tc rate of every node's link")
    p.add_argument("--models", type=_csv(str), default=None, help=f"default {','.join(MODELS)}")
    p.add_argument("--baselines", type=_csv(str), default=None, help=f"default {','.join(BASELINES)}")
    p.add_argument("--transports", type=_csv(str), default=None, help=f"default {','.join(FLAT_TRANSPORTS)}")
    p.add_argument("--sparsities", type=_csv(float), default=None,
                   help=f"default {','.join(map(str, SPARSITIES))}")
    p.add_argument("--scale-blocks", type=_csv(int), default=[0],
                   help="3LC elements per scale, comma list (default 0: one scale per tensor)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 300, train.py's)")
    p.add_argument("--run-factor", type=int, default=3, help="steps of every hook but none: --steps times this")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--slack", type=float, default=0.02, help="second target: none's final loss times 1 + this")
    p.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    p.add_argument("--quick", action="store_true", help="development run, output under launch/results/raw/")
    p.add_argument("--out", default=None, help="output prefix (default launch/results/bench_tta)")
    p.add_argument("--render", default=None, metavar="JSON", help="only rewrite the .md/.png of an earlier output")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args(argv)
    q = QUICK if a.quick else {}
    a.nodes = a.nodes or q.get("nodes", [2, 4])
    a.models = a.models or q.get("models", list(MODELS))
    a.baselines = a.baselines or q.get("baselines", list(BASELINES))
    a.transports = a.transports or q.get("transports", list(FLAT_TRANSPORTS))
    a.sparsities = a.sparsities or q.get("sparsities", list(SPARSITIES))
    a.steps = a.steps or q.get("steps", 300)
    a.run_factor = q.get("run_factor", a.run_factor)
    a.out = a.out or ("launch/results/raw/bench_tta_quick" if a.quick else "launch/results/bench_tta")
    if "none" not in a.baselines:
        p.error("the targets come from the 'none' cells: keep 'none' in --baselines")
    return a


def variants(a) -> list[dict]:
    out = [{"variant": b, "hook": b} for b in a.baselines]
    out += [{"variant": f"threelc-{t}-s{s:g}" + (f"-b{b}" if b else ""), "hook": "threelc", "transport": t,
             "sparsity": s, "scale_block": b}
            for b in a.scale_blocks for t in a.transports for s in a.sparsities]
    return out


def plan(a) -> list[dict]:
    cells = []
    for nodes in a.nodes:
        for model in a.models:
            for v in variants(a):
                steps = a.steps if v["hook"] == "none" else a.steps * a.run_factor
                args = ["--model", model, "--hook", v["hook"], "--steps", str(steps), "--eval-every",
                        str(a.eval_every), "--threads", "1", "--dist-timeout", "120", "--no-progress"]
                if v["hook"] == "threelc":
                    args += ["--transport", v["transport"], "--sparsity", f"{v['sparsity']:g}",
                             *(["--scale-block", str(v["scale_block"])] if v["scale_block"] else [])]
                cells.append({"id": f"n{nodes}-{model}-{v['variant']}", "nodes": nodes, "model": model,
                              **v, "train_args": args})
    return cells


def run_cell(cell: dict, a, log_root: Path) -> dict:
    from launch.testbed.lab import LabError, run_lab

    log_dir = log_root / cell["id"]
    shutil.rmtree(log_dir, ignore_errors=True)
    rec = {**cell, "status": "ok", "error": None, "loadavg_before": list(os.getloadavg())}
    t0 = time.time()
    try:
        res = run_lab(cell["train_args"], nodes=cell["nodes"], rate=a.rate, timeout=a.timeout, strict=True,
                      log_dir=str(log_dir))
        t = res["train"]
        curve = [(e["step"], e["train_s"], e["loss"]) for e in t["evals"]]
        curve.append((t["steps"], t["train_s"], t["final_loss"]))
        rec.update(curve=curve, final_loss=t["final_loss"], final_accuracy=t.get("final_accuracy"),
                   loss_at_steps=next(loss for step, _, loss in curve if step >= a.steps),
                   step_time_s=t["mean_step_time_s"], wire_bytes_per_step=res["wire"]["tx_bytes_per_step"],
                   hook_ratio=(t.get("whole_run") or {}).get("ratio"))
        shutil.rmtree(log_dir, ignore_errors=True)
    except (LabError, OSError, ValueError, KeyError) as e:
        rec.update(status="failed", error=str(e)[-4000:], log_dir=str(log_dir))
    rec["cell_wall_s"] = time.time() - t0
    return rec


def time_to(curve: list, target: float) -> float | None:
    return next((s for _, s, loss in curve if loss <= target), None)


def derive(doc: dict) -> None:
    """Targets from each group's none cell; per cell: times to them and traffic relative to none."""
    slack = doc["settings"]["slack"]
    for c in doc["cells"]:
        base = next((b for b in doc["cells"] if b["nodes"] == c["nodes"] and b["model"] == c["model"]
                     and b["variant"] == "none" and b["status"] == "ok"), None)
        if c["status"] != "ok" or base is None:
            continue
        c["target_loss"] = base["final_loss"]
        c["time_to_target_s"] = time_to(c["curve"], base["final_loss"])
        c["time_to_slack_s"] = time_to(c["curve"], base["final_loss"] * (1 + slack))
        c["loss_vs_none"] = c["loss_at_steps"] / base["final_loss"]
        c["traffic_ratio"] = base["wire_bytes_per_step"] / c["wire_bytes_per_step"]
    for c in doc["cells"]:  # none's own time first: the loop above sets it
        base = next((b for b in doc["cells"] if b["nodes"] == c["nodes"] and b["model"] == c["model"]
                     and b["variant"] == "none" and b["status"] == "ok"), None)
        if c["status"] == "ok" and base is not None and c.get("time_to_target_s"):
            c["speedup_vs_none"] = base["time_to_target_s"] / c["time_to_target_s"]


def _fmt(x, spec=".1f"):
    return "—" if x is None else format(x, spec)


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"# launch/bench_tta.py: time to the uncompressed loss at {s['rate']}", "",
             f"`{doc['command']}` — {doc['started']}, {doc['machine']}, git {doc['git_commit']}", "",
             f"Seconds of training (evaluations excluded) until the test loss is at or below `none`'s final loss "
             f"after {s['steps']} steps, and that loss + {s['slack']:.0%}; — = not reached ({s['steps']} steps for "
             f"none, {s['steps'] * s['run_factor']} for the others). Loss at step {s['steps']}: the same steps as "
             "none. Traffic: bytes across the shaped links per step, whole run, none / cell.", ""]
    for nodes in s["nodes"]:
        for model in s["models"]:
            group = [c for c in doc["cells"] if c["nodes"] == nodes and c["model"] == model]
            if not group:
                continue
            lines += [f"## {model}, {nodes} nodes", "",
                      f"| hook | loss at step {s['steps']} | vs none | to none's loss (s) | speed-up vs none "
                      f"| to +{s['slack']:.0%} (s) | final loss | step (ms) | traffic (x less) |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for c in group:
                if c["status"] != "ok":
                    lines.append(f"| {c['variant']} | failed: {c['error'][-120:]!r} | | | | | | | |")
                    continue
                lines.append(f"| {c['variant']} | {c['loss_at_steps']:.4f} | {_fmt(c.get('loss_vs_none'), '.3f')} "
                             f"| {_fmt(c.get('time_to_target_s'))} | {_fmt(c.get('speedup_vs_none'), '.2f')} "
                             f"| {_fmt(c.get('time_to_slack_s'))} | {c['final_loss']:.4f} "
                             f"| {c['step_time_s'] * 1e3:.1f} | {_fmt(c.get('traffic_ratio'))} |")
            lines.append("")
    return "\n".join(lines)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["settings"]
    groups = [(n, m) for n in s["nodes"] for m in s["models"]]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
    for ax, (nodes, model) in zip(axes[0], groups):
        for c in doc["cells"]:
            if c["nodes"] != nodes or c["model"] != model or c["status"] != "ok":
                continue
            _, xs, ys = zip(*c["curve"])
            style = "-" if c["hook"] == "threelc" else "--"
            ax.plot(xs, ys, style, lw=1.2 if c["hook"] == "threelc" else 2, label=c["variant"].replace("threelc-", "3lc-"))
            if c["variant"] == "none":
                ax.axhline(c["final_loss"] * (1 + s["slack"]), color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{model}, {nodes} nodes at {s['rate']}", fontsize=9)
        ax.set_xlabel("training seconds (log)")
        ax.set_ylabel("test loss (log)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"launch/bench_tta.py: test loss against training time (dotted: none's final loss + {s['slack']:.0%})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: dict, out: Path, final: bool) -> None:
    derive(doc)
    save_json(doc, out)
    if final:
        out.with_suffix(".md").write_text(markdown(doc) + "\n")
        plot(doc, out.with_suffix(".png"))


def main(argv=None) -> int:
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    cells = cells_to_run(a, plan, write)
    if cells is None:
        return 0
    signal.signal(signal.SIGINT, signal.default_int_handler)  # netlab tears down on the exception
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, f: (_ for _ in ()).throw(SystemExit(128 + n)))

    from launch.testbed.lab import cleanup_stale, preflight

    preflight()
    cleanup_stale()
    out = output_prefix(a.out)
    doc = new_document("launch/bench_tta.py", argv, vars(a))
    log_root = out.parent / "raw" / f"{out.name}_logs"
    run_all("bench_tta", doc, cells, lambda cell: run_cell(cell, a, log_root), lambda d, final: write(d, out, final),
            lambda r: f"ok: final loss {r['final_loss']:.4f}" if r["status"] == "ok" else f"failed: {r['error'][-200:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
