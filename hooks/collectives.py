"""The collectives the transports need, behind one small interface.

Transports (hooks/transports.py) speak only to ``Collectives``; the DDP hook plugs
in ``TorchCollectives`` (torch.distributed) and the Horovod integration its own
class. Every call is blocking and returns new tensors (or fills the ``out`` given);
every rank must make the same calls in the same order, which the caller's single
communication thread ensures.
The byte counters record what this rank hands to and gets back from collectives.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


class Pending:
    """A collective in flight: ``done()`` polls it, ``wait()`` returns its result."""

    def __init__(self, result, work=None, then: Callable | None = None):
        self._result, self._work, self._then = result, work, then

    def done(self) -> bool:
        work = self._work
        return work is None or (work.done() if isinstance(work, Pending) else work.is_completed())

    def wait(self):
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._then is not None:
            self._result, self._then = self._then(self._result), None
        return self._result


class Collectives:
    """Interface: ``rank``, ``world_size``, four blocking collectives and two asynchronous ones.

    The ``*_async`` variants return a ``Pending``; the defaults here run the blocking
    call, so a backend without asynchronous collectives still works, only without overlap.
    ``allgather_into``, ``allgather_to`` and ``reduce_scatter`` are built here on the others; a backend
    overrides them where it can skip a copy (hooks/shm.py).
    """

    rank: int
    world_size: int

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0

        # Collectives of a subgroup count into the group they were made from too, so a
        # hook's traffic figures cover every group its transport uses.
        self.parent: Collectives | None = None

    def _count(self, sent: torch.Tensor | int, received: torch.Tensor | int) -> None:
        sent_bytes = sent if isinstance(sent, int) else sent.numel() * sent.element_size()
        received_bytes = received if isinstance(received, int) else received.numel() * received.element_size()
        collectives = self
        while collectives is not None:
            collectives.bytes_sent += sent_bytes
            collectives.bytes_received += received_bytes
            collectives = collectives.parent

    def subgroup(self, ranks: list[int]) -> "Collectives":
        """Collectives over ``ranks`` (ranks of this group, this rank among them; rank order kept).

        Every member calls it for the same ``ranks``, and each rank makes its calls in
        one order that agrees with its peers' (create groups in a fixed order everywhere).
        """
        raise NotImplementedError(f"{type(self).__name__} has no subgroups")

    def begin(self, tag: str) -> None:
        """Mark the start of one bucket's collectives (``tag``, e.g. ``"b3"``).

        Backends whose collectives are matched by name (Horovod) name the following
        calls after it; the others ignore it.
        """

    def _adopt(self, child: "Collectives") -> "Collectives":
        child.parent = self
        return child

    def allreduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:  # op: "sum" | "max"
        raise NotImplementedError

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stack of every rank's same-shaped ``tensor``, rank order: shape (world, *shape)."""
        raise NotImplementedError

    def alltoall(self, tensor: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Send ``tensor.split(send_splits)[j]`` to rank j; receive ``recv_splits`` from each."""
        raise NotImplementedError

    def allgather_into(self, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``allgather`` written into ``out`` (contiguous, shape (world, *shape)); returns ``out``.

        For callers that reuse one buffer step after step: a fresh buffer of tens of
        megabytes costs more in page faults than the copy into it.
        """
        return out.copy_(self.allgather(tensor))

    def allgather_to(self, tensor: torch.Tensor, targets: list[list[tuple[int, torch.Tensor]]],
                     rows: torch.Tensor) -> None:
        """``allgather`` with every rank's row copied, in pieces, to where the caller wants it.

        ``targets[r]`` lists ``(start, dest)``: elements ``[start, start + dest.numel())`` of
        rank r's flattened ``tensor`` go to ``dest``. ``rows`` (contiguous, shape (world,
        tensor.numel())) is a buffer a backend may gather into first; one that reads its
        peers' memory directly (hooks/shm.py) skips it, and a copy of the bucket with it.
        """
        gathered = self.allgather_into(tensor.reshape(-1), rows)
        for row, pairs in zip(gathered, targets):
            for start, dest in pairs:
                dest.copy_(row[start:start + dest.numel()])

    def reduce_scatter(self, pieces: list[torch.Tensor], splits: list[int],
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """The sum over ranks of the part each rank sends to this one, added in rank order.

        Every rank lays ``pieces`` end to end and sends the ``splits[j]`` elements after
        the first j parts to rank j (as ``alltoall``). Rank order (``x_0 + x_1 + ...``)
        fixes the float result, so a reference can reproduce it bit for bit.
        """
        tensor = torch.cat(pieces) if len(pieces) != 1 else pieces[0]
        mine = splits[self.rank]
        rows = self.alltoall(tensor, splits, [mine] * self.world_size).view(self.world_size, mine)
        return sum_in_rank_order(list(rows), out)

    def allgather_bytes(self, payload: torch.Tensor, sizes: list[int],
                        room: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Every rank's uint8 ``payload`` (their lengths ``sizes`` already exchanged)."""
        return self.allgather_bytes_async(payload, sizes, room).wait()

    def allreduce_async(self, tensor: torch.Tensor, op: str) -> Pending:
        return Pending(self.allreduce(tensor, op))

    def allgather_async(self, tensor: torch.Tensor) -> Pending:
        return Pending(self.allgather(tensor))

    def allgather_bytes_async(self, payload: torch.Tensor, sizes: list[int],
                              room: torch.Tensor | None = None) -> Pending:
        """Padding to the longest keeps it one fixed-size all-gather, which every backend has.

        ``room``, when given, is a buffer that begins with ``payload`` and may be longer:
        its first ``max(sizes)`` bytes are sent as they are (the bytes after the payload
        zeroed), which saves copying the payload into a padded buffer.
        """
        longest = max(sizes)
        n = payload.numel()
        if room is not None and room.numel() >= longest:
            padded = room[:longest]
            padded[n:].zero_()
        else:
            padded = torch.zeros(longest, dtype=torch.uint8, device=payload.device)
            padded[:n] = payload
        gathered = self.allgather_async(padded)
        return Pending(gathered, gathered, then=lambda done: [row[:size] for row, size in zip(done.wait(), sizes)])


def sum_in_rank_order(rows: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """``rows[0] + rows[1] + ...``, left to right, into ``out`` (new when None)."""
    if out is None:
        out = torch.empty_like(rows[0])
    if len(rows) == 1:
        return out.copy_(rows[0])
    torch.add(rows[0], rows[1], out=out)
    for row in rows[2:]:
        out += row
    return out


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class TorchCollectives(Collectives):
    """torch.distributed, on ``group`` (None: the default process group)."""

    def __init__(self, group: dist.ProcessGroup | None = None, timeout=None) -> None:
        super().__init__()
        self.group, self.timeout = group, timeout
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def subgroup(self, ranks: list[int]) -> "TorchCollectives":
        members = dist.get_process_group_ranks(self.group or dist.group.WORLD)
        # Only members synchronise on a group's creation, so ranks need not create the
        # groups they are not in.
        group = dist.new_group([members[r] for r in ranks], timeout=self.timeout, use_local_synchronization=True)
        return self._adopt(TorchCollectives(group, self.timeout))

    def allreduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        return self.allreduce_async(tensor, op).wait()

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.allgather_async(tensor).wait()

    def allreduce_async(self, tensor: torch.Tensor, op: str) -> Pending:
        result = tensor.clone()
        work = dist.all_reduce(result, op=_OPS[op], group=self.group, async_op=True)
        self._count(tensor, result)
        return Pending(result, work)

    def allgather_async(self, tensor: torch.Tensor, out: torch.Tensor | None = None) -> Pending:
        flat = tensor.reshape(-1).contiguous()
        if out is None:
            out = torch.empty(self.world_size * flat.numel(), dtype=tensor.dtype, device=tensor.device)
        # gloo takes the concatenated form only
        work = dist.all_gather_into_tensor(out.view(-1), flat, group=self.group, async_op=True)
        self._count(tensor, out)
        return Pending(out.view(self.world_size, *tensor.shape), work)

    def allgather_into(self, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.allgather_async(tensor, out).wait()

    def alltoall(self, tensor: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        result = torch.empty(sum(recv_splits), *tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
        dist.all_to_all_single(result, tensor.contiguous(), recv_splits, send_splits, group=self.group)
        self._count(tensor, result)
        return result


class TorchGroup:
    """The engine's group on torch.distributed: a private copy of ``process_group``'s ranks.

    Private because DDP issues collectives of its own during backward (the
    unused-parameter map with find_unused_parameters=True) from its own thread, and
    sharing a group would let those interleave with ours differently on different
    ranks. Only member ranks take part in creating it.
    """

    node_groups = True

    def __init__(self, process_group: dist.ProcessGroup | None = None, timeout=None) -> None:
        self.process_group, self.timeout = process_group, timeout

    def size(self) -> int:
        return dist.get_world_size(self.process_group)

    def collectives(self) -> TorchCollectives:
        ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
        group = dist.new_group(ranks, timeout=self.timeout, use_local_synchronization=True)
        return TorchCollectives(group, self.timeout)
