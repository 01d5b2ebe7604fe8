"""torchrun entry point: train a launch.models task with a DDP comm hook.

Single machine::

    torchrun --standalone --nproc-per-node 2 launch/train.py \\
        --model digits-cnn --hook threelc --sparsity 1.75 --transport allgather --steps 300

Several machines (one agent per node)::

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --rdzv-backend c10d \\
        --rdzv-endpoint 10.77.0.1:29500 launch/train.py --model mlp-wide --hook fp16

Backend: NCCL when CUDA is available (one GPU per local rank), else gloo;
``--device cpu`` forces gloo on a GPU machine.  At the end rank 0 prints one
JSON line (nothing else on that line; launch/loop.py's ``result_line`` has the fields)
and, with ``--json PATH``, writes the same object to a file.

Averages (``mean_step_time_s``, ``bytes_per_step``, ...) skip the first
``--warmup-steps`` steps of this invocation: they include DDP's bucket
rebuild and the hooks' plain all-reduce warm-up (``--start-iter``).

``--checkpoint PATH`` saves model, optimizer, step, per-rank RNG and per-rank
hook state every ``--checkpoint-every`` steps (atomically) and resumes from
PATH when it exists (rank 0 logs the resume to stderr).  ``--wire-iface
IFACE`` (set by launch/netlab.py) also reports the bytes that crossed that
network interface during the measured steps, per rank.

``--fault-kill-at-step N`` is a testing aid (tests/test_faults.py), not a
feature: rank 1 SIGKILLs itself at the start of step N, but only in torchrun's
first attempt (``TORCHELASTIC_RESTART_COUNT=0``), so that under
``torchrun --max-restarts 1`` (or more) the restarted job resumes from
``--checkpoint`` and runs through.  Elastic restarts need
``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in torchrun's environment (torch
2.13): otherwise restarted workers can read the dead attempt's gloo
addresses from the shared store and fail in ``init_process_group``
("connectFullMesh failed ... Connection refused"; pytorch/pytorch#135712).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun launch/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from launch import checkpoint, models
from launch.comm import KINDS, TRANSPORTS, setup_comm
from launch.gather import all_gather_rows
from launch.loop import IFNAMSIZ, build_task, cross_rank, emit, restore_checkpoint, result_line, run_steps

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", choices=["torch", "horovod"], default="torch",
                   help="horovod: run under horovodrun with hooks none/fp16/threelc (launch/train_horovod.py)")
    p.add_argument("--model", default="digits-cnn", choices=sorted(models.TASKS))
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="task-specific option for models.build (e.g. width=1024), repeatable")
    p.add_argument("--hook", default="none", choices=KINDS)
    p.add_argument("--sparsity", type=float, default=1.0, help="3LC sparsity multiplier s, 1 <= s < 2")
    p.add_argument("--sparsity-warmup", type=int, default=None,
                   help="3LC: compressed steps over which s ramps from 1 to --sparsity (default: threelc's)")
    p.add_argument("--transport", default="allgather", choices=TRANSPORTS)
    p.add_argument("--start-iter", type=int, default=2,
                   help="plain fp32 all-reduce for the first N steps (3LC start_iter, PowerSGD start_powerSGD_iter)")
    p.add_argument("--no-error-feedback", action="store_true")
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


def init_distributed(args) -> tuple[int, int, torch.device]:
    """Join the torchrun job; pick backend and device without caring which we run on."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:  # plain `python launch/train.py`: a world of one
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        timeout=datetime.timedelta(seconds=args.dist_timeout),
        **({"device_id": device} if use_cuda else {}),
    )
    return dist.get_rank(), dist.get_world_size(), device


# Hooks whose state is kept per *bucket index* as flat vectors.  (The 3LC hook
# keys its residuals per parameter and copes with DDP's rebuild by itself.)
BUCKET_KEYED_HOOKS = ("powersgd", "batched-powersgd")


