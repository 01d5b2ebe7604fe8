"""The self-describing payload: header, segment table, body (docs/wire-format.md).

    offset  size           field
    0       4              magic b"3LC\\x00"
    4       1              version (1)
    5       1              dtype code of the original tensor (1 f32, 2 f16, 3 bf16)
    6       1              flags (bit 0: body is zero-run encoded; other bits 0)
    7       1              reserved, 0
    8       8  u64         numel
    16      8  u64         body length in bytes
    24      4  u32         number of segments S (>= 1)
    28      4              reserved, 0
    32      8*S u64        segment lengths (sum = numel)
    32+8S   4*S f32        segment scales
    32+12S  body length    base-3^5 bytes, zero-run encoded when flag bit 0 is set

All integers little-endian. A payload is exactly 32 + 12*S + body length bytes.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import ConfigurationError, DecodeError
from .packing import pack_ternary, packed_length, unpack
from .quantize import check_segments, dequantize, quantize
from .zre import MAX_EXPANSION, zre_decode, zre_encode

MAGIC = b"3LC\x00"
VERSION = 1
FLAG_ZRE = 0x01
KNOWN_FLAGS = FLAG_ZRE
HEADER = struct.Struct("<4sBBBBQQII")
HEADER_SIZE = HEADER.size  # 32
SEGMENT_ENTRY_SIZE = 12  # u64 length + f32 scale
DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}

if sys.byteorder != "little":  # tensors are reinterpreted as bytes in native order
    raise ImportError("threelc's wire format needs a little-endian host")


@dataclass(frozen=True)
class Header:
    """What the first 32 + 12*S bytes of a payload say."""

    dtype: torch.dtype
    numel: int
    zre: bool
    segments: list[int]
    body_offset: int
    body_length: int


def payload_size(num_segments: int, body_length: int) -> int:
    return HEADER_SIZE + SEGMENT_ENTRY_SIZE * num_segments + body_length


def header_prefix(segments: Sequence[int], dtype: torch.dtype, zre: bool, body_length: int) -> bytes:
    """The header and the segment lengths: every byte of a payload before its scales."""
    return HEADER.pack(MAGIC, VERSION, DTYPE_CODES[dtype], FLAG_ZRE if zre else 0, 0, sum(segments), body_length,
                       len(segments), 0) + np.asarray(segments, dtype="<u8").tobytes()


def encode_quantized(
    q: torch.Tensor,
    scale: torch.Tensor,
    segments: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
    zre: bool = True,
) -> torch.Tensor:
    """Payload for ternary values ``q`` that were quantized with ``scale`` (one per segment)."""
    segments = check_segments(segments, q.numel())
    scales = torch.as_tensor(scale, dtype=torch.float32, device=q.device).reshape(-1)
    if scales.numel() != len(segments):
        raise ConfigurationError(f"{scales.numel()} scales given for {len(segments)} segments")
    body = pack_ternary(q.reshape(-1))
    if zre:
        body = zre_encode(body)
    prefix = header_prefix(segments, dtype, zre, body.numel())
    prefix_tensor = torch.frombuffer(bytearray(prefix), dtype=torch.uint8).to(q.device)
    # A fresh buffer: a strided view (even of one element) cannot be reinterpreted as bytes.
    scale_bytes = torch.empty(len(segments), dtype=torch.float32, device=q.device).copy_(scales).view(torch.uint8)
    return torch.cat([prefix_tensor, scale_bytes, body])


def encode(
    x: torch.Tensor, sparsity: float = 1.0, segments: Sequence[int] | None = None
) -> torch.Tensor:
    """Quantize, pack and zero-run encode ``x`` into one uint8 payload on ``x``'s device.

    ``segments`` (lengths of consecutive slices of the flattened ``x``) gives each
    slice its own scale: a DDP bucket holds many layers, and one scale for all of them
    would round the small layers to zero.
    """
    q, scale = quantize(x, sparsity, segments)
    return encode_quantized(q, scale, segments, x.dtype)


def negative_scales(scales: torch.Tensor) -> torch.Tensor:
    """Where a scale is invalid: below zero, or -0.0 (NaN and +inf mark a non-finite input and pass)."""
    return (scales < 0) | ((scales == 0) & torch.signbit(scales))


def _as_payload(payload) -> torch.Tensor:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        data = bytearray(payload)
        return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
        raise DecodeError(f"a payload is a uint8 tensor or bytes; got {type(payload).__name__}"
                          + (f" of {payload.dtype}" if isinstance(payload, torch.Tensor) else ""))
    return payload.reshape(-1)


def read_header(payload) -> Header:
    """Parse and check everything but the body. Allocates nothing beyond the header."""
    payload = _as_payload(payload)
    return parse_header(payload[:HEADER_SIZE].cpu().numpy().tobytes(), payload.numel(),
                        lambda count: payload[HEADER_SIZE : HEADER_SIZE + 8 * count].cpu().numpy().tobytes())


def parse_header(head: bytes, size: int, table: Callable[[int], bytes]) -> Header:
    """The checks of ``read_header`` on the first bytes of a payload of ``size`` bytes.

    ``table(S)`` returns the 8*S bytes of segment lengths after the header; it is only
    called once the header has been found consistent with ``size``.
    """
    if size < HEADER_SIZE:
        raise DecodeError(f"payload of {size} bytes is truncated: the header alone is {HEADER_SIZE}")
    magic, version, dtype_code, flags, reserved, numel, body_length, num_segments, reserved2 = \
        HEADER.unpack(head[:HEADER_SIZE])
    if magic != MAGIC:
        raise DecodeError(f"not a 3LC payload: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise DecodeError(f"payload has wire-format version {version}; this threelc reads version {VERSION}")
    if dtype_code not in CODE_DTYPES:
        raise DecodeError(f"unknown dtype code {dtype_code}")
    if flags & ~KNOWN_FLAGS or reserved or reserved2:
        raise DecodeError(f"unknown flags {flags:#x} or non-zero reserved bytes")
    if num_segments < 1:
        raise DecodeError("payload declares no segments")
    expected = payload_size(num_segments, body_length)
    if size != expected:
        raise DecodeError(f"payload is {size} bytes but its header describes {expected} "
                          f"({num_segments} segments, body of {body_length} bytes)")
    packed = packed_length(numel)
    zre = bool(flags & FLAG_ZRE)
    fits = body_length <= packed <= MAX_EXPANSION * body_length if zre else body_length == packed
    if not fits:
        raise DecodeError(f"a body of {body_length} bytes cannot hold {numel} values")
    segments = [int(n) for n in np.frombuffer(table(num_segments), dtype="<u8")]
    if sum(segments) != numel:
        raise DecodeError(f"segment lengths sum to {sum(segments)}, the header says numel={numel}")
    return Header(CODE_DTYPES[dtype_code], numel, zre, segments,
                  HEADER_SIZE + SEGMENT_ENTRY_SIZE * num_segments, body_length)


def segment_scales(payload: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` float32 scales of a payload known to hold ``count`` segments (a codec
    decoded it), read on the payload's device without parsing the header again."""
    start = HEADER_SIZE + 8 * count  # after the header and the u64 segment lengths
    return payload[start:start + 4 * count].clone().view(torch.float32)


def decode_quantized(payload) -> tuple[torch.Tensor, torch.Tensor, Header]:
    """``(q, scales, header)`` of a payload; raises ``DecodeError`` if it is not valid."""
    payload = _as_payload(payload)
    header = read_header(payload)
    scales = segment_scales(payload, len(header.segments))
    if bool(negative_scales(scales).any()):
        raise DecodeError("payload holds a negative scale")
    body = payload[header.body_offset:]
    packed = zre_decode(body, packed_length(header.numel)) if header.zre else body
    return unpack(packed, header.numel), scales, header


def decode(payload) -> torch.Tensor:
    """Decode a payload to a 1-D tensor of its original dtype, on the payload's device."""
    q, scales, header = decode_quantized(payload)
    return dequantize(q, scales, header.segments, header.dtype)
