"""The transformers ``TrainerCallback`` of threelc.hooks.hf (imported only when used)."""

from __future__ import annotations

from typing import Optional

from threelc import ConfigurationError

from .ddp import ThreeLCState
from .hf import register
from .metrics import flat_stats

try:
    from transformers import TrainerCallback
except ImportError as error:
    raise ImportError("threelc.hooks.hf.ThreeLCCallback needs transformers: pip install transformers") from error


class ThreeLCCallback(TrainerCallback):
    """Register 3LC on a transformers ``Trainer``'s DDP model and log ``state.stats``.

    ::

        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.add_callback(ThreeLCCallback(trainer, ThreeLCState(sparsity=1.0)))
        trainer.train()

    The Trainer wraps its model in DDP inside ``train()``; this callback registers the
    hook at ``on_train_begin`` (before the first backward) on ``trainer.model_wrapped``,
    and at every logging step (``logging_steps``) logs ``threelc/*`` figures through
    ``trainer.log`` (one entry before the Trainer's own loss entry of that step), so
    every ``report_to`` integration and ``trainer.state.log_history`` get them. In a single-process run there is no DDP model and it raises
    ``threelc.ConfigurationError``: launch with ``torchrun --nproc-per-node N``.
    Call ``train()`` once per callback (a hook can be registered only once per model).
    """

    def __init__(self, trainer, state: Optional[ThreeLCState] = None):
        self.trainer = trainer
        self.state = state if state is not None else ThreeLCState()
        self._registered = False

    def on_train_begin(self, args, state, control, **kwargs):
        if self._registered:
            raise ConfigurationError("ThreeLCCallback already registered its hook; build a new Trainer and "
                                     "callback for another train() call")
        register(self.trainer.model_wrapped, self.state)
        self._registered = True

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log:
            self.trainer.log(flat_stats(self.state.stats))
            control.should_log = True  # trainer.log cleared it; the Trainer's own entry (loss) follows
