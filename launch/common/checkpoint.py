"""Atomic, ``weights_only``-loadable training checkpoints for DDP runs.

Layout (only tensors and plain Python types, so ``torch.load(path,
weights_only=True)`` works)::

    {"format": 1, "step": int, "world_size": int, "meta": {...plain...},
     "model": state_dict, "optimizer": state_dict,
     "ranks": [{"rng": {"torch": ByteTensor, "cuda": ByteTensor|None},
                "hook": dict|None}, ...]}          # one entry per rank

Model and optimizer are replicated across DDP ranks, so rank 0's copy is
saved.  Hook state (error-feedback residuals, PowerSGD memories) and RNG
state differ per rank, so every rank's copy is gathered to rank 0 and stored
by rank index; a resume with another world size restores the model and
optimizer but starts the hook state fresh (residuals cannot be re-sharded).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

FORMAT = 1


def to_cpu(obj):
    """Recursively move tensors to CPU (a rank's CUDA tensors must not be
    unpickled on rank 0's GPU, and a checkpoint should load anywhere)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def capture_rng(device: torch.device) -> dict:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng(d: dict, device: torch.device) -> None:
    torch.set_rng_state(d["torch"])
    if device.type == "cuda" and d.get("cuda") is not None:
        torch.cuda.set_rng_state(d["cuda"], device)


def atomic_save(obj, path: str) -> None:
    """Write to a temporary file in the same directory, fsync, then rename:
    a crash mid-write leaves the previous checkpoint intact."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save(path: str, *, step: int, model, optimizer, meter, device, meta: dict) -> None:
    """Collective: every rank must call it.  Rank 0 writes ``path``."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {"rng": capture_rng(device), "hook": to_cpu(meter.state_dict())}
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        atomic_save(
            {
                "format": FORMAT,
                "step": int(step),
                "world_size": world,
                "meta": dict(meta),
                "model": to_cpu(model.state_dict()),
                "optimizer": to_cpu(optimizer.state_dict()),
                "ranks": gathered,
            },
            path,
        )
    # Nobody runs ahead (and possibly crashes) before the file is in place.
    dist.barrier()


def load(path: str) -> dict | None:
    """The checkpoint at ``path`` (CPU tensors), or None when there is none."""
    if not path or not os.path.exists(path):
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {ckpt.get('format')!r}")
    return ckpt


def check_meta(ckpt: dict, meta: dict) -> None:
    """Refuse to resume a run with a different model/seed/batch/hook."""
    old = ckpt.get("meta", {})
    diff = {k: (old.get(k), v) for k, v in meta.items() if k in old and old[k] != v}
    if diff:
        raise ValueError(f"checkpoint was written by a different run: {diff} (old, new)")
