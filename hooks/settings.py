"""The settings every rank must share, and their agreement across ranks.

A rank that compresses with other settings than its peers would not hang: it would
decode their payloads with the wrong expectations and diverge silently. So the first
exchange all-gathers a fingerprint of the settings (plus whatever the framework
adapter adds, e.g. Horovod's ``op``) and every rank raises the same error on a
difference.
"""

from __future__ import annotations

import struct
from dataclasses import asdict, dataclass

import torch

from threelc import ConfigurationError, check_sparsity

from .hierarchical import HierarchicalTransport
from .transports import TRANSPORTS

# Version of the settings fingerprint and of checkpointed hook state.
# 5: scale_block in the settings (one scale per block of elements; version 4 state loads
# as scale_block=0); 4: bounded_scale in the settings (scale bounded by the current gradient's max);
# 3: sparsity warm-up in the settings; 2: residuals per parameter (1: per bucket).
STATE_VERSION = 5
# Compressed steps over which the sparsity multiplier ramps from 1 to its target when
# the user does not say: see ThreeLCState's docstring for why a ramp is needed at all.
DEFAULT_SPARSITY_WARMUP = 100
# Every ``transport=`` a state takes; the fingerprint carries the index into it.
TRANSPORT_CHOICES = (*TRANSPORTS, "auto", HierarchicalTransport.name)


def _flag(name: str, value) -> bool:
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise ConfigurationError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def _non_negative_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ConfigurationError(f"{name} must be a non-negative integer; got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Settings:
    """What every rank must agree on (see ``ThreeLCState`` for each field's meaning)."""

    sparsity: float = 1.0
    transport: str = "allgather"
    start_iter: int = 2
    error_feedback: bool = True
    sparsity_warmup: int = DEFAULT_SPARSITY_WARMUP
    bounded_scale: bool = True
    scale_block: int = 0

    def __post_init__(self):
        if self.transport not in TRANSPORT_CHOICES:
            raise ConfigurationError(f"transport must be one of {TRANSPORT_CHOICES}; got {self.transport!r}")
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
        object.__setattr__(self, "start_iter", _non_negative_int("start_iter", self.start_iter))
        object.__setattr__(self, "error_feedback", bool(self.error_feedback))
        object.__setattr__(self, "sparsity_warmup", _non_negative_int("sparsity_warmup", self.sparsity_warmup))
        object.__setattr__(self, "bounded_scale", _flag("bounded_scale", self.bounded_scale))
        object.__setattr__(self, "scale_block", _non_negative_int("scale_block", self.scale_block))

    def sparsity_at(self, iteration: int) -> float:
        """The sparsity multiplier of iteration ``iteration`` (a compressed one)."""
        done = iteration - self.start_iter + 1
        if self.sparsity_warmup == 0 or done >= self.sparsity_warmup:
            return self.sparsity
        return 1.0 + (self.sparsity - 1.0) * max(done, 0) / self.sparsity_warmup

    def as_dict(self) -> dict:
        """Plain types, for checkpoints."""
        return asdict(self)


def agree(settings: Settings, collectives, world_size: int, extra: dict[str, int], device: torch.device,
          built_by: str) -> None:
    """All-gather the settings' fingerprint; every rank raises the same ConfigurationError on a difference.

    ``extra``: integer fields the framework adapter adds to the agreement (named in the error).
    """
    sparsity_bits = struct.unpack("<q", struct.pack("<d", settings.sparsity))[0]
    mine = torch.tensor([STATE_VERSION, TRANSPORT_CHOICES.index(settings.transport), sparsity_bits,
                         settings.start_iter, int(settings.error_feedback), world_size, settings.sparsity_warmup,
                         int(settings.bounded_scale), settings.scale_block, *(int(v) for v in extra.values())],
                        dtype=torch.int64)
    everyone = collectives.allgather(mine.to(device)).cpu()
    if bool((everyone == mine).all()):
        return
    rows = []
    for rank, row in enumerate(everyone.tolist()):
        sparsity = struct.unpack("<d", struct.pack("<q", row[2]))[0]
        transport = TRANSPORT_CHOICES[row[1]] if 0 <= row[1] < len(TRANSPORT_CHOICES) else row[1]
        fields = "".join(f" {name}={value}" for name, value in zip(extra, row[9:]))
        rows.append(f"rank {rank}: transport={transport} sparsity={sparsity} sparsity_warmup={row[6]} "
                    f"start_iter={row[3]} error_feedback={bool(row[4])} bounded_scale={bool(row[7])} "
                    f"scale_block={row[8]}{fields} "
                    f"(state version {row[0]})")
    raise ConfigurationError(f"threelc settings differ across ranks; every rank must build {built_by} "
                             "with the same arguments:\n  " + "\n  ".join(rows))
