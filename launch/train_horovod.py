"""horovodrun entry point: train a launch.models task with Horovod (none / fp16 / threelc).

    horovodrun -np 2 -H localhost:2 --gloo python launch/train_horovod.py \\
        --model digits-cnn --hook threelc --sparsity 1.75 --steps 300

The flags are launch/train.py's (its ``parse_args`` is imported), and rank 0 prints
the same final JSON line (plus ``"framework": "horovod"``). ``--hook`` takes

* ``none``: ``hvd.DistributedOptimizer`` (fp32 all-reduce, Horovod's tensor fusion),
* ``fp16``: the same with ``compression=hvd.Compression.fp16``,
* ``threelc``: ``threelc.hooks.horovod.DistributedOptimizer`` (``--sparsity``,
  ``--transport``, ``--start-iter``, ``--no-error-feedback``; ``--bucket-cap-mb``
  sets its own bucket size, default 4 MB).

Flags only DDP or PowerSGD use (``--powersgd-rank``, ``--no-prime-buckets``,
``--dist-timeout``) are accepted and ignored. ``--checkpoint`` writes launch/checkpoint.py's
format (every rank's RNG and 3LC state gathered to rank 0), so ``--steps`` can be
raised and the run resumed bit-exactly. train.py can hand over with ``run(args)``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (horovodrun python launch/train_horovod.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from launch import checkpoint, models
from launch.train import (_task_options, first_measured_step, parse_args, progress_bar, read_iface,
                          restore_checkpoint, sync)

HOOKS = ("none", "fp16", "threelc")
DEFAULT_BUCKET_CAP_MB = 4.0  # threelc.hooks.horovod.DistributedOptimizer's default


def _horovod():
    try:
        import horovod.torch as hvd
    except ImportError as error:
        raise SystemExit(f"launch/train_horovod.py needs Horovod (import horovod.torch failed: {error}); "
                         "install it with: bash launch/install_horovod.sh") from error
    return hvd


class Meter:
    """Cumulative bytes this rank handed to collectives, as launch/comm.py's ``Comm.counters``."""

    def __init__(self, hook: str, numel: int, optimizer):
        self.hook, self.numel, self.optimizer = hook, numel, optimizer
        self._sent = self._uncompressed = 0

    def step_done(self) -> None:
        if self.hook != "threelc":
            self._sent += self.numel * (2 if self.hook == "fp16" else 4)
            self._uncompressed += self.numel * 4

    def counters(self) -> dict:
        if self.hook == "threelc":
            s = self.optimizer.stats
            return {"sent": int(s["bytes_sent"]), "received": int(s["bytes_received"]),
                    "uncompressed": int(s["uncompressed_bytes"])}
        return {"sent": self._sent, "received": self._sent, "uncompressed": self._uncompressed}

    def state_dict(self) -> dict | None:
        return self.optimizer.threelc.state_dict() if self.hook == "threelc" else None

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None and self.hook == "threelc":
            self.optimizer.threelc.load_state_dict(state)


def wrap_optimizer(hvd, hook: str, base, named_parameters, args):
    """The distributed optimizer for ``hook``."""
    if hook == "threelc":
        from threelc.hooks.horovod import DistributedOptimizer

        return DistributedOptimizer(base, named_parameters, sparsity=args.sparsity, transport=args.transport,
                                    start_iter=args.start_iter, error_feedback=not args.no_error_feedback,
                                    bucket_cap_mb=args.bucket_cap_mb or DEFAULT_BUCKET_CAP_MB)
    compression = hvd.Compression.fp16 if hook == "fp16" else hvd.Compression.none
    return hvd.DistributedOptimizer(base, named_parameters=named_parameters, compression=compression,
                                    op=hvd.Average)


