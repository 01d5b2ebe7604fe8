"""Codec benchmark: throughput beside clone()/fp16 in the same run, and bits per element.

    python launch/bench_codec.py                 # CPU, writes results/codec.json
    python launch/bench_codec.py --device cuda   # the same on a GPU
    python launch/bench_codec.py --profile       # where 1M-element encode+decode spends its time

Throughput is GB/s of float32 input (4 bytes per element) through ``threelc.encode``
and ``threelc.decode``; ``clone()`` and ``.to(torch.float16)`` of the same tensor are
timed in the same process, interleaved, so the ratios hold on a noisy machine.
Bits per element are measured on Gaussian data and on real gradients: a digits CNN
trained with error feedback on, every gradient sent through the codec.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import threelc
from launch import models

SIZES = (1_000_000, 26_000_000)
THROUGHPUT_SPARSITIES = (1.0, 1.9)
BITS_SPARSITIES = (1.0, 1.5, 1.9)


def _timer(device: torch.device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    def measure(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start
    return measure


def throughput(device: torch.device, repeats: int) -> list[dict]:
    measure = _timer(device)
    rows = []
    generator = torch.Generator().manual_seed(0)
    for numel in SIZES:
        x = torch.randn(numel, generator=generator).to(device)
        for sparsity in THROUGHPUT_SPARSITIES:
            payload = threelc.encode(x, sparsity)
            candidates = {
                "encode": lambda: threelc.encode(x, sparsity),
                "decode": lambda: threelc.decode(payload),
                "clone": lambda: x.clone(),
                "to_fp16": lambda: x.to(torch.float16),
            }
            times = {name: [] for name in candidates}
            for _ in range(repeats):  # interleaved, so drift hits every candidate alike
                for name, fn in candidates.items():
                    times[name].append(measure(fn))
            best = {name: min(t) for name, t in times.items()}
            gbps = {name: 4 * numel / t / 1e9 for name, t in best.items()}
            round_trip = best["encode"] + best["decode"]
            rows.append({
                "numel": numel, "sparsity": sparsity,
                "encode_gbps": gbps["encode"], "decode_gbps": gbps["decode"],
                "encode_decode_gbps": 4 * numel / round_trip / 1e9,
                "clone_gbps": gbps["clone"], "to_fp16_gbps": gbps["to_fp16"],
                "encode_decode_vs_clone": best["clone"] / round_trip,
                "encode_ms_median": 1e3 * statistics.median(times["encode"]),
                "bits_per_element": 8 * payload.numel() / numel,
            })
    return rows


def gaussian_bits(device: torch.device) -> list[dict]:
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(1)).to(device)
    return [{"data": "gaussian", "sparsity": s, "bits_per_element": 8 * threelc.encode(x, s).numel() / x.numel()}
            for s in BITS_SPARSITIES]


def gradient_bits(device: torch.device, steps: int) -> list[dict]:
    """Train the digits CNN on one process, its gradients through 3LC with error feedback."""
    rows = []
    for sparsity in BITS_SPARSITIES:
        task = models.build("digits-cnn", seed=0)
        model = task.model.to(device)
        optimizer = task.make_optimizer(model.parameters())
        memory = threelc.ErrorFeedback(sparsity)
        params = list(model.parameters())
        segments = [p.numel() for p in params]
        payload_bytes = numel = 0
        for step in range(steps):
            x, y = task.train_batch(0, 1, step)
            optimizer.zero_grad()
            task.loss_fn(model(x.to(device)), y.to(device)).backward()
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            q, scale, _, _ = memory.step("model", flat, segments)
            payload = threelc.encode_quantized(q, scale, segments)
            decoded = threelc.decode(payload)
            for p, g in zip(params, decoded.split(segments)):
                p.grad.copy_(g.view_as(p))
            optimizer.step()
            payload_bytes += payload.numel()
            numel += flat.numel()
        accuracy = task.evaluate(model).get("accuracy")
        rows.append({"data": "digits-cnn gradients (error feedback on)", "sparsity": sparsity, "steps": steps,
                     "bits_per_element": 8 * payload_bytes / numel, "compression_vs_fp32": 32 * numel / (8 * payload_bytes),
                     "test_accuracy": accuracy})
    return rows


def profile(device: torch.device, numel: int = 1_000_000, pairs: int = 10, top: int = 12) -> None:
    """torch.profiler over ``pairs`` encode+decode of ``numel`` Gaussian values: the
    ops with the most self time, as shares of the total (printed, not saved)."""
    from torch.profiler import ProfilerActivity, profile as run_profiler

    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device)
    threelc.decode(threelc.encode(x))  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with run_profiler(activities=activities) as prof:
        for _ in range(pairs):
            threelc.decode(threelc.encode(x))
    ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in ops)
    print(f"{pairs} encode+decode pairs of {numel:,} values on {device}: {total / 1e3 / pairs:.2f} ms per pair, "
          f"{len(ops)} distinct ops")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"  {100 * e.self_cpu_time_total / total:5.1f}%  {e.count // pairs:3d}/pair  {e.key}")


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=300, help="training steps for the gradient bits")
    parser.add_argument("--out", default="results/codec.json")
    parser.add_argument("--profile", action="store_true", help="only print the encode+decode profile")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.profile:
        profile(device)
        return None
    torch.set_num_threads(torch.get_num_threads())
    result = {
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "throughput": throughput(device, args.repeats),
        "bits": gaussian_bits(device) + gradient_bits(device, args.steps),
    }
    print("| elements | sparsity | encode GB/s | decode GB/s | enc+dec GB/s | clone GB/s | to(fp16) GB/s | enc+dec / clone |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["throughput"]:
        print(f"| {r['numel']:,} | {r['sparsity']} | {r['encode_gbps']:.2f} | {r['decode_gbps']:.2f} | "
              f"{r['encode_decode_gbps']:.2f} | {r['clone_gbps']:.2f} | {r['to_fp16_gbps']:.2f} | {r['encode_decode_vs_clone']:.2f} |")
    print()
    print("| data | sparsity | bits/element | vs fp32 |")
    print("|---|---:|---:|---:|")
    for r in result["bits"]:
        print(f"| {r['data']} | {r['sparsity']} | {r['bits_per_element']:.3f} | {32 / r['bits_per_element']:.0f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
