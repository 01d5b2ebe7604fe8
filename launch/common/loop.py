"""The training loop and result line shared by launch/train.py (DDP) and
launch/train_horovod.py (Horovod).

The two entry points differ only in how they set up communication, zero
gradients, save a checkpoint and gather across ranks; they pass those in.
Everything measured (step times, byte counters, interface counters, evals)
and the JSON result line are defined once, here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from launch.common import checkpoint, models
from launch.testbed.iface import IFNAMSIZ, decode_name, encode_name, read_iface

def _task_options(pairs: list[str]) -> dict:
    out = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep:
            raise SystemExit(f"--task-opt expects KEY=VALUE, got {kv!r}")
        out[k] = v
    return out


def build_task(args, rank: int, world: int, device: torch.device, who: str):
    """(task, checkpoint meta, the loaded --checkpoint or None, first step) for this rank.

    The model's weights come from the checkpoint when there is one; rank 0 logs
    the resume (tests/test_faults.py reads that line after an elastic restart).
    """
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
        if rank == 0:
            print(f"[{who}] resuming from {args.checkpoint} at step {start_step} (torchelastic restart "
                  f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '-')}, time {time.time():.3f})",
                  file=sys.stderr, flush=True)
    return task, meta, ckpt, start_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


@dataclass
class Measured:
    """What one invocation's steps measured; averages cover ``step_times`` only."""

    start_step: int
    step_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    counters: tuple[dict | None, dict | None] = (None, None)  # meter, before and after the window
    # The meter before this invocation's first step, and before the first step at the
    # target sparsity (threelc after its warm-up; None when the run ends before it).
    run_start: dict | None = None
    at_target: tuple[int, dict] | None = None
    iface: tuple[dict | None, dict | None] = (None, None)  # --wire-iface, before and after
    total_time_s: float = 0.0
    train_s: float = 0.0  # seconds inside steps so far: total_time_s less evaluations and checkpoints

    def per_step(self, key: str) -> float | None:
        before, after = self.counters
        n = len(self.step_times)
        return (after[key] - before[key]) / n if n and before is not None else None

    def whole_run(self) -> dict | None:
        """Bytes over every step this invocation ran: uncompressed start and warm-up included."""
        before, after = self.run_start, self.counters[1]
        if before is None or after is None:
            return None
        sent, uncompressed = after["sent"] - before["sent"], after["uncompressed"] - before["uncompressed"]
        return {"bytes_sent": sent, "uncompressed_bytes": uncompressed, "ratio": uncompressed / sent if sent else None}

    def target_bytes_per_step(self, end_step: int) -> float | None:
        """Bytes per step from the first step at the target sparsity to the end."""
        if self.at_target is None or self.counters[1] is None or end_step <= self.at_target[0]:
            return None
        step, before = self.at_target
        return (self.counters[1]["sent"] - before["sent"]) / (end_step - step)


def target_sparsity_step(args) -> int | None:
    """The first step threelc compresses at ``--sparsity`` itself (after start_iter and the warm-up)."""
    if args.hook != "threelc":
        return None
    from threelc.hooks.settings import DEFAULT_SPARSITY_WARMUP

    warmup = DEFAULT_SPARSITY_WARMUP if args.sparsity_warmup is None else args.sparsity_warmup
    return args.start_iter + max(warmup - 1, 0)


