"""Error feedback: the residual memory of 3LC (docs/algorithm.md, section 1).

    compensated = x + residual
    scale       = sparsity * min(max|compensated|, max|x|)   (bounded, the default)
    q           = round(compensated / scale), clipped to {-1, 0, 1}
    residual    = compensated - q * scale

Residuals are float32 whatever the input dtype, so bf16/fp16 gradients do not lose
the small values error feedback exists to carry.
"""

from __future__ import annotations

import warnings
from typing import Hashable, List, NamedTuple, Sequence, Union

import torch

from .errors import ConfigurationError
from .quantize import (bounded_absmax, cap_scales, check_scale_cap, check_segments, check_sparsity,
                       quantize_with_scales, scales_from_absmax, segment_absmax, subtract_decoded)


class Quantized(NamedTuple):
    """Result of quantizing one compensated tensor."""

    q: torch.Tensor  # int8 ternary values, flattened
    scale: torch.Tensor  # float32, one per segment
    finite: bool  # False: the input held NaN/inf; q is all zero, scales non-finite
    residual: torch.Tensor | None  # what quantization lost; None when disabled or not finite


Keys = Union[Hashable, List[Hashable]]


class ErrorFeedback:
    """Holds residuals by key and quantizes with them.

    ``step(key, x, segments)`` compensates ``x`` with its residual, quantizes, and
    stores what quantization lost. ``key`` names one residual for all of ``x``; a
    *list* of keys, one per segment, stores one residual per segment instead, so the
    same parameter keeps its residual however tensors are grouped from step to step
    (DDP regroups its buckets after the first iteration, and on every restart).

    If ``x`` holds NaN or inf the residual is left exactly as it was and ``finite``
    is False in the result (the scales are then non-finite, so decoding yields NaN:
    a GradScaler downstream still sees the overflow).

    Collective users split the step in two: ``quantize`` computes the new residual
    without storing it, and ``commit`` stores it once every rank agreed the step
    counts (a step that any rank found non-finite is dropped everywhere).

    A residual whose size no longer matches is reset with a warning, never
    misapplied. ``enabled=False`` quantizes without any residual.

    ``bounded`` (default) bounds each segment's scale by the current gradient:
    ``sparsity * min(max|x + r|, max|x|)`` (quantize.bounded_absmax says why). The codecs'
    ``bounded`` argument is this flag; transports pass ``memory.bounded`` on.
    """

    def __init__(self, sparsity: float = 1.0, enabled: bool = True, bounded: bool = True):
        self.sparsity = check_sparsity(sparsity)
        self.enabled = bool(enabled)
        self.bounded = bool(bounded)
        self.residuals: dict[Hashable, torch.Tensor] = {}
        # Residuals committed together are views into one tensor; while every key of a
        # group still points into it, the next step uses it whole instead of a cat().
        self._blocks: dict[tuple, torch.Tensor] = {}
        self._owner: dict[Hashable, tuple] = {}
        # The block a commit replaced, kept to receive the step after next's residual:
        # writing into memory already mapped saves a page fault per 4 KiB every step.
        self._spares: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _layout(key: Keys, segments: list[int]) -> tuple[tuple, list[int]]:
        if isinstance(key, list):
            if len(key) != len(segments):
                raise ConfigurationError(f"{len(key)} keys given for {len(segments)} segments")
            return tuple(key), segments
        return (key,), [sum(segments)]

    def residual(self, key: Keys, segments: Sequence[int], device: torch.device | str) -> torch.Tensor | None:
        """The residual of ``key``'s segments as one flat float32 tensor, or None if there is none.

        Segments without a residual yet contribute zeros; a residual of the wrong size or
        device is reset with a warning. The tensor may be the stored block itself: read it,
        never write to it.
        """
        if not self.enabled:
            return None
        keys, sizes = self._layout(key, [int(n) for n in segments])
        device = torch.device(device)
        block = self._blocks.get(keys)
        if (block is not None and block.numel() == sum(sizes) and block.device == device
                and all(self._owner.get(k) == keys for k in keys)):
            return block
        pieces = []
        for k, n in zip(keys, sizes):
            residual = self.residuals.get(k)
            if residual is not None and (residual.numel() != n or residual.device != device):
                warnings.warn(f"threelc: residual {k!r} holds {residual.numel()} elements but its tensor has {n}; "
                              "resetting it (did the model or its bucketing change?)", RuntimeWarning, stacklevel=3)
                self._forget(k)
                residual = None
            pieces.append(residual)
        if all(p is None for p in pieces):
            return None
        return torch.cat([p if p is not None else torch.zeros(n, dtype=torch.float32, device=device)
                          for p, n in zip(pieces, sizes)])

    def spare(self, key: Keys, numel: int, device: torch.device | str) -> torch.Tensor:
        """A float32 buffer of ``numel`` elements to write ``key``'s next residual into.

        It is never the stored residual (that one must survive a step that is not
        committed); after ``commit`` adopts it, the block it replaced becomes the spare.
        """
        keys = tuple(key) if isinstance(key, list) else (key,)
        spare = self._spares.get(keys)
        if spare is None or spare.numel() != numel or spare.device != torch.device(device):
            spare = torch.empty(numel, dtype=torch.float32, device=device)
            self._spares[keys] = spare
        return spare

    def compensate(self, key: Keys, x: torch.Tensor, segments: Sequence[int] | None = None) -> torch.Tensor:
        """``x + residual`` as a new flat float32 tensor (``x`` is not modified)."""
        flat = x.reshape(-1)
        residual = self.residual(key, check_segments(segments, flat.numel()), flat.device)
        if residual is None:
            return flat.to(torch.float32, copy=True)
        return flat.float().add(residual)

    def quantize(self, key: Keys, x: torch.Tensor, segments: Sequence[int] | None = None,
                 scale_cap: torch.Tensor | None = None) -> Quantized:
        """Compensate and quantize; the new residual is returned, not stored. ``scale_cap``: as the codecs' encode."""
        segments = check_segments(segments, x.numel())
        compensated = self.compensate(key, x, segments)
        maxima = segment_absmax(compensated, segments)
        if self.bounded:  # without a residual compensated is x and the bound changes nothing
            maxima = bounded_absmax(maxima, segment_absmax(x.reshape(-1), segments))
        scale_cap = check_scale_cap(scale_cap, len(segments), compensated.device)
        scales = cap_scales(scales_from_absmax(maxima, self.sparsity), scale_cap)
        q = quantize_with_scales(compensated, scales, segments)
        finite = bool(torch.isfinite(scales).all())
        residual = None
        if self.enabled and finite:
            residual = subtract_decoded(compensated, q, scales, segments)
        return Quantized(q, scales, finite, residual)

    def commit(self, key: Keys, residual: Quantized | torch.Tensor | None,
               segments: Sequence[int] | None = None) -> None:
        """Store the residual of a step every rank agreed on (None: nothing to store)."""
        if isinstance(residual, Quantized):
            residual = residual.residual
        if residual is None:
            return
        keys, sizes = self._layout(key, check_segments(segments, residual.numel()))
        replaced = self._blocks.get(keys)
        for k in keys:
            self._forget(k)
        if self._spares.get(keys) is residual:
            del self._spares[keys]
            if replaced is not None and replaced is not residual:
                self._spares[keys] = replaced
        self._blocks[keys] = residual
        for k, view in zip(keys, residual.split(sizes)):
            self.residuals[k] = view
            self._owner[k] = keys

    def step(self, key: Keys, x: torch.Tensor, segments: Sequence[int] | None = None,
             scale_cap: torch.Tensor | None = None) -> Quantized:
        """``quantize`` then ``commit``: the single-process use."""
        result = self.quantize(key, x, segments, scale_cap)
        self.commit(key, result, segments)
        return result

    def _forget(self, key: Hashable) -> None:
        self.residuals.pop(key, None)
        owner = self._owner.pop(key, None)
        if owner is not None:
            self._blocks.pop(owner, None)

    def reset(self) -> None:
        """Forget every residual."""
        self.residuals.clear()
        self._blocks.clear()
        self._owner.clear()
        self._spares.clear()

    def state_dict(self) -> dict:
        """Tensors and plain types only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "sparsity": self.sparsity,
            "enabled": self.enabled,
            "bounded": self.bounded,
            "residuals": {key: r.detach().clone() for key, r in self.residuals.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.sparsity = check_sparsity(state["sparsity"])
        self.enabled = bool(state["enabled"])
        self.bounded = bool(state.get("bounded", self.bounded))  # state dicts before the bound lack it
        self.reset()
        self.residuals = {key: r.detach().clone() for key, r in state["residuals"].items()}
