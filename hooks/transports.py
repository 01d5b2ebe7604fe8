"""The three flat ways to run 3LC over collectives (docs/algorithm.md, section 4; hooks/hierarchical.py builds on them).

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

from threelc import DecodeError, ErrorFeedback, check_sparsity
from threelc.backends import Codec, Encoded, Layout, codec_for
from threelc.quantize import scales_from_absmax
from threelc.wire import segment_scales

from .collectives import Collectives, sum_in_rank_order
from .pipeline import Deferred

# Status a server reports with its aggregate's size (sharded transport), and an
# inter-node group to its node (hierarchical).
OK, NOT_FINITE, UNDECODABLE = 0, 1, 2


def all_finite(statuses: list[int], who: str, problem: str = "") -> bool:
    """False if any status is NOT_FINITE; a DecodeError naming ``who`` (the indices) if any is UNDECODABLE.

    Every rank holds the same statuses, so every rank takes the same branch.
    """
    if UNDECODABLE in statuses:
        failed = [j for j, s in enumerate(statuses) if s == UNDECODABLE]
        raise DecodeError(who.format(failed=failed) + (f": {problem}" if problem else ""))
    return NOT_FINITE not in statuses


def shard_lengths(length: int, world_size: int) -> list[int]:
    """Near-equal contiguous shards of one tensor; the first ``length % world_size`` are one larger."""
    return [length // world_size + (1 if j < length % world_size else 0) for j in range(world_size)]


class Transport:
    """Common parts: the collectives, the worker residuals, timing and layouts.

    ``start(keys, grad, segments)`` runs a bucket up to its last collective and returns
    a ``Deferred``; ``reduce`` is start and finish in one call.
    """

    name = ""
    node_exchange: str | None = None  # how a node's ranks exchange (hierarchical only)

    def __init__(self, collectives: Collectives, sparsity: float, error_feedback: bool = True,
                 bounded_scale: bool = True, scale_block: int = 0):
        self.collectives = collectives
        # Elements per scale (0: one per tensor). Blocks are cut per tensor, so a tensor's
        # scales do not depend on how tensors are grouped into buckets.
        self.scale_block = scale_block
        # The memory owns the scale rule too: every encode and absmax passes memory.bounded.
        self.memory = ErrorFeedback(sparsity, error_feedback, bounded_scale)
        self.seconds = {"encode": 0.0, "decode": 0.0}
        self.zeros = 0  # ternary zeros this rank produced, for the stats
        self._layouts: dict = {}
        # While a list, commits wait in it: the hierarchical transport stores a step's
        # residuals only once every inter-node group agreed the step counts.
        self.held_commits: list | None = None

    @property
    def sparsity(self) -> float:
        return self.memory.sparsity

    def set_sparsity(self, sparsity: float) -> None:
        """The multiplier of the steps that follow (the hook state's warm-up schedule sets it)."""
        self.memory.sparsity = check_sparsity(sparsity)

    def start(self, keys: list[Hashable], grad: torch.Tensor, segments: list[int],
              out: torch.Tensor | None = None) -> Deferred:
        """Begin averaging ``grad`` (flat) over all ranks; the result is float32.

        ``segments`` are the lengths of the tensors packed in ``grad`` (one scale each, or
        one per ``scale_block`` elements of each) and ``keys`` name them, so each keeps
        its residual however they are grouped.
        ``out`` (float32, ``grad``'s size, may be ``grad`` itself) receives the average.
        """
        raise NotImplementedError

    def reduce(self, keys, grad, segments, out=None) -> torch.Tensor:
        return self.start(keys, grad, segments, out).finish()

    def node_traffic(self) -> tuple[int, int]:
        """Bytes sent and received inside the node, counted apart from ``collectives`` (hierarchical only)."""
        return 0, 0

    def _layout(self, segments: list[int]) -> Layout:
        """The codec's layout of a bucket of ``segments``: one scale per tensor or per block of one."""
        key = tuple(segments)
        layout = self._layouts.get(key)
        if layout is None:
            layout = self._layouts[key] = Layout(segments).in_blocks(self.scale_block)
        return layout

    @staticmethod
    def _encode(memory: ErrorFeedback, keys, segments, x: torch.Tensor, layout: Layout, codec: Codec,
                dtype: torch.dtype, scale_cap: torch.Tensor | None = None) -> Encoded:
        """Encode ``x`` (laid out as ``layout``) with ``memory``'s residual for ``keys`` (of ``segments``' lengths)."""
        residual = memory.residual(keys, segments, x.device)
        residual_out = memory.spare(keys, x.numel(), x.device) if memory.enabled else None
        return codec.encode(x, residual, layout, memory.sparsity, dtype=dtype, feedback=memory.enabled,
                            residual_out=residual_out, bounded=memory.bounded, scale_cap=scale_cap)

    @staticmethod
    def _output(out: torch.Tensor | None, numel: int, device: torch.device) -> torch.Tensor:
        if out is not None and out.dtype == torch.float32 and out.is_contiguous() and out.numel() == numel:
            return out.view(-1)
        return torch.empty(numel, dtype=torch.float32, device=device)

    def _commit(self, memory: ErrorFeedback, keys, residual, segments) -> None:
        if self.held_commits is None:
            memory.commit(keys, residual, segments)
        else:
            self.held_commits.append((memory, keys, residual, segments))

    def _timed(self, phase: str, start: float) -> None:
        self.seconds[phase] += time.perf_counter() - start

    @staticmethod
    def _not_finite(numel: int, device: torch.device) -> Deferred:
        return Deferred.of(torch.full((numel,), float("nan"), dtype=torch.float32, device=device))

    @staticmethod
    def _decode_peers(codec: Codec, payloads, layout: Layout, out: torch.Tensor, what: str, average: bool = True,
                      ranks: list[int] | None = None) -> torch.Tensor:
        """Decode payloads (from ``ranks``, default 0..N-1) that must describe ``layout``'s lengths."""
        try:
            return codec.decode(payloads, layout, out, average=average)
        except DecodeError as error:
            index = getattr(error, "payload_index", 0)
            rank = ranks[index] if ranks is not None else index
            raise DecodeError(f"{what} from rank {rank}: {error}") from error

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

    def start(self, keys, grad, segments, out=None):
        device, layout, codec = grad.device, self._layout(segments), codec_for(grad.device)
        start = time.perf_counter()
        encoded = self._encode(self.memory, keys, segments, grad, layout, codec, grad.dtype)
        self._timed("encode", start)
        # The payload size and the finiteness flag ride in one small all-gather. Host syncs
        # on CUDA (threelc/triton/codec.py): encode read back its size, flag and zero count;
        # this .cpu() is the one the variable-length all-gather needs (its split sizes);
        # decode reads the headers and its validity verdicts back in one copy.
        meta = self.collectives.allgather(torch.tensor([encoded.payload.numel(), encoded.finite], device=device)).cpu()
        if not bool(meta[:, 1].all()):
            return self._not_finite(grad.numel(), device)
        payloads = self.collectives.allgather_bytes_async(encoded.payload, meta[:, 0].tolist(), encoded.room)

        def finish():
            gathered = payloads.wait()
            start = time.perf_counter()
            average = self._decode_peers(codec, gathered, layout, self._output(out, grad.numel(), device), "payload")
            self._timed("decode", start)
            self.zeros += encoded.zeros
            self._commit(self.memory, keys, encoded.residual, segments)
            return average

        return Deferred(finish, (payloads,))


def agreed_absmax(proposals: torch.Tensor, bounded: bool) -> torch.Tensor:
    """The one absmax per segment that the allreduce transport's ranks share, from each rank's proposal (rows).

    One scale must serve every rank. Unbounded (the paper's rule) it is the largest
    proposal. Bounded it is their mean: under the largest, the ranks with smaller
    gradients send rarely and late (the delay error feedback adds, which cost accuracy at
    s >= 1.75 on 4 ranks: README, "Accuracy at high sparsity"); under the smallest, the
    larger ranks' values wait instead. Summed in rank order, so every rank, and any
    reference that adds the rows in that order, gets the same bits.
    """
    if not bounded:
        return proposals.amax(0)
    return sum_in_rank_order(list(proposals)) / proposals.shape[0]


class AllreduceTransport(Transport):
    """Ranks agree on one scale per segment (all-gather), then sum lane-packed ternaries (SUM)."""

    name = "allreduce"

    def start(self, keys, grad, segments, out=None):
        world, device, layout, codec = self.collectives.world_size, grad.device, self._layout(segments), codec_for(grad.device)
        start = time.perf_counter()
        residual = self.memory.residual(keys, segments, device)
        # Each rank proposes its (bounded) absmax; agreed_absmax says how the ranks agree on one.
        absmax = codec.absmax(grad, residual, layout, bounded=self.memory.bounded)
        finite = torch.isfinite(absmax)
        # The last entry is a "this rank is not finite" flag; NaN itself would poison the agreement.
        proposal = torch.cat([torch.where(finite, absmax, 0.0), (~finite.all()).float().reshape(1)])
        self._timed("encode", start)
        proposals = self.collectives.allgather(proposal)  # (world, segments + 1), the same on every rank
        # Host syncs on CUDA: this .item() (every rank must skip a non-finite bucket alike,
        # before the integer all-reduce is issued) and encode_lanes' zero count.
        if proposals[:, -1].amax().item() > 0:
            return self._not_finite(grad.numel(), device)
        start = time.perf_counter()
        scales = scales_from_absmax(agreed_absmax(proposals[:, :-1], self.memory.bounded), self.sparsity)
        residual_out = self.memory.spare(keys, grad.numel(), device) if self.memory.enabled else None
        words, new_residual, zeros = codec.encode_lanes(grad, residual, layout, scales, world,
                                                        feedback=self.memory.enabled, residual_out=residual_out)
        self._timed("encode", start)
        summed = self.collectives.allreduce_async(words, "sum")

        def finish():
            words = summed.wait()
            start = time.perf_counter()
            average = codec.decode_lanes(words, layout, scales, world, self._output(out, grad.numel(), device))
            self._timed("decode", start)
            self.zeros += zeros
            self._commit(self.memory, keys, new_residual, segments)
            return average

        return Deferred(finish, (summed,))


def server_scale_cap(worker_scales: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The most a sharded server's scale may be, per segment: max_r S_r / min(N, s), from the workers' scales (rows).

    The server's average of N ternary payloads holds multiples of S/N. At s near 2 its own
    (bounded) threshold, s/2 x max|average|, sits near the largest of them, so a value
    that one worker sent, the common case at high sparsity, waits in the server's
    residual until others add to it: a second delay on top of the worker's, which cost
    accuracy at s=1.9 (README, "Accuracy at high sparsity"). Capped at S/N, one worker's
    value passes at once. S/s, a worker's largest input, keeps the server at least as
    fast as what any worker can feed it per step on average, so the residual cannot grow
    without bound where workers agree. At s=1.0 the cap is S, at or above the bounded
    scale: nothing changes. Float32, the same bits on every rank.
    """
    divisor = torch.tensor(min(worker_scales.shape[0], sparsity), dtype=torch.float32, device=worker_scales.device)
    # A non-finite worker scale makes that segment of the average, and so the server's
    # scale, non-finite whatever the cap (the step is skipped); 0 keeps the cap valid.
    return torch.nan_to_num(worker_scales.amax(0) / divisor, nan=0.0, posinf=0.0, neginf=0.0)


class ShardedTransport(Transport):
    """Parameter-server 3LC on collectives: each rank serves 1/N of every tensor.

    all-to-all the encoded shards, each server decodes and averages its shard,
    re-encodes the average with its own server residual (two-way compression), and
    the encoded averages are all-gathered. Shards are cut per tensor, not per
    bucket, so the result does not depend on how tensors are grouped into buckets.
    """

    name = "sharded"

    def __init__(self, collectives, sparsity, error_feedback=True, bounded_scale=True, scale_block=0):
        super().__init__(collectives, sparsity, error_feedback, bounded_scale, scale_block)
        # The server's scale is bounded by the max of the average it re-compresses.
        self.server_memory = ErrorFeedback(sparsity, error_feedback, bounded_scale)
        self._plans: dict = {}

    def _plan(self, segments: list[int]):
        """Per server j: its piece of every tensor, as a codec layout into the bucket (cached per bucket layout).

        Also the worker residuals' lengths and, for this rank's server, the layout of the
        shard it receives and the lengths of its server residuals. Scale blocks are cut
        per piece, so workers and server agree on them.
        """
        key = tuple(segments)
        plan = self._plans.get(key)
        if plan is None:
            world = self.collectives.world_size
            pieces = [shard_lengths(n, world) for n in segments]  # pieces[i][j]
            starts, position = [], 0
            for row in pieces:
                starts.append([position + sum(row[:j]) for j in range(world)])
                position += sum(row)
            servers = [Layout([pieces[i][j] for i in range(len(segments))],
                              [starts[i][j] for i in range(len(segments))]) for j in range(world)]
            # Worker residuals: one per (tensor, server) piece, in bucket order.
            refined = [n for row in pieces for n in row]
            served = list(servers[self.collectives.rank].segments)
            plan = self._plans[key] = ([s.in_blocks(self.scale_block) for s in servers], refined,
                                       Layout(served).in_blocks(self.scale_block), served)
        return plan

    def start(self, keys, grad, segments, out=None):
        world, device, codec = self.collectives.world_size, grad.device, codec_for(grad.device)
        servers, refined, mine, served_segments = self._plan(segments)
        worker_keys = [(k, j) for k in keys for j in range(world)]
        start = time.perf_counter()
        residual = self.memory.residual(worker_keys, refined, device)
        residual_out = self.memory.spare(worker_keys, grad.numel(), device) if self.memory.enabled else None
        encoded = [codec.encode(grad, residual, servers[j], self.sparsity, dtype=grad.dtype,
                                feedback=self.memory.enabled, residual_out=residual_out, bounded=self.memory.bounded)
                   for j in range(world)]
        finite = all(e.finite for e in encoded)
        empty = torch.empty(0, dtype=torch.uint8, device=device)
        payloads = [e.payload if finite else empty for e in encoded]
        self._timed("encode", start)
        send_sizes = [p.numel() for p in payloads]
        meta = torch.tensor([[n, finite] for n in send_sizes], device=device).view(-1)
        # Host syncs on CUDA: each encode's size read-back, this .cpu() (the all-to-all's
        # receive sizes), the servers' decode, and the status all-gather below.
        meta = self.collectives.alltoall(meta, [2] * world, [2] * world).view(world, 2).cpu()
        if not bool(meta[:, 1].all()):  # each rank told every peer its flag: all agree
            return self._not_finite(grad.numel(), device)
        recv_sizes = meta[:, 0].tolist()
        received = self.collectives.alltoall(torch.cat(payloads), send_sizes, recv_sizes).split(recv_sizes)

        status, problem, served = OK, "", None
        start = time.perf_counter()
        try:
            total = self._decode_peers(codec, received, mine,
                                       torch.empty(mine.numel, dtype=torch.float32, device=device), "shard")
            cap = None
            if self.server_memory.bounded:
                scales = torch.stack([segment_scales(payload, len(mine.segments)) for payload in received])
                cap = server_scale_cap(scales, self.server_memory.sparsity)
            served = self._encode(self.server_memory, list(keys), served_segments, total, mine, codec, grad.dtype, cap)
            status = OK if served.finite else NOT_FINITE
        except DecodeError as error:
            status, problem = UNDECODABLE, str(error)
        self._timed("decode", start)
        aggregate = served.payload if status == OK else empty
        meta = self.collectives.allgather(torch.tensor([aggregate.numel(), status], device=device)).cpu()
        if not all_finite(meta[:, 1].tolist(), "server rank(s) {failed} could not decode their shard", problem):
            return self._not_finite(grad.numel(), device)
        aggregates = self.collectives.allgather_bytes_async(aggregate, meta[:, 0].tolist(), served.room)

        def finish():
            gathered = aggregates.wait()
            start = time.perf_counter()
            average = self._output(out, grad.numel(), device)
            for rank in range(world):  # each server's aggregate lands on its pieces of every tensor
                self._decode_peers(codec, [gathered[rank]], servers[rank], average, "aggregate", average=False,
                                   ranks=[rank])
            self._timed("decode", start)
            self.zeros += sum(e.zeros for e in encoded)
            self._commit(self.memory, worker_keys, residual_out if self.memory.enabled else None, refined)
            self._commit(self.server_memory, list(keys), served.residual, served_segments)
            return average

        return Deferred(finish, (aggregates,))

    def set_sparsity(self, sparsity: float) -> None:
        super().set_sparsity(sparsity)
        self.server_memory.sparsity = self.memory.sparsity

    def reset(self) -> None:
        super().reset()
        self.server_memory.reset()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "server": self.server_memory.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.server_memory.load_state_dict(state["server"])


TRANSPORTS = {cls.name: cls for cls in (AllreduceTransport, AllgatherTransport, ShardedTransport)}
# The flat transports by name, in one place for the launchers, benchmarks and tests.
FLAT_TRANSPORTS = tuple(TRANSPORTS)


def choose_transport(name: str, world_size: int, ranks_per_node: int = 1) -> str:
    """Resolve ``"auto"``: hierarchical for several nodes of several ranks; else allgather for 2 ranks, sharded for more.

    Hierarchical keeps compressed bytes off the fast intra-node links and divides the
    inter-node work by the ranks per node; its inter-node groups use this same rule.

    Per rank, allgather receives (N - 1) payloads while sharded moves about
    2 (N - 1) / N payloads' worth, at the price of four collectives instead of two:
    equal bytes at N = 2 (allgather wins on latency), sharded ahead from N = 3 on.
    allreduce never wins on bytes (no zero-run encoding: 3 to 6 bits per value).
    """
    if name != "auto":
        return name
    if ranks_per_node > 1 and world_size // ranks_per_node > 1:
        return "hierarchical"
    return "allgather" if world_size <= 2 else "sharded"
