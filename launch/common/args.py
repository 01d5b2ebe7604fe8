"""The flags of launch/train.py and launch/train_horovod.py: one parser, so both entry points take the same run."""

from __future__ import annotations

import argparse
import os

from launch.common import models
from launch.common.schemes import KINDS
from launch.testbed.iface import IFNAMSIZ
from threelc.hooks import TRANSPORT_CHOICES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a launch.models task with a DDP comm hook (torchrun), or under Horovod.")
    p.add_argument("--framework", choices=["torch", "horovod"], default="torch",
                   help="horovod: run under horovodrun with hooks none/fp16/threelc (launch/train_horovod.py)")
    p.add_argument("--model", default="digits-cnn", choices=sorted(models.TASKS))
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="task-specific option for models.build (e.g. width=1024), repeatable")
    p.add_argument("--hook", default="none", choices=KINDS)
    p.add_argument("--sparsity", type=float, default=1.0, help="3LC sparsity multiplier s, 1 <= s < 2")
    p.add_argument("--sparsity-warmup", type=int, default=None,
                   help="3LC: compressed steps over which s ramps from 1 to --sparsity (default: threelc's)")
    p.add_argument("--transport", default="allgather", choices=TRANSPORT_CHOICES)
    p.add_argument("--start-iter", type=int, default=2,
                   help="plain fp32 all-reduce for the first N steps (3LC start_iter, PowerSGD start_powerSGD_iter)")
    p.add_argument("--no-error-feedback", action="store_true")
    p.add_argument("--unbounded-scale", action="store_true",
                   help="3LC: scale = s * max|g + r| without the bound by the current gradient (experiments)")
    p.add_argument("--scale-block", type=int, default=0,
                   help="3LC: elements per scale (0: one per tensor; for Adam, e.g. 1024)")
    p.add_argument("--powersgd-rank", type=int, default=2)
    p.add_argument("--bucket-cap-mb", type=float, default=None,
                   help="DDP bucket size; PowerSGD on gloo needs one bucket (default for it: the whole model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=300, help="total steps (a resumed run continues up to it)")
    p.add_argument("--lr", type=float, default=None, help="default: the task's")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="cosine: lr * (1 + cos(pi * step / steps)) / 2, a pure function of the step "
                        "(nothing to checkpoint)")
    p.add_argument("--optimizer", choices=["sgd", "adam"], default=None, help="default: the task's")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (all ranks); default: the task's")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate on rank 0 every N steps (0: only at the end)")
    p.add_argument("--warmup-steps", type=int, default=3, help="steps excluded from the averages")
    p.add_argument("--checkpoint", default=None, metavar="PATH")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--save-params", default=None, metavar="PATH", help="rank 0 saves final parameters here")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result object here")
    p.add_argument("--wire-iface", default=os.environ.get("TLC_WIRE_IFACE"),
                   help="network interface whose byte counters to report (default: $TLC_WIRE_IFACE)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    p.add_argument("--dist-timeout", type=float, default=300, help="seconds before a stuck collective fails")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--no-prime-buckets", action="store_true",
                   help="on a PowerSGD resume, skip the two throw-away passes that settle DDP's bucket layout")
    p.add_argument("--fault-kill-at-step", type=int, default=None, metavar="N",
                   help="testing aid: rank 1 SIGKILLs itself at the start of step N in torchrun's first attempt "
                        "only (TORCHELASTIC_RESTART_COUNT=0), to exercise elastic restarts")
    args = p.parse_args(argv)
    if args.wire_iface and len(args.wire_iface.encode()) >= IFNAMSIZ:
        p.error(f"--wire-iface {args.wire_iface!r}: interface names are at most {IFNAMSIZ - 1} bytes")
    return args
