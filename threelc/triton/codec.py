"""``TritonCodec``: the codec interface (threelc.backends) on the Triton kernels of kernels.py.

Host synchronisation, the point of this backend: each operation launches its kernels
and reads back to the host only what the interface returns as a host value.

* ``encode``: one device-to-host copy of [body length, finite, zeros]. The body
  length is data-dependent (zero-run encoding) and the exchange of variable-length
  payloads needs it on the host to size the all-gather; ``finite`` and ``zeros``
  ride in the same copy.
* ``decode``: one copy of every payload's header and segment table together with the
  device's validity flags, because a bad payload must raise ``DecodeError`` (naming
  the first bad one) before ``out`` is written.
* ``encode_lanes``: one copy of the zero count (the interface returns it as an int).
* ``absmax`` and ``decode_lanes``: none.

Thresholds, scales and the finiteness flag that gates the residual store never leave
the device.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from ..interface import Codec, Encoded, payload_error
from ..errors import ConfigurationError, DecodeError
from ..lanes import lane_bits, lanes_per_word, word_count
from ..packing import TRITS_PER_BYTE, packed_length
from ..quantize import BAD_SCALE_CAP, _check_input, cap_scales, check_scale_cap, invalid_scale_cap, scales_from_absmax
from ..wire import HEADER_SIZE, SEGMENT_ENTRY_SIZE, header_prefix, negative_scales, parse_header
from . import kernels as K

_BLOCK = K.BLOCK
_MAX_POSITIONS = 2**31 - 1  # the byte kernels index bodies and digit positions k * n5 + j in int32


def _blocks(n: int) -> int:
    return triton.cdiv(n, _BLOCK)


@functools.lru_cache(maxsize=256)
def _chunk_table(layout, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(segment, payload position, tensor offset, count) per chunk of up to BLOCK elements, on ``device``."""
    segment, position, offset, count = [], [], [], []
    at = 0
    for s, (n, o) in enumerate(zip(layout.segments, layout.offsets)):
        for start in range(0, n, _BLOCK):
            segment.append(s)
            position.append(at + start)
            offset.append(o + start)
            count.append(min(_BLOCK, n - start))
        at += n
    return (torch.tensor(segment, dtype=torch.int32).to(device), torch.tensor(position, dtype=torch.int64).to(device),
            torch.tensor(offset, dtype=torch.int64).to(device), torch.tensor(count, dtype=torch.int32).to(device))


def _exclusive_cumsum(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exclusive prefix sums, total) of per-block counts, on the device, in int64: a
    hostile body's expansion (up to 14 bytes a byte) must not wrap around to a valid size."""
    inclusive = torch.cumsum(values, 0, dtype=torch.int64)
    return inclusive - values, inclusive[-1]


@functools.lru_cache(maxsize=256)
def _prefix(layout, dtype: torch.dtype, zre: bool, device: torch.device) -> torch.Tensor:
    """The header and segment table on ``device``, built once (the body length is written per payload)."""
    n5 = packed_length(layout.numel)
    return torch.frombuffer(bytearray(header_prefix(layout.segments, dtype, zre, 0 if zre else n5)),
                            dtype=torch.uint8).to(device)


