"""3-value quantization with a sparsity multiplier (docs/algorithm.md, section 1).

    scale = max(|x|) * sparsity          (float32, one per segment)
    q     = round(x / scale)             (int8 in {-1, 0, +1}, round half to even)

Everything here is pure tensor code: no process groups, no host loops over elements.
The only host synchronisation is one check that the scales are finite, so that a
non-finite input can never produce out-of-range ternary values.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .errors import ConfigurationError

MIN_SPARSITY = 1.0
MAX_SPARSITY = 2.0  # exclusive: at 2 every element would round to zero
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT32_MAX = torch.finfo(torch.float32).max
CANONICAL_NAN_BITS = 0x7FC00000  # the quiet NaN a non-finite scale is written as


def check_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` as a float, or raise if it is outside [1, 2)."""
    value = float(sparsity)
    if not (MIN_SPARSITY <= value < MAX_SPARSITY):  # also rejects NaN
        raise ConfigurationError(
            f"sparsity must be in [{MIN_SPARSITY}, {MAX_SPARSITY}) (1 keeps the most, "
            f"values near 2 the fewest elements); got {sparsity!r}"
        )
    return value


def check_segments(segments: Sequence[int] | None, numel: int) -> list[int]:
    """Normalise ``segments`` (lengths of consecutive slices) to a list of ints."""
    if segments is None:
        return [numel]
    segments = [int(n) for n in segments]
    if any(n < 0 for n in segments) or sum(segments) != numel:
        raise ConfigurationError(
            f"segments must be non-negative lengths summing to numel={numel}; "
            f"got {len(segments)} lengths summing to {sum(segments)}"
        )
    if not segments:
        raise ConfigurationError("segments must hold at least one length")
    return segments


