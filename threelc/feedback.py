"""Error feedback: the residual memory of 3LC (3LC.md section 1).

    compensated = x + residual
    q, scale    = quantize(compensated)
    residual    = compensated - q * scale

Residuals are float32 whatever the input dtype, so bf16/fp16 gradients do not lose
the small values error feedback exists to carry.
"""

from __future__ import annotations

import warnings
from typing import Hashable, NamedTuple, Sequence

import torch

from .quantize import check_segments, check_sparsity, dequantize, quantize


class Quantized(NamedTuple):
    """Result of quantizing one compensated tensor."""

    q: torch.Tensor  # int8 ternary values, flattened
    scale: torch.Tensor  # float32, one per segment
    finite: bool  # False: the input held NaN/inf; q is all zero, scales non-finite
    residual: torch.Tensor | None  # what quantization lost; None when disabled or not finite


class ErrorFeedback:
    """Holds one residual per key and quantizes with it.

    ``step(key, x, segments)`` compensates ``x`` with the key's residual, quantizes,
    and stores what quantization lost. If ``x`` holds NaN or inf the residual is left
    exactly as it was and ``finite`` is False in the result (the scales are then
    non-finite, so decoding yields NaN: a GradScaler downstream still sees the overflow).

    Collective users split the step in two: ``quantize`` computes the new residual
    without storing it, and ``commit`` stores it once every rank agreed the step
    counts (a step that any rank found non-finite is dropped everywhere).

    A key whose input changes size gets a fresh residual and a warning, never a
    misapplied one. ``enabled=False`` quantizes without any residual.
    """

    def __init__(self, sparsity: float = 1.0, enabled: bool = True):
        self.sparsity = check_sparsity(sparsity)
        self.enabled = bool(enabled)
        self.residuals: dict[Hashable, torch.Tensor] = {}

    def compensate(self, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        """``x + residual`` as a new flat float32 tensor (``x`` is not modified)."""
        flat = x.reshape(-1)
        residual = self.residuals.get(key) if self.enabled else None
        if residual is not None and (residual.numel() != flat.numel() or residual.device != flat.device):
            warnings.warn(
                f"threelc: residual for {key!r} holds {residual.numel()} elements but the input has "
                f"{flat.numel()}; resetting it (did the bucket layout change?)",
                RuntimeWarning,
                stacklevel=3,
            )
            del self.residuals[key]
            residual = None
        if residual is None:
            return flat.to(torch.float32, copy=True)
        return flat.float().add(residual)

    def quantize(self, key: Hashable, x: torch.Tensor, segments: Sequence[int] | None = None) -> Quantized:
        """Compensate and quantize; the new residual is returned, not stored."""
        lengths = check_segments(segments, x.numel())
        compensated = self.compensate(key, x)
        q, scales = quantize(compensated, self.sparsity, lengths)
        finite = bool(torch.isfinite(scales).all())
        residual = None
        if self.enabled and finite:
            residual = compensated.sub_(dequantize(q, scales, lengths))
        return Quantized(q, scales, finite, residual)

    def commit(self, key: Hashable, result: Quantized | torch.Tensor | None) -> None:
        """Store the residual of a step every rank agreed on (None: nothing to store)."""
        residual = result.residual if isinstance(result, Quantized) else result
        if residual is not None:
            self.residuals[key] = residual

    def step(self, key: Hashable, x: torch.Tensor, segments: Sequence[int] | None = None) -> Quantized:
        """``quantize`` then ``commit``: the single-process use."""
        result = self.quantize(key, x, segments)
        self.commit(key, result)
        return result

    def reset(self, key: Hashable | None = None) -> None:
        """Forget one residual, or all of them."""
        if key is None:
            self.residuals.clear()
        else:
            self.residuals.pop(key, None)

    def state_dict(self) -> dict:
        """Tensors and plain types only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "sparsity": self.sparsity,
            "enabled": self.enabled,
            "residuals": {key: r.detach().clone() for key, r in self.residuals.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.sparsity = check_sparsity(state["sparsity"])
        self.enabled = bool(state["enabled"])
        self.residuals = {key: r.detach().clone() for key, r in state["residuals"].items()}