@functools.lru_cache(maxsize=256)
def _segment_table(layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 payload starts and tensor offsets of the segments, on ``device``."""
    starts = [0]
    for n in layout.segments[:-1]:
        starts.append(starts[-1] + n)
    return (torch.tensor(starts, dtype=torch.int64).to(device),
            torch.tensor(layout.offsets, dtype=torch.int64).to(device))


def _elements(x: torch.Tensor) -> torch.Tensor:
    """What the element kernels load: bfloat16 as its int16 bits (kernels._compensated)."""
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x


class TritonCodec(Codec):
    """The Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

    name = "triton"

    @staticmethod
    def _check(x: torch.Tensor, layout, what: str = "input") -> None:
        if x.device.type != "cuda" and not (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            raise ConfigurationError(f"the triton codec takes CUDA tensors (CPU ones under TRITON_INTERPRET=1); "
                                     f"the {what} is on {x.device}")
        if not x.is_contiguous():
            raise ConfigurationError(f"the triton codec takes contiguous tensors; the {what} is not")
        if x.numel() < layout.extent():
            raise ConfigurationError(f"the {what} holds {x.numel()} elements; its layout reaches {layout.extent()}")
        if TRITS_PER_BYTE * packed_length(layout.numel) > _MAX_POSITIONS:
            raise ConfigurationError(f"a layout of {layout.numel} elements is too large for one triton payload")

    def _absmax(self, x, residual, layout, table, bounded) -> torch.Tensor:
        chunks = table[0].numel()
        bounded = bounded and residual is not None  # without a residual max|x + r| is max|x|
        maxima = torch.zeros(len(layout.segments), dtype=torch.int32, device=x.device)
        if chunks:
            per_chunk = torch.empty(chunks, dtype=torch.int32, device=x.device)
            gradient = torch.empty(chunks, dtype=torch.int32, device=x.device) if bounded else per_chunk
            K.absmax_kernel[(chunks,)](_elements(x), x if residual is None else residual, *table, per_chunk, gradient,
                                       HAS_RESIDUAL=residual is not None, BOUNDED=bounded,
                                       BF16_BITS=x.dtype == torch.bfloat16, BLOCK=_BLOCK)
            maxima.scatter_reduce_(0, table[0].long(), per_chunk, "amax")
            if bounded:
                bound = torch.zeros_like(maxima).scatter_reduce_(0, table[0].long(), gradient, "amax")
                # quantize.bounded_absmax on the bits: the smaller where both are finite
                # (below the bits of +inf), else the larger, so NaN/inf still poison the scale.
                finite = (maxima < 0x7F800000) & (bound < 0x7F800000)
                maxima = torch.where(finite, torch.minimum(maxima, bound), torch.maximum(maxima, bound))
        return maxima.view(torch.float32)

    @staticmethod
    def _thresholds(scales: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(scales)
        K.thresholds_kernel[(_blocks(scales.numel()),)](scales, out, scales.numel(), BLOCK=_BLOCK,
                                                        STEPS=K.THRESHOLD_STEPS)
        return out

    def _quantize(self, x, residual, residual_out, layout, table, scales, finite, digits) -> torch.Tensor:
        """Digits into ``digits`` (payload order); returns the zero count as a device scalar."""
        chunks = table[0].numel()
        if not chunks:
            return torch.zeros((), dtype=torch.int64, device=x.device)
        zeros = torch.empty(chunks, dtype=torch.int32, device=x.device)
        K.quantize_kernel[(chunks,)](_elements(x), x if residual is None else residual,
                                     x if residual_out is None else residual_out, self._thresholds(scales), scales,
                                     finite, *table, digits, zeros, HAS_RESIDUAL=residual is not None,
                                     FEEDBACK=residual_out is not None, BF16_BITS=x.dtype == torch.bfloat16,
                                     BLOCK=_BLOCK)
        return zeros.sum(dtype=torch.int64)

    @staticmethod
    def _digits(count: int, numel: int, device) -> torch.Tensor:
        digits = torch.empty(count, dtype=torch.uint8, device=device)
        digits[numel:] = 1  # padding: q = 0
        return digits

    @staticmethod
    def _zre(packed: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
        """Zero-run encode ``packed`` into ``body`` (as long or longer); returns the length on the device."""
        n = packed.numel()
        if not n:
            return torch.zeros((), dtype=torch.int64, device=packed.device)
        blocks = _blocks(n)
        last_kept = torch.empty(blocks, dtype=torch.int32, device=packed.device)
        K.zre_last_kept_kernel[(blocks,)](packed, n, last_kept, BLOCK=_BLOCK)
        # carry[b]: the last kept byte before block b (-1: none), a max-scan over blocks.
        carry = torch.cat([last_kept.new_full((1,), -1), torch.cummax(last_kept, 0).values[:-1]])
        emitted = torch.empty(blocks, dtype=torch.int32, device=packed.device)
        K.zre_count_kernel[(blocks,)](packed, n, carry, emitted, BLOCK=_BLOCK)
        starts, total = _exclusive_cumsum(emitted)
        K.zre_write_kernel[(blocks,)](packed, n, carry, starts, body, BLOCK=_BLOCK)
        return total

    def encode(self, x, residual, layout, sparsity, *, dtype=None, feedback=True, residual_out=None, zre=True,
               bounded=True, scale_cap=None):
        x, residual, residual_out = self._prepare(x, residual, layout, feedback, residual_out)
        device, count, numel = x.device, len(layout.segments), layout.numel
        scale_cap = check_scale_cap(scale_cap, count, device, values=False)  # values: in the read-back below
        table = _chunk_table(layout, device)
        scales = cap_scales(scales_from_absmax(self._absmax(x, residual, layout, table, bounded), sparsity), scale_cap)
        finite = torch.isfinite(scales).all().to(torch.int32)
        n5 = packed_length(numel)

        prefix = _prefix(layout, dtype or x.dtype, zre, device)
        body_offset = prefix.numel() + 4 * count
        buffer = torch.empty(body_offset + n5, dtype=torch.uint8, device=device)
        buffer[:prefix.numel()].copy_(prefix)
        buffer[prefix.numel():body_offset].copy_(scales.view(torch.uint8))
        body = buffer[body_offset:]
        packed = torch.empty(n5, dtype=torch.uint8, device=device) if zre else body
        zeros = torch.zeros((), dtype=torch.int64, device=device)
        if n5:
            per_block = torch.empty(_blocks(n5), dtype=torch.int32, device=device)
            starts, offsets = _segment_table(layout, device)
            K.quantize_pack_kernel[(_blocks(n5),)](
                _elements(x), x if residual is None else residual, x if residual_out is None else residual_out,
                self._thresholds(scales), scales, finite, starts, offsets, count, numel, n5, packed, per_block,
                HAS_RESIDUAL=residual is not None, FEEDBACK=residual_out is not None,
                BF16_BITS=x.dtype == torch.bfloat16, SEARCH_STEPS=max(1, (count - 1).bit_length()), BLOCK=_BLOCK)
            zeros = per_block.sum(dtype=torch.int64)
        if zre:
            length = self._zre(packed, body).to(torch.int64)
            buffer[16:24].view(torch.int64).copy_(length.reshape(1))  # the header's body length (wire.py)
        else:
            length = torch.full((), n5, dtype=torch.int64, device=device)
        # The one sync: the exchange needs the payload's size on the host.
        read = [length, finite.to(torch.int64), zeros]
        if scale_cap is not None:
            read.append(invalid_scale_cap(scale_cap).to(torch.int64))
        body_length, is_finite, zero_count, *cap_rejected = torch.stack(read).cpu().tolist()
        if any(cap_rejected):
            raise ConfigurationError(BAD_SCALE_CAP)
        if not is_finite:
            return Encoded(buffer[:0], scales, None, False, 0)
        return Encoded(buffer[:body_offset + body_length], scales, residual_out, True, zero_count, buffer)

    def _expand(self, body: torch.Tensor, flags: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """Expand one body into ``packed``; returns a device bool: the body is invalid."""
        n, n5 = body.numel(), packed.numel()
        if not n:
            return torch.full((), n5 != 0, dtype=torch.bool, device=body.device)
        blocks = _blocks(n)
        totals = torch.empty(blocks, dtype=torch.int32, device=body.device)
        K.expand_count_kernel[(blocks,)](body, n, flags, totals, BLOCK=_BLOCK)
        starts, total = _exclusive_cumsum(totals)
        over = torch.empty(blocks, dtype=torch.int8, device=body.device)
        K.expand_write_kernel[(blocks,)](body, n, flags, starts, packed, n5, over, BLOCK=_BLOCK)
        return (total != n5) | over.any()

    def decode(self, payloads, layout, out, *, average=True):
        self._check_decode(payloads, layout, out, average)
        device, count, numel = out.device, len(layout.segments), layout.numel
        n5 = packed_length(numel)
        prefix_size, body_offset = HEADER_SIZE + 8 * count, HEADER_SIZE + SEGMENT_ENTRY_SIZE * count
        views = []
        for index, payload in enumerate(payloads):
            if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
                raise payload_error(index, f"a payload is a uint8 tensor; got {type(payload).__name__}")
            views.append(payload.reshape(-1).to(device).contiguous())

        # Device checks run on every payload as if its header matched the layout (the host
        # checks the headers below), bounded by the payload's real size, never its claims.
        packed = torch.empty((len(views), n5), dtype=torch.uint8, device=device)
        scales = torch.zeros((len(views), count), dtype=torch.float32, device=device)
        bad = torch.zeros(len(views), dtype=torch.bool, device=device)
        padding = [(k, e - k * n5) for e in range(numel, TRITS_PER_BYTE * n5) for k in [e // n5]]
        for index, view in enumerate(views):
            if not body_offset <= view.numel() <= body_offset + n5:
                continue  # no body of this layout is shorter than 0 or longer than n5: the host rejects it
            scales[index].view(torch.uint8).copy_(view[prefix_size:body_offset])
            flags = view[6:7].to(torch.int32)
            bad[index] = negative_scales(scales[index]).any() | self._expand(view[body_offset:], flags, packed[index])
        for k, j in padding:  # digits after the last value must be q = 0 (t = 1)
            bad |= torch.div(packed[:, j], 3 ** (TRITS_PER_BYTE - 1 - k), rounding_mode="floor") % 3 != 1

        # The one sync: headers and the device's verdicts in one copy.
        heads = [view[:min(view.numel(), prefix_size)] for view in views]
        host = torch.cat(heads + [bad.to(torch.uint8)]).cpu().numpy().tobytes()
        at, verdicts = 0, host[-len(views):]
        for index, (view, head) in enumerate(zip(views, heads)):
            data, at = host[at:at + head.numel()], at + head.numel()
            try:
                header = parse_header(data, view.numel(), lambda s, data=data: data[HEADER_SIZE:HEADER_SIZE + 8 * s]
                                      if s == count else b"")
            except DecodeError as error:
                raise payload_error(index, error) from error
            if header.segments != list(layout.segments):
                raise payload_error(index, f"describes {header.numel} elements in {len(header.segments)} "
                                            f"segments; expected {numel} in {count}")
            if verdicts[index]:
                raise payload_error(index, "payload holds a negative scale, a byte above 242, a zero-run body "
                                            "that does not expand to its values, or padding that is not q = 0")
        table = _chunk_table(layout, device)
        if table[0].numel():
            K.accumulate_kernel[(table[0].numel(),)](packed, scales, *table, out, n5, count,
                                                     NUM_PAYLOADS=len(views), AVERAGE=average, BLOCK=_BLOCK)
        return out

    def absmax(self, x, residual, layout, *, bounded=True):
        _check_input(x)
        x = x.reshape(-1)
        self._check(x, layout)
        return self._absmax(x, self._residual(residual, x), layout, _chunk_table(layout, x.device), bounded).clone()

    def encode_lanes(self, x, residual, layout, scales, world_size, *, feedback=True, residual_out=None):
        x, residual, residual_out = self._prepare(x, residual, layout, feedback, residual_out)
        device = x.device
        scales = scales.to(device, torch.float32).contiguous()
        lanes, bits, words = lanes_per_word(world_size), lane_bits(world_size), word_count(layout.numel, world_size)
        digits = self._digits(lanes * words, layout.numel, device)
        always = torch.ones((), dtype=torch.int32, device=device)  # the scales were agreed finite
        zeros = self._quantize(x, residual, residual_out, layout, _chunk_table(layout, device), scales, always,
                               digits)
        out = torch.empty(words, dtype=torch.int64, device=device)
        if words:
            K.lanes_pack_kernel[(_blocks(words),)](digits, out, words, LANES=lanes, BITS=bits, BLOCK=_BLOCK)
        return out, residual_out, int(zeros)  # the sync: the interface returns the count as an int

    def decode_lanes(self, words, layout, scales, world_size, out):
        self._check(out, layout, "output")
        if words.dtype != torch.int64 or words.numel() != word_count(layout.numel, world_size):
            raise ConfigurationError(f"{words.numel()} words cannot hold {layout.numel} lanes for world size {world_size}")
        words, scales = words.contiguous(), scales.to(out.device, torch.float32).contiguous()
        table = _chunk_table(layout, out.device)
        if table[0].numel():
            K.lanes_decode_kernel[(table[0].numel(),)](words, scales, *table, out, words.numel(), world_size,
                                                       BITS=lane_bits(world_size), BLOCK=_BLOCK)
        return out
