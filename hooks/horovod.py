"""3LC for Horovod: a ``DistributedOptimizer`` that compresses gradients with 3LC.

    import horovod.torch as hvd
    from threelc.hooks.horovod import DistributedOptimizer

    hvd.init()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = DistributedOptimizer(opt, model.named_parameters(), sparsity=1.5, transport="allgather")
    ...
    loss.backward()
    opt.step()                      # waits for the exchanges, then updates
    opt.stats                       # traffic, as ThreeLCState.stats
    opt.threelc.state_dict()        # residuals for checkpoints (opt.state_dict() is the optimizer's)

It is the DDP hook's machinery on Horovod's collectives: the same transports
(hooks/transports.py), the same state class (a ``ThreeLCState`` subclass: settings
check, stats, checkpoints), the same ordered communication thread.

Design (Horovod has no buckets, so this module makes its own):

* Buckets: the parameters in reverse registration order (the order backward
  produces their gradients), cut into consecutive groups of at most
  ``bucket_cap_mb`` each (one larger parameter gets a bucket of its own; a dtype or
  device change starts a new bucket). Every parameter is one segment, so it gets
  its own scale and its own residual, keyed by its position in registration order
  (so residuals do not depend on the bucketing). ``opt.buckets`` lists the buckets.
* Scheduling: a gradient-accumulator hook counts backward passes per parameter.
  Bucket k is handed to the communication thread as soon as all its gradients are
  final *and* buckets 0..k-1 have been handed over, so every rank issues the same
  collectives in the same order while backward goes on (``overlap=False`` defers
  every exchange to ``synchronize()``, still in bucket order). ``synchronize()``
  hands over whatever is left (parameters without a gradient send zeros, as in
  Horovod), waits, and writes the averages into ``p.grad``.
* Names: every collective is named ``threelc.<instance>.b<bucket>.<kind><n>``, so
  the user's own unnamed Horovod calls (even from another thread) never pair up
  with ours, and steady-state names repeat step after step (Horovod's response
  cache keeps working).
* Warm-up: the first ``start_iter`` steps average with a plain Horovod all-reduce.
* ``op=hvd.Average`` (default) or ``hvd.Sum`` (the average times the world size).
* A non-finite gradient on any rank gives NaN in that bucket on every rank (the
  transports agree on it) and no residual is stored; the NaN reaches ``p.grad``.
* Settings: the first exchange all-gathers a fingerprint of the settings plus op,
  ``backward_passes_per_step`` and a digest of the bucket layout; a difference raises
  :class:`threelc.ConfigurationError` on every rank, and every later exchange of that
  optimizer raises it again without touching the network (ranks may even disagree
  about the number of buckets).
* World size 1: like Horovod, no hooks and no communication: gradients are left alone.

Importing this module needs Horovod built with PyTorch support (``bash
launch/install_horovod.sh``); ``import threelc`` and ``threelc.hooks`` never do.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import warnings
from typing import Iterable

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
from .ddp import ThreeLCState

__all__ = ["DistributedOptimizer", "HorovodCollectives", "HorovodThreeLCState"]

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


_EXTRA_FIELDS = ("op", "backward_passes_per_step", "layout_digest")
_OP_NAMES = {hvd.Average: "Average", hvd.Sum: "Sum"}


class HorovodThreeLCState(ThreeLCState):
    """``ThreeLCState`` on Horovod: same settings, stats, ``state_dict``/``load_state_dict``.

    Built by :func:`DistributedOptimizer` (``opt.threelc``); ``process_group`` must be
    None (Horovod's global process set). The settings fingerprint also carries the
    optimizer's ``op``, ``backward_passes_per_step`` and bucket layout digest.
    """

    def __init__(self, process_group=None, sparsity: float = 1.0, transport: str = "allgather",
                 start_iter: int = 2, error_feedback: bool = True, **options):
        if process_group is not None:
            raise ConfigurationError("threelc on Horovod uses Horovod's global process set; process_group must be None")
        if transport == "hierarchical":
            raise ConfigurationError("the hierarchical transport needs node subgroups, which threelc does not build "
                                     "on Horovod; use allgather, sharded, allreduce or auto (flat on Horovod)")
        self.extra = dict.fromkeys(_EXTRA_FIELDS, 0)  # set by DistributedOptimizer; part of the fingerprint
        super().__init__(None, sparsity, transport, start_iter, error_feedback, **options)

    def _reset_runtime(self) -> None:
        super()._reset_runtime()
        self._failed: ConfigurationError | None = None

    built_by = "threelc.hooks.horovod.DistributedOptimizer"
    supports_hierarchical = False

    def _group_size(self) -> int:
        return hvd.size()

    def _make_collectives(self) -> HorovodCollectives:
        return HorovodCollectives()

    def _extra_tensor(self) -> torch.Tensor:
        return torch.tensor([int(self.extra[k]) for k in _EXTRA_FIELDS], dtype=torch.int64)

    def _fingerprint(self) -> torch.Tensor:
        return torch.cat([super()._fingerprint().to(torch.int64), self._extra_tensor()])

    def _check_settings(self, device: torch.device) -> None:
        try:
            super()._check_settings(device)
        except ConfigurationError as error:
            # Every rank saw the same gathered fingerprints, so every rank is here: one
            # more gather for the fields the base message does not spell out.
            rows = self._comm.allgather(self._extra_tensor().to(device)).cpu().tolist()
            lines = [f"rank {rank}: op={_OP_NAMES.get(op, op)} backward_passes_per_step={passes} "
                     f"bucket layout digest {digest:016x}" for rank, (op, passes, digest) in enumerate(rows)]
            self._failed = ConfigurationError(str(error) + "\n  " + "\n  ".join(lines))
            raise self._failed from None

    def _reduce_bucket(self, *args, **kwargs):
        if self._failed is not None:  # agreed on every rank: no further collectives
            raise ConfigurationError(str(self._failed))
        return super()._reduce_bucket(*args, **kwargs)


def _make_buckets(params: list[torch.Tensor], cap_bytes: float) -> list[list[torch.Tensor]]:
    """Consecutive groups of ``params`` in reverse order, each at most ``cap_bytes``."""
    buckets: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    size, key = 0, None
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if current and ((p.dtype, p.device) != key or size + nbytes > cap_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += nbytes
        key = (p.dtype, p.device)
    if current:
        buckets.append(current)
    return buckets


def _layout_digest(buckets: list[list[torch.Tensor]]) -> int:
    layout = repr([[(p.numel(), str(p.dtype)) for p in bucket] for bucket in buckets]).encode()
    return int.from_bytes(hashlib.sha256(layout).digest()[:8], "little") >> 1  # non-negative int64


class _ThreeLCDistributedOptimizer:
    """Mixed in before the wrapped optimizer's class (see :func:`DistributedOptimizer`)."""

    def __init__(self, params, named_parameters, state: HorovodThreeLCState, bucket_cap_mb: float,
                 backward_passes_per_step: int, op: int, overlap: bool):
        super().__init__(params)
        self.threelc = state
        self.op = op
        self.backward_passes_per_step = backward_passes_per_step
        self.bucket_cap_mb = bucket_cap_mb
        self.overlap = overlap

        params, seen = [], set()
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        self._names = _parameter_names(named_parameters, self.param_groups)
        self._buckets = _make_buckets(params, bucket_cap_mb * 2**20)
        self._bucket_of = {p: b for b, bucket in enumerate(self._buckets) for p in bucket}
        self._segments = [[p.numel() for p in bucket] for bucket in self._buckets]
        # Residual keys: each parameter's position in registration order, whatever the buckets.
        position = {p: i for i, p in enumerate(params)}
        self._keys = [[position[p] for p in bucket] for bucket in self._buckets]
        state.extra.update(op=int(op), backward_passes_per_step=backward_passes_per_step,
                           layout_digest=_layout_digest(self._buckets))
        self._params = params
        self._enabled = hvd.size() > 1
        self._hook_handles = []
        self._synchronized = False
        self._should_synchronize = True
        self._reset_step()
        if self._enabled:
            state._world_size()  # fail early, e.g. when lane packing cannot hold this world size
            for p in params:
                self._hook_handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    # ------------------------------------------------------------------ public

    @property
    def stats(self) -> dict:
        """``opt.threelc.stats``: traffic, compression and codec time of this rank."""
        return self.threelc.stats

    @property
    def buckets(self) -> list[list[str]]:
        """Parameter names per bucket, bucket index order; each parameter is one segment."""
        return [[self._names[p] for p in bucket] for bucket in self._buckets]

    def synchronize(self) -> None:
        """Finish every bucket's exchange and write the averages into ``p.grad``."""
        if not self._enabled:
            self._synchronized = True
            return
        for p in self._params:  # no gradient yet (unused here, or fewer passes): send what there is
            if self._delay[p] > 0:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self._delay[p] = 0
                self._ready[self._bucket_of[p]] += 1
        self._submit_ready()
        error = None
        for b, future in enumerate(self._futures):
            try:
                average = future.wait()
            except Exception as failure:  # noqa: BLE001 - wait for every bucket, then raise the first
                error = error or failure
                continue
            with torch.no_grad():
                for p, part in zip(self._buckets[b], average.split(self._segments[b])):
                    p.grad.copy_(part.view_as(p.grad))
        self._reset_step()
        self._synchronized = True
        if error is not None:
            raise error

    @contextlib.contextmanager
    def skip_synchronize(self):
        """``opt.synchronize(); with opt.skip_synchronize(): opt.step()``, as in Horovod."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized and not self._dirty:
                # Horovod would exchange again; 3LC would then re-quantize the averages and
                # move the residuals, so a second exchange without a new backward is skipped.
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() after "
                              "optimizer.synchronize(); the gradients are already averaged, not exchanging "
                              "them again", RuntimeWarning, stacklevel=2)
            else:
                self.synchronize()
        self._synchronized = False
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True):
        if self._dirty:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(). This is prohibited as it can "
                                 "cause a race condition.")
        return super().zero_grad(set_to_none)

    def load_state_dict(self, state_dict) -> None:
        """The wrapped optimizer's state; 3LC's is ``opt.threelc.load_state_dict``."""
        if self._dirty:
            self._wait_quietly()
        self._reset_step()
        self._synchronized = False
        return super().load_state_dict(state_dict)

    def remove_hooks(self) -> None:
        """Detach from the parameters and stop the communication thread (no more averaging)."""
        if self._dirty:
            self._wait_quietly()
            self._reset_step()
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self._enabled = False
        self.threelc.close()

    # ------------------------------------------------------------------ per step

    def _reset_step(self) -> None:
        self._delay = dict.fromkeys(self._params, self.backward_passes_per_step)
        self._ready = [0] * len(self._buckets)
        self._next = 0  # the next bucket to hand to the communication thread
        self._futures: list[torch.futures.Future] = []
        self._compress = False
        self._dirty = False  # a gradient arrived since the last synchronize()

    def _on_grad(self, p: torch.Tensor) -> None:
        if self._delay[p] <= 0:
            raise AssertionError("Gradients were computed more than backward_passes_per_step times before call "
                                 "to step(). Increase backward_passes_per_step to accumulate gradients locally.")
        self._dirty = True
        self._delay[p] -= 1
        if self._delay[p] == 0:
            self._ready[self._bucket_of[p]] += 1
            if self.overlap:
                self._submit_ready()

    def _submit_ready(self) -> None:
        """Hand over buckets in index order, each once all its gradients are final."""
        while self._next < len(self._buckets) and self._ready[self._next] == len(self._buckets[self._next]):
            self._submit(self._next)
            self._next += 1

    def _submit(self, index: int) -> None:
        state, last = self.threelc, index == len(self._buckets) - 1
        if index == 0:
            if state._comm is None:
                state._start()
            self._compress = state.iter >= state.start_iter
        step = state.iter
        if last:
            state.iter += 1
        bucket = self._buckets[index]
        for p in bucket:
            if p.grad.is_sparse:
                raise ConfigurationError(f"threelc cannot compress the sparse gradient of {self._names[p]}")
        with torch.no_grad():
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        keys, segments, compress = self._keys[index], self._segments[index], self._compress
        scale = state._comm.world_size if self.op == hvd.Sum else None

        def job():
            state._comm.begin(f"b{index}")
            deferred = state._reduce_bucket(step, index, keys, flat, segments, compress, last)
            return deferred if scale is None else deferred.wrapped(lambda finish: finish().mul_(scale))

        self._futures.append(state._pipeline.submit(job, flat.device, flush=last))

    def _wait_quietly(self) -> None:
        for future in self._futures:
            with contextlib.suppress(Exception):
                future.wait()


def _parameter_names(named_parameters, param_groups) -> dict:
    """``{parameter: name}``, validated as Horovod does."""
    if named_parameters is None:
        return {p: f"threelc.noname.{i}.{j}" for i, group in enumerate(param_groups)
                for j, p in enumerate(group["params"])}
    named = list(named_parameters)
    if any(not isinstance(item, tuple) for item in named):
        raise ConfigurationError("named_parameters should be a sequence of (name, parameter) tuples, usually "
                         "model.named_parameters()")
    names = [name for name, _ in named]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigurationError(f"parameter names in named_parameters must be unique; duplicates: {', '.join(duplicates)}")
    by_id = {id(p): name for name, p in named}
    unnamed = [p for group in param_groups for p in group["params"] if id(p) not in by_id]
    if unnamed:
        raise ConfigurationError(f"named_parameters was given, but {len(unnamed)} optimizer parameter(s) are not in it")
    return {p: by_id[id(p)] for group in param_groups for p in group["params"]}


def DistributedOptimizer(optimizer: torch.optim.Optimizer,
                         named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
                         sparsity: float = 1.0,
                         transport: str = "allgather",
                         start_iter: int = 2,
                         error_feedback: bool = True,
                         sparsity_warmup: int | None = None,
                         backward_passes_per_step: int = 1,
                         op: int = hvd.Average,
                         bucket_cap_mb: float = 4.0,
                         overlap: bool = True) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` like ``hvd.DistributedOptimizer``, averaging gradients with 3LC.

    The result is an instance of a subclass of ``optimizer``'s class sharing its
    parameter groups (and a copy of its state). ``step()`` first calls
    ``synchronize()``; ``zero_grad()`` between ``backward()`` and ``step()`` is an
    error; ``skip_synchronize()`` works as in Horovod. Broadcast parameters (and, if
    needed, the *unwrapped* optimizer's state) from rank 0 before training.

    Args:
        sparsity, transport, start_iter, error_feedback, sparsity_warmup: as
            :class:`threelc.hooks.ThreeLCState`
            (``start_iter`` counts optimizer steps, each averaged by a plain Horovod
            all-reduce before it).
        backward_passes_per_step: backward passes accumulated locally per step.
        op: ``hvd.Average`` or ``hvd.Sum`` (the average times the world size).
        bucket_cap_mb: gradient megabytes per bucket (one exchange each); scales and
            residuals are per parameter.
        overlap: exchange each bucket on the communication thread as soon as its gradients
            are ready (True), or all of them in ``synchronize()`` (False).

    ``opt.threelc`` (a ``ThreeLCState``) holds the residuals: ``opt.stats`` and
    ``opt.threelc.state_dict()``/``load_state_dict()``; ``opt.state_dict()`` stays the
    wrapped optimizer's, so Horovod's broadcast helpers and checkpoints work unchanged.
    """
    if op not in (hvd.Average, hvd.Sum):
        raise ConfigurationError(f"op must be hvd.Average or hvd.Sum; got {op!r}")
    if int(backward_passes_per_step) != backward_passes_per_step or backward_passes_per_step < 1:
        raise ConfigurationError("backward_passes_per_step must be a positive integer; "
                                 f"got {backward_passes_per_step!r}")
    if not bucket_cap_mb > 0:
        raise ConfigurationError(f"bucket_cap_mb must be positive; got {bucket_cap_mb!r}")
    if not hvd.is_initialized():
        raise ConfigurationError("Horovod is not initialized: call hvd.init() before DistributedOptimizer")
    state = HorovodThreeLCState(None, sparsity, transport, start_iter, error_feedback,
                                sparsity_warmup=sparsity_warmup)
    base = optimizer.__class__
    cls = type(base.__name__, (_ThreeLCDistributedOptimizer, base), {"__module__": __name__})
    wrapped = cls(optimizer.param_groups, named_parameters, state, float(bucket_cap_mb),
                  int(backward_passes_per_step), op, bool(overlap))
    wrapped.defaults = dict(optimizer.defaults)
    if optimizer.state:
        wrapped.load_state_dict(optimizer.state_dict())
    return wrapped
