"""threelc with Hugging Face accelerate and the transformers ``Trainer``.

accelerate's ``DistributedDataParallelKwargs(comm_hook=...)`` accepts only its own
built-in hooks, so register threelc on the model ``accelerator.prepare`` returned::

    from threelc.hooks import ThreeLCState
    from threelc.hooks.hf import register

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = register(model, ThreeLCState(sparsity=1.0))

With the transformers ``Trainer``, which prepares the model inside ``train()``, add
:class:`ThreeLCCallback`: it registers the hook once the model is wrapped and adds
``state.stats`` to the Trainer's logs.

Launch a distributed CPU run with ``torchrun --nproc-per-node 2 script.py`` (or
``accelerate launch --multi_gpu --num_processes 2``): ``accelerate launch --cpu
--num_processes 2`` starts one process. ``register`` needs neither accelerate nor
transformers; ``ThreeLCCallback`` needs transformers (``pip install transformers``).
"""

from __future__ import annotations

from typing import Optional

from torch.nn.parallel import DistributedDataParallel

from threelc import ConfigurationError

from .ddp import ThreeLCState, threelc_hook
from .metrics import flat_stats


def find_ddp(model) -> DistributedDataParallel:
    """The ``DistributedDataParallel`` in ``model`` (itself, or under ``torch.compile``'s wrapper)."""
    for candidate in (model, getattr(model, "_orig_mod", None)):
        if isinstance(candidate, DistributedDataParallel):
            return candidate
    raise ConfigurationError(
        f"threelc needs the DistributedDataParallel model of a distributed run; got {type(model).__name__}. "
        "Pass what accelerator.prepare returned (Trainer: trainer.model_wrapped) and launch with torchrun "
        "--nproc-per-node N (or accelerate launch --multi_gpu); `accelerate launch --cpu --num_processes N` "
        "starts a single process")


def register(prepared_model, state: Optional[ThreeLCState] = None) -> ThreeLCState:
    """Register the 3LC hook on a prepared (DDP-wrapped) model; returns the state.

    Call it once, after ``accelerator.prepare`` and before the first backward.
    ``state`` defaults to ``ThreeLCState()``; read ``state.stats`` for traffic figures.
    """
    state = state if state is not None else ThreeLCState()
    if not isinstance(state, ThreeLCState):
        raise ConfigurationError(f"state must be a threelc.hooks.ThreeLCState; got {type(state).__name__}")
    find_ddp(prepared_model).register_comm_hook(state, threelc_hook)
    return state


def __getattr__(name: str):
    if name == "ThreeLCCallback":
        from ._hf_trainer import ThreeLCCallback  # imports transformers, with a clear error without it

        return ThreeLCCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ThreeLCCallback", "find_ddp", "flat_stats", "register"]
