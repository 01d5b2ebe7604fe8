"""3LC as a DDP communication hook: ``ThreeLCState`` and ``threelc_hook``.

The state is a :class:`hooks.engine.ThreeLCEngine` on torch.distributed plus what is
DDP's own: residual keys that survive DDP's bucket rebuild, and pickling. No
`from __future__ import annotations` here: DDP checks the hook's annotations at
registration, and string annotations fail that check.
"""


import datetime
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from .collectives import TorchGroup
from .engine import ThreeLCEngine
from .settings import DEFAULT_SPARSITY_WARMUP, Settings


class BucketKeys:
    """Residual keys for DDP's buckets: each parameter's position in this process's first layout.

    That layout is DDP's initial one, the same in every fresh process, so the keys
    survive DDP's bucket rebuild after the first iteration and restarts from
    checkpoints alike. Call it on the main thread, in bucket order.
    """

    def __init__(self) -> None:
        self.param_ids: dict[int, int] = {}
        self.first_layout: list[list[int]] = []  # segments of each bucket of the first iteration
        self.saved_first_layout: list[list[int]] | None = None  # from a checkpoint, to compare with

    def __call__(self, bucket: dist.GradBucket, segments: list[int]) -> tuple[list[int], bool]:
        """``(keys, layout_changed)``: changed when the first layout differs from the checkpoint's."""
        params, changed = bucket.parameters(), False
        if any(p.data_ptr() not in self.param_ids for p in params):
            for p in params:
                self.param_ids.setdefault(p.data_ptr(), len(self.param_ids))
            self.first_layout.append(segments)
            saved, index = self.saved_first_layout, len(self.first_layout) - 1
            if saved is not None and (index >= len(saved) or saved[index] != segments):
                self.saved_first_layout, changed = None, True
        return [self.param_ids[p.data_ptr()] for p in params], changed


class ThreeLCState(ThreeLCEngine):
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
        sparsity: the 3LC sparsity multiplier s in [1, 2): scale = max|g + r| * s (r the
            residual; see ``bounded_scale``), so larger s sends fewer non-zeros (cheaper)
            and carries more in the residual.
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
        bounded_scale: bound each tensor's scale by the current gradient, scale =
            s * min(max|g + r|, max|g|) (default True). Why: at a high s only values
            above max/s are sent, the residual grows until max|g + r| is many times
            max|g|, and each step then kicks a few weights by s * max|g + r|: bursts that
            momentum amplifies until training diverges. Bounded, more values are sent
            while the residual is large (those above the scale as +-scale), so it drains
            as a stream (README: accuracy and bytes with and without). Without a residual
            both rules agree; False restores the unbounded scale (for experiments).
            Sharded servers also cap their scale so that a value one worker sent passes
            at once (transports.server_scale_cap).
        ranks_per_node: the node layout for ``"hierarchical"`` and ``"auto"``: group
            rank r runs on node r // ranks_per_node (default: torchrun's
            ``GROUP_RANK`` and ``LOCAL_WORLD_SIZE``). Every node must run the same
            number of ranks; the first hook call checks it on every rank.
        scale_block: elements per scale (default 0: one scale per tensor). Each tensor
            is cut into blocks of this many elements, each block with a scale of its own
            (12 bytes of payload per block). Use it with Adam and its kin: Adam divides
            each element's step by the root of its mean squared gradient, and with one
            scale per tensor an element whose gradient is small next to the tensor's
            largest arrives as a rare burst of the whole scale, whose mean square is
            too large, so Adam barely moves it. A block's scale follows the local
            magnitude, so such elements are sent more often and smaller (README:
            charlm with and without). SGD with momentum sees only the mean and needs
            no blocks.

    All ranks must use the same settings; the first hook call compares them across
    ranks and raises :class:`threelc.ConfigurationError` on every rank if they differ.
    ``state.settings`` holds the settings, ``state.transport_in_use`` the transport
    ("auto" resolved) and ``state.stats`` traffic, compression and codec time;
    ``close()`` stops the communication thread. ``state_dict()`` and
    pickling carry every residual into checkpoints (the process group is not pickled).
    Residuals belong to parameters, not buckets, so DDP's bucket rebuild after the
    first iteration and restarts from a checkpoint keep every residual with its
    parameter; resume with the same model, ``bucket_cap_mb`` and world size.
    """

    def __init__(
        self,
        process_group: Optional[dist.ProcessGroup] = None,
        sparsity: float = 1.0,
        transport: str = "allgather",
        start_iter: int = 2,
        error_feedback: bool = True,
        timeout: Optional[datetime.timedelta] = None,
        sparsity_warmup: Optional[int] = None,
        ranks_per_node: Optional[int] = None,
        bounded_scale: bool = True,
        scale_block: int = 0,
    ):
        warmup = DEFAULT_SPARSITY_WARMUP if sparsity_warmup is None else sparsity_warmup
        settings = Settings(sparsity, transport, start_iter, error_feedback, warmup, bounded_scale, scale_block)
        super().__init__(settings, TorchGroup(process_group, timeout), ranks_per_node, built_by="ThreeLCState")
        self.process_group, self.timeout = process_group, timeout
        self.bucket_keys = BucketKeys()
        if process_group is not None or dist.is_initialized():
            self.check_world_size()  # fail early when lane packing cannot hold this world size

    def keys(self, bucket: dist.GradBucket, segments: list[int]) -> list[int]:
        """Residual keys of ``bucket``'s parameters (resets residuals when the layout left the checkpoint's)."""
        keys, changed = self.bucket_keys(bucket, segments)
        if changed:
            warnings.warn("threelc: DDP's bucket layout differs from the checkpoint's (another model or "
                          "bucket_cap_mb?); residuals are reset", RuntimeWarning)
            self.reset_residuals(bucket.buffer().device)
        return keys

    def state_dict(self) -> dict:
        """Settings, iteration, DDP's first bucket layout and every residual: tensors and plain types only."""
        return {**super().state_dict(), "first_layout": [list(b) for b in self.bucket_keys.first_layout]}

    def load_state_dict(self, state: dict) -> None:
        """Restore residuals saved by ``state_dict``; settings must match this state's."""
        super().load_state_dict(state)
        self.bucket_keys.saved_first_layout = [list(b) for b in state["first_layout"]] or None

    def __getstate__(self) -> dict:
        arguments = {**self.settings.as_dict(), "timeout": self.timeout, "ranks_per_node": self.ranks_per_node}
        return {"arguments": arguments, "state": self.state_dict()}

    def __setstate__(self, pickled: dict) -> None:
        self.__init__(None, **pickled["arguments"])
        self.load_state_dict(pickled["state"])


def threelc_hook(state: ThreeLCState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average ``bucket`` across ranks with 3LC compression.

    Register with ``ddp_model.register_comm_hook(state, threelc_hook)``. Each bucket's
    parameters get one scale each. The returned future completes on threelc's
    communication thread, so backward keeps computing the next buckets meanwhile.
    """
    buffer = bucket.buffer()
    segments = [p.numel() for p in bucket.parameters()]
    keys = state.keys(bucket, segments)
    if sum(segments) != buffer.numel():  # unexpected layout: one scale and one residual for the bucket
        segments, keys = [buffer.numel()], [tuple(keys)]
    return state.submit(keys, buffer, segments, index=bucket.index(), last=bucket.is_last())