def run_steps(args, task, model, module, opt, meter, *, rank: int, world: int, device: torch.device,
              start_step: int, desc: str, zero_grad: Callable[[], None], save: Callable[[int], None]) -> Measured:
    """Steps ``start_step .. args.steps - 1``; ``save(step)`` every --checkpoint-every and at the end.

    ``model`` is what the forward pass calls (the DDP wrapper, or the module
    itself under Horovod), ``module`` what rank 0 evaluates; ``meter`` has
    ``counters()`` and ``step_done()``.
    """
    progress = progress_bar(args, rank, start_step, desc)
    first_measured = first_measured_step(args, start_step)
    run = Measured(start_step, run_start=meter.counters())
    target_step = target_sparsity_step(args)
    before = before_iface = None
    base_lrs = [group["lr"] for group in opt.param_groups]
    t_begin = time.perf_counter()
    model.train()
    for step in range(start_step, args.steps):
        if args.fault_kill_at_step == step:
            inject_fault(args, rank, step)
        if step == first_measured:  # counters *before* the first measured step
            before, before_iface = meter.counters(), read_iface(args.wire_iface)
        if step == target_step:
            run.at_target = (step, meter.counters())
        x, y = task.train_batch(rank, world, step)
        sync(device)
        t0 = time.perf_counter()
        loss = task.loss_fn(model(x), y)
        zero_grad()
        loss.backward()  # DDP's all-reduce / the comm hook / Horovod's exchanges run in here
        if args.lr_schedule == "cosine":
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * (1 + math.cos(math.pi * step / args.steps)) / 2
        opt.step()
        sync(device)
        dt = time.perf_counter() - t0
        run.train_s += dt
        meter.step_done()
        if step >= first_measured:
            run.step_times.append(dt)
        run.losses.append(loss.item())
        done = step + 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{run.losses[-1]:.3f}", refresh=False)
        if args.eval_every and done % args.eval_every == 0 and done < args.steps and rank == 0:
            run.evals.append({"step": done, "train_s": run.train_s, **task.evaluate(module)})
            if progress is not None:
                progress.write(f"[eval] step {done}: {run.evals[-1]}")
        if args.checkpoint and args.checkpoint_every and done % args.checkpoint_every == 0:
            saving = read_iface(args.wire_iface) if before_iface else None
            save(done)  # gathers hook state: not training traffic, so kept out of the interface window
            saved = read_iface(args.wire_iface) if saving else None
            if saved:
                before_iface = {k: before_iface[k] + saved[k] - saving[k] for k in before_iface}
    run.counters = (before, meter.counters())
    run.iface = (before_iface, read_iface(args.wire_iface))
    run.total_time_s = time.perf_counter() - t_begin
    if progress is not None:
        progress.close()
    saved_last = args.checkpoint_every and args.steps % args.checkpoint_every == 0
    if args.checkpoint and args.steps > start_step and not saved_last:
        save(args.steps)  # the final state too, so a rerun with more --steps continues
    return run


def cross_rank(args, run: Measured, gather_rows: Callable[[list[float]], list[list[float]]], world: int):
    """(mean train loss over ranks, per-rank interface bytes per step or None).

    One gather of a float64 row per rank, after the measured window so it is
    not counted as training traffic. Every rank must call it.
    """
    tail = run.losses[-10:]
    n = len(run.step_times)
    (tx0, rx0), (tx1, rx1) = [(c["tx"], c["rx"]) if c else (None, None) for c in run.iface]
    has_wire = n > 0 and tx0 is not None and tx1 is not None
    row = [sum(tail) / len(tail) if tail else 0.0,
           (tx1 - tx0) / n if has_wire else 0.0, (rx1 - rx0) / n if has_wire else 0.0, float(has_wire),
           *encode_name(args.wire_iface, IFNAMSIZ)]
    rows = gather_rows(row)
    train_loss = sum(r[0] for r in rows) / world if run.losses else None
    wire = None
    if args.wire_iface:
        wire = [{"iface": decode_name(r[4:]), "tx_bytes_per_step": r[1], "rx_bytes_per_step": r[2]} if r[3] else None
                for r in rows]
    return train_loss, wire


def result_line(args, task, run: Measured, *, world: int, final: dict, train_loss, wire, **extras) -> dict:
    """Rank 0's result object; ``extras`` add or override framework-specific fields."""
    measured = len(run.step_times)
    threelc = args.hook == "threelc"
    return {
        "model": args.model,
        "hook": args.hook,
        "transport": args.transport if threelc else None,
        "sparsity": args.sparsity if threelc else None,
        "world_size": world,
        "steps": args.steps,
        "mean_step_time_s": sum(run.step_times) / measured if measured else None,
        "bytes_per_step": run.per_step("sent"),
        "uncompressed_bytes_per_step": run.per_step("uncompressed"),
        "final_loss": final["loss"],
        "final_accuracy": final.get("accuracy"),
        # -- extras --
        "bytes_received_per_step": run.per_step("received"),
        # Honest traffic: every step of the run (fp32 start and sparsity warm-up included),
        # and the steps at the target sparsity alone.
        "whole_run": run.whole_run(),
        "target_sparsity_bytes_per_step": run.target_bytes_per_step(args.steps) if threelc else None,
        "metrics": final,
        "final_train_loss": train_loss,
        "evals": run.evals,
        "measured_steps": measured,
        "start_step": run.start_step,
        "total_time_s": run.total_time_s,
        "train_s": run.train_s,
        "batch_size": task.batch_size,
        "wire": wire,
        **extras,
    }


def emit(args, result: dict, module: torch.nn.Module) -> None:
    """--save-params, --json and the result line on stdout (rank 0)."""
    if args.save_params:
        checkpoint.atomic_save(checkpoint.to_cpu(dict(module.state_dict())), args.save_params)
    line = json.dumps(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(line + "\n")
    print(line, flush=True)
