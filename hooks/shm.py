"""Collectives through shared memory for the ranks of one host: the hierarchical transport's node group on CPU.

The hierarchical transport moves a node's buckets between its ranks in fp32 (a
reduce-scatter and an all-gather, 2 (L-1)/L of the bucket per rank per step). On CUDA
that is NCCL over NVLink or PCIe. On CPU, gloo would push those bytes through TCP
loopback: two copies through the kernel per byte, on the same cores that compute the
gradients. Here each rank writes its tensor once into a memory-mapped file of its own
(under ``/dev/shm``) and every peer copies out the part it needs; one small gloo
all-gather per collective is the barrier.

Protocol of collective k (every member makes the same calls in the same order):

1. finish this group's previous collective (its copies out), so a peer that has passed
   collective k's barrier is done reading collective k-1;
2. write this rank's tensor into half ``k % 2`` of its segment; a segment too small is
   replaced by a larger one in a new file (a new *generation*);
3. all-gather ``[room, generation, capacity, piece offsets]`` over gloo: the barrier,
   which also tells every peer where to read and which file to map;
4. copy the pieces out of the peers' segments (``reduce_scatter`` sums them from there
   instead, into the caller's buffer).

Half ``k % 2`` is written again at collective k+2, after collective k+1's barrier, which
no peer passes before it has finished reading collective k. A file is unlinked once
every peer has mapped it (the barrier after its first use), so a killed job leaves at
most the files of its last two collectives in ``/dev/shm``; a finished one leaves none.

``host_collectives`` decides whether a group can use this: only a gloo group whose
members prove, through files they write and read back, that they share the directory.
Otherwise (NCCL, ranks on different hosts, no ``/dev/shm``) the group stays as it was.
A segment that cannot grow (a full tmpfs) is reported in the barrier's table, and every
member then finishes that collective, and all later ones, over the process group.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import weakref

import torch
import torch.distributed as dist

from .collectives import Collectives, Pending, TorchCollectives, sum_in_rank_order

_log = logging.getLogger("threelc")
SHM_DIR_ENV = "THREELC_SHM_DIR"  # "" turns shared memory off; unset: /dev/shm
MIN_CAPACITY = 1 << 16  # bytes per half of a segment; capacities are powers of two


def host_collectives(group: Collectives, directory: str | None = None) -> Collectives:
    """``group`` with its collectives through shared memory when its members share a host, else ``group``.

    Collective over ``group``: every member calls it, and all reach the same verdict.
    """
    if directory is None:
        directory = os.environ.get(SHM_DIR_ENV, "/dev/shm")
    if not directory or not isinstance(group, TorchCollectives) or group.world_size < 2:
        return group
    if dist.get_backend(group.group) != "gloo":  # NCCL moves device tensors over the node's own links
        return group
    shared = SharedMemoryCollectives(group, directory)
    return shared if shared.usable else group


def _map(path: str, size: int | None = None) -> torch.Tensor:
    """The file at ``path`` as a shared uint8 tensor (created with ``size`` bytes when given)."""
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if size is not None else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if size is not None:
            # Reserved now, not on first touch: a full tmpfs (Docker's 64 MB /dev/shm)
            # then fails here with ENOSPC instead of killing the process with SIGBUS later.
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                os.unlink(path)
                raise
        return torch.frombuffer(mmap.mmap(fd, 0), dtype=torch.uint8)
    finally:
        os.close(fd)


def _unlink(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _spans(pieces: list[torch.Tensor], start: int, stop: int) -> list[tuple[int, torch.Tensor]]:
    """Elements [start, stop) of ``pieces`` laid end to end: ``(position after start, view)`` in order."""
    spans, position = [], 0
    for piece in pieces:
        low, high = max(start, position), min(stop, position + piece.numel())
        if low < high:
            spans.append((low - start, piece[low - position:high - position]))
        position += piece.numel()
    return spans


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).contiguous().view(torch.uint8)


class SharedMemoryCollectives(Collectives):
    """The collectives of ``group`` (a gloo TorchCollectives of one host's ranks) through memory-mapped files."""

    def __init__(self, group: TorchCollectives, directory: str):
        super().__init__()
        self.group, self.rank, self.world_size = group, group.rank, group.world_size
        self.parent = group.parent
        self._count_calls = 0  # collectives so far: picks the half of the segment
        self._previous: Pending | None = None
        self._peers: dict[int, tuple[int, torch.Tensor]] = {}  # rank -> (generation, mapped segment)
        self._generation, self._capacity, self._segment = 0, MIN_CAPACITY, None
        self._unlink_next: list[str] = []  # own files every peer will have mapped after the next barrier
        self._fallen_back, self._no_room = False, ""  # a segment could not grow: the process group from then on
        tokens = group.allgather(torch.tensor([secrets.randbits(62)], dtype=torch.int64)).view(-1).tolist()
        self._prefix = os.path.join(directory, f"threelc-{tokens[0]:x}")
        self._own_files: list[str] = []
        weakref.finalize(self, _unlink, self._own_files)
        self.usable = self._probe(tokens)

    def _path(self, rank: int, generation: int) -> str:
        return f"{self._prefix}-r{rank}-g{generation}"

    def _grow(self, generation: int, capacity: int) -> None:
        path = self._path(self.rank, generation)
        self._segment = _map(path, 2 * capacity)
        self._own_files.append(path)
        self._generation, self._capacity = generation, capacity

    def _probe(self, tokens: list[int]) -> bool:
        """Each rank writes its token into its first segment; all must read every peer's back."""
        try:
            self._grow(0, MIN_CAPACITY)
            self._segment[:8].view(torch.int64)[0] = tokens[self.rank]
            written = True
        except OSError:
            written = False
        written = bool(self.group.allgather(torch.tensor([int(written)])).all())
        seen = written
        if written:
            try:
                for peer in range(self.world_size):
                    segment = self._peer_segment(peer, 0)
                    seen = seen and int(segment[:8].view(torch.int64)[0]) == tokens[peer]
            except OSError:
                seen = False
        usable = bool(self.group.allgather(torch.tensor([int(seen)])).all())
        _unlink(self._own_files)  # every peer has mapped it (or gave up): the name is no longer needed
        self._own_files.clear()
        if not usable:
            self._peers.clear()
            self._segment = None
        return usable

    def _peer_segment(self, peer: int, generation: int) -> torch.Tensor:
        if peer == self.rank:
            return self._segment
        known = self._peers.get(peer)
        if known is None or known[0] != generation:
            known = self._peers[peer] = (generation, _map(self._path(peer, generation)))
        return known[1]

    def _publish(self, parts: list[torch.Tensor], offsets: list[int]) -> tuple[Pending, int]:
        """Steps 1-3: write ``parts`` (bytes) end to end into this collective's half; start the barrier."""
        self._settle()
        half = self._count_calls % 2
        self._count_calls += 1
        numel = sum(part.numel() for part in parts)
        grew, room = numel > self._capacity, True
        if grew:
            try:
                self._grow(self._generation + 1, max(MIN_CAPACITY, 1 << (numel - 1).bit_length()))
            except OSError as error:  # no room: told to every peer in the barrier's table
                grew, room, self._no_room = False, False, f"{type(error).__name__}: {error}"
        if room:
            position = half * self._capacity
            for part in parts:  # straight from the caller's pieces: no staging copy
                self._segment[position:position + part.numel()].copy_(part)
                position += part.numel()
        unlink, self._unlink_next = self._unlink_next, [self._own_files[-1]] if grew else []

        def read_after(done: torch.Tensor) -> torch.Tensor:
            # Every peer mapped the files of the previous collective before this barrier.
            _unlink(unlink)
            self._own_files[:] = [f for f in self._own_files if f not in unlink]
            return done

        table = torch.tensor([int(room), self._generation, self._capacity, *offsets], dtype=torch.int64)
        barrier = self.group.allgather_async(table)
        return Pending(barrier, barrier, then=lambda pending: read_after(pending.wait())), half

    def _piece(self, table: torch.Tensor, peer: int, half: int, index: int, length: int) -> torch.Tensor:
        generation, capacity = int(table[peer, 1]), int(table[peer, 2])
        start = half * capacity + int(table[peer, 3 + index])
        return self._peer_segment(peer, generation)[start:start + length]

    def _room_everywhere(self, table: torch.Tensor) -> bool:
        """False (and the process group from now on, on every member alike) if a rank could not grow its segment."""
        if bool(table[:, 0].all()):
            return True
        short = [r for r in range(self.world_size) if not int(table[r, 0])]
        _log.warning("threelc: shared memory under %s has no room for rank(s) %s of this node (%s); the node's "
                     "exchange continues over its process group", os.path.dirname(self._prefix), short,
                     self._no_room or "see that rank's log")
        self._fallen_back = True
        return False

    def allreduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        self._settle()
        return self.group.allreduce(tensor, op)

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.allgather_async(tensor).wait()

    def allgather_into(self, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.allgather_async(tensor, out).wait()

    def allgather_async(self, tensor: torch.Tensor, out: torch.Tensor | None = None) -> Pending:
        if self._fallen_back:
            self._settle()
            return self.group.allgather_async(tensor, out)
        data = _bytes(tensor)
        barrier, half = self._publish([data], [0])
        result = out if out is not None else torch.empty((self.world_size, *tensor.shape), dtype=tensor.dtype,
                                                         device=tensor.device)
        self._count(tensor, result)

        def read(_):
            table = barrier.wait()
            if not self._room_everywhere(table):
                # before any later collective: each one settles this first
                return self.group.allgather_async(tensor, out).wait()
            rows = _bytes(result).view(self.world_size, -1)
            for peer in range(self.world_size):
                rows[peer].copy_(data if peer == self.rank else self._piece(table, peer, half, 0, data.numel()))
            return result

        pending = Pending(None, barrier, then=read)
        self._previous = pending
        return pending

    def alltoall(self, tensor: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        if self._fallen_back:
            self._settle()
            return self.group.alltoall(tensor, send_splits, recv_splits)
        row = _bytes(tensor[:1]).numel() if tensor.shape[0] else 0
        data = _bytes(tensor)
        offsets = [0]
        for rows in send_splits[:-1]:
            offsets.append(offsets[-1] + rows * row)
        barrier, half = self._publish([data], offsets)
        table = barrier.wait()
        if not self._room_everywhere(table):
            return self.group.alltoall(tensor, send_splits, recv_splits)
        result = torch.empty(sum(recv_splits), *tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
        out, position = _bytes(result), 0
        for peer, rows in enumerate(recv_splits):
            length = rows * row
            source = (data[offsets[self.rank]:offsets[self.rank] + length] if peer == self.rank
                      else self._piece(table, peer, half, self.rank, length))
            out[position:position + length].copy_(source)
            position += length
        self._count(tensor, result)
        return result

    def allgather_to(self, tensor: torch.Tensor, targets: list[list[tuple[int, torch.Tensor]]],
                     rows: torch.Tensor) -> None:
        """Copied from the peers' segments straight to the targets: ``rows`` stays untouched."""
        if self._fallen_back:
            self._settle()
            return super().allgather_to(tensor, targets, rows)
        flat = tensor.reshape(-1)
        data = _bytes(flat)
        barrier, half = self._publish([data], [0])
        table = barrier.wait()
        if not self._room_everywhere(table):
            return super().allgather_to(tensor, targets, rows)
        for peer, pairs in enumerate(targets):
            source = flat if peer == self.rank else self._piece(table, peer, half, 0, data.numel()).view(flat.dtype)
            for start, dest in pairs:
                dest.copy_(source[start:start + dest.numel()])
        self._count(tensor, self.world_size * data.numel())

    def reduce_scatter(self, pieces: list[torch.Tensor], splits: list[int],
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """Summed straight out of the peers' segments: no received copy, no staging buffer.

        Only the parts the peers sum are published; this rank's own part is added where
        it lies in ``pieces``, piece by piece, in the same rank order.
        """
        if self._fallen_back:
            self._settle()
            return self.group.reduce_scatter(pieces, splits, out)
        pieces = [p.reshape(-1) for p in pieces]
        dtype, element = pieces[0].dtype, pieces[0].element_size()
        mine, begin = splits[self.rank], sum(splits[:self.rank])
        end, total = begin + mine, sum(splits)
        offsets, position = [], 0
        for peer, n in enumerate(splits):  # this rank's own offset is never read
            offsets.append(position * element)
            position += n if peer != self.rank else 0
        published = [_bytes(v) for _, v in _spans(pieces, 0, begin) + _spans(pieces, end, total)]
        barrier, half = self._publish(published, offsets)
        table = barrier.wait()
        if not self._room_everywhere(table):
            return self.group.reduce_scatter(pieces, splits, out)
        # Offsets are whole elements from a page-aligned start, so each view is aligned.
        rows = [None if peer == self.rank else self._piece(table, peer, half, self.rank, mine * element).view(dtype)
                for peer in range(self.world_size)]
        self._count((total - mine) * element, (self.world_size - 1) * mine * element)
        if out is None:
            out = torch.empty(mine, dtype=dtype, device=pieces[0].device)
        for at, own in _spans(pieces, begin, end):
            n = own.numel()
            sum_in_rank_order([own if row is None else row[at:at + n] for row in rows], out[at:at + n])
        return out

    def _settle(self) -> None:
        """Step 1: the previous collective's copies out are done."""
        if self._previous is not None:
            self._previous.wait()
            self._previous = None
