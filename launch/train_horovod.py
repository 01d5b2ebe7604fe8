"""horovodrun entry point: train a launch.models task with Horovod (none / fp16 / threelc).

    horovodrun -np 2 -H localhost:2 --gloo python launch/train_horovod.py \\
        --model digits-cnn --hook threelc --sparsity 1.75 --steps 300

The flags are launch/train.py's (launch/common/args.py), and rank 0 prints
the same final JSON line (plus ``"framework": "horovod"``). ``--hook`` takes

* ``none``: ``hvd.DistributedOptimizer`` (fp32 all-reduce, Horovod's tensor fusion),
* ``fp16``: the same with ``compression=hvd.Compression.fp16``,
* ``threelc``: ``threelc.hooks.horovod.DistributedOptimizer`` (``--sparsity``,
  ``--transport``, ``--start-iter``, ``--no-error-feedback``, ``--unbounded-scale``,
  ``--scale-block``; ``--bucket-cap-mb`` sets its own bucket size, default 4 MB).

Flags only DDP or PowerSGD use (``--powersgd-rank``, ``--no-prime-buckets``,
``--dist-timeout``) are accepted and ignored. ``--checkpoint`` writes launch/common/checkpoint.py's
format (every rank's RNG and 3LC state gathered to rank 0), so ``--steps`` can be
raised and the run resumed bit-exactly. train.py can hand over with ``run(args)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (horovodrun python launch/train_horovod.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from launch.common import checkpoint
from launch.common.meter import ByteMeter
from launch.common.loop import build_task, cross_rank, emit, restore_checkpoint, result_line, run_steps
from launch.common.args import parse_args

HOOKS = ("none", "fp16", "threelc")


def _horovod():
    try:
        import horovod.torch as hvd
    except ImportError as error:
        raise SystemExit(f"launch/train_horovod.py needs Horovod (import horovod.torch failed: {error}); "
                         "install it with: bash launch/install_horovod.sh") from error
    return hvd


def wrap_optimizer(hvd, hook: str, base, named_parameters, args):
    """The distributed optimizer for ``hook``."""
    if hook == "threelc":
        from threelc.hooks.horovod import DistributedOptimizer

        return DistributedOptimizer(base, named_parameters, sparsity=args.sparsity,
                                    sparsity_warmup=args.sparsity_warmup, transport=args.transport,
                                    start_iter=args.start_iter, error_feedback=not args.no_error_feedback,
                                    bounded_scale=not args.unbounded_scale, scale_block=args.scale_block,
                                    **({"bucket_cap_mb": args.bucket_cap_mb} if args.bucket_cap_mb else {}))
    compression = hvd.Compression.fp16 if hook == "fp16" else hvd.Compression.none
    return hvd.DistributedOptimizer(base, named_parameters=named_parameters, compression=compression,
                                    op=hvd.Average)


def save_checkpoint(hvd, path: str, *, step: int, model, optimizer, meter: ByteMeter, device, meta: dict) -> None:
    """launch/common/checkpoint.py's layout, gathered with Horovod. Collective: every rank calls it."""
    mine = {"rng": checkpoint.capture_rng(device), "hook": checkpoint.to_cpu(meter.state_dict())}
    ranks = hvd.allgather_object(mine, name=f"train_horovod.checkpoint.{step}")
    if hvd.rank() == 0:
        checkpoint.atomic_save({"format": checkpoint.FORMAT, "step": int(step), "world_size": hvd.size(),
                                "meta": dict(meta), "model": checkpoint.to_cpu(model.state_dict()),
                                "optimizer": checkpoint.to_cpu(optimizer.state_dict()), "ranks": ranks}, path)
    hvd.barrier()  # nobody runs ahead (and possibly crashes) before the file is in place


def main(argv=None) -> dict | None:
    return run(parse_args(argv))


def run(args) -> dict | None:
    """Train with the parsed launch/train.py arguments; rank 0 returns the result."""
    if args.hook not in HOOKS:
        raise SystemExit(f"--hook {args.hook} is not available with Horovod; choose from {HOOKS}")
    hvd = _horovod()
    torch.set_num_threads(args.threads)
    hvd.init()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(hvd.local_rank())
    device = torch.device("cuda", hvd.local_rank()) if use_cuda else torch.device("cpu")
    try:
        return _train(args, hvd, hvd.rank(), hvd.size(), device)
    finally:
        hvd.shutdown()


def _train(args, hvd, rank: int, world: int, device: torch.device) -> dict | None:
    task, meta, ckpt, start_step = build_task(args, rank, world, device, "train_horovod")
    model = task.model
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    base = task.make_optimizer(model.parameters(), lr=args.lr, kind=args.optimizer)
    opt = wrap_optimizer(hvd, args.hook, base, model.named_parameters(), args)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    threelc = args.hook == "threelc"
    meter = ByteMeter(args.hook, numel, opt.threelc if threelc else None,
                 bytes_per_element=None if threelc else (2 if args.hook == "fp16" else 4))
    if ckpt is not None:
        restore_checkpoint(ckpt, opt, meter, world, rank, device, "train_horovod")
        del ckpt

    def save(step: int) -> None:
        save_checkpoint(hvd, args.checkpoint, step=step, model=model, optimizer=opt, meter=meter, device=device,
                        meta=meta)

    def gather_rows(row: list[float]) -> list[list[float]]:
        mine = torch.tensor([row], dtype=torch.float64)
        return hvd.allgather(mine, name="train_horovod.final").tolist()

    run = run_steps(args, task, model, model, opt, meter, rank=rank, world=world, device=device,
                    start_step=start_step, desc=f"{args.model}/{args.hook} (horovod)",
                    zero_grad=opt.zero_grad,  # Horovod's zero_grad takes no arguments (sets None anyway)
                    save=save)
    train_loss, wire = cross_rank(args, run, gather_rows, world)
    meter.close()  # all communication is done; park the 3LC thread
    if rank != 0:
        return None
    result = result_line(args, task, run, world=world, final=task.evaluate(model), train_loss=train_loss,
                         wire=wire, num_params=numel, backend="horovod-gloo" if hvd.gloo_enabled() else "horovod",
                         bucket_cap_mb=opt.bucket_cap_mb if threelc else None,
                         powersgd_rank=None, framework="horovod")
    emit(args, result, model)
    return result


if __name__ == "__main__":
    main()
