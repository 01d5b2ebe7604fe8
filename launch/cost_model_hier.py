"""An alpha-beta cost model of flat and hierarchical 3LC, calibrated by this repo's measurements.

    python launch/cost_model_hier.py            # the README table (8 to 1,024 ranks, 8 per node)

Per bucket of ``n`` fp32 values, N ranks in M nodes of L, one link of ``B`` bytes/s per
node between nodes (the node's ranks share it, as in netlab), ``beta_intra`` bytes/s per
rank inside a node:

* time = alpha x (messages in sequence) + (bytes into the busiest node) / B
  + intra-node bytes / beta_intra + codec time (encode and decode per element);
* a payload of n values is ``n x bits / 8`` bytes; ``bits`` per value and the codec's
  nanoseconds per value come from launch/results/ (``--codec``: launch/results/codec.json, the native
  codec single-threaded at sparsity 1.9, 26M values; ``--bench``: launch/results/bench_hier.json,
  the hierarchical cells' bytes on the shaped links, which fix the wire bits per value with
  every header and TCP/IP overhead included);
* flat allgather: each node takes in the N - L payloads of the other nodes, each rank
  decodes N; ring all-gathers: 2 (N - 1) messages in sequence (sizes, payloads);
* flat sharded: each node takes in 2 (N - L) / N payloads' worth per rank (shards, then
  aggregates), each rank encodes twice and decodes 2 n values; 4 collectives: 4 (N - 1);
* hierarchical: fp32 reduce-scatter and all-gather inside the node (2 (L - 1) / L x 4n
  bytes per rank, 2 (L - 1) messages plus one status all-gather), then L groups of M, each
  a flat transport on n / L values (the same auto rule: allgather for M = 2, sharded above);
* DDP's fp32 ring all-reduce for reference: 2 (N - 1) / N x 4n bytes through every node
  link, 2 (N - 1) messages.

The model ignores overlap of communication with backward and with the codec, and
congestion beyond the one link per node: it ranks transports, it does not predict step
times. Latencies are inputs (defaults: typical of datacenter fabrics, not measured here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def calibrate(codec_path: Path, bench_path: Path | None, numel_bench: int) -> dict:
    """ns per value for encode and for decoding one payload; wire bits per value."""
    rows = json.loads(codec_path.read_text())["throughput"]
    row = max((r for r in rows if r["backend"] == "native" and r["threads"] == 1 and r["sparsity"] == 1.9),
              key=lambda r: r["numel"])
    out = {"encode_ns": row["encode_ns_per_element"], "decode_ns": row["decode4_ns_per_element"] / 4,
           "bits": row["bits_per_element"], "bits_source": f"{codec_path.name} (payload bits, gaussian)"}
    if bench_path is not None and bench_path.exists():
        doc = json.loads(bench_path.read_text())
        two = [c for c in doc["cells"] if c["variant"] == "threelc-hierarchical" and c["nodes"] == 2]
        if two:
            # 2 nodes: each of a node's L ranks sends one payload of n / L values to the other
            # node, so the two links together carry 2 payloads' worth of n values.
            out["bits"] = two[0]["link_bytes_per_step"] * 8 / (2 * numel_bench)
            out["bits_source"] = f"{bench_path.name} (bytes on the shaped links, 2 nodes)"
    return out


def flat(name: str, n: float, N: int, L: int, c: dict, B: float, alpha: float) -> float:
    P = n * c["bits"] / 8
    if N == 1:
        return 0.0
    if name == "allgather":
        wire = (N - L) * P
        codec = n * (c["encode_ns"] + N * c["decode_ns"]) * 1e-9
        messages = 2 * (N - 1)
    else:
        wire = L * 2 * (N - L) / N * P
        codec = (n * c["encode_ns"] * (1 + 1 / N) + 2 * n * c["decode_ns"]) * 1e-9
        messages = 4 * (N - 1)
    return alpha * messages + wire / B + codec


def hierarchical(n: float, N: int, L: int, c: dict, B: float, alpha: float, alpha_intra: float,
                 beta_intra: float) -> float:
    M = N // L
    intra = 2 * (L - 1) / L * 4 * n / beta_intra + alpha_intra * (2 * (L - 1) + 1)
    inner = "allgather" if M <= 2 else "sharded"
    # L groups of M ranks, one rank per node: the node's link carries all L groups.
    shard = n / L
    P = shard * c["bits"] / 8
    if M == 1:
        return intra
    wire = L * ((M - 1) * P if inner == "allgather" else 2 * (M - 1) / M * P)
    per_rank = flat(inner, shard, M, 1, c, float("inf"), alpha)  # codec and latency of one group
    return intra + per_rank + wire / B


def ddp(n: float, N: int, L: int, B: float, alpha: float, beta_intra: float) -> float:
    link = B if N > L else beta_intra  # one node: the ring never leaves it
    return alpha * 2 * (N - 1) + 2 * (N - 1) / N * 4 * n / link


def table(a, c: dict) -> str:
    n, L = a.numel, a.ranks_per_node
    lines = [f"Bucket of {n / 1e6:g}M fp32 values, {L} ranks per node; codec {c['encode_ns']:.2f} ns/value encode, "
             f"{c['decode_ns']:.2f} ns/value per decoded payload; {c['bits']:.3f} wire bits/value "
             f"({c['bits_source']}); alpha {a.alpha_us:g} us between nodes, {a.alpha_intra_us:g} us inside, "
             f"{a.intra_gbytes:g} GB/s per rank inside a node.", "",
             "| ranks | link | DDP fp32 (ms) | flat allgather | flat sharded | hierarchical | best |",
             "|---:|---|---:|---:|---:|---:|---|"]
    crossings = {}
    names = ("ddp", "allgather", "sharded", "hierarchical")
    for gbit in a.gbits:
        B = gbit * 1e9 / 8
        ahead: dict = {}
        for N in [2 ** k for k in range(3, 11)]:
            t = {"ddp": ddp(n, N, L, B, a.alpha_us * 1e-6, a.intra_gbytes * 1e9),
                 "allgather": flat("allgather", n, N, L, c, B, a.alpha_us * 1e-6),
                 "sharded": flat("sharded", n, N, L, c, B, a.alpha_us * 1e-6),
                 "hierarchical": hierarchical(n, N, L, c, B, a.alpha_us * 1e-6, a.alpha_intra_us * 1e-6,
                                              a.intra_gbytes * 1e9)}
            best = min(t, key=t.get)
            for i, x in enumerate(names):  # where one of a pair overtakes the other
                for y in names[i + 1:]:
                    winner = x if t[x] < t[y] else y
                    before = ahead.get((x, y))
                    if before is not None and before != winner:
                        crossings.setdefault(f"{gbit:g} Gbit/s", []).append(
                            f"{winner} overtakes {before} at {N} ranks")
                    ahead[(x, y)] = winner
            lines.append(f"| {N} | {gbit:g} Gbit/s | {t['ddp'] * 1e3:.1f} | {t['allgather'] * 1e3:.1f} "
                         f"| {t['sharded'] * 1e3:.1f} | {t['hierarchical'] * 1e3:.1f} | {best} |")
    lines.append("")
    for gbit in a.gbits:  # how slow the node's own links may be before hierarchical stops paying
        B, N = gbit * 1e9 / 8, 64
        best_flat = min(flat(t, n, N, L, c, B, a.alpha_us * 1e-6) for t in ("allgather", "sharded"))
        low, high = 1e6, 1e12
        for _ in range(60):
            mid = (low * high) ** 0.5
            slower = hierarchical(n, N, L, c, B, a.alpha_us * 1e-6, a.alpha_intra_us * 1e-6, mid) > best_flat
            low, high = (mid, high) if slower else (low, mid)
        lines.append(f"At {gbit:g} Gbit/s and {N} ranks hierarchical beats the best flat transport while the "
                     f"intra-node links move more than {high / 1e9:.2f} GB/s per rank.")
    for gbit in a.gbits:
        found = crossings.get(f"{gbit:g} Gbit/s") or ["none, each pair keeps its order throughout"]
        lines.append(f"Crossovers at {gbit:g} Gbit/s (8 to 1,024 ranks): {'; '.join(found)}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=float, default=25e6, help="values per bucket (all buckets of a step together)")
    p.add_argument("--ranks-per-node", type=int, default=8)
    p.add_argument("--gbits", type=float, nargs="+", default=[25, 100], help="inter-node link per node, Gbit/s")
    p.add_argument("--alpha-us", type=float, default=15.0, help="latency of one inter-node message")
    p.add_argument("--alpha-intra-us", type=float, default=5.0, help="latency of one intra-node message")
    p.add_argument("--intra-gbytes", type=float, default=100.0, help="intra-node bandwidth per rank, GB/s")
    p.add_argument("--codec", default=str(REPO / "launch" / "results" / "codec.json"))
    p.add_argument("--bench", default=str(REPO / "launch" / "results" / "bench_hier.json"))
    p.add_argument("--bench-numel", type=int, default=5_283_850, help="values of the benchmark model (mlp-wide)")
    a = p.parse_args(argv)
    print(table(a, calibrate(Path(a.codec), Path(a.bench) if a.bench else None, a.bench_numel)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
