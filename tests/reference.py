"""Single-process references for the three transports, built from codec functions only.

Given every rank's flat gradient for one bucket, each returns the average the hook must
produce, carrying one residual per tensor across steps exactly as docs/algorithm.md describes.
"""

from __future__ import annotations

import torch

import threelc
from threelc.quantize import bounded_absmax, quantize_with_scales, scales_from_absmax, segment_absmax


def shard_lengths(n, world):
    return [n // world + (1 if j < n % world else 0) for j in range(world)]


def in_blocks(keys, segments, block):
    """Keys and lengths with every tensor cut into ``block``-element pieces, each its own residual and scale.

    A residual per block holds the same numbers as one per tensor, so the reference
    gets one scale per block from the codec functions without a layout of its own.
    """
    if not block:
        return list(keys), list(segments)
    blocked_keys, lengths = [], []
    for key, n in zip(keys, segments):
        for start in range(0, n, block) if n else range(1):
            blocked_keys.append((key, start))
            lengths.append(min(block, n - start))
    return blocked_keys, lengths


class Reference:
    def __init__(self, transport, world, sparsity, error_feedback=True, ranks_per_node=1, bounded=True, block=0):
        self.transport, self.world, self.sparsity, self.block = transport, world, sparsity, block
        self.workers = [threelc.ErrorFeedback(sparsity, error_feedback, bounded) for _ in range(world)]
        self.servers = [threelc.ErrorFeedback(sparsity, error_feedback, bounded) for _ in range(world)]
        if transport == "hierarchical":
            # One flat reference per local rank: the inter-node group of that shard.
            nodes = world // ranks_per_node
            self.ranks_per_node, self.nodes = ranks_per_node, nodes
            inner = "allgather" if nodes <= 2 else "sharded"
            self.groups = [Reference(inner, nodes, sparsity, error_feedback, bounded=bounded, block=block)
                           for _ in range(ranks_per_node)]

    def set_sparsity(self, sparsity):
        """The multiplier of the steps that follow (the hook's warm-up schedule)."""
        self.sparsity = sparsity
        for memory in (*self.workers, *self.servers):
            memory.sparsity = sparsity
        for group in getattr(self, "groups", ()):
            group.set_sparsity(sparsity)

    def average(self, keys, grads, segments):
        """``keys`` name the tensors (one per segment) whose gradients ``grads`` concatenate."""
        return getattr(self, "_" + self.transport)(keys, grads, segments)

    def _allgather(self, keys, grads, segments):
        keys, segments = in_blocks(keys, segments, self.block)
        total = torch.zeros(grads[0].numel())
        for rank, g in enumerate(grads):
            q, scale, _, _ = self.workers[rank].step(list(keys), g, segments)
            total += threelc.dequantize(q, scale, segments)
        return total / self.world

    def _allreduce(self, keys, grads, segments):
        keys, segments = in_blocks(keys, segments, self.block)
        compensated = [w.compensate(list(keys), g, segments) for w, g in zip(self.workers, grads)]
        # Each rank proposes its own (bounded) absmax. Unbounded the scale is the largest
        # proposal; bounded their mean, added in rank order.
        proposals = [bounded_absmax(segment_absmax(c, segments), segment_absmax(g, segments))
                     if w.bounded else segment_absmax(c, segments)
                     for w, c, g in zip(self.workers, compensated, grads)]
        if self.workers[0].bounded:
            absmax = sum(proposals[1:], proposals[0]) / self.world  # left to right: rank order
        else:
            absmax = torch.stack(proposals).amax(0)
        scales = scales_from_absmax(absmax, self.sparsity)
        qs = [quantize_with_scales(c, scales, segments) for c in compensated]
        for worker, c, q in zip(self.workers, compensated, qs):
            if worker.enabled:
                worker.commit(list(keys), c - threelc.dequantize(q, scales, segments), segments)
        sums = torch.stack([q.int() for q in qs]).sum(0)
        return threelc.dequantize(sums, scales, segments) / self.world

    def _sharded(self, keys, grads, segments):
        """Each tensor is cut into ``world`` pieces; server j averages piece j of every tensor."""
        world = self.world
        pieces = [shard_lengths(n, world) for n in segments]  # pieces[i][j]
        refined = [n for p in pieces for n in p]
        worker_keys, worker_blocks = in_blocks([(k, j) for k in keys for j in range(world)], refined, self.block)
        # Scale entries per (tensor, server) piece, so server j can find its workers' scales.
        counts = [len(in_blocks([None], [n], self.block)[1]) for n in refined]
        decoded, worker_scales = [], []
        for rank, g in enumerate(grads):
            q, scale, _, _ = self.workers[rank].step(worker_keys, g, worker_blocks)
            decoded.append(threelc.dequantize(q, scale, worker_blocks).split(refined))
            worker_scales.append(scale.split(counts))
        served = []
        for j in range(world):
            mine = [pieces[i][j] for i in range(len(segments))]
            total = torch.zeros(sum(mine))
            for rank in range(world):
                total += torch.cat([decoded[rank][i * world + j] for i in range(len(segments))])
            server_keys, server_blocks = in_blocks(keys, mine, self.block)
            cap = None
            if self.servers[j].bounded:  # the largest worker scale over min(N, s), per scale entry
                largest = torch.stack([torch.cat([worker_scales[rank][i * world + j] for i in range(len(segments))])
                                       for rank in range(world)]).amax(0)
                cap = largest / torch.tensor(min(world, self.sparsity), dtype=torch.float32)
            q, scale, _, _ = self.servers[j].step(server_keys, total / world, server_blocks, cap)
            served.append(threelc.dequantize(q, scale, server_blocks).split(mine))
        return torch.cat([served[j][i] for i in range(len(segments)) for j in range(world)])

    def _hierarchical(self, keys, grads, segments):
        """Shard l of a node: (x_0 + ... + x_{L-1}) / L in local-rank order, then group l's 3LC over nodes."""
        size, nodes = self.ranks_per_node, self.nodes
        pieces = [shard_lengths(n, size) for n in segments]  # pieces[i][l]
        split = [[p.float().split(pieces[i]) for i, p in enumerate(g.split(segments))] for g in grads]
        results = []
        for local in range(size):
            lengths = [pieces[i][local] for i in range(len(segments))]
            means = []
            for node in range(nodes):
                rows = [torch.cat([split[rank][i][local] for i in range(len(segments))])
                        for rank in range(node * size, (node + 1) * size)]
                means.append(sum(rows[1:], rows[0]) / size)  # left to right, no leading zero
            inner_keys = [(k, local) for k in keys]
            results.append(self.groups[local].average(inner_keys, means, lengths).split(lengths))
        return torch.cat([results[local][i] for i in range(len(segments)) for local in range(size)])
