"""One-rank NCCL DDP run of the threelc hook on CUDA, checked against the reference codec.

    python launch/tools/gpu_ddp_check.py            # needs one CUDA device (launch/gpu_check.sh)
    python launch/tools/gpu_ddp_check.py cpu        # the same logic over gloo on the CPU

A two-layer model with a small ``bucket_cap_mb`` gives DDP two or more buckets. For each
transport, the first compressed step's (the second, after DDP's bucket rebuild) averaged gradient of every bucket must equal,
bit for bit, what the pure-PyTorch codec makes of the same bucket on the CPU: with one
rank, decode(encode(bucket)) of its one payload (or its lane words), which are the
same floats. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import threelc
from threelc.backends import TORCH, Layout
from threelc.hooks import ThreeLCState, threelc_hook

SPARSITY = 1.5


def check(transport: str, device: torch.device) -> int:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[0] if device.type == "cuda" else None, bucket_cap_mb=0.25)  # 4 MB of gradients: several buckets
    state = ThreeLCState(None, sparsity=SPARSITY, transport=transport, start_iter=1, sparsity_warmup=0)
    seen = []

    def recording_hook(state, bucket):
        if state.iter < state.settings.start_iter:  # DDP's first step: plain averaging; it rebuilds its buckets after
            return threelc_hook(state, bucket)
        buffer = bucket.buffer().detach().clone()  # on the device: a .cpu() here would add a sync
        segments = [p.numel() for p in bucket.parameters()]
        return threelc_hook(state, bucket).then(lambda f: seen.append((buffer, segments, f.value().detach().clone()))
                                                or f.value())

    ddp.register_comm_hook(state, recording_hook)
    syncs = []
    for step in range(2):
        ddp.zero_grad()
        with counting_syncs(device, syncs, enabled=step == 1):
            ddp(torch.randn(64, 512, device=device)).square().mean().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
    if device.type == "cuda":
        # Not asserted: the forward/backward and the step's own synchronize count too.
        print(f"{transport}: {len(syncs)} synchronising CUDA calls in the compressed step "
              f"({len(seen)} buckets); the codec and transport document theirs")
    failures = 0
    for buffer, segments, averaged in ((b.cpu(), s, a.cpu()) for b, s, a in seen):
        layout = Layout(segments)
        encoded = TORCH.encode(buffer, None, layout, SPARSITY)
        expected = TORCH.decode([encoded.payload], layout, torch.empty(layout.numel))
        bits = expected.view(torch.int32), averaged.reshape(-1).view(torch.int32)
        ok = torch.equal(*bits)
        failures += not ok
        print(f"{transport}: bucket of {layout.numel:,} values in {len(segments)} tensors: "
              f"{'equal to the reference' if ok else 'DIFFERS from the reference'}")
    if len(seen) < 2:
        print(f"{transport}: expected 2 or more buckets, saw {len(seen)}")
        failures += 1
    return failures


@contextlib.contextmanager
def counting_syncs(device: torch.device, into: list, enabled: bool):
    """Count torch's sync-debug warnings (any thread: the hook runs on threelc's comm thread)."""
    if not enabled or device.type != "cuda":
        yield
        return
    show = warnings.showwarning

    def record(message, *args, **kwargs):
        if "synchroniz" in str(message):
            into.append(str(message))
        else:
            show(message, *args, **kwargs)

    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = show


def main() -> int:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    try:
        print(f"codec backend on {device}: {threelc.backend(device)}")
        failures = sum(check(t, device) for t in ("allgather", "allreduce"))
    finally:
        dist.destroy_process_group()
    print("ddp check:", "passed" if not failures else f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
