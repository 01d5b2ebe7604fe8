"""Gradient-communication schemes for train.py, with a common byte meter.

``setup_comm(ddp_model, kind, ...)`` registers the DDP comm hook for ``kind``
(``none|fp16|powersgd|batched-powersgd|threelc``) and returns a :class:`Comm`
whose ``counters()`` are the cumulative bytes *this rank handed to
collectives* (not the bytes on the wire, which depend on the collective
algorithm; launch/netlab.py measures those).

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

import numpy as np
import torch

KINDS = ("none", "fp16", "powersgd", "batched-powersgd", "threelc")


class Comm:
    """A registered scheme plus its cumulative byte counters for this rank."""

    def __init__(self, kind: str, numel: int, state=None, bytes_per_element: int | None = None):
        """``numel`` gradient elements are synchronized per step. ``bytes_per_element``:
        what a step hands over per element when no hook meters it (DDP's own
        all-reduce: 4; Horovod's fp16 compression: 2); metered hooks count themselves."""
        self.kind = kind
        self.state = state
        self._numel = numel
        self._step_bytes = bytes_per_element
        self._sent = 0
        self._uncompressed = 0

    @property
    def numel(self) -> int:
        """Number of gradient elements DDP synchronizes per step."""
        return self._numel

    # -- accounting -----------------------------------------------------------
    def _add(self, sent: int, uncompressed: int) -> None:
        self._sent += int(sent)
        self._uncompressed += int(uncompressed)

    def step_done(self) -> None:
        """Call after every optimizer step (counts the unmetered exchange, if any)."""
        if self._step_bytes is not None:
            self._add(self._numel * self._step_bytes, self._numel * 4)

    def counters(self) -> dict:
        """Cumulative bytes this rank handed to collectives (snapshot-friendly)."""
        if self.kind == "threelc":
            s = self.state.stats
            return {
                "sent": int(s["bytes_sent"]),
                "received": int(s.get("bytes_received", 0)),
                "uncompressed": int(s["uncompressed_bytes"]),
            }
        # For all-reduce based schemes the result buffer a rank gets back is
        # as large as what it handed in.
        return {"sent": self._sent, "received": self._sent, "uncompressed": self._uncompressed}

    def close(self) -> None:
        """Stop the 3LC hook's communication thread (it also stops at interpreter exit)."""
        close = getattr(self.state, "close", None)
        if callable(close):
            close()

    # -- checkpointing (tensors and plain types only) ------------------------
    def state_dict(self) -> dict | None:
        if self.kind == "threelc":
            return self.state.state_dict()
        if self.kind in ("powersgd", "batched-powersgd"):
            return _powersgd_state_dict(self.state)
        return None

    def load_state_dict(self, d: dict | None) -> None:
        if d is None:
            return
        if self.kind == "threelc":
            self.state.load_state_dict(d)
        elif self.kind in ("powersgd", "batched-powersgd"):
            _powersgd_load_state_dict(self.state, d)


def _metered(hook, comm: Comm, account):
    """Wrap ``hook`` so ``account(state, bucket)`` bytes are counted first.

    DDP inspects the parameter named ``bucket``, so the signature must keep it.
    """

    def metered_hook(state, bucket):
        numel = bucket.buffer().numel()
        comm._add(account(state, bucket, numel), numel * 4)
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


def setup_comm(
    ddp,
    kind: str,
    *,
    process_group=None,
    sparsity: float = 1.0,
    sparsity_warmup: int | None = None,
    transport: str = "allgather",
    start_iter: int = 2,
    error_feedback: bool = True,
    powersgd_rank: int = 2,
    seed: int = 0,
    timeout=None,
) -> Comm:
    """Register the comm hook for ``kind`` on ``ddp`` and return its :class:`Comm`.

    ``start_iter`` is 3LC's ``start_iter`` and PowerSGD's
    ``start_powerSGD_iter`` (plain fp32 all-reduce before it), so the two are
    compared on equal terms.
    """
    numel = sum(p.numel() for p in ddp.module.parameters() if p.requires_grad)
    if kind == "none":
        return Comm(kind, numel, bytes_per_element=4)  # DDP's own all-reduce has no hook to meter
    if kind == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        comm = Comm(kind, numel)
        ddp.register_comm_hook(process_group, _metered(default_hooks.fp16_compress_hook, comm, _fp16_bytes))
        return comm
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
        comm = Comm(kind, numel, state)
        if kind == "powersgd":
            ddp.register_comm_hook(state, _metered(ps.powerSGD_hook, comm, _powersgd_bytes))
        else:
            _patch_batched_orthogonalize(ps)
            ddp.register_comm_hook(state, _metered(ps.batched_powerSGD_hook, comm, _batched_powersgd_bytes))
        return comm
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
            timeout=timeout,
        )
        ddp.register_comm_hook(state, threelc_hook)
        return Comm(kind, numel, state)
    raise ValueError(f"unknown hook {kind!r}; choose from {KINDS}")


def _patch_batched_orthogonalize(ps) -> None:
    """Work around a PyTorch bug in ``batched_powerSGD_hook``.

    Since ``_orthogonalize`` was rewritten for *batches* of matrices (3-D), the
    batched hook still hands it a single 2-D ``side x rank`` matrix and fails
    with a bare ``AssertionError`` (seen on torch 2.13).  Give 2-D inputs a
    leading batch dim of 1; the view shares storage, so the in-place
    orthogonalization still lands in the hook's tensor.  Idempotent; 3-D
    calls (the per-layer hook) are untouched.
    """
    orig = ps._orthogonalize
    if getattr(orig, "_threelc_launch_shim", False):
        return

    def _orthogonalize(matrices, epsilon=0):
        if matrices.dim() == 2:
            return orig(matrices.unsqueeze(0), epsilon)
        return orig(matrices, epsilon)

    _orthogonalize._threelc_launch_shim = True
    ps._orthogonalize = _orthogonalize


# -- PowerSGD state <-> tensors and plain types --------------------------------


def _powersgd_state_dict(state) -> dict:
    name, keys, pos, has_gauss, cached = state.rng.get_state()
    return {
        "iter": int(state.iter),
        "error_dict": {int(k): v.detach().cpu() for k, v in state.error_dict.items()},
        "p_memory_dict": {int(k): v.detach().cpu() for k, v in state.p_memory_dict.items()},
        "q_memory_dict": {int(k): v.detach().cpu() for k, v in state.q_memory_dict.items()},
        # numpy's MT19937 state as a tensor + ints (torch.load(weights_only=True) safe).
        "rng": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "total_numel_before_compression": int(state.total_numel_before_compression),
        "total_numel_after_compression": int(state.total_numel_after_compression),
    }


def _powersgd_load_state_dict(state, d: dict) -> None:
    # Buffers must live where the buckets live (the GPU under NCCL).
    dev = _state_device()

    def to_dev(src: dict) -> dict:
        return {int(k): v.to(dev) for k, v in src.items()}

    state.iter = int(d["iter"])
    state.error_dict = to_dev(d["error_dict"])
    state.p_memory_dict = to_dev(d["p_memory_dict"])
    state.q_memory_dict = to_dev(d["q_memory_dict"])
    r = d["rng"]
    state.rng.set_state((r["name"], r["keys"].numpy().astype(np.uint32), r["pos"], r["has_gauss"], r["cached_gaussian"]))
    state.total_numel_before_compression = int(d["total_numel_before_compression"])
    state.total_numel_after_compression = int(d["total_numel_after_compression"])


def _state_device() -> torch.device:
    if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
