"""Base-3^5 packing: five ternary values per byte (docs/algorithm.md, section 2).

Layout (part of the wire format): t = q + 1, padded with t = 1 to a multiple of 5,
split into five *contiguous* parts p0..p4 of n5 values, and
``byte[j] = 81*p0[j] + 27*p1[j] + 9*p2[j] + 3*p3[j] + p4[j]``. Contiguous parts make
packing and unpacking five strided vector operations with no gather.
"""

from __future__ import annotations

import torch

from .errors import ConfigurationError, DecodeError

TRITS_PER_BYTE = 5
ZERO_GROUP = 121  # five q = 0 (t = 1): 81 + 27 + 9 + 3 + 1
MAX_PACKED = 242  # 3**5 - 1; bytes 243..255 never come out of pack()


def packed_length(numel: int) -> int:
    """Bytes that ``numel`` ternary values occupy."""
    return -(-numel // TRITS_PER_BYTE)


def digits_buffer(numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A uint8 buffer of ``5 * packed_length(numel)`` digits whose padding is already t = 1."""
    padded = TRITS_PER_BYTE * packed_length(numel)
    digits = torch.empty(padded, dtype=torch.uint8, device=device)
    digits[numel:] = 1
    return digits


def pack_digits(digits: torch.Tensor) -> torch.Tensor:
    """Pack a padded uint8 buffer of digits t in {0, 1, 2} (length a multiple of 5)."""
    parts = digits.view(TRITS_PER_BYTE, -1)
    packed = parts[0] * 3  # Horner: ((((p0*3 + p1)*3 + p2)*3 + p3)*3 + p4, max 242
    packed.add_(parts[1])
    for k in range(2, TRITS_PER_BYTE):
        packed.mul_(3).add_(parts[k])
    return packed


def pack_ternary(flat: torch.Tensor) -> torch.Tensor:
    """``pack`` without the range check, for int8 values known to be ternary."""
    digits = digits_buffer(flat.numel(), flat.device)
    # Reinterpreting int8 as uint8 turns -1 into 255; adding 1 in uint8 wraps it to 0.
    torch.add(flat.reshape(-1).view(torch.uint8), 1, out=digits[: flat.numel()])
    return pack_digits(digits)


def pack(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary values (any shape, flattened) into ``packed_length(q.numel())`` bytes."""
    if q.dtype != torch.int8:
        raise ConfigurationError(f"pack expects int8 ternary values; got {q.dtype}")
    if q.numel():
        low, high = torch.aminmax(q)
        if int(low) < -1 or int(high) > 1:
            raise ConfigurationError(f"pack expects values in {{-1, 0, 1}}; found [{int(low)}, {int(high)}]")
    return pack_ternary(q.reshape(-1))


def unpack_digits(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_digits``: a (5 * n) uint8 buffer of digits, padding included."""
    digits = torch.empty((TRITS_PER_BYTE, packed.numel()), dtype=torch.uint8, device=packed.device)
    rest = packed
    for k in range(TRITS_PER_BYTE - 1, 0, -1):
        quotient = torch.div(rest, 3, rounding_mode="floor")
        torch.sub(rest, quotient * 3, out=digits[k])
        rest = quotient
    digits[0].copy_(rest)
    return digits.view(-1)


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Unpack ``numel`` int8 ternary values from base-3^5 bytes.

    Raises ``DecodeError`` when the byte count does not match ``numel``, a byte is
    above 242, or the padding is not q = 0.
    """
    if packed.dtype != torch.uint8:
        raise DecodeError(f"packed data must be uint8; got {packed.dtype}")
    packed = packed.reshape(-1)
    if numel < 0 or packed.numel() != packed_length(numel):
        raise DecodeError(f"{packed.numel()} packed bytes cannot hold {numel} values (need {packed_length(max(numel, 0))})")
    if packed.numel() and int(packed.max()) > MAX_PACKED:
        raise DecodeError(f"packed byte {int(packed.max())} is above {MAX_PACKED}: not base-3^5 data")
    digits = unpack_digits(packed)
    if numel < digits.numel() and not bool((digits[numel:] == 1).all()):
        raise DecodeError("padding after the last value is not q = 0")
    return digits[:numel].view(torch.int8).sub_(1)
