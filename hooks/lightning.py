"""threelc in PyTorch Lightning: a DDP strategy that registers the hook on any device.

Lightning's own ``DDPStrategy(ddp_comm_hook=...)`` registers a communication hook
only when the device is CUDA, so on CPU (gloo) it silently trains uncompressed.
Use :class:`ThreeLCStrategy` instead, and :class:`ThreeLCStatsLogger` to send
``state.stats`` to the trainer's loggers::

    from threelc.hooks import ThreeLCState
    from threelc.hooks.lightning import ThreeLCStatsLogger, ThreeLCStrategy

    strategy = ThreeLCStrategy(ThreeLCState(sparsity=1.0, transport="allgather"))
    trainer = L.Trainer(strategy=strategy, callbacks=[ThreeLCStatsLogger()], ...)

Needs ``lightning`` (``pip install "threelc[integrations]"``); ``import threelc``
and ``import threelc.hooks`` never import it.
"""

from __future__ import annotations

from typing import Any, Optional

from threelc import ConfigurationError

from .ddp import ThreeLCState, threelc_hook
from .metrics import flat_stats

try:
    from lightning.pytorch import Callback
    from lightning.pytorch.strategies import DDPStrategy
except ImportError:  # the standalone package ships the same classes
    try:
        from pytorch_lightning import Callback
        from pytorch_lightning.strategies import DDPStrategy
    except ImportError as error:
        raise ImportError("threelc.hooks.lightning needs PyTorch Lightning: pip install \"threelc[integrations]\" "
                          "(or pip install lightning)") from error

_NOT_OURS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


class ThreeLCStrategy(DDPStrategy):
    """Lightning's DDP strategy with the 3LC hook registered on CPU and CUDA alike.

    Use it where you would pass ``strategy="ddp"`` (or ``"ddp_spawn"``: add
    ``start_method="spawn"``). Every other keyword goes to Lightning's
    ``DDPStrategy`` (``process_group_backend``, ``timeout``, ``find_unused_parameters``,
    ``static_graph``, ...). Pass the ``timeout`` you give Lightning to the state as well
    (``ThreeLCState(timeout=...)``), so a dead peer raises within the same time.

    With ``start_method="spawn"`` the state is pickled into the worker processes:
    its counters and residuals then live there, not in the object you passed; read
    them through :class:`ThreeLCStatsLogger` (or ``trainer.strategy.threelc_state``
    inside the workers). Checkpoint residuals with ``state.state_dict()`` as with
    plain DDP (Lightning's checkpoints do not include them).
    """

    def __init__(self, state: Optional[ThreeLCState] = None, **ddp_strategy_kwargs: Any):
        clash = sorted(set(_NOT_OURS) & set(ddp_strategy_kwargs))
        if clash:
            raise ConfigurationError(f"ThreeLCStrategy registers the threelc hook itself; do not pass {clash}")
        if state is not None and not isinstance(state, ThreeLCState):
            raise ConfigurationError(f"state must be a threelc.hooks.ThreeLCState; got {type(state).__name__}")
        super().__init__(**ddp_strategy_kwargs)
        self.threelc_state = state if state is not None else ThreeLCState()

    def configure_ddp(self) -> None:
        super().configure_ddp()  # wraps the module in DDP; registers no hook (none was given)
        self.model.register_comm_hook(self.threelc_state, threelc_hook)


class ThreeLCStatsLogger(Callback):
    """Log ``state.stats`` of a :class:`ThreeLCStrategy` run to the trainer's loggers.

    Every ``every_n_steps`` optimizer steps (default: the trainer's
    ``log_every_n_steps``) it hands ``threelc/*`` metrics to every logger
    (TensorBoard, CSV, W&B, MLflow, ...): ``ratio`` (uncompressed / sent bytes since
    the start), ``step_ratio`` and ``step_bytes_sent`` (last step), ``bytes_sent``,
    ``uncompressed_bytes``, ``codec_seconds`` (encode + decode), ``compressed_steps``
    and ``zero_fraction``. Loggers write rank 0's figures; ``self.metrics`` holds the
    last ones of this rank.
    """

    def __init__(self, every_n_steps: Optional[int] = None):
        if every_n_steps is not None and (int(every_n_steps) != every_n_steps or every_n_steps < 1):
            raise ConfigurationError(f"every_n_steps must be a positive integer; got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.metrics: dict[str, float] = {}
        self._logged_step = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not isinstance(trainer.strategy, ThreeLCStrategy):
            raise ConfigurationError(f"ThreeLCStatsLogger needs strategy=ThreeLCStrategy(...); this trainer uses "
                                     f"{type(trainer.strategy).__name__}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if step == self._logged_step or step % every:  # accumulation repeats a global step
            return
        self._logged_step = step
        self.metrics = flat_stats(trainer.strategy.threelc_state.stats)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.metrics, step=step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.metrics = flat_stats(trainer.strategy.threelc_state.stats)  # the final figures, not logged
