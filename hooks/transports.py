"""The three ways to run 3LC over collectives (3LC.md section 4).

A transport turns one rank's flat gradient into the average over all ranks, the same
bits on every rank. It owns its residual memories (the codec's ``ErrorFeedback``) and
talks to the network only through a ``Collectives`` object, so the DDP hook and the
Horovod optimizer share this code.

Agreement comes before action: every data-dependent decision (a rank saw NaN/inf, a
server could not decode its shard) travels inside a collective that every rank makes
anyway, so all ranks take the same branch and none is left waiting. A step that any
rank found non-finite returns NaN everywhere (a GradScaler then skips it) and stores
no residual anywhere.
"""

from __future__ import annotations

import time
from typing import Hashable

import torch

from threelc import DecodeError, ErrorFeedback, decode_quantized, dequantize, encode_quantized
from threelc.lanes import pack_lanes, unpack_lane_sums
from threelc.quantize import quantize_with_scales, scales_from_absmax, segment_absmax, subtract_decoded

from .collectives import Collectives

# Status a server reports with its aggregate's size (sharded transport).
OK, NOT_FINITE, UNDECODABLE = 0, 1, 2


def shard_lengths(length: int, world_size: int) -> list[int]:
    """Near-equal contiguous shards of one tensor; the first ``length % world_size`` are one larger."""
    return [length // world_size + (1 if j < length % world_size else 0) for j in range(world_size)]


class Transport:
    """Common parts: the collectives, the worker residuals, timing and a peer check."""

    name = ""

    def __init__(self, collectives: Collectives, sparsity: float, error_feedback: bool = True):
        self.comm = collectives
        self.memory = ErrorFeedback(sparsity, error_feedback)
        self.seconds = {"encode": 0.0, "decode": 0.0}
        self.zeros = 0  # ternary zeros this rank produced, for the stats

    @property
    def sparsity(self) -> float:
        return self.memory.sparsity

    def reduce(self, keys: list[Hashable], grad: torch.Tensor, segments: list[int]) -> torch.Tensor:
        """Average of ``grad`` (flat) over all ranks, as float32.

        ``segments`` are the lengths of the tensors packed in ``grad`` (one scale each)
        and ``keys`` name them, so each keeps its residual however they are grouped.
        """
        raise NotImplementedError

    def _timed(self, phase: str, start: float) -> None:
        self.seconds[phase] += time.perf_counter() - start

    def _count_zeros(self, q: torch.Tensor) -> None:
        self.zeros += q.numel() - int(torch.count_nonzero(q))

    @staticmethod
    def _not_finite(numel: int, device: torch.device) -> torch.Tensor:
        return torch.full((numel,), float("nan"), dtype=torch.float32, device=device)

    @staticmethod
    def _decode_peer(rank: int, payload: torch.Tensor, segments: list[int], what: str) -> torch.Tensor:
        """Decode a payload from ``rank`` that must describe exactly ``segments``."""
        try:
            q, scales, header = decode_quantized(payload)
        except DecodeError as error:
            raise DecodeError(f"{what} from rank {rank}: {error}") from error
        if header.segments != segments:
            raise DecodeError(f"{what} from rank {rank} describes {header.numel} elements in "
                              f"{len(header.segments)} segments; expected {sum(segments)} in {len(segments)}")
        return dequantize(q, scales, segments)

    def reset(self) -> None:
        """Forget every residual."""
        self.memory.reset()

    def state_dict(self) -> dict:
        return {"worker": self.memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["worker"])


class AllgatherTransport(Transport):
    """Each rank all-gathers every rank's full 3LC payload, decodes all N and averages."""

    name = "allgather"

    def reduce(self, keys, grad, segments):
        start = time.perf_counter()
        quantized = self.memory.quantize(keys, grad, segments)
        payload = (encode_quantized(quantized.q, quantized.scale, segments, grad.dtype) if quantized.finite
                   else torch.empty(0, dtype=torch.uint8, device=grad.device))
        self._timed("encode", start)
        meta = self.comm.allgather(torch.tensor([payload.numel(), quantized.finite], device=grad.device)).cpu()
        if not bool(meta[:, 1].all()):
            return self._not_finite(grad.numel(), grad.device)
        payloads = self.comm.allgather_bytes(payload, meta[:, 0].tolist())
        start = time.perf_counter()
        total = torch.zeros(grad.numel(), dtype=torch.float32, device=grad.device)
        for rank, peer_payload in enumerate(payloads):  # rank order: the same sum everywhere
            if rank == self.comm.rank:
                total += dequantize(quantized.q, quantized.scale, segments)
            else:
                total += self._decode_peer(rank, peer_payload, segments, "payload")
        self._timed("decode", start)
        self._count_zeros(quantized.q)
        self.memory.commit(keys, quantized, segments)
        return total.div_(self.comm.world_size)


class AllreduceTransport(Transport):
    """Ranks agree on one scale per segment (MAX), then sum lane-packed ternaries (SUM)."""

    name = "allreduce"

    def reduce(self, keys, grad, segments):
        world = self.comm.world_size
        start = time.perf_counter()
        compensated = self.memory.compensate(keys, grad, segments)
        absmax = segment_absmax(compensated, segments)
        finite = torch.isfinite(absmax)
        # The last entry is a "some rank is not finite" flag; NaN itself would not survive MAX.
        proposal = torch.cat([torch.where(finite, absmax, 0.0), (~finite.all()).float().reshape(1)])
        self._timed("encode", start)
        agreed = self.comm.allreduce(proposal, "max")
        if agreed[-1].item() > 0:
            return self._not_finite(grad.numel(), grad.device)
        start = time.perf_counter()
        scales = scales_from_absmax(agreed[:-1], self.sparsity)
        q = quantize_with_scales(compensated, scales, segments)
        words = pack_lanes(q, world)
        self._timed("encode", start)
        summed = self.comm.allreduce(words, "sum")
        start = time.perf_counter()
        average = dequantize(unpack_lane_sums(summed, grad.numel(), world), scales, segments).div_(world)
        self._timed("decode", start)
        self._count_zeros(q)
        if self.memory.enabled:
            self.memory.commit(keys, subtract_decoded(compensated, q, scales, segments), segments)
        return average


class ShardedTransport(Transport):
    """Parameter-server 3LC on collectives: each rank serves 1/N of every tensor.

    all-to-all the encoded shards, each server decodes and averages its shard,
    re-encodes the average with its own server residual (two-way compression), and
    the encoded averages are all-gathered. Shards are cut per tensor, not per
    bucket, so the result does not depend on how tensors are grouped into buckets.
    """

    name = "sharded"

    def __init__(self, collectives, sparsity, error_feedback=True):
        super().__init__(collectives, sparsity, error_feedback)
        self.server_memory = ErrorFeedback(sparsity, error_feedback)

    def reduce(self, keys, grad, segments):
        world, me, device = self.comm.world_size, self.comm.rank, grad.device
        # shards[j][i]: length of server j's piece of tensor i. Worker quantization uses
        # one scale per (tensor, server) piece, in bucket order.
        shards = list(zip(*(shard_lengths(n, world) for n in segments)))
        refined = [shards[j][i] for i in range(len(segments)) for j in range(world)]
        worker_keys = [(k, j) for k in keys for j in range(world)]
        start = time.perf_counter()
        quantized = self.memory.quantize(worker_keys, grad, refined)
        empty = torch.empty(0, dtype=torch.uint8, device=device)
        payloads = [empty] * world
        if quantized.finite:
            q_pieces = quantized.q.split(refined)
            scales = quantized.scale.view(len(segments), world)
            payloads = [encode_quantized(torch.cat(q_pieces[j::world]), scales[:, j], list(shards[j]),
                                         grad.dtype) for j in range(world)]
        self._timed("encode", start)
        send_sizes = [p.numel() for p in payloads]
        meta = torch.tensor([[n, quantized.finite] for n in send_sizes], device=device).view(-1)
        meta = self.comm.alltoall(meta, [2] * world, [2] * world).view(world, 2).cpu()
        if not bool(meta[:, 1].all()):  # each rank told every peer its flag: all agree
            return self._not_finite(grad.numel(), device)
        recv_sizes = meta[:, 0].tolist()
        received = self.comm.alltoall(torch.cat(payloads), send_sizes, recv_sizes).split(recv_sizes)

        mine = list(shards[me])
        status, problem, served, aggregate = OK, "", None, empty
        start = time.perf_counter()
        try:
            total = torch.zeros(sum(mine), dtype=torch.float32, device=device)
            for rank, piece in enumerate(received):
                total += self._decode_peer(rank, piece, mine, "shard")
            served = self.server_memory.quantize(list(keys), total.div_(world), mine)
            if served.finite:
                aggregate = encode_quantized(served.q, served.scale, mine, grad.dtype)
            else:
                status = NOT_FINITE
        except DecodeError as error:
            status, problem = UNDECODABLE, str(error)
        self._timed("decode", start)

        meta = self.comm.allgather(torch.tensor([aggregate.numel(), status], device=device)).cpu()
        statuses = meta[:, 1].tolist()
        if UNDECODABLE in statuses:
            servers = [r for r, s in enumerate(statuses) if s == UNDECODABLE]
            raise DecodeError(f"server rank(s) {servers} could not decode their shard"
                              + (f": {problem}" if problem else ""))
        if NOT_FINITE in statuses:
            return self._not_finite(grad.numel(), device)
        aggregates = self.comm.allgather_bytes(aggregate, meta[:, 0].tolist())
        start = time.perf_counter()
        averaged = [
            (dequantize(served.q, served.scale, mine) if rank == me
             else self._decode_peer(rank, aggregates[rank], list(shards[rank]), "aggregate")).split(shards[rank])
            for rank in range(world)
        ]
        average = torch.cat([averaged[j][i] for i in range(len(segments)) for j in range(world)])
        self._timed("decode", start)
        self._count_zeros(quantized.q)
        self.memory.commit(worker_keys, quantized, refined)
        self.server_memory.commit(list(keys), served, mine)
        return average

    def reset(self) -> None:
        super().reset()
        self.server_memory.reset()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "server": self.server_memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.server_memory.load_state_dict(state["server"])


TRANSPORTS = {cls.name: cls for cls in (AllreduceTransport, AllgatherTransport, ShardedTransport)}


def choose_transport(name: str, world_size: int) -> str:
    """Resolve ``"auto"``: allgather for 2 ranks, sharded for more.

    Per rank, allgather receives (N - 1) payloads while sharded moves about
    2 (N - 1) / N payloads' worth, at the price of four collectives instead of two:
    equal bytes at N = 2 (allgather wins on latency), sharded ahead from N = 3 on.
    allreduce never wins on bytes (no zero-run encoding: 3 to 6 bits per value).
    Measured on the testbed (README, "Bandwidth-limited multi-node testbed"): at 4 nodes
    on mlp-wide sharded took 0.38 s a step against 0.96 s for allgather.
    """
    if name != "auto":
        return name
    return "allgather" if world_size <= 2 else "sharded"
