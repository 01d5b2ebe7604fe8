"""torchrun entry point: train a launch.models task with a DDP comm hook.

Single machine::

    torchrun --standalone --nproc-per-node 2 launch/train.py \\
        --model digits-cnn --hook threelc --sparsity 1.75 --transport allgather --steps 300

Several machines (one agent per node)::

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --rdzv-backend c10d \\
        --rdzv-endpoint 10.77.0.1:29500 launch/train.py --model mlp-wide --hook fp16

Backend: NCCL when CUDA is available (one GPU per local rank), else gloo;
``--device cpu`` forces gloo on a GPU machine.  At the end rank 0 prints one
JSON line (nothing else on that line; see ``result`` below for the fields)
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
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun launch/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from launch import checkpoint, models
from launch.comm import KINDS, TRANSPORTS, setup_comm
from launch.gather import all_gather_rows, decode_name, encode_name

IFNAMSIZ = 16  # Linux: an interface name is at most 15 bytes plus the NUL


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", choices=["torch", "horovod"], default="torch",
                   help="horovod: run under horovodrun with hooks none/fp16/threelc (launch/train_horovod.py)")
    p.add_argument("--model", default="digits-cnn", choices=sorted(models.TASKS))
    p.add_argument("--task-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="task-specific option for models.build (e.g. width=1024), repeatable")
    p.add_argument("--hook", default="none", choices=KINDS)
    p.add_argument("--sparsity", type=float, default=1.0, help="3LC sparsity multiplier s, 1 <= s < 2")
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


def _task_options(pairs: list[str]) -> dict:
    out = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"--task-opt expects KEY=VALUE, got {kv!r}")
        out[k] = v
    return out


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


def read_iface(iface: str | None) -> dict | None:
    """tx/rx byte counters of ``iface`` as seen from this process's netns."""
    if not iface:
        return None
    base = f"/sys/class/net/{iface}/statistics"
    try:
        with open(f"{base}/tx_bytes") as t, open(f"{base}/rx_bytes") as r:
            return {"tx": int(t.read()), "rx": int(r.read())}
    except OSError:
        return None


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


