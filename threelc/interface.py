"""The codec interface every backend implements: the layout it works on, what encode returns, the five operations.

threelc/backends.py documents the operations and holds the PyTorch and native
implementations; threelc/triton holds the Triton one. Both import this module, never
each other at import time.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .errors import ConfigurationError, DecodeError
from .quantize import _check_input


class Layout:
    """Segments in payload order: ``segments[s]`` elements at element ``offsets[s]`` of the tensor.

    The offsets index the tensor that is read (encode) or written (decode); by default
    the segments lie end to end from 0. Layouts are immutable and hashable, so callers
    keep one per bucket.
    """

    __slots__ = ("segments", "offsets", "numel", "contiguous", "_table")

    def __init__(self, segments: Sequence[int], offsets: Sequence[int] | None = None):
        self.segments = tuple(int(n) for n in segments)
        if not self.segments or any(n < 0 for n in self.segments):
            raise ConfigurationError(f"a layout needs at least one non-negative length; got {list(self.segments)}")
        if offsets is None:
            starts, total = [], 0
            for n in self.segments:
                starts.append(total)
                total += n
            offsets = starts
        self.offsets = tuple(int(o) for o in offsets)
        if len(self.offsets) != len(self.segments):
            raise ConfigurationError(f"{len(self.offsets)} offsets for {len(self.segments)} segments")
        self.numel = sum(self.segments)
        ends = [o + n for o, n in zip(self.offsets, self.segments)]
        self.contiguous = self.offsets[0] == 0 and all(e == o for e, o in zip(ends, self.offsets[1:]))
        self._table = None

    def table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 CPU tensors of lengths and offsets (for the native kernels), built once."""
        if self._table is None:
            self._table = (torch.tensor(self.segments, dtype=torch.int64), torch.tensor(self.offsets, dtype=torch.int64))
        return self._table

    def in_blocks(self, block: int) -> Layout:
        """This layout with every segment cut into pieces of ``block`` elements (the last may be shorter).

        Each piece gets a scale of its own, so the payload grows by one segment entry
        per piece; ``block=0`` returns the layout unchanged. An empty segment stays one.
        """
        if isinstance(block, bool) or int(block) != block or block < 0:
            raise ConfigurationError(f"a scale block must be a non-negative integer; got {block!r}")
        if block == 0:
            return self
        segments, offsets = [], []
        for n, o in zip(self.segments, self.offsets):
            cuts = range(0, n, block) if n else range(1)
            segments += [min(block, n - c) for c in cuts]
            offsets += [o + c for c in cuts]
        return Layout(segments, offsets)

    def extent(self) -> int:
        """Elements a tensor needs to hold every segment."""
        return max((o + n for o, n in zip(self.offsets, self.segments)), default=0)

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and (self.segments, self.offsets) == (other.segments, other.offsets)

    def __hash__(self) -> int:
        return hash((self.segments, self.offsets))

    def __repr__(self) -> str:
        return f"Layout(segments={list(self.segments)}, offsets={list(self.offsets)})"


class Encoded(NamedTuple):
    """One rank's encoded tensor."""

    payload: torch.Tensor  # uint8 wire payload; empty when not finite
    scales: torch.Tensor  # float32, one per segment (non-finite where the input was)
    residual: torch.Tensor | None  # the new residual (same offsets as the input); None: feedback off or not finite
    finite: bool
    zeros: int  # ternary zeros among the values
    room: torch.Tensor | None = None  # a buffer that begins with the payload and may be longer


class Codec:
    """The interface (see the module docstring). Arguments are flat tensors on one device."""

    name = ""

    def encode(self, x: torch.Tensor, residual: torch.Tensor | None, layout: Layout, sparsity: float, *,
               dtype: torch.dtype | None = None, feedback: bool = True, residual_out: torch.Tensor | None = None,
               zre: bool = True, bounded: bool = True, scale_cap: torch.Tensor | None = None) -> Encoded:
        """``dtype`` goes into the header (default ``x.dtype``). With ``feedback`` the new residual
        is written into ``residual_out`` (default: a new float32 tensor shaped like ``x``) at the
        layout's positions only: the others keep what they held, so the sharded transport passes
        one buffer to the encodes of every server's layout (in the default tensor they are unspecified).
        ``bounded``: the scale is ``sparsity * min(max|x + r|, max|x|)`` per segment
        (quantize.bounded_absmax says why); without a residual that is today's scale.
        ``scale_cap`` (float32, one per segment, on ``x``'s device): each finite scale is at
        most its cap (quantize.cap_scales)."""
        raise NotImplementedError

    @staticmethod
    def _check(x: torch.Tensor, layout: Layout, what: str = "input") -> None:
        """Raise ConfigurationError unless this backend can read or write ``x`` with ``layout``."""

    @staticmethod
    def _residual(residual: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        if residual is not None and (residual.dtype != torch.float32 or residual.numel() != x.numel()
                                     or not residual.is_contiguous() or residual.device != x.device):
            raise ConfigurationError("a residual must be a contiguous float32 tensor shaped like its input")
        return residual

    def _prepare(self, x, residual, layout, feedback, residual_out):
        """The flat input, the checked residual and the buffer of the new one (None without feedback)."""
        _check_input(x)
        x = x.reshape(-1)
        self._check(x, layout)
        residual = self._residual(residual, x)
        if feedback:
            residual_out = self._residual(residual_out, x) if residual_out is not None else torch.empty_like(
                x, dtype=torch.float32)
        else:
            residual_out = None
        return x, residual, residual_out

    def _check_decode(self, payloads, layout: Layout, out: torch.Tensor, average: bool) -> None:
        self._check(out, layout, "output")
        if out.dtype != torch.float32:
            raise ConfigurationError(f"decode writes float32; the output is {out.dtype}")
        if not average and len(payloads) != 1:
            raise ConfigurationError(f"decode without averaging takes one payload; got {len(payloads)}")

    def decode(self, payloads: Sequence[torch.Tensor], layout: Layout, out: torch.Tensor, *,
               average: bool = True) -> torch.Tensor:
        """``out[segments] = (0 + d_0 + ... + d_{N-1}) / N`` (``average``) or ``d_0`` (one payload).

        ``out`` is float32; raises ``DecodeError`` with ``payload_index`` set when a
        payload is invalid or does not describe ``layout``'s lengths.
        """
        raise NotImplementedError

    def absmax(self, x: torch.Tensor, residual: torch.Tensor | None, layout: Layout, *,
               bounded: bool = True) -> torch.Tensor:
        """max|x + residual| per segment; ``bounded``: at most max|x| (as ``encode``)."""
        raise NotImplementedError

    def encode_lanes(self, x: torch.Tensor, residual: torch.Tensor | None, layout: Layout, scales: torch.Tensor,
                     world_size: int, *, feedback: bool = True, residual_out: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """``(words, new residual or None, zeros)`` for scales every rank agreed on; ``residual_out``
        as in ``encode``."""
        raise NotImplementedError

    def decode_lanes(self, words: torch.Tensor, layout: Layout, scales: torch.Tensor, world_size: int,
                     out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def payload_error(index: int, error: DecodeError | str) -> DecodeError:
    """A DecodeError that names which of the N payloads failed (``payload_index``)."""
    failure = DecodeError(str(error))
    failure.payload_index = index
    return failure
