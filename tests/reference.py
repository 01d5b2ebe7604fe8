"""Single-process references for the three transports, built from codec functions only.

Given every rank's flat gradient for one bucket, each returns the average the hook must
produce, while carrying residuals across steps exactly as 3LC.md describes.
"""

from __future__ import annotations

import torch

import threelc
from threelc.quantize import quantize_with_scales, scales_from_absmax, segment_absmax


def shard_bounds(numel, world):
    sizes = [numel // world + (1 if j < numel % world else 0) for j in range(world)]
    bounds = [0]
    for size in sizes:
        bounds.append(bounds[-1] + size)
    return bounds


def cut(segments, start, stop):
    """Segment lengths of [start, stop) after cutting ``segments`` there."""
    pieces, offset = [], 0
    for n in segments:
        lo, hi = max(offset, start), min(offset + n, stop)
        if hi > lo:
            pieces.append(hi - lo)
        offset += n
    return pieces or [0]


class Reference:
    def __init__(self, transport, world, sparsity, error_feedback=True):
        self.transport, self.world, self.sparsity = transport, world, sparsity
        self.workers = [threelc.ErrorFeedback(sparsity, error_feedback) for _ in range(world)]
        self.servers = [threelc.ErrorFeedback(sparsity, error_feedback) for _ in range(world)]

    def average(self, key, grads, segments):
        return getattr(self, "_" + self.transport)(key, grads, segments)

    def _allgather(self, key, grads, segments):
        total = torch.zeros(grads[0].numel())
        for rank, g in enumerate(grads):
            q, scale, _, _ = self.workers[rank].step(key, g, segments)
            total += threelc.dequantize(q, scale, segments)
        return total / self.world

    def _allreduce(self, key, grads, segments):
        compensated = [w.compensate(key, g) for w, g in zip(self.workers, grads)]
        absmax = torch.stack([segment_absmax(c, segments) for c in compensated]).amax(0)
        scales = scales_from_absmax(absmax, self.sparsity)
        qs = [quantize_with_scales(c, scales, segments) for c in compensated]
        for worker, c, q in zip(self.workers, compensated, qs):
            if worker.enabled:
                worker.commit(key, c - threelc.dequantize(q, scales, segments))
        sums = torch.stack([q.int() for q in qs]).sum(0)
        return threelc.dequantize(sums, scales, segments) / self.world

    def _sharded(self, key, grads, segments):
        bounds = shard_bounds(grads[0].numel(), self.world)
        pieces = [cut(segments, bounds[j], bounds[j + 1]) for j in range(self.world)]
        refined = [n for p in pieces for n in p]
        decoded = [threelc.dequantize(*self.workers[r].step(key, g, refined)[:2], refined)
                   for r, g in enumerate(grads)]
        out = []
        for j in range(self.world):
            total = torch.zeros(bounds[j + 1] - bounds[j])
            for r in range(self.world):
                total += decoded[r][bounds[j]:bounds[j + 1]]
            q, scale, _, _ = self.servers[j].step(key, total / self.world, pieces[j])
            out.append(threelc.dequantize(q, scale, pieces[j]))
        return torch.cat(out)