def inject_fault(args, rank: int, step: int) -> None:
    """``--fault-kill-at-step``: a testing aid that simulates a worker crash.

    SIGKILL: no exception, no atexit handlers, no goodbye to the peers, as when
    the OOM killer or a dying machine takes a worker.  Only rank 1, and only in
    torchrun's first attempt (without torchrun the variable is unset: no kill),
    so the restarted job runs through.  First it copies the checkpoint that the
    restart will resume from to ``PATH.at-fault``, so that a test can replay
    the same resume in a fresh job and compare.
    """
    if rank != 1 or os.environ.get("TORCHELASTIC_RESTART_COUNT") != "0":
        return
    if args.checkpoint and os.path.exists(args.checkpoint):
        shutil.copyfile(args.checkpoint, args.checkpoint + ".at-fault")
    print(f"[train] fault injection: rank {rank} SIGKILLs itself at step {step} (time {time.time():.3f})",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def restore_checkpoint(ckpt: dict, opt, hook, world: int, rank: int, device, who: str) -> None:
    """Load optimizer state, and this rank's RNG and hook state when the world size matches."""
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt["world_size"] == world:
        mine = ckpt["ranks"][rank]
        checkpoint.restore_rng(mine["rng"], device)
        hook.load_state_dict(mine["hook"])
    elif rank == 0:
        print(f"[{who}] checkpoint from world size {ckpt['world_size']} != {world}: "
              "hook state and RNG start fresh", file=sys.stderr)


def progress_bar(args: argparse.Namespace, rank: int, start_step: int, desc: str):
    """A tqdm bar on rank 0 (None elsewhere or with --no-progress)."""
    if rank != 0 or args.no_progress:
        return None
    from tqdm import tqdm

    return tqdm(total=args.steps, initial=start_step, desc=desc, file=sys.stderr, mininterval=1.0,
                dynamic_ncols=True)


def first_measured_step(args: argparse.Namespace, start_step: int) -> int:
    """The first step the averages count: --warmup-steps in, but at least one step measured."""
    n_run = max(0, args.steps - start_step)
    return start_step + (min(args.warmup_steps, n_run - 1) if n_run > 1 else 0)


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
    task = models.build(args.model, args.seed, batch_size=args.batch_size, device=device,
                        **_task_options(args.task_opt))
    if task.batch_size % world:
        raise SystemExit(f"--batch-size {task.batch_size} must be divisible by world size {world}")
    meta = {"model": args.model, "seed": args.seed, "batch_size": task.batch_size, "hook": args.hook}

    ckpt = checkpoint.load(args.checkpoint)
    start_step = 0
    if ckpt is not None:
        checkpoint.check_meta(ckpt, meta)
        task.model.load_state_dict(ckpt["model"])
        start_step = int(ckpt["step"])
        if rank == 0:  # one line per resume; tests/test_faults.py reads it after an elastic restart
            print(f"[train] resuming from {args.checkpoint} at step {start_step} (torchelastic restart "
                  f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '-')}, time {time.time():.3f})",
                  file=sys.stderr, flush=True)

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
    comm = setup_comm(ddp, args.hook, sparsity=args.sparsity, transport=args.transport,
                      start_iter=args.start_iter, error_feedback=not args.no_error_feedback,
                      powersgd_rank=args.powersgd_rank, seed=args.seed,
                      timeout=datetime.timedelta(seconds=args.dist_timeout))
    opt = task.make_optimizer(ddp.parameters(), lr=args.lr, kind=args.optimizer)
    base_lrs = [group["lr"] for group in opt.param_groups]

    if ckpt is not None:
        restore_checkpoint(ckpt, opt, comm, world, rank, device, "train")
        del ckpt

    progress = progress_bar(args, rank, start_step, f"{args.model}/{args.hook}")
    first_measured = first_measured_step(args, start_step)
    step_times, losses, evals = [], [], []
    snap_c = snap_w = None
    t_begin = time.perf_counter()
    ddp.train()
    for step in range(start_step, args.steps):
        if args.fault_kill_at_step == step:
            inject_fault(args, rank, step)
        if step == first_measured:  # counters *before* the first measured step
            snap_c, snap_w = comm.counters(), read_iface(args.wire_iface)
        x, y = task.train_batch(rank, world, step)
        sync(device)
        t0 = time.perf_counter()
        loss = task.loss_fn(ddp(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # DDP's all-reduce / the comm hook run in here
        if args.lr_schedule == "cosine":
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * (1 + math.cos(math.pi * step / args.steps)) / 2
        opt.step()
        sync(device)
        dt = time.perf_counter() - t0
        comm.step_done()
        if step >= first_measured:
            step_times.append(dt)
        losses.append(loss.item())
        done = step + 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if args.eval_every and done % args.eval_every == 0 and done < args.steps and rank == 0:
            evals.append({"step": done, **task.evaluate(ddp.module)})
            if progress is not None:
                progress.write(f"[eval] step {done}: {evals[-1]}")
        if args.checkpoint and args.checkpoint_every and done % args.checkpoint_every == 0:
            checkpoint.save(args.checkpoint, step=done, model=ddp.module, optimizer=opt, comm=comm,
                            device=device, meta=meta)
    end_c, end_w = comm.counters(), read_iface(args.wire_iface)
    total_time = time.perf_counter() - t_begin
    if progress is not None:
        progress.close()

    saved_last = args.checkpoint_every and args.steps % args.checkpoint_every == 0
    if args.checkpoint and args.steps > start_step and not saved_last:
        # Also checkpoint the final state, so a rerun with more --steps continues.
        checkpoint.save(args.checkpoint, step=args.steps, model=ddp.module, optimizer=opt, comm=comm,
                        device=device, meta=meta)

    # Cross-rank reductions happen after the measured window so they are not
    # counted as training traffic; all_gather_rows makes exiting right after safe.
    tail = losses[-10:]
    measured = len(step_times)
    wire_mine = None
    if snap_w and end_w and measured:
        wire_mine = [(end_w["tx"] - snap_w["tx"]) / measured, (end_w["rx"] - snap_w["rx"]) / measured]
    rows = all_gather_rows([sum(tail) / len(tail) if tail else 0.0, *(wire_mine or [0.0, 0.0]),
                            float(wire_mine is not None), *encode_name(args.wire_iface, IFNAMSIZ)], device)
    train_loss = sum(r[0] for r in rows)
    wire = None
    if args.wire_iface:
        wire = [{"iface": decode_name(r[4:]), "tx_bytes_per_step": r[1], "rx_bytes_per_step": r[2]} if r[3] else None
                for r in rows]

    comm.close()  # all communication is done; park the hook's thread before exit
    if rank != 0:
        return None
    final = task.evaluate(ddp.module)
    per = (lambda k: (end_c[k] - snap_c[k]) / measured) if measured else (lambda k: None)
    result = {
        "model": args.model,
        "hook": args.hook,
        "transport": args.transport if args.hook == "threelc" else None,
        "sparsity": args.sparsity if args.hook == "threelc" else None,
        "world_size": world,
        "steps": args.steps,
        "mean_step_time_s": sum(step_times) / measured if measured else None,
        "bytes_per_step": per("sent"),
        "uncompressed_bytes_per_step": per("uncompressed"),
        "final_loss": final["loss"],
        "final_accuracy": final.get("accuracy"),
        # -- extras --
        "bytes_received_per_step": per("received"),
        "metrics": final,
        "final_train_loss": train_loss / world if losses else None,
        "evals": evals,
        "measured_steps": measured,
        "start_step": start_step,
        "total_time_s": total_time,
        "num_params": comm.numel,
        "backend": dist.get_backend(),
        "bucket_cap_mb": bucket_cap_mb,
        "batch_size": task.batch_size,
        "powersgd_rank": args.powersgd_rank if "powersgd" in args.hook else None,
        "wire": wire,
    }
    if args.save_params:
        checkpoint.atomic_save(checkpoint.to_cpu(dict(ddp.module.state_dict())), args.save_params)
    line = json.dumps(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