def prime_buckets(ddp, task, rank: int, world: int, step: int, device: torch.device) -> None:
    """Make DDP rebuild its buckets *before* the comm hook is registered.

    DDP starts with buckets in reverse parameter order and, after the first
    iteration, rebuilds them in gradient-ready order.  PowerSGD keeps its
    error-feedback residuals and P/Q memories per bucket index as flat
    vectors, saved in the rebuilt layout; a resumed process would apply them
    to the wrong elements during its first step (initial layout) and then
    switch layouts.  Two throw-away forward/backward passes with DDP's plain
    all-reduce (no optimizer step, gradients discarded, RNG restored) trigger
    the rebuild before the hook is registered, so the restored state meets
    the layout it was saved in.  Cost: two fp32 all-reduces, before the
    measured window.
    """
    x, y = task.train_batch(rank, world, step)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for _ in range(2):  # pass 1 records the ready order; pass 2's forward rebuilds
            task.loss_fn(ddp(x), y).backward()
    for p in ddp.parameters():
        p.grad = None


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.framework == "horovod":
        from launch import train_horovod

        return train_horovod.run(args)
    torch.set_num_threads(args.threads)
    rank, world, device = init_distributed(args)
    try:
        return _train(args, rank, world, device)
    finally:
        dist.destroy_process_group()


def _train(args, rank: int, world: int, device: torch.device) -> dict | None:
    task, meta, ckpt, start_step = build_task(args, rank, world, device, "train")

    bucket_cap_mb = args.bucket_cap_mb
    if bucket_cap_mb is None and "powersgd" in args.hook and not device.type == "cuda":
        # PyTorch's PowerSGD hooks can hang/abort on gloo with 2+ buckets:
        # default to a single bucket holding the whole model.
        nbytes = sum(p.numel() * p.element_size() for p in task.model.parameters())
        bucket_cap_mb = nbytes / 2**20 + 1
    ddp = DDP(task.model, device_ids=[device.index] if device.type == "cuda" else None,
              **({"bucket_cap_mb": bucket_cap_mb} if bucket_cap_mb is not None else {}))
    # A fresh run needs no priming (PowerSGD's fp32 warm-up, >= 2 steps, spans
    # DDP's rebuild); a resumed one compresses from its first step.
    if args.hook in BUCKET_KEYED_HOOKS and ckpt is not None and not args.no_prime_buckets:
        prime_buckets(ddp, task, rank, world, start_step, device)
    comm = setup_comm(ddp, args.hook, sparsity=args.sparsity, sparsity_warmup=args.sparsity_warmup,
                      transport=args.transport,
                      start_iter=args.start_iter, error_feedback=not args.no_error_feedback,
                      powersgd_rank=args.powersgd_rank, seed=args.seed,
                      timeout=datetime.timedelta(seconds=args.dist_timeout))
    opt = task.make_optimizer(ddp.parameters(), lr=args.lr, kind=args.optimizer)

    if ckpt is not None:
        restore_checkpoint(ckpt, opt, comm, world, rank, device, "train")
        del ckpt

    def save(step: int) -> None:
        checkpoint.save(args.checkpoint, step=step, model=ddp.module, optimizer=opt, comm=comm, device=device,
                        meta=meta)

    run = run_steps(args, task, ddp, ddp.module, opt, comm, rank=rank, world=world, device=device,
                    start_step=start_step, desc=f"{args.model}/{args.hook}",
                    zero_grad=lambda: opt.zero_grad(set_to_none=True), save=save)
    # all_gather_rows returns once gloo has let go of its tensors, so we may exit right after.
    train_loss, wire = cross_rank(args, run, lambda row: all_gather_rows(row, device), world)
    comm.close()  # all communication is done; park the hook's thread before exit
    if rank != 0:
        return None
    result = result_line(args, task, run, world=world, final=task.evaluate(ddp.module), train_loss=train_loss,
                         wire=wire, num_params=comm.numel, backend=dist.get_backend(), bucket_cap_mb=bucket_cap_mb,
                         powersgd_rank=args.powersgd_rank if "powersgd" in args.hook else None)
    emit(args, result, ddp.module)
    return result


def exit_now(code: int = 0) -> None:
    """Exit without interpreter teardown, once everything is written.

    On torch 2.13 a gloo worker thread can still be letting go of a finished
    collective's tensors (a comm hook's, DDP's) when Python starts finalizing;
    the release needs the GIL, cannot get it, and the process aborts with
    SIGABRT after a successful run (launch/gather.py has the details; DDP keeps
    the process group's threads alive past destroy_process_group, so they
    cannot be joined first). Everything of ours is already closed or flushed
    here, so teardown has nothing left to do.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
    exit_now(0)
