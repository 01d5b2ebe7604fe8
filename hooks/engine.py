"""The framework-neutral 3LC engine: one object that averages buckets across ranks.

The DDP hook (hooks/ddp.py) and the Horovod optimizer (hooks/horovod.py) both hand
their buckets to a ``ThreeLCEngine`` and use nothing but its public methods. The
engine composes the pieces that do the work, each in its own module:

* a **group** (how to make this job's ``Collectives``: torch.distributed or Horovod),
* the **transport** (hooks/transports.py, hooks/hierarchical.py: codec + residuals +
  collectives for one bucket), built on the first exchange once the settings agree,
* the **pipeline** (hooks/pipeline.py: one ordered communication thread),
* the **settings** agreement (hooks/settings.py) and **stats** (hooks/stats.py).

A framework adapter supplies the group, residual ``keys`` per bucket (stable across
bucket rebuilds and restarts), and calls :meth:`ThreeLCEngine.submit` for each bucket
in the same order on every rank.
"""

from __future__ import annotations

import logging
from typing import Any, Hashable, Protocol

import torch

from threelc import CommunicationError, ConfigurationError, ThreeLCError
from threelc.lanes import lanes_per_word

from .collectives import Collectives
from .hierarchical import HierarchicalTransport, agree_node_layout, node_claim
from .pipeline import CommPipeline, Deferred
from .settings import STATE_VERSION, Settings, agree
from .stats import TrafficStats
from .transports import TRANSPORTS, choose_transport

_log = logging.getLogger("threelc")


class Group(Protocol):
    """Where an engine's collectives come from (``TorchGroup``, ``HorovodGroup``)."""

    node_groups: bool  # whether its collectives can form per-node subgroups (hierarchical transport)

    def size(self) -> int:
        """Ranks in the group, known before any collective exists."""

    def collectives(self) -> Collectives:
        """This job's collectives (called once, on the calling thread, before the first exchange)."""


