"""torchrun entry point: train a launch.models task with a DDP comm hook.

Single machine::

    torchrun --standalone --nproc-per-node 2 launch/train.py \\
        --model digits-cnn --hook threelc --sparsity 1.75 --transport allgather --steps 300

Several machines (one agent per node)::

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --rdzv-backend c10d \\
        --rdzv-endpoint 10.77.0.1:29500 launch/train.py --model mlp-wide --hook fp16

Backend: NCCL when CUDA is available (one GPU per local rank), else gloo;
``--device cpu`` forces gloo on a GPU machine.  At the end rank 0 prints one
JSON line (nothing else on that line; launch/common/loop.py's ``result_line`` has the fields)
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

import datetime
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun launch/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from launch.common import checkpoint
from launch.common.args import parse_args
from launch.common.schemes import register_scheme
from launch.common.gather import all_gather_rows
from launch.common.loop import build_task, cross_rank, emit, restore_checkpoint, result_line, run_steps

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
    meter = register_scheme(ddp, args.hook, sparsity=args.sparsity, sparsity_warmup=args.sparsity_warmup,
                            transport=args.transport, start_iter=args.start_iter,
                            error_feedback=not args.no_error_feedback, bounded_scale=not args.unbounded_scale,
                            scale_block=args.scale_block, powersgd_rank=args.powersgd_rank, seed=args.seed,
                            timeout=datetime.timedelta(seconds=args.dist_timeout))
    opt = task.make_optimizer(ddp.parameters(), lr=args.lr, kind=args.optimizer)

    if ckpt is not None:
        restore_checkpoint(ckpt, opt, meter, world, rank, device, "train")
        del ckpt

    def save(step: int) -> None:
        checkpoint.save(args.checkpoint, step=step, model=ddp.module, optimizer=opt, meter=meter, device=device,
                        meta=meta)

    run = run_steps(args, task, ddp, ddp.module, opt, meter, rank=rank, world=world, device=device,
                    start_step=start_step, desc=f"{args.model}/{args.hook}",
                    zero_grad=lambda: opt.zero_grad(set_to_none=True), save=save)
    # all_gather_rows returns once gloo has let go of its tensors, so we may exit right after.
    train_loss, wire = cross_rank(args, run, lambda row: all_gather_rows(row, device), world)
    meter.close()  # all communication is done; park the hook's thread before exit
    if rank != 0:
        return None
    result = result_line(args, task, run, world=world, final=task.evaluate(ddp.module), train_loss=train_loss,
                         wire=wire, num_params=meter.numel, backend=dist.get_backend(), bucket_cap_mb=bucket_cap_mb,
                         powersgd_rank=args.powersgd_rank if "powersgd" in args.hook else None)
    emit(args, result, ddp.module)
    return result


def exit_now(code: int = 0) -> None:
    """Exit without interpreter teardown, once everything is written.

    On torch 2.13 a gloo worker thread can still be letting go of a finished
    collective's tensors (a comm hook's, DDP's) when Python starts finalizing;
    the release needs the GIL, cannot get it, and the process aborts with
    SIGABRT after a successful run (launch/common/gather.py has the details; DDP keeps
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
