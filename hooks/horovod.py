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

It is the DDP hook's engine (hooks/engine.py: settings agreement, transports,
residuals, stats, checkpoints, the ordered communication thread) on Horovod's
collectives (hooks/horovod_collectives.py), with buckets of its own
(hooks/horovod_buckets.py).

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
* ``op=hvd.Average`` (default) or ``hvd.Sum`` (the average times the world size,
  applied in ``synchronize()``).
* A non-finite gradient on any rank gives NaN in that bucket on every rank (the
  transports agree on it) and no residual is stored; the NaN reaches ``p.grad``.
* Settings: the first exchange all-gathers a fingerprint of the settings plus op,
  ``backward_passes_per_step`` and a digest of the bucket layout (the engine's
  ``agreement``); a difference raises
  :class:`threelc.ConfigurationError` on every rank, and every later exchange of that
  optimizer raises it again without touching the network (ranks may even disagree
  about the number of buckets).
* World size 1: like Horovod, no hooks and no communication: gradients are left alone.

Importing this module needs Horovod built with PyTorch support (``bash
launch/install_horovod.sh``); ``import threelc`` and ``threelc.hooks`` never do.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable

import torch

from threelc import ConfigurationError

from .horovod_collectives import HorovodGroup  # first: its ImportError says how to install Horovod

import horovod.torch as hvd  # noqa: E402

from .engine import ThreeLCEngine  # noqa: E402
from .horovod_buckets import layout_digest, make_buckets, parameter_names  # noqa: E402
from .settings import DEFAULT_SPARSITY_WARMUP, Settings  # noqa: E402

__all__ = ["DistributedOptimizer", "HorovodThreeLCState"]

# What the optimizer adds to the settings agreement: ranks must wrap alike.
AGREEMENT_FIELDS = ("op", "backward_passes_per_step", "layout_digest")


class HorovodThreeLCState(ThreeLCEngine):
    """The 3LC engine on Horovod: same settings, stats, ``state_dict``/``load_state_dict`` as ``ThreeLCState``.

    Built by :func:`DistributedOptimizer` (``opt.threelc``); ``process_group`` must be
    None (Horovod's global process set) and ``transport`` flat or ``"auto"`` (no node
    subgroups here).
    """

    def __init__(self, process_group=None, sparsity: float = 1.0, transport: str = "allgather",
                 start_iter: int = 2, error_feedback: bool = True, sparsity_warmup: int | None = None,
                 bounded_scale: bool = True, scale_block: int = 0):
        if process_group is not None:
            raise ConfigurationError("threelc on Horovod uses Horovod's global process set; process_group must be None")
        warmup = DEFAULT_SPARSITY_WARMUP if sparsity_warmup is None else sparsity_warmup
        settings = Settings(sparsity, transport, start_iter, error_feedback, warmup, bounded_scale, scale_block)
        super().__init__(settings, HorovodGroup(), built_by="threelc.hooks.horovod.DistributedOptimizer")
        self.agreement = dict.fromkeys(AGREEMENT_FIELDS, 0)  # set by DistributedOptimizer

    def __getstate__(self) -> dict:
        return {"arguments": self.settings.as_dict(), "state": self.state_dict()}

    def __setstate__(self, pickled: dict) -> None:
        self.__init__(None, **pickled["arguments"])
        self.load_state_dict(pickled["state"])


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
        self._names = parameter_names(named_parameters, self.param_groups)
        self._buckets = make_buckets(params, bucket_cap_mb * 2**20)
        self._bucket_of = {p: b for b, bucket in enumerate(self._buckets) for p in bucket}
        self._segments = [[p.numel() for p in bucket] for bucket in self._buckets]
        # Residual keys: each parameter's position in registration order, whatever the buckets.
        position = {p: i for i, p in enumerate(params)}
        self._keys = [[position[p] for p in bucket] for bucket in self._buckets]
        state.agreement.update(op=int(op), backward_passes_per_step=backward_passes_per_step,
                               layout_digest=layout_digest(self._buckets))
        self._params = params
        self._enabled = hvd.size() > 1
        self._hook_handles = []
        self._synchronized = False
        self._should_synchronize = True
        self._reset_step()
        if self._enabled:
            state.check_world_size()  # fail early, e.g. when lane packing cannot hold this world size
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
        error, times = None, self.threelc.world_size if self.op == hvd.Sum else None
        for b, future in enumerate(self._futures):
            try:
                average = future.wait()
            except Exception as failure:  # noqa: BLE001 - wait for every bucket, then raise the first
                error = error or failure
                continue
            if times is not None:  # hvd.Sum: the average times the world size
                average = average.mul_(times)
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
        bucket = self._buckets[index]
        for p in bucket:
            if p.grad.is_sparse:
                raise ConfigurationError(f"threelc cannot compress the sparse gradient of {self._names[p]}")
        with torch.no_grad():
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        self._futures.append(self.threelc.submit(self._keys[index], flat, self._segments[index], index=index,
                                                 last=index == len(self._buckets) - 1))

    def _wait_quietly(self) -> None:
        for future in self._futures:
            with contextlib.suppress(Exception):
                future.wait()


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
                         overlap: bool = True,
                         bounded_scale: bool = True,
                         scale_block: int = 0) -> torch.optim.Optimizer:
    """Wrap ``optimizer`` like ``hvd.DistributedOptimizer``, averaging gradients with 3LC.

    The result is an instance of a subclass of ``optimizer``'s class sharing its
    parameter groups (and a copy of its state). ``step()`` first calls
    ``synchronize()``; ``zero_grad()`` between ``backward()`` and ``step()`` is an
    error; ``skip_synchronize()`` works as in Horovod. Broadcast parameters (and, if
    needed, the *unwrapped* optimizer's state) from rank 0 before training.

    Args:
        sparsity, transport, start_iter, error_feedback, sparsity_warmup, bounded_scale, scale_block:
            as :class:`threelc.hooks.ThreeLCState` (bounded_scale: the scale is bounded by the
            current gradient's max, default True, so residual bursts cannot diverge training)
            (``start_iter`` counts optimizer steps, each averaged by a plain Horovod
            all-reduce before it).
        backward_passes_per_step: backward passes accumulated locally per step.
        op: ``hvd.Average`` or ``hvd.Sum`` (the average times the world size).
        bucket_cap_mb: gradient megabytes per bucket (one exchange each); scales and
            residuals are per parameter.
        overlap: exchange each bucket on the communication thread as soon as its gradients
            are ready (True), or all of them in ``synchronize()`` (False).

    ``opt.threelc`` (a ``HorovodThreeLCState``) holds the residuals: ``opt.stats`` and
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
    state = HorovodThreeLCState(None, sparsity, transport, start_iter, error_feedback, sparsity_warmup,
                                bounded_scale, scale_block)
    base = optimizer.__class__
    cls = type(base.__name__, (_ThreeLCDistributedOptimizer, base), {"__module__": __name__})
    wrapped = cls(optimizer.param_groups, named_parameters, state, float(bucket_cap_mb),
                  int(backward_passes_per_step), op, bool(overlap))
    wrapped.defaults = dict(optimizer.defaults)
    if optimizer.state:
        wrapped.load_state_dict(optimizer.state_dict())
    return wrapped
