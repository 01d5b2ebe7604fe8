"""Why high sparsity diverges: a one-process simulation of 3LC's transports for mechanism studies.

Each of ``--world`` simulated ranks computes its shard's gradient; the transports'
arithmetic is replayed with the codec's pure functions, one scale per tensor (or per
``--block`` elements), so variants that threelc does not ship can be tried in seconds:

    python launch/sparsity_study.py --transport sharded --sparsity 1.9 --trace
    python launch/sparsity_study.py --transport sharded --sparsity 1.9 --server-sparsity 1.0
    python launch/sparsity_study.py --transport allgather --sparsity 1.9 --warmup 200
    python launch/sparsity_study.py --transport sharded --bounded --server-cap hook --world 4
    python launch/sparsity_study.py --model charlm --bounded --precondition 0.999 --floor 0.01

The scale rule is the paper's unbounded one unless ``--bounded`` (the hook's default)
is given; ``--server-cap hook`` adds the sharded server's cap (transports.server_scale_cap).

It follows launch/train.py's defaults (the task's optimizer and learning rate,
``start_iter`` 2, 300 steps) but is not bit-identical to the hook: it is for
comparing variants with each other in one run, not for the hook's figures.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.common import models
from threelc.hooks import FLAT_TRANSPORTS
from threelc.hooks.transports import server_scale_cap
from threelc.quantize import (bounded_absmax, cap_scales, dequantize, quantize, quantize_with_scales,
                              scales_from_absmax, segment_absmax)
from threelc.wire import encode_quantized


def blocks(numel: int, block: int) -> list[int] | None:
    if not block:
        return None
    return [block] * (numel // block) + ([numel % block] if numel % block else [])


SENT = {"worker": 0, "server": 0}  # non-zero values sent by each stage (main resets both)
PAYLOAD_BYTES = {"worker": 0, "server": 0}  # the wire payloads' sizes, summed over ranks


def compress(x: torch.Tensor, residual: torch.Tensor, sparsity: float, args, cap: torch.Tensor | None = None,
             stage: str = "worker", divisor: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(decoded, new residual, scales) of one error-feedback stage; ``cap`` bounds each scale (bounded rule only).

    ``divisor`` (variant): quantize ``x / divisor`` element by element and multiply back; the
    residual stays in the gradient's units.
    """
    whole = x + args.residual_decay * residual
    compensated = whole if divisor is None else whole / divisor
    x = x if divisor is None else x / divisor
    segments = blocks(x.numel(), args.block)
    if args.bounded:  # the hook's default: scale bounded by this step's own maximum
        sizes = segments or [x.numel()]
        absmax = bounded_absmax(segment_absmax(compensated, sizes), segment_absmax(x, sizes))
        scales = cap_scales(scales_from_absmax(absmax, sparsity), cap)
        q = quantize_with_scales(compensated, scales, sizes)
    else:
        q, scales = quantize(compensated, sparsity, segments)
    decoded = dequantize(q, scales, segments)
    SENT[stage] += int(q.count_nonzero())
    PAYLOAD_BYTES[stage] += encode_quantized(q, scales, segments).numel()
    if args.mean_scale and bool((q != 0).any()):  # send the mean selected magnitude, not sparsity * max
        decoded = q.float() * compensated.abs()[q != 0].mean()
    if divisor is not None:
        decoded = decoded * divisor
    residual = whole - decoded
    if args.residual_clip:  # variant: bound the residual by a multiple of this step's largest input
        bound = float(x.abs().max()) * args.residual_clip
        residual = residual.clamp(-bound, bound)
    return decoded, residual, scales