class ThreeLCEngine:
    """Averages flat buckets with 3LC; settings, residuals, stats and checkpoints in one place.

    Args:
        settings: what every rank must agree on (:class:`hooks.settings.Settings`).
        group: makes the collectives (see :class:`Group`).
        ranks_per_node: the node layout for the hierarchical and auto transports
            (None: torchrun's environment).
        built_by: the user-facing class or function, named in the settings-mismatch error.

    ``agreement`` holds integer fields an adapter adds to the settings agreement
    (Horovod's ``op``, its bucket layout digest); set them before the first exchange.
    ``iter`` counts steps: a step ends with a bucket submitted as ``last``.
    """

    def __init__(self, settings: Settings, group: Group, ranks_per_node: int | None = None,
                 built_by: str = "ThreeLCEngine"):
        if settings.transport == HierarchicalTransport.name and not group.node_groups:
            raise ConfigurationError(f"the hierarchical transport needs node subgroups, which {built_by} does "
                                     "not build; use allgather, sharded, allreduce or auto (flat there)")
        if ranks_per_node is not None and (isinstance(ranks_per_node, bool) or int(ranks_per_node) != ranks_per_node
                                           or ranks_per_node < 1):
            raise ConfigurationError(f"ranks_per_node must be a positive integer; got {ranks_per_node!r}")
        self.settings = settings
        self.group = group
        self.ranks_per_node = None if ranks_per_node is None else int(ranks_per_node)
        self.built_by = built_by
        self.agreement: dict[str, int] = {}
        self.iter = 0
        self._collectives: Collectives | None = None
        self._transport = None  # built on the communication thread by the first exchange
        self._pending_state: dict | None = None  # checkpointed residuals waiting for the transport
        self._pending_origin: tuple | None = None  # their (world_size, transport), checked even if reset
        self._agreed = False  # settings compared across ranks (a failed transport build is retried)
        self._disagreement: ConfigurationError | None = None
        self._pipeline = CommPipeline()
        self._stats = TrafficStats()

    # ------------------------------------------------------------------ the public surface

    def check_world_size(self) -> int:
        """The group's size; raises ConfigurationError when lane packing cannot hold it (allreduce)."""
        world = self._collectives.world_size if self._collectives is not None else self.group.size()
        if self.settings.transport == "allreduce":
            lanes_per_word(world)
        return world

    def start(self) -> None:
        """Make the collectives (idempotent); ``submit`` calls it, adapters may call it earlier."""
        if self._collectives is None:
            self.check_world_size()
            self._collectives = self.group.collectives()

    @property
    def world_size(self) -> int:
        return self.check_world_size()

    def sparsity_at(self, iteration: int) -> float:
        return self.settings.sparsity_at(iteration)

    @property
    def transport_in_use(self) -> str:
        """The transport averaging the buckets ("auto" resolved), or the requested one before the first step."""
        return self._transport.name if self._transport is not None else self.settings.transport

    def submit(self, keys: list[Hashable], buffer: torch.Tensor, segments: list[int], *, index: int,
               last: bool) -> torch.futures.Future:
        """Queue one bucket: average ``buffer`` in place across ranks; the future yields ``buffer``.

        ``segments`` are the lengths of the tensors laid end to end in ``buffer`` (one
        scale and one residual each) and ``keys`` name their residuals. Every rank must
        submit the same buckets in the same order; ``last`` ends the step. The first
        ``start_iter`` steps are plain averaging all-reduces.
        """
        self.start()
        step, compress = self.iter, self.iter >= self.settings.start_iter
        if last:
            self.iter += 1
        job = lambda: self._named(step, index, lambda: self._start_bucket(  # noqa: E731
            step, index, keys, buffer, segments, compress, last))
        return self._pipeline.submit(job, buffer.device, flush=last)

    def reset_residuals(self, device: torch.device) -> None:
        """Drop every residual (in queue order: buckets submitted before keep theirs)."""
        def reset():
            if self._transport is None:
                self._pending_state = None
            else:
                self._transport.reset()
        self._pipeline.submit(reset, device)

    @property
    def stats(self) -> dict[str, Any]:
        """Traffic of this rank: totals since construction and the last finished step.

        ``bytes_sent``/``bytes_received`` count the tensors this rank handed to and got
        from collectives (payloads, sizes, padding, warm-up all-reduces included; for
        hierarchical, those between nodes, and ``node_bytes_sent``/``node_bytes_received``
        its exact fp32 exchange inside the node);
        ``uncompressed_bytes`` what DDP's default all-reduce would have handed over;
        ``ratio`` their quotient; ``zero_fraction`` the share of ternary zeros sent;
        ``node_exchange`` (hierarchical) ``"shared memory"`` or ``"process group"``.
        """
        node_exchange = self._transport.node_exchange if self._transport is not None else None
        return self._stats.report(transport=self.transport_in_use, sparsity=self.sparsity_at(max(self.iter - 1, 0)),
                                  node_exchange=node_exchange)

    def close(self) -> None:
        """Stop the communication thread once its queued work is done (idempotent).

        Optional: it also happens at interpreter exit. A later ``submit`` restarts it.
        """
        self._pipeline.close()

    def state_dict(self) -> dict:
        """Settings, iteration and every residual: tensors and plain types only."""
        transport = self._transport.state_dict() if self._transport is not None else self._pending_state
        world = self._collectives.world_size if self._collectives is not None else \
            (self._pending_state or {}).get("world_size")
        return {"version": STATE_VERSION, "settings": self.settings.as_dict(), "iter": self.iter,
                "world_size": world,
                "transport": transport and {**transport, "world_size": world, "name": self.transport_in_use}}

    def load_state_dict(self, state: dict) -> None:
        """Restore residuals saved by ``state_dict``; settings must match this engine's."""
        version = state.get("version")
        if version == STATE_VERSION - 1:  # version 4 predates scale_block: its state had one scale per tensor
            state = {**state, "version": STATE_VERSION, "settings": {**state["settings"], "scale_block": 0}}
        elif version != STATE_VERSION:
            raise ConfigurationError(f"hook state version {version} is not {STATE_VERSION}")
        if state["settings"] != self.settings.as_dict():
            raise ConfigurationError(f"checkpointed hook settings {state['settings']} differ from "
                                     f"{self.settings.as_dict()}")
        self.iter = int(state["iter"])
        if state["transport"] is None:
            return
        if self._transport is None:
            self._pending_state = state["transport"]
            self._pending_origin = (state["transport"]["world_size"], state["transport"]["name"])
        else:
            self._load_transport_state(state["transport"])

    # ------------------------------------------------------------------ on the communication thread

    def _named(self, step: int, index: int, run):
        """Run ``run`` and the finish it defers; errors name the step and the bucket."""
        def named(call):
            try:
                return call()
            except ThreeLCError as error:
                raise type(error)(f"threelc step {step}, bucket {index}: {error}") from error
            except Exception as error:  # noqa: BLE001 - a collective failed: a peer died, hung or left
                message = (f"threelc step {step}, bucket {index} ({self.transport_in_use} transport): "
                           f"{type(error).__name__}: {error}")
                # Logged here, on the communication thread, the moment it fails: torchrun
                # stops the surviving workers soon after a peer dies, often before the
                # exception reaches backward() and its traceback is printed.
                _log.error("%s", message)
                raise CommunicationError(message) from error

        return named(run).wrapped(named)

    def _start_bucket(self, step: int, index: int, keys: list, buffer: torch.Tensor, segments: list[int],
                      compress: bool, last: bool) -> Deferred:
        collectives = self._collectives
        collectives.begin(f"b{index}")
        if self._transport is None:  # a failed build is retried, so every later bucket fails alike
            self._build_transport(buffer.device)
        self._stats.add_bucket(buffer.numel() * buffer.element_size(), buffer.numel() if compress else 0)
        if compress:
            self._transport.set_sparsity(self.sparsity_at(step))
            deferred = self._transport.start(keys, buffer, segments, out=buffer)
        else:
            summed = collectives.allreduce_async(buffer.div(collectives.world_size), "sum")
            deferred = Deferred(summed.wait, (summed,))

        def finish(average):
            result = average()
            if result.data_ptr() != buffer.data_ptr():
                buffer.copy_(result.view_as(buffer))
            if last:
                self._stats.end_step(self._running_counters(), compress)
            return buffer

        return deferred.wrapped(finish)

    def _build_transport(self, device: torch.device) -> None:
        """After the settings agree; ``auto`` and ``hierarchical`` first agree on the node layout."""
        if self._disagreement is not None:  # agreed on every rank: no further collectives
            raise ConfigurationError(str(self._disagreement))
        collectives, settings = self._collectives, self.settings
        if not self._agreed:
            try:
                agree(settings, collectives, collectives.world_size, self.agreement, device, self.built_by)
            except ConfigurationError as error:
                self._disagreement = error
                raise
            self._agreed = True
        ranks_per_node = 1
        if self.group.node_groups and settings.transport in ("auto", HierarchicalTransport.name):
            claim = node_claim(collectives.rank, self.ranks_per_node)
            required = settings.transport == HierarchicalTransport.name
            ranks_per_node = agree_node_layout(collectives, claim, required) or 1
        name = choose_transport(settings.transport, collectives.world_size, ranks_per_node)
        if name == HierarchicalTransport.name:
            transport = HierarchicalTransport(collectives, settings.sparsity, settings.error_feedback, ranks_per_node,
                                              settings.bounded_scale, settings.scale_block)
        else:
            transport = TRANSPORTS[name](collectives, settings.sparsity, settings.error_feedback,
                                         settings.bounded_scale, settings.scale_block)
        if self._pending_origin is not None:  # a checkpoint from another world size fails even after a reset
            self._check_saved(*self._pending_origin, transport.name)
        if self._pending_state is not None:
            transport.load_state_dict(self._pending_state)
        self._pending_state = self._pending_origin = None
        self._transport = transport

    def _load_transport_state(self, saved: dict) -> None:
        self._check_saved(saved["world_size"], saved["name"], self._transport.name)
        self._transport.load_state_dict(saved)

    def _check_saved(self, saved_world: int, saved_name: str, name: str) -> None:
        world = self._collectives.world_size
        if saved_world != world or saved_name != name:
            raise ConfigurationError(
                f"checkpoint residuals were made by {saved_world} ranks with transport {saved_name}; "
                f"this job has {world} ranks with {name}. Residuals are per rank "
                "(and, sharded, per shard), so they cannot be carried across; start without the hook state "
                "(error feedback restarts from zero) or resume with the original world size")

    def _running_counters(self) -> dict:
        transport = self._transport
        node_sent, node_received = transport.node_traffic()
        return {"bytes_sent": self._collectives.bytes_sent, "bytes_received": self._collectives.bytes_received,
                "node_bytes_sent": node_sent, "node_bytes_received": node_received,
                "zeros": transport.zeros, "encode_seconds": transport.seconds["encode"],
                "decode_seconds": transport.seconds["decode"]}
