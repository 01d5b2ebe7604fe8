"""Codec benchmark: each backend beside memcpy in the same run, and bits per element.

    python launch/bench_codec.py                 # CPU, writes launch/results/codec.json
    python launch/bench_codec.py --device cuda   # the same on a GPU
    python launch/bench_codec.py --profile       # where 1M-element encode+decode spends its time

Throughput rows: for each backend (on CPU ``native``, the fused C++ kernels; on CUDA
``triton``; and ``torch``, the pure-PyTorch reference), each thread count (1 and ``torch.get_num_threads()``),
1M and 26M float32 elements in 10 segments and s = 1.0 and 1.9, the best of
``--repeats`` timings of

* ``encode``: encode with error feedback, as a transport runs it in steady state
  (a residual from the step before, the new one written into the recycled buffer);
* ``decode N`` for N = 1, 2, 4: N payloads summed in rank order and averaged into a
  preallocated float32 output;
* ``memcpy``: ``dst.copy_(x)`` of the same float32 tensor into a preallocated one,
  and ``clone``: ``x.clone()``,

interleaved, so drift on a shared machine hits every candidate alike. On CUDA each row
also gives GB/s: the bytes its kernels must move at the least (encode: the maxima pass
reads x and the residual, the quantize pass reads them again and writes the new
residual and the payload; decode N: read N payloads, write the float32 output) over its
time, and that as a fraction of the card's memory bandwidth
(``--bandwidth``, else a table of data-sheet figures by card name, else clock x bus
width from the device properties; the row names the figure and where it came from). Ratios to
memcpy are in the same row. Bits per element are measured on Gaussian data and on
real gradients: a digits CNN trained with error feedback on.
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
from threelc.backends import NATIVE, TORCH, Layout, triton_codec
from launch.common import models

SIZES = (1_000_000, 26_000_000)
THROUGHPUT_SPARSITIES = (1.0, 1.9)
DECODE_COUNTS = (1, 2, 4)
SEGMENTS = 10
BITS_SPARSITIES = (1.0, 1.5, 1.9)


# Data-sheet peak memory bandwidth, GB/s, by a substring of torch.cuda.get_device_name().
CARD_BANDWIDTH_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 NVL": 3900, "H100 PCIe": 2000, "H100": 3350,
                      "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "A10": 600}


def card_bandwidth(device: torch.device, given: float | None) -> tuple[float, str]:
    """(GB/s, where the figure comes from) for the card the benchmark runs on."""
    if given:
        return given, "--bandwidth"
    name = torch.cuda.get_device_name(device)
    for key, figure in CARD_BANDWIDTH_GBS.items():
        if key in name:
            return float(figure), f"data sheet ({name})"
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # double data rate: two transfers per clock
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, f"memory clock x bus width ({name})"
    raise SystemExit(f"no bandwidth figure for {name}: pass --bandwidth GB/s")


def bytes_moved(numel: int, payload_bytes: list[int], decode_count: int | None = None) -> int:
    """The least traffic of one operation on float32 data (see the module docstring)."""
    if decode_count is None:
        return 5 * 4 * numel + payload_bytes[0]
    return sum(payload_bytes[:decode_count]) + 4 * numel


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


def _layout(numel: int) -> Layout:
    base = numel // SEGMENTS
    return Layout([base] * (SEGMENTS - 1) + [numel - base * (SEGMENTS - 1)])


def throughput_row(codec, device, numel, sparsity, threads, repeats) -> dict:
    measure = _timer(device)
    generator = torch.Generator().manual_seed(numel)
    layout = _layout(numel)
    x = torch.randn(numel, generator=generator).to(device)
    residual = (torch.randn(numel, generator=generator) * 0.1).to(device)
    residual_out, dst, out = torch.empty_like(residual), torch.empty_like(x), torch.empty_like(x)
    payloads = [codec.encode(x, residual, layout, sparsity).payload] + [
        codec.encode(torch.randn(numel, generator=generator).to(device), None, layout, sparsity).payload
        for _ in range(max(DECODE_COUNTS) - 1)]
    candidates = {
        "encode": lambda: codec.encode(x, residual, layout, sparsity, residual_out=residual_out),
        **{f"decode{n}": (lambda n=n: codec.decode(payloads[:n], layout, out)) for n in DECODE_COUNTS},
        "memcpy": lambda: dst.copy_(x),
        "clone": lambda: x.clone(),
    }
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = {name: [] for name in candidates}
        for fn in candidates.values():
            fn()  # warm-up: first touch of every buffer
        for _ in range(repeats):
            for name, fn in candidates.items():
                times[name].append(measure(fn))
    finally:
        torch.set_num_threads(before)
    best = {name: min(t) for name, t in times.items()}
    row = {"backend": codec.name, "threads": threads, "numel": numel, "sparsity": sparsity,
           "bits_per_element": 8 * payloads[0].numel() / numel}
    sizes = [p.numel() for p in payloads]
    for name, count in (("encode", None), *((f"decode{n}", n) for n in DECODE_COUNTS)):
        row[f"{name}_gbs"] = bytes_moved(numel, sizes, count) / best[name] / 1e9
    row["encode_decode2_gbs"] = ((bytes_moved(numel, sizes) + bytes_moved(numel, sizes, 2))
                                 / (best["encode"] + best["decode2"]) / 1e9)
    for name, t in best.items():
        row[f"{name}_ms"] = 1e3 * t
        row[f"{name}_ns_per_element"] = 1e9 * t / numel
    for name in ("encode", *(f"decode{n}" for n in DECODE_COUNTS), "clone"):
        row[f"{name}_vs_memcpy"] = best[name] / best["memcpy"]
    row["encode_ms_median"] = 1e3 * statistics.median(times["encode"])
    return row


def throughput(device: torch.device, repeats: int) -> list[dict]:
    fused = NATIVE if device.type == "cpu" else triton_codec() if device.type == "cuda" else None
    codecs = [c for c in (fused, TORCH) if c is not None]
    thread_counts = sorted({1, torch.get_num_threads()}) if device.type == "cpu" else [torch.get_num_threads()]
    rows = []
    for numel in SIZES:
        for sparsity in THROUGHPUT_SPARSITIES:
            for threads in thread_counts:
                for codec in codecs:
                    # The reference is an order of magnitude slower: fewer repeats keep the run short.
                    n = repeats if codec is not TORCH or fused is None else max(2, repeats // 3)
                    rows.append(throughput_row(codec, device, numel, sparsity, threads, n))
    by_key = {(r["numel"], r["sparsity"], r["threads"], r["backend"]): r for r in rows}
    for r in rows:
        pure = by_key.get((r["numel"], r["sparsity"], r["threads"], "torch"))
        if pure is not None:
            r["encode_decode2_speedup_vs_torch"] = ((pure["encode_ms"] + pure["decode2_ms"])
                                                    / (r["encode_ms"] + r["decode2_ms"]))
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
    """torch.profiler over ``pairs`` encode+decode of ``numel`` Gaussian values on the
    active backend: the ops with the most self time, as shares of the total (printed)."""
    from torch.profiler import ProfilerActivity, profile as run_profiler

    codec, layout = threelc.backends.codec_for(device), _layout(numel)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device)
    out = torch.empty_like(x)

    def pair():
        codec.decode([codec.encode(x, None, layout, 1.0).payload], layout, out)

    pair()  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with run_profiler(activities=activities) as prof:
        for _ in range(pairs):
            pair()
    ops = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in ops)
    print(f"{pairs} encode+decode pairs of {numel:,} values on {device}, {codec.name} backend: "
          f"{total / 1e3 / pairs:.2f} ms of op self time per pair, {len(ops)} distinct ops")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"  {100 * e.self_cpu_time_total / total:5.1f}%  {e.count // pairs:3d}/pair  {e.key}")


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=300, help="training steps for the gradient bits")
    parser.add_argument("--out", default="launch/results/codec.json")
    parser.add_argument("--profile", action="store_true", help="only print the encode+decode profile")
    parser.add_argument("--bandwidth", type=float, help="the card's memory bandwidth in GB/s (CUDA)")
    parser.add_argument("--no-bits", action="store_true", help="skip the bits-per-element rows (and their training)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.profile:
        profile(device)
        return None
    torch.set_num_threads(torch.get_num_threads())
    result = {
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "backend": threelc.backend(device),
        "throughput": throughput(device, args.repeats),
        "bits": [] if args.no_bits else gaussian_bits(device) + gradient_bits(device, args.steps),
    }
    if device.type == "cuda":
        result["bandwidth_gbs"], result["bandwidth_source"] = card_bandwidth(device, args.bandwidth)
        for r in result["throughput"]:
            r["encode_decode2_of_bandwidth"] = r["encode_decode2_gbs"] / result["bandwidth_gbs"]
    print("| backend | threads | elements | s | encode ms (x memcpy) | decode 1 / 2 / 4 ms | decode 2 x memcpy "
          "| memcpy ms | enc+dec2 speedup vs torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["throughput"]:
        speedup = r.get("encode_decode2_speedup_vs_torch")
        print(f"| {r['backend']} | {r['threads']} | {r['numel']:,} | {r['sparsity']} | "
              f"{r['encode_ms']:.1f} ({r['encode_vs_memcpy']:.2f}x) | "
              f"{r['decode1_ms']:.1f} / {r['decode2_ms']:.1f} / {r['decode4_ms']:.1f} | {r['decode2_vs_memcpy']:.2f}x | "
              f"{r['memcpy_ms']:.2f} | {f'{speedup:.1f}x' if speedup else '-'} |")
    if device.type == "cuda":
        print(f"\nGB/s of the least bytes each operation moves, against {result['bandwidth_gbs']:.0f} GB/s "
              f"({result['bandwidth_source']}):\n")
        print("| backend | elements | s | encode GB/s | decode 2 GB/s | encode + decode 2 GB/s | of bandwidth |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in result["throughput"]:
            print(f"| {r['backend']} | {r['numel']:,} | {r['sparsity']} | {r['encode_gbs']:.0f} | {r['decode2_gbs']:.0f} "
                  f"| {r['encode_decode2_gbs']:.0f} | {100 * r['encode_decode2_of_bandwidth']:.0f}% |")
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
