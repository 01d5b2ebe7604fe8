"""The Triton kernels of the GPU codec (threelc/triton/codec.py drives them).

Element kernels walk a layout's chunk table: chunk ``c`` is up to ``BLOCK`` elements of
one segment, ``segment[c]``, at payload position ``position[c]`` and tensor offset
``offset[c]``. Byte kernels walk a flat byte stream in blocks of ``BLOCK``; the encode
kernel, which quantizes the five values of each byte, finds their segments by binary
search. Every
floating-point operation is the one the pure-PyTorch reference performs, in the same
order, with IEEE rounding (``tl.div_rn``: Triton's ``/`` on float32 is approximate on
CUDA), so the bits match. Products ``q * scale`` with q in {-1, 0, 1} are exact, so a
compiler contracting ``acc + q * scale`` into a fused multiply-add changes nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..packing import MAX_PACKED, ZERO_GROUP
from ..zre import MAX_RUN, RUN_BASE

BLOCK = 1024
THRESHOLD_STEPS = 64  # the reference's search bound (quantize.round_thresholds)
_RUN_BYTE = RUN_BASE + MAX_RUN  # 255: a full run of MAX_RUN zero groups
_MIN_RUN_BYTE = RUN_BASE + 2


@triton.jit
def _compensated(x_ptr, r_ptr, at, mask, HAS_RESIDUAL: tl.constexpr, BF16_BITS: tl.constexpr):
    if BF16_BITS:  # bfloat16 given as int16 bits: the upper half of a float32, subnormals included
        c = (tl.load(x_ptr + at, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:
        c = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)  # f16 -> f32 is exact
    if HAS_RESIDUAL:
        c = c + tl.load(r_ptr + at, mask=mask, other=0.0)
    return c


@triton.jit
def _chunk(segment_ptr, position_ptr, offset_ptr, count_ptr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    mask = i < tl.load(count_ptr + chunk)
    return (chunk, tl.load(segment_ptr + chunk), tl.load(position_ptr + chunk) + i,
            tl.load(offset_ptr + chunk) + i, mask)


@triton.jit
def absmax_kernel(x_ptr, r_ptr, segment_ptr, position_ptr, offset_ptr, count_ptr, out_ptr, gradient_out_ptr,
                  HAS_RESIDUAL: tl.constexpr, BOUNDED: tl.constexpr, BF16_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Per chunk, the largest bit pattern of |x + r|: non-negative floats order like their
    bits, and every NaN sorts above +inf, so a NaN anywhere makes the maximum a NaN.
    ``BOUNDED`` also stores that of |x| (the bound of the scale), from the same load."""
    chunk, segment, position, at, mask = _chunk(segment_ptr, position_ptr, offset_ptr, count_ptr, BLOCK)
    c = _compensated(x_ptr, r_ptr, at, mask, False, BF16_BITS)
    if BOUNDED:
        bits = tl.where(mask, c.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
        tl.store(gradient_out_ptr + chunk, tl.max(bits, 0))
    if HAS_RESIDUAL:
        c = c + tl.load(r_ptr + at, mask=mask, other=0.0)
    bits = tl.where(mask, c.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
    tl.store(out_ptr + chunk, tl.max(bits, 0))


@triton.jit
def thresholds_kernel(scale_ptr, out_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """quantize.round_thresholds on the device: the same search, step for step.

    An element that is settled stays settled, so running every element for all STEPS
    steps equals the reference's loop, which stops once all are settled.
    """
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    scale = tl.load(scale_ptr + i, mask=mask, other=1.0)
    usable = (scale > 0) & (scale < float("inf"))  # false for NaN
    safe = tl.where(usable, scale, 1.0)
    t = 0.5 * safe
    for _ in range(STEPS):
        bits = t.to(tl.int32, bitcast=True)  # t >= 0 throughout: neighbours are bits -/+ 1
        lower = tl.where(t > 0, (bits - 1).to(tl.float32, bitcast=True), 0.0)
        upper = (bits + 1).to(tl.float32, bitcast=True)
        step_down = (tl.div_rn(lower, safe) > 0.5) & (lower > 0)
        step_up = ~(tl.div_rn(t, safe) > 0.5)
        t = tl.where(step_down, lower, tl.where(step_up, upper, t))
    t = tl.where(usable, t, tl.where(scale == 0, float("inf"), float("nan")))
    tl.store(out_ptr + i, t, mask=mask)


@triton.jit
def quantize_kernel(x_ptr, r_ptr, residual_out_ptr, threshold_ptr, scale_ptr, finite_ptr,
                    segment_ptr, position_ptr, offset_ptr, count_ptr, digits_ptr, zeros_ptr,
                    HAS_RESIDUAL: tl.constexpr, FEEDBACK: tl.constexpr, BF16_BITS: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Compensate, quantize by the thresholds, write digits t = q + 1 in payload order (for
    the lane packing) and the new residual; count ternary zeros per chunk. The residual is written only when
    every scale is finite (``finite_ptr``), so a non-finite bucket keeps the old one
    without the host having to look first."""
    chunk, segment, position, at, mask = _chunk(segment_ptr, position_ptr, offset_ptr, count_ptr, BLOCK)
    c = _compensated(x_ptr, r_ptr, at, mask, HAS_RESIDUAL, BF16_BITS)
    t = tl.load(threshold_ptr + segment)
    q = (c >= t).to(tl.int32) - (c <= -t).to(tl.int32)
    tl.store(digits_ptr + position, (q + 1).to(tl.uint8), mask=mask)
    if FEEDBACK:
        scale = tl.load(scale_ptr + segment)
        keep = tl.load(finite_ptr) != 0
        tl.store(residual_out_ptr + at, c - q.to(tl.float32) * scale, mask=mask & keep)
    tl.store(zeros_ptr + chunk, tl.sum(tl.where(mask & (q == 0), 1, 0), 0))


@triton.jit
def _segment_of(e, starts_ptr, num_segments, SEARCH_STEPS: tl.constexpr):
    """The last segment starting at or before payload position ``e`` (so empty ones are skipped)."""
    lo = tl.zeros(e.shape, tl.int32)
    hi = lo + (num_segments - 1)
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi + 1) // 2
        go = tl.load(starts_ptr + mid) <= e
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return lo


@triton.jit
def quantize_pack_kernel(x_ptr, r_ptr, residual_out_ptr, threshold_ptr, scale_ptr, finite_ptr, starts_ptr,
                         offsets_ptr, num_segments, numel, n5, out_ptr, zeros_ptr, HAS_RESIDUAL: tl.constexpr,
                         FEEDBACK: tl.constexpr, BF16_BITS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Quantize and pack (packing.py) in one pass over bytes: byte j takes the digits of
    payload positions k * n5 + j, k = 0..4, so five contiguous streams are read and the
    digits never go through memory. Each position finds its segment by binary search in
    the (small, cached) table of segment starts."""
    block = tl.program_id(0)
    j = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_body = j < n5
    acc = tl.zeros((BLOCK,), tl.int32)
    zeros = 0
    for k in tl.static_range(5):
        e = k * n5 + j
        mask = in_body & (e < numel)
        segment = _segment_of(e, starts_ptr, num_segments, SEARCH_STEPS)
        at = tl.load(offsets_ptr + segment) + (e - tl.load(starts_ptr + segment))
        c = _compensated(x_ptr, r_ptr, at, mask, HAS_RESIDUAL, BF16_BITS)
        t = tl.load(threshold_ptr + segment)
        q = tl.where(mask, (c >= t).to(tl.int32) - (c <= -t).to(tl.int32), 0)  # padding: q = 0
        if FEEDBACK:
            scale = tl.load(scale_ptr + segment)
            keep = tl.load(finite_ptr) != 0
            tl.store(residual_out_ptr + at, c - q.to(tl.float32) * scale, mask=mask & keep)
        acc = acc * 3 + (q + 1)
        zeros += tl.sum(tl.where(mask & (q == 0), 1, 0), 0)
    tl.store(out_ptr + j, acc.to(tl.uint8), mask=in_body)
    tl.store(zeros_ptr + block, zeros)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _zre_emits(packed_ptr, n, carry_ptr, BLOCK: tl.constexpr):
    """Which bytes of this block the zero-run encoding writes, and what.

    A zero group at index i of its run writes 255 when i % 14 == 13 (a full run), and the
    last one of a run writes its remainder (i % 14 + 1 groups) unless that is zero; any
    other byte is copied. The index in the run comes from a max-scan of the last kept
    byte's position, carried over from earlier blocks by ``carry_ptr``.
    """
    block = tl.program_id(0)
    j = block * BLOCK + tl.arange(0, BLOCK)
    mask = j < n
    byte = tl.load(packed_ptr + j, mask=mask, other=0).to(tl.int32)
    after = tl.load(packed_ptr + j + 1, mask=(j + 1) < n, other=0).to(tl.int32)
    zero = byte == ZERO_GROUP
    kept = tl.where(mask & ~zero, j, -1)
    last_kept = tl.maximum(tl.associative_scan(kept, 0, _max), tl.load(carry_ptr + block))
    phase = (j - last_kept - 1) % MAX_RUN
    full = zero & (phase == MAX_RUN - 1)
    ends = zero & (after != ZERO_GROUP)
    emit = mask & (~zero | full | ends)
    remainder = phase + 1
    value = tl.where(~zero, byte, tl.where(full, _RUN_BYTE, tl.where(remainder == 1, ZERO_GROUP, RUN_BASE + remainder)))
    return block, emit, value


@triton.jit
def zre_last_kept_kernel(packed_ptr, n, out_ptr, BLOCK: tl.constexpr):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    byte = tl.load(packed_ptr + j, mask=j < n, other=ZERO_GROUP)
    tl.store(out_ptr + tl.program_id(0), tl.max(tl.where(byte != ZERO_GROUP, j, -1), 0))


@triton.jit
def zre_count_kernel(packed_ptr, n, carry_ptr, out_ptr, BLOCK: tl.constexpr):
    block, emit, value = _zre_emits(packed_ptr, n, carry_ptr, BLOCK)
    tl.store(out_ptr + block, tl.sum(emit.to(tl.int32), 0))


@triton.jit
def zre_write_kernel(packed_ptr, n, carry_ptr, start_ptr, out_ptr, BLOCK: tl.constexpr):
    block, emit, value = _zre_emits(packed_ptr, n, carry_ptr, BLOCK)
    counts = emit.to(tl.int32)
    at = tl.load(start_ptr + block) + tl.cumsum(counts, 0) - counts
    tl.store(out_ptr + at, value.to(tl.uint8), mask=emit)


@triton.jit
def _expansion(body_ptr, n, flags_ptr, BLOCK: tl.constexpr):
    """How many packed bytes each body byte stands for (zero-run encoded or not: byte 6 of the header)."""
    block = tl.program_id(0)
    b = block * BLOCK + tl.arange(0, BLOCK)
    mask = b < n
    byte = tl.load(body_ptr + b, mask=mask, other=0).to(tl.int32)
    runs = ((tl.load(flags_ptr) & 1) != 0) & (byte >= _MIN_RUN_BYTE)
    counts = tl.where(mask, tl.where(runs, byte - RUN_BASE, 1), 0)
    return block, counts, tl.where(runs, ZERO_GROUP, byte)


@triton.jit
def expand_count_kernel(body_ptr, n, flags_ptr, out_ptr, BLOCK: tl.constexpr):
    block, counts, value = _expansion(body_ptr, n, flags_ptr, BLOCK)
    tl.store(out_ptr + block, tl.sum(counts, 0))


@triton.jit
def expand_write_kernel(body_ptr, n, flags_ptr, start_ptr, out_ptr, n5, over_ptr, BLOCK: tl.constexpr):
    """Write the packed bytes (never past n5: a hostile body's total is checked by the
    caller) and flag a byte above 242 in a body that is not zero-run encoded."""
    block, counts, value = _expansion(body_ptr, n, flags_ptr, BLOCK)
    start = tl.load(start_ptr + block) + tl.cumsum(counts, 0) - counts
    for r in tl.static_range(MAX_RUN):
        at = start + r
        tl.store(out_ptr + at, value.to(tl.uint8), mask=(r < counts) & (at < n5))
    tl.store(over_ptr + block, (tl.max(tl.where(counts > 0, value, 0), 0) > MAX_PACKED).to(tl.int8))


@triton.jit
def accumulate_kernel(packed_ptr, scale_ptr, segment_ptr, position_ptr, offset_ptr, count_ptr, out_ptr,
                      n5, num_segments, NUM_PAYLOADS: tl.constexpr, AVERAGE: tl.constexpr, BLOCK: tl.constexpr):
    """out = (0 + d_0 + ... + d_{N-1}) / N in rank order, d_n = q_n * scale_n (or d_0 alone)."""
    chunk, segment, position, at, mask = _chunk(segment_ptr, position_ptr, offset_ptr, count_ptr, BLOCK)
    part = position // n5
    j = position - part * n5
    power = tl.where(part == 0, 81, tl.where(part == 1, 27, tl.where(part == 2, 9, tl.where(part == 3, 3, 1))))
    if AVERAGE:
        acc = tl.zeros((BLOCK,), tl.float32)
        row = j  # int64: p * n5 in int32 could overflow for many payloads
        for p in range(NUM_PAYLOADS):  # a constant: one compilation per world size
            byte = tl.load(packed_ptr + row, mask=mask, other=0).to(tl.int32)
            row += n5
            q = (byte // power) % 3 - 1
            acc = acc + q.to(tl.float32) * tl.load(scale_ptr + p * num_segments + segment)
        acc = tl.div_rn(acc, tl.zeros((BLOCK,), tl.float32) + NUM_PAYLOADS)  # N is exact in float32
    else:
        byte = tl.load(packed_ptr + j, mask=mask, other=0).to(tl.int32)
        acc = ((byte // power) % 3 - 1).to(tl.float32) * tl.load(scale_ptr + segment)
    tl.store(out_ptr + at, acc, mask=mask)


@triton.jit
def lanes_pack_kernel(digits_ptr, out_ptr, words, LANES: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """word[w] = sum over lanes k of t[k * words + w] << (BITS * k) (lanes.py)."""
    w = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = w < words
    acc = tl.zeros((BLOCK,), tl.int64)
    for k in tl.static_range(LANES):
        acc += tl.load(digits_ptr + k * words + w, mask=mask, other=0).to(tl.int64) << (BITS * k)
    tl.store(out_ptr + w, acc, mask=mask)


@triton.jit
def lanes_decode_kernel(words_ptr, scale_ptr, segment_ptr, position_ptr, offset_ptr, count_ptr, out_ptr,
                        words, world_size, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """out = (lane sum - N) * scale / N, the lane of element e being word e % words, lane e // words."""
    chunk, segment, position, at, mask = _chunk(segment_ptr, position_ptr, offset_ptr, count_ptr, BLOCK)
    lane = position // words
    word = tl.load(words_ptr + (position - lane * words), mask=mask, other=0)
    total = ((word >> (lane * BITS).to(tl.int64)) & ((1 << BITS) - 1)).to(tl.int32) - world_size
    value = total.to(tl.float32) * tl.load(scale_ptr + segment)
    tl.store(out_ptr + at, tl.div_rn(value, tl.zeros((BLOCK,), tl.float32) + world_size), mask=mask)
