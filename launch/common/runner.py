"""Run launch/train.py under torchrun from Python and parse its result line.

Shared by launch/demo.py, launch/netlab.py, the tests and benchmarks.
``python -m torch.distributed.run`` (rather than a ``torchrun`` on PATH) makes
the workers use the same interpreter and environment as the caller.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "launch" / "train.py"


def torchrun_cmd(torchrun_args: list[str], train_args: list[str]) -> list[str]:
    """``[python, -m, torch.distributed.run, *torchrun_args, train.py, *train_args]``."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args, str(TRAIN), *train_args]


def standalone_cmd(train_args: list[str], nproc: int = 2) -> list[str]:
    """Single-machine torchrun (``--standalone`` picks a free port, so several
    runs may proceed side by side)."""
    return torchrun_cmd(["--standalone", f"--nproc-per-node={nproc}"], train_args)


def worker_env(extra: dict | None = None) -> dict:
    """The caller's environment, with one thread per worker: the machines this
    runs on are small and shared, and torchrun would set it anyway (noisily)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    # torch 2.13: restarted torchrun workers can read the dead attempt's gloo addresses
    # from the shared rendezvous store (pytorch/pytorch#135712).
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # Workers import launch.* by path; make the repo importable regardless of cwd.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def parse_result(stdout: str) -> dict:
    """The last JSON object line on stdout that looks like a train.py result."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "model" in obj and "hook" in obj:
                return obj
    raise ValueError("no result JSON line in output")


class RunError(RuntimeError):
    """A torchrun invocation failed; carries the tail of its output."""


def run_standalone(train_args: list[str], nproc: int = 2, timeout: float = 600, env: dict | None = None) -> dict:
    """Run train.py on ``nproc`` local processes and return its result dict."""
    cmd = standalone_cmd(list(train_args), nproc)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env(env), cwd=REPO)
    if p.returncode != 0:
        raise RunError(f"exit {p.returncode}: {' '.join(cmd)}\n--- stdout ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-5000:]}")
    try:
        return parse_result(p.stdout)
    except ValueError as e:
        raise RunError(f"{e}: {' '.join(cmd)}\n--- stdout ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-3000:]}") from None