def save_checkpoint(hvd, path: str, *, step: int, model, optimizer, meter: Meter, device, meta: dict) -> None:
    """launch/checkpoint.py's layout, gathered with Horovod. Collective: every rank calls it."""
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
    model = task.model
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    base = task.make_optimizer(model.parameters(), lr=args.lr, kind=args.optimizer)
    opt = wrap_optimizer(hvd, args.hook, base, model.named_parameters(), args)
    base_lrs = [group["lr"] for group in opt.param_groups]
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meter = Meter(args.hook, numel, opt)
    if ckpt is not None:
        restore_checkpoint(ckpt, opt, meter, world, rank, device, "train_horovod")
        del ckpt

    progress = progress_bar(args, rank, start_step, f"{args.model}/{args.hook} (horovod)")
    first_measured = first_measured_step(args, start_step)
    step_times, losses, evals = [], [], []
    snap_c = snap_w = None
    t_begin = time.perf_counter()
    model.train()
    for step in range(start_step, args.steps):
        if step == first_measured:  # counters *before* the first measured step
            snap_c, snap_w = meter.counters(), read_iface(args.wire_iface)
        x, y = task.train_batch(rank, world, step)
        sync(device)
        t0 = time.perf_counter()
        loss = task.loss_fn(model(x), y)
        opt.zero_grad()  # hvd.DistributedOptimizer.zero_grad takes no arguments (sets None anyway)
        loss.backward()  # Horovod's all-reduces / threelc's exchanges start in here
        if args.lr_schedule == "cosine":  # as in train.py
            for group, lr in zip(opt.param_groups, base_lrs):
                group["lr"] = lr * (1 + math.cos(math.pi * step / args.steps)) / 2
        opt.step()
        sync(device)
        dt = time.perf_counter() - t0
        meter.step_done()
        if step >= first_measured:
            step_times.append(dt)
        losses.append(loss.item())
        done = step + 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if args.eval_every and done % args.eval_every == 0 and done < args.steps and rank == 0:
            evals.append({"step": done, **task.evaluate(model)})
            if progress is not None:
                progress.write(f"[eval] step {done}: {evals[-1]}")
        if args.checkpoint and args.checkpoint_every and done % args.checkpoint_every == 0:
            save_checkpoint(hvd, args.checkpoint, step=done, model=model, optimizer=opt, meter=meter,
                            device=device, meta=meta)
    end_c, end_w = meter.counters(), read_iface(args.wire_iface)
    total_time = time.perf_counter() - t_begin
    if progress is not None:
        progress.close()

    saved_last = args.checkpoint_every and args.steps % args.checkpoint_every == 0
    if args.checkpoint and args.steps > start_step and not saved_last:
        save_checkpoint(hvd, args.checkpoint, step=args.steps, model=model, optimizer=opt, meter=meter,
                        device=device, meta=meta)

    # Cross-rank reductions after the measured window: not counted as training traffic.
    tail = losses[-10:]
    train_loss = torch.tensor([sum(tail) / len(tail) if tail else float("nan")], dtype=torch.float64)
    train_loss = hvd.allreduce(train_loss, op=hvd.Sum, name="train_horovod.train_loss")
    measured = len(step_times)
    wire = None
    if args.wire_iface:
        mine = None
        if snap_w and end_w and measured:
            mine = {"iface": args.wire_iface,
                    "tx_bytes_per_step": (end_w["tx"] - snap_w["tx"]) / measured,
                    "rx_bytes_per_step": (end_w["rx"] - snap_w["rx"]) / measured}
        wire = hvd.allgather_object(mine, name="train_horovod.wire")

    if rank != 0:
        return None
    final = task.evaluate(model)
    per = (lambda k: (end_c[k] - snap_c[k]) / measured) if measured else (lambda k: None)
    threelc = args.hook == "threelc"
    result = {
        "model": args.model,
        "hook": args.hook,
        "transport": args.transport if threelc else None,
        "sparsity": args.sparsity if threelc else None,
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
        "final_train_loss": train_loss.item() / world,
        "evals": evals,
        "measured_steps": measured,
        "start_step": start_step,
        "total_time_s": total_time,
        "num_params": numel,
        "backend": "horovod-gloo" if hvd.gloo_enabled() else "horovod",
        "bucket_cap_mb": (args.bucket_cap_mb or DEFAULT_BUCKET_CAP_MB) if threelc else None,
        "batch_size": task.batch_size,
        "powersgd_rank": None,
        "wire": wire,
        "framework": "horovod",
    }
    if args.save_params:
        checkpoint.atomic_save(checkpoint.to_cpu(dict(model.state_dict())), args.save_params)
    line = json.dumps(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(line + "\n")
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
