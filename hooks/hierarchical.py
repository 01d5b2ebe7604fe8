"""Hierarchical 3LC: exact averaging inside a node, 3LC only between nodes (issue 12).

With M nodes of L ranks each (group rank ``r`` on node ``r // L``, local rank ``r % L``):

1. inside a node, a reduce-scatter: every tensor is cut into L pieces as the sharded
   transport cuts it (``shard_lengths``), local rank l receives piece l of every tensor
   from its L node peers and sums them in fp32, ``x_0 + x_1 + ... + x_{L-1}`` in local-rank
   order, then divides by L: the node's mean of shard l;
2. between nodes, local rank l runs a flat 3LC transport (allgather or sharded, by
   ``choose_transport("auto", M)``) on that shard with local rank l of every other
   node: L independent inter-node groups, each moving 1/L of the bucket and keeping
   its own residuals, keyed per (parameter, piece) so they survive bucket rebuilds;
3. inside a node, an all-gather of the averaged shards.

``start`` runs steps 1 and 2 up to the inter-node payload in flight; ``finish`` decodes
it and runs step 3, so the next bucket's node reduction overlaps this one's transfer.
As finish issues a collective, the pipeline finishes a bucket only after it starts the
next (the ``Deferred`` says ``issues_collectives``), never by timing alone: ranks of a
node that took the two in different orders would each wait for the other in a
different node collective.

Shard l's result comes from inter-node group l alone, whose members decode identical
bytes, so every rank ends with the same bits. Agreement: each shard travels in step 3
with its group's status (ok, not finite, undecodable). Each group's status is the same
on every node, so the whole job takes the same branch; residuals are stored only when
every group is ok (the flat transports' commits are held until then).

On CPU the node's ranks exchange through shared memory (hooks/shm.py), on CUDA through
the node group's NCCL.
"""

from __future__ import annotations

import os
import time

import torch

from threelc import ConfigurationError, DecodeError
from threelc.backends import Layout

from .collectives import Collectives
from .pipeline import Deferred
from .shm import SharedMemoryCollectives, host_collectives
from .transports import (NOT_FINITE, OK, TRANSPORTS, UNDECODABLE, Transport, all_finite, choose_transport,
                         shard_lengths)

UNKNOWN = -1  # a rank that does not know its node


def node_claim(rank: int, ranks_per_node: int | None, environ=os.environ) -> tuple[int, int]:
    """``(ranks per node or UNKNOWN, node id or UNKNOWN)`` this rank believes in.

    An explicit ``ranks_per_node`` puts group rank r on node r // ranks_per_node;
    otherwise torchrun's ``GROUP_RANK`` names the node and ``LOCAL_WORLD_SIZE`` its size.
    """
    if ranks_per_node is not None:
        return int(ranks_per_node), rank // int(ranks_per_node)
    size = int(environ.get("LOCAL_WORLD_SIZE", UNKNOWN))
    node = environ.get("GROUP_RANK")
    if node is None and size > 0:
        node = int(environ.get("RANK", rank)) // size
    return size, int(node) if node is not None else UNKNOWN


def agree_node_layout(collectives: Collectives, claim: tuple[int, int], required: bool) -> int | None:
    """Ranks per node, agreed by all ranks; None if no rank knows it and it is not ``required``.

    Every rank checks the same gathered table, so a bad layout raises the same
    ConfigurationError everywhere.
    """
    if claim[0] != UNKNOWN and claim[0] < 1:
        claim = (UNKNOWN, claim[1])
    table = collectives.allgather(torch.tensor(claim, dtype=torch.int64)).tolist()
    sizes = {size for size, _ in table}
    nodes = [node for _, node in table]
    described = "; ".join(f"rank {r}: ranks_per_node={'?' if s == UNKNOWN else s}, "
                          f"node={'?' if n == UNKNOWN else n}" for r, (s, n) in enumerate(table))
    if sizes == {UNKNOWN} and all(n == UNKNOWN for n in nodes):
        if required:
            raise ConfigurationError("the hierarchical transport needs the node layout: run under torchrun "
                                     "(LOCAL_WORLD_SIZE, GROUP_RANK) or pass ranks_per_node")
        return None
    counts: dict[int, int] = {}
    for node in nodes:
        counts[node] = counts.get(node, 0) + 1
    per_node = next(iter(counts.values()))
    blocks = [nodes[i:i + per_node] for i in range(0, len(nodes), per_node)]
    consistent = (len(sizes) == 1 and UNKNOWN not in nodes and len(set(counts.values())) == 1
                  and (sizes == {UNKNOWN} or per_node == next(iter(sizes)))  # GROUP_RANK alone suffices
                  and all(len(set(b)) == 1 for b in blocks) and len({b[0] for b in blocks}) == len(blocks))
    if not consistent:
        raise ConfigurationError("threelc: every node must run the same number of ranks, numbered consecutively "
                                 f"(ranks by node: {dict(sorted(counts.items()))}); layout claimed: {described}")
    return per_node


