"""Traffic of each 3LC transport in real training, beside DDP's own all-reduce.

    python launch/bench_hook.py                  # 4 ranks, digits-cnn, 300 steps
    python launch/bench_hook.py --nproc 2 --steps 100

Runs launch/train.py under ``torchrun --standalone`` once per configuration (hook
none, then threelc with every transport at each sparsity), all in one invocation,
and prints bytes one rank hands to collectives per compressed step, the ratio to
the uncompressed all-reduce measured in the same invocation, and the final test
accuracy. Writes launch/results/bench_hook.json.
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
from threelc.hooks import FLAT_TRANSPORTS

TRANSPORTS = FLAT_TRANSPORTS


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[1.0, 1.9])
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more train.py flags")
    parser.add_argument("--out", default="launch/results/bench_hook.json")
    args = parser.parse_args(argv)

    common = ["--model", args.model, "--steps", str(args.steps), "--no-progress", *args.extra]
    configs = [("none", None, None)] + [("threelc", t, s) for s in args.sparsities for t in TRANSPORTS]
    rows, started = [], time.time()
    for hook, transport, sparsity in configs:
        flags = ["--hook", hook] + (["--transport", transport, "--sparsity", str(sparsity)] if transport else [])
        print("running:", " ".join(flags), file=sys.stderr, flush=True)
        try:
            result = run_standalone(common + flags, nproc=args.nproc, timeout=1200)
        except RunError as error:
            result = {"hook": hook, "transport": transport, "sparsity": sparsity, "error": str(error)[-500:]}
        rows.append(result)
    baseline = rows[0].get("bytes_per_step")
    print(f"\n{args.model}, {args.nproc} ranks, {args.steps} steps ({time.time() - started:.0f} s); "
          "bytes one rank hands to collectives per step, after warm-up\n")
    print("| hook | transport | sparsity | bytes/step | vs none | step time | test accuracy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['hook']} | {r['transport']} | {r['sparsity']} | failed: {r['error'][:60]} | | | |")
            continue
        ratio = baseline / r["bytes_per_step"] if baseline and r.get("bytes_per_step") else None
        acc = r.get("final_accuracy")
        print(f"| {r['hook']} | {r.get('transport') if r['hook'] == 'threelc' else '-'} | "
              f"{r.get('sparsity') if r['hook'] == 'threelc' else '-'} | {r['bytes_per_step']:,.0f} | "
              f"{f'{ratio:.0f}x' if ratio else '-'} | {1e3 * r['mean_step_time_s']:.1f} ms | "
              f"{f'{100 * acc:.1f}%' if acc is not None else '-'} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python launch/bench_hook.py " + " ".join(argv or sys.argv[1:]),
                               "rows": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
