"""Zero-run encoding of packed bytes (docs/algorithm.md, section 3).

A run of k all-zero groups (byte 121) becomes k // 14 bytes of 255, then for
r = k % 14 one byte 241 + r when r >= 2, or a single 121 when r == 1. Every other
byte is copied. Bytes 243..255 therefore each stand for (b - 241) zero groups.
"""

from __future__ import annotations

import torch

from .errors import DecodeError
from .packing import ZERO_GROUP

RUN_BASE = 241  # byte 241 + r stands for a run of r zero groups, r in 2..14
MIN_RUN_BYTE = RUN_BASE + 2  # 243
MAX_RUN = 14  # byte 255
MAX_EXPANSION = MAX_RUN  # one encoded byte never stands for more than 14 packed bytes


def zre_encode(packed: torch.Tensor) -> torch.Tensor:
    """Zero-run encode a uint8 stream of packed bytes (values 0..242)."""
    packed = packed.reshape(-1)
    n = packed.numel()
    if n == 0:
        return packed.clone()
    is_zero = packed == ZERO_GROUP
    # +1 where a run starts, -1 one past where it ends; nonzero() lists them in order,
    # so they alternate start, end, start, end, ...
    edges = torch.diff(is_zero.to(torch.int8), prepend=is_zero.new_zeros(1, dtype=torch.int8),
                       append=is_zero.new_zeros(1, dtype=torch.int8))
    bounds = edges.nonzero().view(-1, 2)
    values = packed.clone()
    keep = ~is_zero
    if bounds.numel():
        starts = bounds[:, 0]
        lengths = bounds[:, 1] - starts
        full, remainder = lengths // MAX_RUN, lengths % MAX_RUN
        # Each run is rewritten in place over its own first bytes: full bytes of 255,
        # then the remainder byte. full + (remainder > 0) <= length always holds.
        total_full = int(full.sum())
        if total_full:
            run_of = torch.repeat_interleave(torch.arange(starts.numel(), device=packed.device), full,
                                             output_size=total_full)
            first = torch.cumsum(full, 0) - full
            offsets = torch.arange(total_full, device=packed.device) - first[run_of]
            positions = starts[run_of] + offsets
            values[positions] = 255
            keep[positions] = True
        has_rest = remainder > 0
        rest_at = (starts + full)[has_rest]
        rest = remainder[has_rest]
        values[rest_at] = torch.where(rest == 1, ZERO_GROUP, RUN_BASE + rest).to(torch.uint8)
        keep[rest_at] = True
    return values[keep]


def zre_decode(encoded: torch.Tensor, expected_length: int | None = None) -> torch.Tensor:
    """Expand a zero-run encoded uint8 stream back to packed bytes.

    With ``expected_length`` the expanded size is checked before anything of that
    size is allocated; a mismatch raises ``DecodeError``.
    """
    if encoded.dtype != torch.uint8:
        raise DecodeError(f"zero-run encoded data must be uint8; got {encoded.dtype}")
    encoded = encoded.reshape(-1)
    runs = encoded >= MIN_RUN_BYTE
    counts = torch.where(runs, encoded.to(torch.int64) - RUN_BASE, 1)
    total = int(counts.sum()) if encoded.numel() else 0
    if expected_length is not None and total != expected_length:
        raise DecodeError(f"zero-run data expands to {total} bytes; the header says {expected_length}")
    if not bool(runs.any()):
        return encoded.clone()
    values = torch.where(runs, ZERO_GROUP, encoded).to(torch.uint8)
    return torch.repeat_interleave(values, counts, output_size=total)
