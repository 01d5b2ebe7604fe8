"""threelc.hooks: 3LC for PyTorch DDP (``ThreeLCState``, ``threelc_hook``).

    from threelc.hooks import ThreeLCState, threelc_hook
    ddp_model.register_comm_hook(ThreeLCState(sparsity=1.0), threelc_hook)

Horovod users: ``threelc.hooks.horovod``. Lightning: ``threelc.hooks.lightning``
(``ThreeLCStrategy``, ``ThreeLCStatsLogger``); accelerate and the transformers
``Trainer``: ``threelc.hooks.hf`` (``register``, ``ThreeLCCallback``). Those modules
import their framework; this package does not.
"""

from .ddp import ThreeLCState, threelc_hook
from .settings import TRANSPORT_CHOICES
from .transports import FLAT_TRANSPORTS

# TRANSPORT_CHOICES: every ``transport=`` a ThreeLCState takes; FLAT_TRANSPORTS: those
# that treat every rank alike (all but "auto" and "hierarchical").
__all__ = ["ThreeLCState", "threelc_hook", "TRANSPORT_CHOICES", "FLAT_TRANSPORTS"]
