"""3LC as a DDP communication hook.

No `from __future__ import annotations` here: DDP checks the hook's annotations at
registration, and string annotations fail that check.
"""


import datetime
import struct
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist

from threelc import CommunicationError, ConfigurationError, ThreeLCError, check_sparsity
from threelc.lanes import lanes_per_word

from .collectives import Collectives, TorchCollectives
from .hierarchical import HierarchicalTransport, agree_node_layout, node_claim
from .pipeline import CommPipeline, Deferred
from .transports import TRANSPORTS, choose_transport

STATE_VERSION = 3  # 3: sparsity warm-up in the settings; 2: residuals per parameter (1: per bucket)
# Compressed steps over which the sparsity multiplier ramps from 1 to its target when
# the user does not say: see ThreeLCState's docstring for why a ramp is needed at all.
DEFAULT_SPARSITY_WARMUP = 100
TRANSPORT_CHOICES = (*TRANSPORTS, "auto", HierarchicalTransport.name)
_STAT_KEYS = ("bytes_sent", "bytes_received", "uncompressed_bytes", "numel", "zeros", "encode_seconds", "decode_seconds")


class ThreeLCState:
    r"""State of :func:`threelc_hook`: settings, one residual per parameter, traffic counters.

    Use it when gradient traffic limits data-parallel training (many nodes, slow
    links, large models): 3LC sends each gradient as ternary values, five per byte,
    with runs of zeros collapsed, and keeps what it could not send in a residual
    (error feedback) that is added to the next step's gradient, so training converges
    as without compression (README: measured traffic and accuracy).

    ::

        state = ThreeLCState(process_group=None, sparsity=1.0, transport="allgather")
        ddp_model.register_comm_hook(state, threelc_hook)

    Args:
        process_group: the group to average over (None: the default group).
        sparsity: the 3LC sparsity multiplier s in [1, 2): scale = max|g| * s, so
            larger s sends fewer non-zeros (cheaper) and carries more in the residual.
        transport: ``"allreduce"`` (agree on scales, integer all-reduce of
            lane-packed ternaries), ``"allgather"`` (every rank gathers every rank's
            payload), ``"sharded"`` (each rank serves 1/N of every tensor, two-way
            compression), ``"hierarchical"`` (exact averaging inside each node, 3LC
            between nodes: one inter-node group per local rank, each on 1/L of the
            bucket), or ``"auto"`` (hierarchical for several nodes of several ranks,
            else allgather for 2 ranks, sharded for more).
        start_iter: plain averaging all-reduce for the first ``start_iter``
            iterations; DDP rebuilds its buckets after the first one, and residuals
            are kept per parameter.
        error_feedback: keep residuals (off only for experiments: 3LC is biased without).
        sparsity_warmup: compressed steps over which the multiplier ramps linearly from
            1.0 to ``sparsity`` (default ``DEFAULT_SPARSITY_WARMUP``; 0: no ramp). Every
            step is compressed; only its sparsity changes. At a high multiplier each
            step sends few values at up to ``sparsity`` times the largest magnitude, and
            early in training, when gradients change fastest, the residual builds up and
            is released in bursts that momentum amplifies; starting at s = 1 (every value
            above half the largest is sent) lets the model leave that phase first.
        timeout: collective timeout of threelc's own process group (it mirrors
            ``process_group``'s ranks); pass the ``timeout`` you gave
            ``init_process_group`` (default: torch's default for the backend). When a
            peer dies or hangs, the others raise ``threelc.CommunicationError``
            naming the step and bucket once it expires.
        ranks_per_node: the node layout for ``"hierarchical"`` and ``"auto"``: group
            rank r runs on node r // ranks_per_node (default: torchrun's
            ``GROUP_RANK`` and ``LOCAL_WORLD_SIZE``). Every node must run the same
            number of ranks; the first hook call checks it on every rank.

    All ranks must use the same settings; the first hook call compares them across
    ranks and raises :class:`threelc.ConfigurationError` on every rank if they differ.
    ``state.stats`` reports traffic, compression and codec time; ``state_dict()`` and
    pickling carry every residual into checkpoints (the process group is not pickled).
    Residuals belong to parameters, not buckets, so DDP's bucket rebuild after the
    first iteration and restarts from a checkpoint keep every residual with its
    parameter; resume with the same model, ``bucket_cap_mb`` and world size.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        sparsity: float = 1.0,
        transport: str = "allgather",
        start_iter: int = 2,
        error_feedback: bool = True,
        timeout: Optional[datetime.timedelta] = None,
        sparsity_warmup: Optional[int] = None,
        ranks_per_node: Optional[int] = None,
    ):
        if transport not in TRANSPORT_CHOICES:
            raise ConfigurationError(f"transport must be one of {TRANSPORT_CHOICES}; got {transport!r}")
        if int(start_iter) != start_iter or start_iter < 0:
            raise ConfigurationError(f"start_iter must be a non-negative integer; got {start_iter!r}")
        self.process_group = process_group
        self.sparsity = check_sparsity(sparsity)
        self.transport = transport
        self.start_iter = int(start_iter)
        self.error_feedback = bool(error_feedback)
        self.timeout = timeout
        warmup = DEFAULT_SPARSITY_WARMUP if sparsity_warmup is None else sparsity_warmup
        if int(warmup) != warmup or warmup < 0:
            raise ConfigurationError(f"sparsity_warmup must be a non-negative integer; got {sparsity_warmup!r}")
        self.sparsity_warmup = int(warmup)
        if ranks_per_node is not None and (int(ranks_per_node) != ranks_per_node or ranks_per_node < 1):
            raise ConfigurationError(f"ranks_per_node must be a positive integer; got {ranks_per_node!r}")
        self.ranks_per_node = None if ranks_per_node is None else int(ranks_per_node)
        self.iter = 0
        self._reset_runtime()
        if process_group is not None or dist.is_initialized():
            self._world_size()  # fail early when lane packing cannot hold this world size

    # ------------------------------------------------------------------ runtime

    def _reset_runtime(self) -> None:
        self._comm: Collectives | None = None
        self._transport = None
        self._pipeline = CommPipeline()
        self._settings_checked = False
        # Residuals are kept per parameter, keyed by the parameter's position in the
        # buckets of this process's first iteration. That layout is DDP's initial one,
        # the same in every fresh process, so keys survive DDP's bucket rebuild and
        # restarts from checkpoints alike.
        self._param_ids: dict[int, int] = {}
        self._first_layout: list[list[int]] = []
        self._saved_first_layout: list[list[int]] | None = None
        self._pending: dict | None = None
        self._totals = dict.fromkeys(("steps", "compressed_steps", *_STAT_KEYS), 0)
        self._last_step = dict.fromkeys(_STAT_KEYS, 0)
        self._current = dict.fromkeys(_STAT_KEYS, 0)
        self._marks: dict = {}

    built_by = "ThreeLCState"  # named in the settings-mismatch error
    supports_hierarchical = True  # its collectives can form node subgroups

    def _group_size(self) -> int:
        return dist.get_world_size(self.process_group)

    def _make_collectives(self) -> Collectives:
        # A private group of the same ranks: DDP issues collectives of its own during
        # backward (the unused-parameter map with find_unused_parameters=True) from
        # its own thread, and sharing a group would let those interleave with ours
        # differently on different ranks. Only member ranks take part in creating it.
        ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
        group = dist.new_group(ranks, timeout=self.timeout, use_local_synchronization=True)
        return TorchCollectives(group, self.timeout)

    def _world_size(self) -> int:
        world = self._group_size()
        if self.transport == "allreduce":
            lanes_per_word(world)  # raises ConfigurationError when even one lane cannot fit
        return world

    def _start(self) -> None:
        self._world_size()
        self._comm = self._make_collectives()

    def _build_transport(self) -> None:
        """On the communication thread, after the settings agree: ``auto`` and
        ``hierarchical`` first agree on the node layout, a collective of their own."""
        comm, ranks_per_node = self._comm, 1
        if self.supports_hierarchical and self.transport in ("auto", HierarchicalTransport.name):
            claim = node_claim(comm.rank, self.ranks_per_node)
            ranks_per_node = agree_node_layout(comm, claim, self.transport == HierarchicalTransport.name) or 1
        name = choose_transport(self.transport, comm.world_size, ranks_per_node)
        if name == HierarchicalTransport.name:
            self._transport = HierarchicalTransport(comm, self.sparsity, self.error_feedback, ranks_per_node)
        else:
            self._transport = TRANSPORTS[name](comm, self.sparsity, self.error_feedback)
        if self._pending is not None:
            self._load_transport_state(self._pending)
            self._pending = None

    def sparsity_at(self, iteration: int) -> float:
        """The sparsity multiplier of iteration ``iteration`` (a compressed one)."""
        done = iteration - self.start_iter + 1
        if self.sparsity_warmup == 0 or done >= self.sparsity_warmup:
            return self.sparsity
        return 1.0 + (self.sparsity - 1.0) * max(done, 0) / self.sparsity_warmup

    @property
    def transport_name(self) -> str:
        """The transport in use ("auto" resolved), or the requested one before the first step."""
        return self._transport.name if self._transport is not None else self.transport

    def _fingerprint(self) -> torch.Tensor:
        sparsity_bits = struct.unpack("<q", struct.pack("<d", self.sparsity))[0]
        return torch.tensor([STATE_VERSION, TRANSPORT_CHOICES.index(self.transport), sparsity_bits,
                             self.start_iter, int(self.error_feedback), self._comm.world_size, self.sparsity_warmup])

    def _check_settings(self, device: torch.device) -> None:
        """Compare settings across ranks; every rank raises the same error on a mismatch."""
        mine = self._fingerprint().to(device)
        everyone = self._comm.allgather(mine).cpu()
        if bool((everyone == mine.cpu()).all()):
            self._settings_checked = True
            return
        rows = []
        for rank, row in enumerate(everyone.tolist()):
            sparsity = struct.unpack("<d", struct.pack("<q", row[2]))[0]
            transport = TRANSPORT_CHOICES[row[1]] if 0 <= row[1] < len(TRANSPORT_CHOICES) else row[1]
            rows.append(f"rank {rank}: transport={transport} sparsity={sparsity} sparsity_warmup={row[6]} "
                        f"start_iter={row[3]} error_feedback={bool(row[4])} (state version {row[0]})")
        raise ConfigurationError(f"threelc settings differ across ranks; every rank must build {self.built_by} "
                                 "with the same arguments:\n  " + "\n  ".join(rows))

    def _keys(self, bucket: dist.GradBucket, segments: list[int]) -> list[int]:
        """Stable residual keys for the parameters of ``bucket`` (main thread, bucket order)."""
        params = bucket.parameters()
        if any(p.data_ptr() not in self._param_ids for p in params):
            for p in params:
                self._param_ids.setdefault(p.data_ptr(), len(self._param_ids))
            self._first_layout.append(segments)
            saved = self._saved_first_layout
            index = len(self._first_layout) - 1
            if saved is not None and (index >= len(saved) or saved[index] != segments):
                warnings.warn("threelc: DDP's bucket layout differs from the checkpoint's (another model or "
                              "bucket_cap_mb?); residuals are reset", RuntimeWarning)
                self._saved_first_layout = None
                self._pipeline.submit(lambda: self._transport.reset(), bucket.buffer().device)
        return [self._param_ids[p.data_ptr()] for p in params]

    def _reduce_bucket(self, step: int, index: int, keys: list, buffer: torch.Tensor,
                       segments: list[int], compress: bool, last: bool) -> Deferred:
        """Start averaging one bucket in place; errors name the step and the bucket."""
        def named(run):
            try:
                return run()
            except ThreeLCError as error:
                raise type(error)(f"threelc step {step}, bucket {index}: {error}") from error
            except Exception as error:  # noqa: BLE001 - a collective failed: a peer died, hung or left
                raise CommunicationError(f"threelc step {step}, bucket {index} ({self.transport_name} transport): "
                                         f"{type(error).__name__}: {error}") from error

        return named(lambda: self._start_bucket(step, keys, buffer, segments, compress, last)).wrapped(named)

    def _start_bucket(self, step: int, keys: list, buffer: torch.Tensor, segments: list[int], compress: bool,
                      last: bool) -> Deferred:
        comm = self._comm
        if self._transport is None:  # a failed build is retried, so every later bucket fails alike
            if not self._settings_checked:
                self._check_settings(buffer.device)
            self._build_transport()
        self._current["uncompressed_bytes"] += buffer.numel() * buffer.element_size()
        if compress:
            self._current["numel"] += buffer.numel()
            self._transport.set_sparsity(self.sparsity_at(step))
            deferred = self._transport.start(keys, buffer, segments, out=buffer)
        else:
            summed = comm.allreduce_async(buffer.div(comm.world_size), "sum")
            deferred = Deferred(summed.wait, (summed,))

        def finish(average):
            result = average()
            if result.data_ptr() != buffer.data_ptr():
                buffer.copy_(result.view_as(buffer))
            if last:
                self._end_step(compress)
            return buffer

        return deferred.wrapped(finish)

    def _counters(self) -> dict:
        """What the collectives and the transport have counted so far."""
        transport = self._transport
        return {"bytes_sent": self._comm.bytes_sent, "bytes_received": self._comm.bytes_received,
                "zeros": transport.zeros, "encode_seconds": transport.seconds["encode"],
                "decode_seconds": transport.seconds["decode"]}

    def _end_step(self, compressed: bool) -> None:
        # Buckets overlap inside a step, so per-step figures are differences of running
        # counters between step ends; the last bucket finishes after every other one.
        counters = self._counters()
        self._last_step = {**self._current, **{k: v - self._marks.get(k, 0) for k, v in counters.items()}}
        self._marks = counters
        self._current = dict.fromkeys(_STAT_KEYS, 0)
        self._totals["steps"] += 1
        self._totals["compressed_steps"] += int(compressed)
        for key in _STAT_KEYS:
            self._totals[key] += self._last_step[key]

    def close(self) -> None:
        """Stop the communication thread once its queued work is done (idempotent).

        Optional: it also happens at interpreter exit. A later hook call restarts it.
        """
        self._pipeline.close()

    # ------------------------------------------------------------------ reporting

    @property
    def stats(self) -> dict[str, Any]:
        """Traffic of this rank: totals since construction and the last finished step.

        ``bytes_sent``/``bytes_received`` count the tensors this rank handed to and got
        from collectives (payloads, sizes, padding, warm-up all-reduces included);
        ``uncompressed_bytes`` what DDP's default all-reduce would have handed over;
        ``ratio`` their quotient; ``zero_fraction`` the share of ternary zeros sent.
        """
        totals, last = dict(self._totals), dict(self._last_step)
        for record in (totals, last):
            record["ratio"] = record["uncompressed_bytes"] / record["bytes_sent"] if record["bytes_sent"] else None
            record["zero_fraction"] = record["zeros"] / record["numel"] if record["numel"] else None
        return {**totals, "transport": self.transport_name, "sparsity": self.sparsity_at(max(self.iter - 1, 0)),
                "last_step": last}

    # ------------------------------------------------------------------ checkpoints

    def _settings(self) -> dict:
        return {"sparsity": self.sparsity, "transport": self.transport, "start_iter": self.start_iter,
                "error_feedback": self.error_feedback, "sparsity_warmup": self.sparsity_warmup}

    def _arguments(self) -> dict:
        return {**self._settings(), "timeout": self.timeout, "ranks_per_node": self.ranks_per_node}

    def state_dict(self) -> dict:
        """Settings, iteration and every residual: tensors and plain types only."""
        transport = self._transport.state_dict() if self._transport is not None else self._pending
        world = self._comm.world_size if self._comm is not None else (self._pending or {}).get("world_size")
        return {"version": STATE_VERSION, "settings": self._settings(), "iter": self.iter,
                "world_size": world, "first_layout": [list(b) for b in self._first_layout],
                "transport": transport and {**transport, "world_size": world, "name": self.transport_name}}

    def load_state_dict(self, state: dict) -> None:
        """Restore residuals saved by ``state_dict``; settings must match this state's."""
        if state.get("version") != STATE_VERSION:
            raise ConfigurationError(f"hook state version {state.get('version')} is not {STATE_VERSION}")
        if state["settings"] != self._settings():
            raise ConfigurationError(f"checkpointed hook settings {state['settings']} differ from {self._settings()}")
        self.iter = int(state["iter"])
        self._saved_first_layout = [list(b) for b in state["first_layout"]] or None
        if state["transport"] is None:
            return
        if self._transport is None:
            self._pending = state["transport"]
        else:
            self._load_transport_state(state["transport"])

    def _load_transport_state(self, saved: dict) -> None:
        if saved["world_size"] != self._comm.world_size or saved["name"] != self._transport.name:
            raise ConfigurationError(
                f"checkpoint residuals were made by {saved['world_size']} ranks with transport {saved['name']}; "
                f"this job has {self._comm.world_size} ranks with {self._transport.name}. Residuals are per rank "
                "(and, sharded, per shard), so they cannot be carried across; start without the hook state "
                "(error feedback restarts from zero) or resume with the original world size")
        self._transport.load_state_dict(saved)

    def __getstate__(self) -> dict:
        return {"arguments": self._arguments(), "state": self.state_dict()}

    def __setstate__(self, pickled: dict) -> None:
        self.__init__(None, **pickled["arguments"])
        self.load_state_dict(pickled["state"])


def threelc_hook(state: ThreeLCState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average ``bucket`` across ranks with 3LC compression.

    Register with ``ddp_model.register_comm_hook(state, threelc_hook)``. Each bucket's
    parameters get one scale each. The returned future completes on threelc's
    communication thread, so backward keeps computing the next buckets meanwhile.
    """
    if state._comm is None:
        state._start()
    buffer = bucket.buffer()
    segments = [p.numel() for p in bucket.parameters()]
    keys = state._keys(bucket, segments)
    if sum(segments) != buffer.numel():  # unexpected layout: one scale and one residual for the bucket
        segments, keys = [buffer.numel()], [tuple(keys)]
    compress = state.iter >= state.start_iter
    index, last, step = bucket.index(), bucket.is_last(), state.iter
    if last:
        state.iter += 1
    job = lambda: state._reduce_bucket(step, index, keys, buffer, segments, compress, last)  # noqa: E731
    return state._pipeline.submit(job, buffer.device, flush=last)
