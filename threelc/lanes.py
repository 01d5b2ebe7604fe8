"""Lane packing: sum ternary values from N ranks with one integer all-reduce (docs/algorithm.md, section 4).

Each rank offsets its ternary values to t = q + 1 in {0, 1, 2}; the sum over N ranks
lies in [0, 2N], so ``lane_bits(N) = ceil(log2(2N + 1))`` bits hold it without a carry
into the next lane. ``lanes_per_word(N)`` such lanes share one int64 word (63 bits
used, so the sign bit never changes and a plain integer SUM is exact on every
backend). Lane k of word w holds value ``k * words + w`` (contiguous lanes, as in the
base-3^5 packing), so packing and unpacking are a few strided vector operations.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigurationError

WORD_DTYPE = torch.int64
USABLE_BITS = 63


def lane_bits(world_size: int) -> int:
    """Bits one lane needs to hold the sum of ``world_size`` offset ternaries."""
    if world_size < 1:
        raise ConfigurationError(f"world size must be at least 1; got {world_size}")
    return max(1, math.ceil(math.log2(2 * world_size + 1)))


def lanes_per_word(world_size: int) -> int:
    """Lanes per int64 word; raises if not even one lane fits."""
    lanes = USABLE_BITS // lane_bits(world_size)
    if lanes < 1:  # pragma: no cover - would need 2**62 ranks
        raise ConfigurationError(f"world size {world_size} is too large for one int64 lane")
    return lanes


def word_count(numel: int, world_size: int) -> int:
    return -(-numel // lanes_per_word(world_size))


def pack_lanes(q: torch.Tensor, world_size: int) -> torch.Tensor:
    """int64 words holding ``q + 1`` for every element of the int8 ternary tensor ``q``."""
    flat = q.reshape(-1)
    lanes, bits = lanes_per_word(world_size), lane_bits(world_size)
    words = word_count(flat.numel(), world_size)
    digits = torch.ones(lanes * words, dtype=WORD_DTYPE, device=flat.device)  # padding: q = 0
    digits[: flat.numel()] = flat
    digits[: flat.numel()] += 1
    digits = digits.view(lanes, words)
    packed = digits[0].clone()
    for k in range(1, lanes):
        packed.add_(digits[k] << (bits * k))
    return packed


def unpack_lane_sums(words: torch.Tensor, numel: int, world_size: int) -> torch.Tensor:
    """From summed words, the int32 sums of q over ranks (each in [-N, N]), ``numel`` of them."""
    lanes, bits = lanes_per_word(world_size), lane_bits(world_size)
    if words.numel() != word_count(numel, world_size):
        raise ConfigurationError(f"{words.numel()} words cannot hold {numel} lanes for world size {world_size}")
    mask = (1 << bits) - 1
    sums = torch.empty((lanes, words.numel()), dtype=torch.int32, device=words.device)
    for k in range(lanes):
        sums[k].copy_((words >> (bits * k)) & mask)
    return sums.view(-1)[:numel] - world_size