def average(grads: list[torch.Tensor], residuals: list[torch.Tensor], server_residual: torch.Tensor,
            sparsity: float, args, divisor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One tensor's average over ranks; updates ``residuals`` in place, returns the server's."""
    world = len(grads)
    if args.transport == "allreduce":  # one agreed scale per tensor, summed ternaries
        compensated = [g + r for g, r in zip(grads, residuals)]
        scales = scales_from_absmax(torch.stack([c.abs().max() for c in compensated]).max().reshape(1), sparsity)
        decoded = [dequantize(quantize_with_scales(c, scales, [c.numel()]), scales) for c in compensated]
        residuals[:] = [c - d for c, d in zip(compensated, decoded)]
        return sum(decoded) / world, server_residual
    decoded, scales = [], []
    for rank in range(world):
        d, residuals[rank], s = compress(grads[rank], residuals[rank], sparsity, args, divisor=divisor)
        decoded.append(d)
        scales.append(s.reshape(-1))
    mean = sum(decoded) / world
    if args.transport == "sharded":  # the server re-encodes the average with its own residual
        cap = None
        if args.server_cap == "hook":  # the hook's rule: largest worker scale / min(N, s)
            cap = server_scale_cap(torch.stack(scales), sparsity)
        elif args.server_cap == "one-rank":  # variant: one rank's share of the average, S / N
            cap = torch.stack(scales).amax(0) / world
        mean, server_residual, _ = compress(mean, server_residual, args.server_sparsity or sparsity, args, cap,
                                            "server", divisor)
    return mean, server_residual


def norm(tensors) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-cnn", choices=sorted(models.TASKS))
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--transport", default="allgather", choices=[*FLAT_TRANSPORTS, "none"])
    p.add_argument("--sparsity", type=float, default=1.9)
    p.add_argument("--warmup", type=int, default=100, help="compressed steps of the linear ramp from 1.0")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--start-iter", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-sparsity", type=float, default=None, help="sharded: the server's own multiplier")
    p.add_argument("--block", type=int, default=0, help="one scale per this many elements (0: per tensor)")
    p.add_argument("--residual-decay", type=float, default=1.0, help="residual multiplier before each step")
    p.add_argument("--residual-clip", type=float, default=0, help="bound |residual| by this x max|gradient| (0: none)")
    p.add_argument("--mean-scale", action="store_true", help="variant: decoded magnitude = mean selected |x|")
    p.add_argument("--bounded", action="store_true", help="the hook's default scale rule, bounded by max|gradient|")
    p.add_argument("--server-cap", choices=["hook", "one-rank"], default=None,
                   help="with --bounded: cap the sharded server's scale (hook: the hook's rule)")
    p.add_argument("--smooth", type=float, default=0.0,
                   help="variant: what the optimizer gets is an EMA (this factor) of the averages")
    p.add_argument("--precondition", type=float, default=0.0,
                   help="variant: quantize g / sqrt(EMA, this factor, of the applied average squared), "
                        "a per-element scale every rank knows without sending it")
    p.add_argument("--floor", type=float, default=1e-3,
                   help="with --precondition: the divisor is at least this x the tensor's largest")
    p.add_argument("--trace", action="store_true", help="norms every 10 steps")
    args = p.parse_args(argv)
    SENT.update(worker=0, server=0)
    PAYLOAD_BYTES.update(worker=0, server=0)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    task = models.build(args.model, seed=args.seed)
    params = list(task.model.parameters())
    opt = task.make_optimizer(params)
    residuals = [[torch.zeros(q.numel()) for _ in range(args.world)] for q in params]
    server_residuals = [torch.zeros(q.numel()) for q in params]
    smoothed = [torch.zeros(q.numel()) for q in params]
    mean_square = [torch.zeros(q.numel()) for q in params]  # --precondition: of what the optimizer got
    for step in range(args.steps):
        grads = []
        for rank in range(args.world):
            x, y = task.train_batch(rank, args.world, step)
            task.model.zero_grad()
            task.loss_fn(task.model(x), y).backward()
            grads.append([q.grad.detach().reshape(-1).clone() for q in params])
        done = step - args.start_iter + 1
        sparsity = args.sparsity if not args.warmup or done >= args.warmup else \
            1.0 + (args.sparsity - 1.0) * max(done, 0) / args.warmup
        sent = []
        for i, q in enumerate(params):
            mine = [g[i] for g in grads]
            if step < args.start_iter or args.transport == "none":
                sent.append(sum(mine) / args.world)
                continue
            divisor = None
            if args.precondition and bool(mean_square[i].any()):
                root = mean_square[i].sqrt()
                divisor = root.clamp_min(float(root.max()) * args.floor)
            mean, server_residuals[i] = average(mine, residuals[i], server_residuals[i], sparsity, args, divisor)
            if args.smooth:
                smoothed[i] = args.smooth * smoothed[i] + (1 - args.smooth) * mean
                mean = smoothed[i]
            sent.append(mean)
        if args.precondition:
            for i, g in enumerate(sent):
                mean_square[i].mul_(args.precondition).add_((1 - args.precondition) * g * g)
        for q, g in zip(params, sent):
            q.grad = g.reshape(q.shape).clone()
        opt.step()
        if args.trace and step % 10 == 0:
            true = [sum(g[i] for g in grads) / args.world for i in range(len(params))]
            print(f"step {step} s={sparsity:.2f} |gradient|={norm(true):.3f} |applied|={norm(sent):.3f} "
                  f"|residual rank 0|={norm(r[0] for r in residuals):.3f} |server residual|={norm(server_residuals):.3f}")
    result = {k: v for k, v in vars(args).items() if k != "trace"} | task.evaluate(task.model)
    result["nonzeros_sent"], result["payload_bytes"] = dict(SENT), dict(PAYLOAD_BYTES)
    result |= {"residual_rank0": norm(r[0] for r in residuals), "server_residual": norm(server_residuals)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
