"""The README's first command: 3LC vs plain DDP on 2 CPU processes, in ~30 s.

    python launch/demo.py

Trains ``digits-cnn`` twice under ``torchrun --standalone --nproc-per-node 2``
-- once with DDP's own fp32 all-reduce (``--hook none``), once with 3LC
(``--hook threelc --sparsity 1.0``) -- and prints the gradient traffic per
step each rank hands to the collectives, the reduction ratio and the final
test accuracy of both. ``--compare fp16`` (or any train.py hook) swaps the second run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common.runner import RunError, run_standalone


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.1f} GB"


def _label(r: dict) -> str:
    if r["hook"] == "threelc":
        return f"threelc s={r['sparsity']:g} ({r['transport']})"
    return {"none": "none (fp32 all-reduce)"}.get(r["hook"], r["hook"])


def table(results: list[dict]) -> str:
    """A plain-text table; the first result is the baseline for the ratio."""
    base = results[0]["bytes_per_step"]
    rows = [("hook", "bytes/step", "reduction", "step time", "test acc", "test loss")]
    for r in results:
        b = r["bytes_per_step"]
        acc = r.get("final_accuracy")
        rows.append((
            _label(r),
            _fmt_bytes(b),
            f"{base / b:.1f}x" if b else "-",
            f"{r['mean_step_time_s'] * 1e3:.1f} ms" if r.get("mean_step_time_s") else "-",
            f"{acc * 100:.1f}%" if acc is not None else "-",
            f"{r['final_loss']:.3f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="3LC vs DDP all-reduce on digits-cnn, 2 CPU processes")
    p.add_argument("--model", default="digits-cnn")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--sparsity", type=float, default=1.0)
    p.add_argument("--transport", default="allgather")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", default="threelc", help="hook to compare against none (any train.py --hook)")
    p.add_argument("--json", default=None, metavar="PATH", help="write both result objects here")
    args = p.parse_args(argv)

    hook = args.compare
    common = ["--model", args.model, "--steps", str(args.steps), "--seed", str(args.seed), "--no-progress"]
    runs = [["--hook", "none"], ["--hook", hook]]
    if hook == "threelc":
        runs[1] += ["--sparsity", str(args.sparsity), "--transport", args.transport]

    results = []
    t0 = time.time()
    for extra in runs:
        print(f"running: torchrun --standalone --nproc-per-node {args.nproc} launch/train.py "
              f"{' '.join(common + extra)}", file=sys.stderr, flush=True)
        try:
            results.append(run_standalone(common + extra, nproc=args.nproc, timeout=600))
        except RunError as e:
            print(e, file=sys.stderr)
            return 1
    r0 = results[0]
    print(f"\n{args.model}: {r0['num_params']:,} parameters, {r0['world_size']} processes ({r0['backend']}), "
          f"{args.steps} steps, global batch {r0['batch_size']}  [{time.time() - t0:.0f} s]")
    print("bytes/step = gradient bytes one rank hands to the collectives per step (after warm-up)\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