def _check_input(x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise ConfigurationError(
            f"threelc compresses float32, float16 and bfloat16 tensors; got {x.dtype}"
        )


def _absmax(values: torch.Tensor) -> torch.Tensor:
    # aminmax reads the data once and allocates nothing of its size (abs() would).
    low, high = torch.aminmax(values)
    return torch.maximum(low.abs(), high.abs()).float()


# The loop pays about 10 us of dispatch per segment, one segment_reduce pass about 3 ns
# per element: on CPU the pass was 1.6x faster at a mean length of 2048, slower at 4096.
_VECTORISED_MEAN_LENGTH = 2048


def segment_absmax(flat: torch.Tensor, segments: list[int]) -> torch.Tensor:
    """max(|x|) of each segment as float32 (0 for an empty segment).

    A NaN anywhere in a segment makes its entry NaN (sign and payload unspecified:
    ``scales_from_absmax`` writes every NaN as one canonical NaN), +-inf gives inf and
    -0.0 gives 0.0. ``segments`` are lengths summing to ``flat.numel()``.
    """
    if (len(segments) > 1 and flat.numel() < len(segments) * _VECTORISED_MEAN_LENGTH
            and flat.dim() == 1 and flat.dtype in SUPPORTED_DTYPES):
        lengths = np.asarray(segments, dtype=np.int64)
        # The reduction below does not check its lengths (it would read out of bounds), so
        # only lengths check_segments accepts reach it; anything else keeps the loop's behaviour.
        if lengths.min() >= 0 and int(lengths.sum()) == flat.numel():
            # non_blocking: a pageable source is staged at once, and a blocking copy would
            # add a host synchronisation on CUDA.
            lengths = torch.from_numpy(lengths).to(flat.device, non_blocking=True)
            return _segment_absmax_vectorised(flat, lengths)
    return _segment_absmax_loop(flat, segments)


def _segment_absmax_loop(flat: torch.Tensor, segments: list[int]) -> torch.Tensor:
    maxima = torch.zeros(len(segments), dtype=torch.float32, device=flat.device)
    start = 0
    for i, n in enumerate(segments):
        if n:
            maxima[i] = _absmax(flat[start : start + n])
        start += n
    return maxima


def _segment_absmax_vectorised(flat: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    # Widening first is exact and order-preserving, so the maximum of the widened values is
    # the widened maximum; segment_reduce on half/bfloat16 converts every element it
    # compares and is several times slower than on float32.
    values = flat.abs() if flat.dtype == torch.float32 else flat.float().abs_()
    # Its max lets a NaN win against any number (a plain comparison would drop it), and
    # initial=0 is both an empty segment's value and neutral for |x| >= 0.
    return torch.segment_reduce(values, "max", lengths=lengths, unsafe=True, initial=0)


def bounded_absmax(compensated: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Per segment, ``min(max|g + r|, max|g|)`` (the bounded scale's absmax), NaN/inf kept.

    Why: at sparsity near 2 only values above ~max/s are sent, so the residual r grows
    until max|g + r| is many times max|g|; each step then kicks a few weights by
    s * max|g + r| (momentum amplifies it) and training diverges. Bounding by the
    current gradient sends more, smaller values while r is large, so r drains as a
    stream rather than in bursts; values above the scale are sent as +-scale and the
    rest stays in r. The min is taken only where both are finite, elsewhere the larger
    (NaN above inf), so a non-finite g or r still makes the scale non-finite. An all-zero
    g gives 0: nothing is sent that step and r is kept whole, which is right, as the
    step carries no new gradient to bound a transmission by.
    """
    both = torch.isfinite(compensated) & torch.isfinite(gradient)
    return torch.where(both, torch.minimum(compensated, gradient), torch.maximum(compensated, gradient))


def scales_from_absmax(absmax: torch.Tensor, sparsity: float) -> torch.Tensor:
    """scale = max|x| * sparsity in float32, clamped so a finite max never overflows."""
    scales = absmax.float() * torch.tensor(sparsity, dtype=torch.float32, device=absmax.device)
    # clamp keeps scale >= max|x| (so |x / scale| <= 1) and leaves NaN/inf untouched,
    # which is what the finiteness check downstream relies on. NaN becomes one
    # canonical NaN, so a non-finite payload has the same bytes on every backend.
    scales = torch.where(torch.isfinite(absmax), scales.clamp(max=_FLOAT32_MAX), scales)
    return torch.where(torch.isnan(scales), _canonical_nan(scales.device), scales)


BAD_SCALE_CAP = "a scale cap must be finite and not negative (nor -0.0)"


def check_scale_cap(cap: torch.Tensor | None, count: int, device: torch.device, *,
                    values: bool = True) -> torch.Tensor | None:
    """``cap`` as the encoders take it: None, or one finite, non-negative float32 per segment on ``device``.

    ``values=False`` skips the check of the values, a host sync, for a caller that
    reads ``invalid_scale_cap`` back with its own (the Triton codec)."""
    if cap is None:
        return None
    if not isinstance(cap, torch.Tensor) or cap.dtype != torch.float32 or cap.shape != (count,) \
            or cap.device != device:
        raise ConfigurationError(f"a scale cap is a float32 tensor of {count} values (one per segment) on {device}; "
                                 f"got {cap.dtype if isinstance(cap, torch.Tensor) else type(cap).__name__} "
                                 f"of shape {tuple(getattr(cap, 'shape', ()))}")
    if values and bool(invalid_scale_cap(cap)):
        raise ConfigurationError(BAD_SCALE_CAP)
    return cap.contiguous()


def invalid_scale_cap(cap: torch.Tensor) -> torch.Tensor:
    """A device bool: some cap is NaN, infinite, negative or -0.0."""
    return ~(torch.isfinite(cap) & ~torch.signbit(cap)).all()


def cap_scales(scales: torch.Tensor, cap: torch.Tensor | None) -> torch.Tensor:
    """Per segment ``min(scale, cap)``; a non-finite scale stays as it is (it marks a non-finite input).

    Values above a capped scale quantize to +-1 and the rest stays in the residual, as
    under the bounded scale. The sharded transport's server uses it (transports.server_scale_cap).
    """
    if cap is None:
        return scales
    return torch.where(torch.isfinite(scales), torch.minimum(scales, cap), scales)


def _canonical_nan(device: torch.device) -> torch.Tensor:
    return torch.tensor(CANONICAL_NAN_BITS, dtype=torch.int32, device=device).view(torch.float32)


def per_element(values: torch.Tensor, segments: list[int]) -> torch.Tensor:
    """Broadcastable per-element view of one value per segment."""
    if len(segments) == 1:
        # Shape (1,), not (): a 0-dim tensor would not take part in type promotion,
        # and a bf16 input would then be compared against a bf16-rounded threshold.
        return values.reshape(1)
    counts = torch.tensor(segments, device=values.device)
    return torch.repeat_interleave(values, counts, output_size=sum(segments))


def round_thresholds(scales: torch.Tensor) -> torch.Tensor:
    """Per scale, the smallest float32 t with fl(t / scale) > 0.5, as a float32 tensor.

    For |x| <= scale, ``round(x / scale)`` (half to even) is +1 exactly when
    ``x >= t`` and -1 exactly when ``x <= -t``, so quantization needs two
    comparisons instead of a division and a rounding pass. The search runs on the
    host in numpy float32, whose division is IEEE correctly rounded like torch's on
    every device. A zero scale gives t = inf and a non-finite one t = NaN: every
    comparison is then false and q = 0.
    """
    values = scales.detach().to("cpu", torch.float32).numpy()
    half = np.float32(0.5)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        usable = np.isfinite(values) & (values > 0)
        safe = np.where(usable, values, np.float32(1))
        t = half * safe
        for _ in range(64):  # two steps at most for normal scales; subnormals take more
            lower = np.nextafter(t, np.float32(0))
            step_down = (lower / safe > half) & (lower > 0)
            step_up = ~(t / safe > half)
            if not (step_down.any() or step_up.any()):
                break
            t = np.where(step_down, lower, np.where(step_up, np.nextafter(t, np.float32(np.inf)), t))
        t = np.where(usable, t, np.where(values == 0, np.float32(np.inf), np.float32(np.nan)))
    return torch.from_numpy(t.astype(np.float32)).to(scales.device)


def quantize_with_scales(flat: torch.Tensor, scales: torch.Tensor, segments: list[int]) -> torch.Tensor:
    """round(x / scale) as int8, given float32 scales (one per segment) that bound |x|.

    Segments whose scale is 0 (all-zero input) or non-finite (NaN/inf input) give
    q = 0; dequantize then yields 0 and NaN respectively.
    """
    threshold = per_element(round_thresholds(scales), segments)
    # bool is one byte of 0/1, so the comparisons reinterpret as int8 without a copy.
    return torch.ge(flat, threshold).view(torch.int8) - torch.le(flat, -threshold).view(torch.int8)


def quantize(
    x: torch.Tensor, sparsity: float = 1.0, segments: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to ternary values.

    Returns ``(q, scale)``: ``q`` is int8 in {-1, 0, 1} with the shape of ``x``;
    ``scale`` is a float32 0-dim tensor (``segments=None``) or a 1-D tensor with one
    scale per segment, ``segments`` being the lengths of consecutive slices of the
    flattened ``x`` (for example the parameters of one DDP bucket).

    An all-zero input gives scale 0 and q = 0. A non-finite input gives a non-finite
    scale and q = 0, so ``dequantize`` returns NaN for it rather than silently zeros.
    """
    _check_input(x)
    sparsity = check_sparsity(sparsity)
    flat = x.reshape(-1)
    checked = check_segments(segments, flat.numel())
    scales = scales_from_absmax(segment_absmax(flat, checked), sparsity)
    q = quantize_with_scales(flat, scales, checked).reshape(x.shape)
    return q, (scales.reshape(()) if segments is None else scales)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    segments: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``q * scale`` computed in float32 and returned as ``dtype`` (shape of ``q``)."""
    flat = q.reshape(-1)
    segments = check_segments(segments, flat.numel())
    scales = torch.as_tensor(scale, dtype=torch.float32, device=q.device).reshape(-1)
    if scales.numel() != len(segments):
        raise ConfigurationError(f"{scales.numel()} scales given for {len(segments)} segments")
    # Convert, then scale in place: a mixed int8 * float32 multiply takes twice as long.
    decoded = flat.to(torch.float32).mul_(per_element(scales, segments))
    # 0 * inf would be NaN anyway; 0 * NaN too: a non-finite scale poisons its segment.
    return decoded.to(dtype).reshape(q.shape)


def subtract_decoded(compensated: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                     segments: list[int]) -> torch.Tensor:
    """``compensated -= q * scale`` in place (the new residual), without a decoded temporary."""
    return compensated.addcmul_(q, per_element(scales, segments), value=-1)
