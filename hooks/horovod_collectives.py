"""``Collectives`` on Horovod: named, blocking calls on Horovod's global process set.

Importing this module needs Horovod built with PyTorch support (``bash
launch/install_horovod.sh``); ``import threelc`` and ``threelc.hooks`` never do.
"""

from __future__ import annotations

import itertools

import torch

from threelc import CommunicationError, ConfigurationError

try:
    import horovod.torch as hvd
except ImportError as _error:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "threelc.hooks.horovod needs Horovod with PyTorch support, and `import horovod.torch` failed "
        f"({_error}). Install it with: bash launch/install_horovod.sh "
        "(builds Horovod 0.28.1 with Gloo against the installed torch)"
    ) from _error

from .collectives import Collectives, Pending

_ALLREDUCE_OPS = {"sum": hvd.Sum, "max": hvd.Max}
# Horovod's allreduce rejects these dtypes: reduce in a wider type, cast back.
_ALLREDUCE_WIDER = {torch.bfloat16: torch.float32, torch.bool: torch.int32, torch.uint8: torch.int32,
                    torch.int8: torch.int32, torch.int16: torch.int32}
# Its allgather rejects these: gather the same bits as another type.
_ALLGATHER_BITS = {torch.bfloat16: torch.int16, torch.bool: torch.uint8}
_instances = itertools.count()


class HorovodCollectives(Collectives):
    """``Collectives`` on Horovod's global process set (``hvd.init()`` first).

    Every call is blocking and named ``<prefix>.<tag>.<kind><n>``: ``begin(tag)``
    starts a job's numbering. ``prefix`` defaults to ``threelc.<k>`` with ``k`` counting
    the instances this process made, so ranks that build their optimizers in the same
    order get matching names.
    """

    def __init__(self, prefix: str | None = None) -> None:
        super().__init__()
        if not hvd.is_initialized():
            raise ConfigurationError("Horovod is not initialized: call hvd.init() before using threelc with it")
        self.rank, self.world_size = hvd.rank(), hvd.size()
        self.prefix = prefix if prefix is not None else f"threelc.{next(_instances)}"
        self.begin("")

    def begin(self, tag: str) -> None:
        """Name the following collectives after ``tag`` (e.g. a bucket), counting from 1."""
        self._tag, self._calls = str(tag), 0

    def _name(self, kind: str) -> str:
        self._calls += 1
        return f"{self.prefix}.{self._tag}.{kind}{self._calls}"

    def allreduce(self, tensor, op):
        return self.allreduce_async(tensor, op).wait()

    def allreduce_async(self, tensor, op):
        wire = tensor.to(_ALLREDUCE_WIDER.get(tensor.dtype, tensor.dtype)).contiguous()
        handle = _Handle(hvd.allreduce_async(wire, op=_ALLREDUCE_OPS[op], name=self._name("allreduce")))
        self._count(wire, wire)
        return Pending(None, handle, then=lambda _: handle.output.to(tensor.dtype))

    def allgather(self, tensor):
        bits = _ALLGATHER_BITS.get(tensor.dtype)
        wire = (tensor.view(bits) if bits is not None else tensor).reshape(1, *tensor.shape).contiguous()
        result = hvd.synchronize(hvd.allgather_async(wire, name=self._name("allgather")))
        self._count(wire, result)
        result = result.view(self.world_size, *tensor.shape)
        return result.view(tensor.dtype) if bits is not None else result

    def allgather_bytes_async(self, payload, sizes, room=None):
        """Horovod gathers different lengths natively: no padding (``room`` is not needed)."""
        payload = payload.contiguous()
        handle = _Handle(hvd.allgather_async(payload, name=self._name("allgather_bytes")))
        self._count(payload, sum(sizes))

        def split(_):
            result = handle.output
            if result.numel() != sum(sizes):
                raise CommunicationError(f"allgather returned {result.numel()} bytes; the exchanged sizes {sizes} "
                                   f"add up to {sum(sizes)}")
            return list(result.split(list(sizes)))

        return Pending(None, handle, then=split)

    def alltoall(self, tensor, send_splits, recv_splits):
        splits = torch.tensor(list(send_splits), dtype=torch.int32)
        result, received = hvd.synchronize(
            hvd.alltoall_async(tensor.contiguous(), splits=splits, name=self._name("alltoall")))
        if received.tolist() != list(recv_splits):
            raise CommunicationError(f"alltoall received splits {received.tolist()}, expected {list(recv_splits)}")
        self._count(tensor, result)
        return result


class _Handle:
    """A Horovod handle as the ``Pending`` protocol wants it (``is_completed``, ``wait``)."""

    def __init__(self, handle):
        self.handle, self.output = handle, None

    def is_completed(self) -> bool:
        return self.output is not None or hvd.poll(self.handle)

    def wait(self) -> None:
        if self.output is None:
            self.output = hvd.synchronize(self.handle)


class HorovodGroup:
    """The engine's group on Horovod: the global process set, no node subgroups."""

    node_groups = False

    def size(self) -> int:
        return hvd.size()

    def collectives(self) -> HorovodCollectives:
        return HorovodCollectives()
