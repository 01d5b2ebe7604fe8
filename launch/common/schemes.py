"""Gradient-communication schemes for train.py, each with a byte meter.

``register_scheme(ddp_model, kind, ...)`` registers the DDP comm hook for ``kind``
(``none|fp16|powersgd|batched-powersgd|threelc``) and returns its
:class:`~launch.common.meter.ByteMeter`.

How the bytes are counted:

* ``none``: DDP's C++ reducer all-reduces every bucket in fp32, so
  ``numel * 4`` per step (no hook runs; ``step_done()`` adds it).
* ``fp16``: ``fp16_compress_hook`` all-reduces the bucket cast to fp16:
  ``bucket numel * 2``.
* ``powersgd``: for the first ``start_powerSGD_iter`` steps a vanilla fp32
  all-reduce; afterwards, per bucket: every gradient viewed as an
  ``n x m`` matrix (``n = shape[0]``) with ``r = min(n, m, rank)`` is either
  compressed -- P (``n*r``) and Q (``m*r``) fp32 values are all-reduced --
  or, when ``(n+m)*r*min_compression_rate >= n*m`` (biases, small layers),
  all-reduced uncompressed (``n*m`` fp32 values).  This mirrors
  ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook``.
* ``batched-powersgd``: the whole bucket is padded to a square of side
  ``s = ceil(sqrt(numel))``; P and Q are ``s*r`` fp32 values each.
* ``threelc``: read from ``state.stats`` (``bytes_sent``, ``bytes_received``,
  ``uncompressed_bytes``), which the hook maintains itself.

The fp16/PowerSGD accounting runs in a thin wrapper around the real hook,
*before* it (PowerSGD mutates ``state.iter`` and batched PowerSGD resizes the
bucket buffer), using the buckets DDP actually built.
"""

from __future__ import annotations

import math

from launch.common.meter import ByteMeter
from launch.common.powersgd_patch import patch_batched_orthogonalize

KINDS = ("none", "fp16", "powersgd", "batched-powersgd", "threelc")


def _metered(hook, meter: ByteMeter, account):
    """Wrap ``hook`` so ``account(state, bucket)`` bytes are counted first.

    DDP inspects the parameter named ``bucket``, so the signature must keep it.
    """

    def metered_hook(state, bucket):
        numel = bucket.buffer().numel()
        meter.add(account(state, bucket, numel), numel * 4)
        return hook(state, bucket)

    metered_hook.__name__ = f"metered_{getattr(hook, '__name__', 'hook')}"
    return metered_hook


def _fp16_bytes(state, bucket, numel: int) -> int:
    return numel * 2


def _powersgd_bytes(state, bucket, numel: int) -> int:
    if state.iter < state.start_powerSGD_iter:
        return numel * 4
    total = 0
    for g in bucket.gradients():
        n = g.shape[0] if g.dim() > 0 else 1
        m = g.numel() // n
        r = min(n, m, state.matrix_approximation_rank)
        if (n + m) * r * state.min_compression_rate < n * m:
            total += (n + m) * r * 4  # P and Q
        else:
            total += n * m * 4  # all-reduced uncompressed
    return total


def _batched_powersgd_bytes(state, bucket, numel: int) -> int:
    if state.iter < state.start_powerSGD_iter:
        return numel * 4
    side = math.ceil(math.sqrt(numel))
    return 2 * side * state.matrix_approximation_rank * 4


def register_scheme(
    ddp,
    kind: str,
    *,
    process_group=None,
    sparsity: float = 1.0,
    sparsity_warmup: int | None = None,
    transport: str = "allgather",
    start_iter: int = 2,
    error_feedback: bool = True,
    bounded_scale: bool = True,
    scale_block: int = 0,
    powersgd_rank: int = 2,
    seed: int = 0,
    timeout=None,
) -> ByteMeter:
    """Register the comm hook for ``kind`` on ``ddp`` and return its :class:`ByteMeter`.

    ``start_iter`` is 3LC's ``start_iter`` and PowerSGD's
    ``start_powerSGD_iter`` (plain fp32 all-reduce before it), so the two are
    compared on equal terms.
    """
    numel = sum(p.numel() for p in ddp.module.parameters() if p.requires_grad)
    if kind == "none":
        return ByteMeter(kind, numel, bytes_per_element=4)  # DDP's own all-reduce has no hook to meter
    if kind == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        meter = ByteMeter(kind, numel)
        ddp.register_comm_hook(process_group, _metered(default_hooks.fp16_compress_hook, meter, _fp16_bytes))
        return meter
    if kind in ("powersgd", "batched-powersgd"):
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps

        # PowerSGD needs start_powerSGD_iter >= 2 with error feedback/warm start.
        state = ps.PowerSGDState(
            process_group=process_group,
            matrix_approximation_rank=powersgd_rank,
            start_powerSGD_iter=max(2, start_iter),
            use_error_feedback=error_feedback,
            random_seed=seed,
        )
        meter = ByteMeter(kind, numel, state)
        if kind == "powersgd":
            ddp.register_comm_hook(state, _metered(ps.powerSGD_hook, meter, _powersgd_bytes))
        else:
            patch_batched_orthogonalize(ps)
            ddp.register_comm_hook(state, _metered(ps.batched_powerSGD_hook, meter, _batched_powersgd_bytes))
        return meter
    if kind == "threelc":
        # Imported lazily: the hook is developed separately and the other
        # schemes must keep working without it.
        from threelc.hooks import ThreeLCState, threelc_hook

        state = ThreeLCState(
            process_group=process_group,
            sparsity=sparsity,
            sparsity_warmup=sparsity_warmup,
            transport=transport,
            start_iter=start_iter,
            error_feedback=error_feedback,
            bounded_scale=bounded_scale,
            scale_block=scale_block,
            timeout=timeout,
        )
        ddp.register_comm_hook(state, threelc_hook)
        return ByteMeter(kind, numel, state)
    raise ValueError(f"unknown hook {kind!r}; choose from {KINDS}")
