"""The testbed's command line: emulated nodes with shaped links on one machine.

    sudo python launch/netlab.py --nodes 2 --rate 100mbit -- --model digits-cnn --hook threelc --steps 20
    sudo python launch/netlab.py --nodes 2 --procs-per-node 2 --rate 100mbit -- --hook threelc --transport hierarchical
    sudo python launch/netlab.py --cleanup     # namespaces left by dead runs

What it builds and measures: launch/testbed/lab.py (``run_lab`` is the same from Python).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.testbed.lab import LabError, cleanup_stale, preflight, raise_system_exit, run_lab  # noqa: E402


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="Multi-node DDP testbed in network namespaces",
                                usage="netlab.py [options] -- TRAIN.PY ARGS")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--procs-per-node", type=int, default=1, help="training processes per node namespace")
    p.add_argument("--rate", default=None, help="per-node egress rate, tc syntax (100mbit, 1gbit)")
    p.add_argument("--delay", default=None, help="per-node egress delay (needs sch_netem), e.g. 1ms")
    p.add_argument("--loss", "--loss-percent", type=float, default=0.0,
                   help="per-node egress packet loss in percent (nftables rule; needs nft)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--port", type=int, default=29500)
    p.add_argument("--best-effort", action="store_true", help="run without delay if netem is missing")
    p.add_argument("--log-dir", default=None, help="keep each node's stdout/stderr here")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result here")
    p.add_argument("--cleanup", action="store_true", help="delete namespaces left by dead netlab runs, then exit")
    a = p.parse_args(own)
    # Explicit handlers: a background job of a non-interactive shell starts
    # with SIGINT ignored, and SIGHUP/SIGTERM would skip `finally`.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_system_exit)
    try:
        if a.cleanup:
            preflight()
            print(json.dumps({"removed": cleanup_stale()}))
            return 0
        res = run_lab(train_args, nodes=a.nodes, rate=a.rate, delay=a.delay, loss=a.loss, timeout=a.timeout,
                      strict=not a.best_effort, port=a.port, log_dir=a.log_dir, procs_per_node=a.procs_per_node)
    except LabError as e:
        print(f"netlab: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("netlab: interrupted; namespaces and processes cleaned up", file=sys.stderr)
        return 130
    line = json.dumps(res)
    if a.json:
        Path(a.json).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