class HierarchicalTransport(Transport):
    """Reduce-scatter in the node, flat 3LC per shard between nodes, all-gather in the node."""

    name = "hierarchical"

    def __init__(self, collectives: Collectives, sparsity: float, error_feedback: bool = True,
                 ranks_per_node: int = 1, bounded_scale: bool = True, scale_block: int = 0):
        super().__init__(collectives, sparsity, error_feedback, bounded_scale, scale_block)
        world, rank = collectives.world_size, collectives.rank
        if ranks_per_node < 1 or world % ranks_per_node:
            raise ConfigurationError(f"{world} ranks cannot form nodes of {ranks_per_node}")
        self.ranks_per_node, self.nodes = ranks_per_node, world // ranks_per_node
        node, self.local_rank = divmod(rank, ranks_per_node)
        # Same creation order on every rank: the node's two groups, then the same-index group.
        # Two node groups, the reduce-scatter's (start) and the all-gather's (finish): a
        # caller that starts bucket k+1 before finishing bucket k on every rank alike still
        # pairs each collective with its own. Ranks that differ in that order would wait on
        # each other across the groups, so the pipeline keeps one order (issues_collectives).
        node_ranks = [node * ranks_per_node + j for j in range(ranks_per_node)]
        self.scatter, self.gather = self._node_group(collectives, node_ranks), self._node_group(collectives, node_ranks)
        shared = isinstance(self.scatter, SharedMemoryCollectives) and isinstance(self.gather, SharedMemoryCollectives)
        self.node_exchange = "shared memory" if shared else "process group"
        self.across = collectives.subgroup([n * ranks_per_node + self.local_rank for n in range(self.nodes)])
        self.inner_name = choose_transport("auto", self.nodes)
        self.inner: Transport = TRANSPORTS[self.inner_name](self.across, sparsity, error_feedback, bounded_scale,
                                                            scale_block)
        self._plans: dict = {}
        self._buffers: dict[str, torch.Tensor] = {}

    @staticmethod
    def _node_group(collectives: Collectives, ranks: list[int]) -> Collectives:
        group = collectives.subgroup(ranks)
        # Not counted into the job's bytes: those are the traffic between nodes, the
        # figure compression is about; node_traffic() reports the fp32 exchange inside.
        group.parent = None
        return host_collectives(group)

    def node_traffic(self) -> tuple[int, int]:
        groups = (self.scatter, self.gather)
        return sum(g.bytes_sent for g in groups), sum(g.bytes_received for g in groups)

    def _plan(self, segments: list[int]):
        """Per local rank j: its shard's piece lengths and where they lie in the bucket (cached)."""
        key = tuple(segments)
        plan = self._plans.get(key)
        if plan is None:
            size = self.ranks_per_node
            pieces = [shard_lengths(n, size) for n in segments]
            starts, position = [], 0
            for row in pieces:
                starts.append([position + sum(row[:j]) for j in range(size)])
                position += sum(row)
            shards = [Layout([row[j] for row in pieces], [s[j] for s in starts]) for j in range(size)]
            # (bucket offset, length) of every non-empty piece, shard 0's first: the order
            # in which the pieces travel end to end.
            order = [(o, n) for shard in shards for o, n in zip(shard.offsets, shard.segments) if n]
            plan = self._plans[key] = (shards, order)
        return plan

    def _scratch(self, name: str, numel: int, device: torch.device) -> torch.Tensor:
        """A float32 buffer of ``numel`` that lives across steps (grown as needed).

        Tens of megabytes allocated afresh every bucket cost more in page faults than the
        work done in them. Each buffer has one use, finished before its next: ``node``
        within ``start`` (the inner transport encodes it there); ``shard`` (which the
        inner transport decodes into) and ``rows`` within ``finish``, and finishes run in
        bucket order.
        """
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(numel, dtype=torch.float32, device=device)
        return buffer[:numel]

    def start(self, keys, grad, segments, out=None):
        size, me, device = self.ranks_per_node, self.local_rank, grad.device
        shards, order = self._plan(segments)
        sizes = [s.numel for s in shards]
        longest = max(sizes)
        flat = grad.reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.float()
        # The pieces travel end to end, shard 0's first; slices, not an index gather.
        pieces = [flat[o:o + n] for o, n in order] or [flat]
        node_sum = self.scatter.reduce_scatter(pieces, sizes, out=self._scratch("node", sizes[me], device))
        start = time.perf_counter()
        node_mean = node_sum.div_(size)
        self._timed("encode", start)
        # The inner transport decodes into the shard's row of the node all-gather, whose
        # last element carries the status.
        row = self._scratch("shard", longest + 1, device)

        # The inter-node exchange is left in flight: the pipeline starts the next bucket
        # meanwhile. Its residual commits are held until the whole node agrees (finish).
        held, problem = [], []
        try:
            between = self._inner(held, lambda: self.inner.start([(k, me) for k in keys], node_mean,
                                                                list(shards[me].segments), out=row[:sizes[me]]))
        except DecodeError as error:
            between, problem = None, [str(error)]

        def finish():
            status = OK
            try:
                if between is None:
                    raise DecodeError(problem[0])
                shard = self._inner(held, between.finish)
                if shard.data_ptr() != row.data_ptr():  # not decoded in place (a not-finite bucket)
                    row[:sizes[me]].copy_(shard)
                # One pass that allocates nothing (isfinite(shard).all() was 13x slower); NaN propagates.
                if shard.numel():
                    low, high = torch.aminmax(shard)
                    if not bool(torch.isfinite(low) & torch.isfinite(high)):
                        status = NOT_FINITE
            except DecodeError as error:
                status, problem[:] = UNDECODABLE, [str(error)]
            row[sizes[me]:longest].zero_()
            row[-1] = status
            # Each row is one shard's pieces end to end: they go straight to their places in
            # the bucket (no gathered copy on shared memory), the statuses beside it.
            average = self._output(out, grad.numel(), device)
            statuses = torch.empty(size, dtype=torch.float32, device=device)
            targets = [[*self._pieces_of(shard, average), (longest, statuses[j:j + 1])]
                       for j, shard in enumerate(shards)]
            self.gather.allgather_to(row, targets, self._scratch("rows", size * (longest + 1), device).view(size, -1))
            if not all_finite(statuses.to(torch.int64).tolist(),
                              "the inter-node group(s) of local rank(s) {failed} could not decode",
                              problem[0] if problem else ""):
                return self._not_finite(grad.numel(), device).finish()
            for memory, *commit in held:
                memory.commit(*commit)
            return average

        # finish issues the node all-gather (hooks/pipeline.py says why that matters)
        return Deferred(finish, (between,) if between is not None else (), issues_collectives=True)

    @staticmethod
    def _pieces_of(shard: Layout, bucket: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``(position in the shard's row, where it lies in the bucket)`` of each of the shard's pieces."""
        pairs, position = [], 0
        for o, n in zip(shard.offsets, shard.segments):
            pairs.append((position, bucket[o:o + n]))
            position += n
        return pairs

    def _inner(self, held: list, step):
        """Run ``step`` of the inner transport with its commits into ``held`` and its time and zeros counted here."""
        inner, seconds, zeros = self.inner, dict(self.inner.seconds), self.inner.zeros
        inner.held_commits = held
        try:
            return step()
        finally:
            inner.held_commits = None
            for phase in self.seconds:
                self.seconds[phase] += inner.seconds[phase] - seconds[phase]
            self.zeros += inner.zeros - zeros

    def set_sparsity(self, sparsity: float) -> None:
        super().set_sparsity(sparsity)
        self.inner.set_sparsity(sparsity)

    def reset(self) -> None:
        self.inner.reset()

    def state_dict(self) -> dict:
        return {"ranks_per_node": self.ranks_per_node, "inner_name": self.inner_name,
                "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("ranks_per_node") != self.ranks_per_node or state.get("inner_name") != self.inner_name:
            raise ConfigurationError(
                f"checkpoint residuals were made by nodes of {state.get('ranks_per_node')} ranks "
                f"({state.get('inner_name')} between nodes); this job has nodes of {self.ranks_per_node} "
                f"({self.inner_name}): residuals belong to a rank's shard and cannot be carried across")
        self.inner.load_state_dict(state["inner"])
