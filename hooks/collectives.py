"""The collectives the transports need, behind one small interface.

Transports (hooks/transports.py) speak only to ``Collectives``; the DDP hook plugs
in ``TorchCollectives`` (torch.distributed) and the Horovod integration its own
class. Every call is blocking and returns new tensors; every rank must make the same
calls in the same order, which the caller's single communication thread ensures.
The byte counters record what this rank hands to and gets back from collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Collectives:
    """Interface: ``rank``, ``world_size`` and four blocking collectives."""

    rank: int
    world_size: int

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0

    def _count(self, sent: torch.Tensor, received: torch.Tensor | int) -> None:
        self.bytes_sent += sent.numel() * sent.element_size()
        self.bytes_received += received if isinstance(received, int) else received.numel() * received.element_size()

    def allreduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:  # op: "sum" | "max"
        raise NotImplementedError

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Stack of every rank's same-shaped ``tensor``, rank order: shape (world, *shape)."""
        raise NotImplementedError

    def alltoall(self, tensor: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        """Send ``tensor.split(send_splits)[j]`` to rank j; receive ``recv_splits`` from each."""
        raise NotImplementedError

    def allgather_bytes(self, payload: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """Every rank's uint8 ``payload`` (their lengths ``sizes`` already exchanged).

        Padding to the longest keeps it one fixed-size all-gather, which every backend has.
        """
        longest = max(sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=payload.device)
        padded[: payload.numel()] = payload
        gathered = self.allgather(padded)
        return [gathered[r, :n] for r, n in enumerate(sizes)]


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class TorchCollectives(Collectives):
    """torch.distributed, on ``group`` (None: the default process group)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def allreduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        result = tensor.clone()
        dist.all_reduce(result, op=_OPS[op], group=self.group)
        self._count(tensor, result)
        return result

    def allgather(self, tensor: torch.Tensor) -> torch.Tensor:
        flat = tensor.reshape(-1).contiguous()
        result = torch.empty(self.world_size * flat.numel(), dtype=tensor.dtype, device=tensor.device)
        dist.all_gather_single(result, flat, group=self.group)  # gloo takes the concatenated form only
        self._count(tensor, result)
        return result.view(self.world_size, *tensor.shape)

    def alltoall(self, tensor: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> torch.Tensor:
        result = torch.empty(sum(recv_splits), *tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
        dist.all_to_all_single(result, tensor.contiguous(), recv_splits, send_splits, group=self.group)
        self._count(tensor, result)
        return result
