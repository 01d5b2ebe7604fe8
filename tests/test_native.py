"""The native codec against the pure-PyTorch one, bit for bit, and the backend switch.

Every operation of ``threelc.backends`` runs on both backends with the same inputs;
payload bytes, scales, residuals, zero counts and decoded floats must be identical
(NaN compared by position). Sizes cross every boundary of the kernels: empty, 1, the
five-part packing (4, 5, 6), the 64-byte zero-run scan, the 8192-byte block, and the
2^18-element threshold above which the kernels use several threads.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import threelc
from threelc import backends
from threelc.backends import NATIVE, TORCH, Layout
from threelc.quantize import scales_from_absmax

pytestmark = pytest.mark.skipif(NATIVE is None, reason="threelc's native codec is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPARSITY_EDGES = [1.0, math.nextafter(1.0, 2.0), 1.5, 1.75, 1.9, math.nextafter(2.0, 1.0)]
SETTINGS = dict(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Equal dtype, shape and bits; any NaN matches any NaN at the same position."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        if not torch.equal(nan_a, nan_b):
            return False
        a, b = a[~nan_a], b[~nan_b]
        bits = torch.int16 if a.element_size() == 2 else torch.int32
        return torch.equal(a.view(bits), b.view(bits))
    return torch.equal(a, b)


def same_encoded(a, b) -> bool:
    return (same(a.payload, b.payload) and same(a.scales, b.scales) and same(a.residual, b.residual)
            and a.finite == b.finite and a.zeros == b.zeros)


@st.composite
def cases(draw, max_numel=3000):
    segments = draw(st.lists(st.one_of(st.sampled_from([0, 1, 4, 5, 6, 7, 64, 65]), st.integers(0, max_numel),
                                      st.integers(0, 120_000)), min_size=1, max_size=6))
    numel = sum(segments)
    dtype = draw(st.sampled_from(DTYPES))
    magnitude = draw(st.sampled_from([1.0, 1e-3, 1e-20, 1e-40, 1e30, 0.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(numel, generator=generator) * magnitude
    if numel and draw(st.booleans()):  # all-zero segments and exact zeros
        x[: segments[0]] = 0
    if numel and draw(st.integers(0, 9)) == 0:
        x[draw(st.integers(0, numel - 1))] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    residual = None
    if draw(st.booleans()):
        # 10 and 1e3: a residual far above the gradient, where the bounded scale differs.
        residual = torch.randn(numel, generator=generator) * draw(st.sampled_from([0.1, 10.0, 1e3, 1e-38, 1e-44]))
        if numel and draw(st.integers(0, 9)) == 0:  # a non-finite residual must poison the bounded scale too
            residual[draw(st.integers(0, numel - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
    sparsity = draw(st.one_of(st.sampled_from(SPARSITY_EDGES), st.floats(1.0, 1.999)))
    return x.to(dtype), residual, Layout(segments), sparsity


def peer_payloads(layout, dtype, sparsity, count, seed):
    generator = torch.Generator().manual_seed(seed)
    return [TORCH.encode(torch.randn(layout.numel, generator=generator).to(dtype), None, layout, sparsity).payload
            for _ in range(count)]


# Scale caps as fractions of each segment's absmax (None: no cap; 0: nothing sent).
CAP_FRACTIONS = st.sampled_from([None, None, 0.0, 0.3, 0.7, 1.2, 3.0])


def scale_cap(x, residual, layout, fraction):
    """One cap per segment, ``fraction`` x its absmax (non-finite maxima get cap 1)."""
    if fraction is None:
        return None
    absmax = TORCH.absmax(x, residual, layout)
    return torch.where(torch.isfinite(absmax), absmax, 1.0).float() * fraction


@pytest.mark.parametrize("bounded", [True, False])
@settings(**SETTINGS)
@given(cases(), st.booleans(), st.booleans(), CAP_FRACTIONS)
def test_encode_is_bit_identical(bounded, case, feedback, zre, cap_fraction):
    x, residual, layout, sparsity = case
    cap = scale_cap(x, residual, layout, cap_fraction)
    a = TORCH.encode(x, residual, layout, sparsity, feedback=feedback, zre=zre, bounded=bounded, scale_cap=cap)
    b = NATIVE.encode(x, residual, layout, sparsity, feedback=feedback, zre=zre, bounded=bounded, scale_cap=cap)
    assert same_encoded(a, b)


@settings(**SETTINGS)
@given(cases(), st.integers(1, 4), st.booleans(), st.integers(0, 1000))
def test_decode_sum_is_bit_identical(case, count, average, seed):
    x, residual, layout, sparsity = case
    own = TORCH.encode(x, residual, layout, sparsity)
    if not own.finite:
        return
    payloads = [own.payload] + peer_payloads(layout, x.dtype, sparsity, count - 1, seed)
    if not average:
        payloads = payloads[:1]
    a, b = torch.full((layout.numel,), 7.0), torch.full((layout.numel,), -7.0)
    TORCH.decode(payloads, layout, a, average=average)
    NATIVE.decode(payloads, layout, b, average=average)
    assert same(a, b)


@pytest.mark.parametrize("bounded", [True, False])
@settings(**SETTINGS)
@given(cases(), st.integers(1, 40), st.integers(0, 1000))
def test_lanes_are_bit_identical(bounded, case, world, seed):
    x, residual, layout, sparsity = case
    absmax = TORCH.absmax(x, residual, layout, bounded=bounded)
    assert same(absmax, NATIVE.absmax(x, residual, layout, bounded=bounded))
    scales = scales_from_absmax(absmax, sparsity)
    if not bool(torch.isfinite(scales).all()):
        return
    a = TORCH.encode_lanes(x, residual, layout, scales, world)
    b = NATIVE.encode_lanes(x, residual, layout, scales, world)
    assert same(a[0], b[0]) and same(a[1], b[1]) and a[2] == b[2]
    # Sums of `world` ranks' words, as the integer all-reduce makes them.
    generator = torch.Generator().manual_seed(seed)
    summed = a[0].clone()
    for _ in range(world - 1):
        q = torch.randint(-1, 2, (layout.numel,), generator=generator, dtype=torch.int8)
        summed += threelc.lanes.pack_lanes(q, world)
    out_a, out_b = torch.zeros(layout.numel), torch.ones(layout.numel)
    TORCH.decode_lanes(summed, layout, scales, world, out_a)
    NATIVE.decode_lanes(summed, layout, scales, world, out_b)
    assert same(out_a, out_b)


def server_layouts(segments: list[int], world: int) -> list[Layout]:
    """Per server j, its piece of every tensor in the bucket, as the sharded transport cuts them."""
    pieces = [[n // world + (j < n % world) for j in range(world)] for n in segments]
    starts, position = [], 0
    for row in pieces:
        starts.append([position + sum(row[:j]) for j in range(world)])
        position += sum(row)
    return [Layout([row[j] for row in pieces], [s[j] for s in starts]) for j in range(world)]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 400), min_size=1, max_size=5), st.integers(2, 4), st.integers(0, 1000))
def test_scattered_layouts_as_the_sharded_transport_cuts_them(segments, world, seed):
    """Each server's pieces of every tensor, read from and written to their places in the bucket."""
    generator = torch.Generator().manual_seed(seed)
    numel = sum(segments)
    x, residual = torch.randn(numel, generator=generator), torch.randn(numel, generator=generator) * 0.1
    out_a, out_b = torch.zeros(numel), torch.zeros(numel)
    residual_a, residual_b = torch.zeros(numel), torch.zeros(numel)
    for layout in server_layouts(segments, world):
        a = TORCH.encode(x, residual, layout, 1.5, residual_out=residual_a)
        b = NATIVE.encode(x, residual, layout, 1.5, residual_out=residual_b)
        assert same_encoded(a, b)
        TORCH.decode([a.payload], layout, out_a, average=False)
        NATIVE.decode([b.payload], layout, out_b, average=False)
    assert same(out_a, out_b)


SENTINEL = 12345.0


def layout_positions(layout: Layout) -> torch.Tensor:
    """The tensor positions ``layout`` reads and writes, in payload order."""
    return torch.cat([torch.arange(o, o + n) for o, n in zip(layout.offsets, layout.segments)])


def check_residual_stays_in_its_layout(codec, x, residual, layout, sparsity, device=torch.device("cpu"),
                                       shared=None) -> torch.Tensor:
    """``encode`` and ``encode_lanes`` write the new residual at ``layout``'s positions of
    ``residual_out`` and leave every other position as it was (Codec.encode).

    The reference is the PyTorch codec on the layout's elements gathered end to end: inside
    the layout the buffer must hold its residual bit for bit, outside it still SENTINEL.
    ``shared``: also encode into this buffer (one for all servers, as the sharded transport
    passes it); returns the expected buffer of this layout alone.
    """
    inside = layout_positions(layout)
    reference = TORCH.encode(x[inside], None if residual is None else residual[inside], Layout(layout.segments),
                             sparsity)
    assert reference.finite
    expected = torch.full((x.numel(),), SENTINEL)
    expected[inside] = reference.residual
    on = (lambda t: None if t is None else t.to(device))
    buffer = torch.full((x.numel(),), SENTINEL, device=device)
    encoded = codec.encode(on(x), on(residual), layout, sparsity, residual_out=buffer)
    assert encoded.residual is buffer and same(encoded.payload.cpu(), reference.payload)
    assert same(buffer.cpu(), expected), f"{codec.name}: residual_out outside {layout} was written"
    buffer.fill_(SENTINEL)
    _, new, _ = codec.encode_lanes(on(x), on(residual), layout, on(reference.scales), 3, residual_out=buffer)
    assert new is buffer and same(buffer.cpu(), expected), f"{codec.name}: encode_lanes wrote outside {layout}"
    if shared is not None:
        codec.encode(on(x), on(residual), layout, sparsity, residual_out=shared)
    return expected


def scattered_layouts(numel: int) -> list[Layout]:
    """Layouts that leave positions of a ``numel``-element tensor out: gaps, an empty segment,
    a tail, payload order unlike tensor order, a contiguous run that does not start at 0."""
    third = numel // 3
    return [Layout([5, 0, third, 3], [2, 10, 20, numel - 10]), Layout([3, third], [numel - 4, 1]),
            Layout([numel - 7]), Layout([third, 9], [4, 4 + third])]


@pytest.mark.parametrize("block", [0, 7])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["torch", "native"])
def test_residual_out_is_written_only_at_the_layout_positions(name, dtype, block):
    """Positions of ``residual_out`` outside the layout keep their values; one buffer given to
    every server's encode (the sharded transport) ends up with each server's residual."""
    codec = {"torch": TORCH, "native": NATIVE}[name]
    generator = torch.Generator().manual_seed(block)
    numel, segments = 1200, [300, 5, 0, 895]
    x = torch.randn(numel, generator=generator).to(dtype)
    residual = torch.randn(numel, generator=generator) * 0.1
    for r in (None, residual):
        for layout in scattered_layouts(numel):
            check_residual_stays_in_its_layout(codec, x, r, layout.in_blocks(block), 1.9)
        shared = torch.full((numel,), SENTINEL)
        merged = torch.full((numel,), SENTINEL)
        for layout in server_layouts(segments, 3):
            layout = layout.in_blocks(block)
            expected = check_residual_stays_in_its_layout(codec, x, r, layout, 1.9, shared=shared)
            merged[layout_positions(layout)] = expected[layout_positions(layout)]
        assert not bool((merged == SENTINEL).any()) and same(shared, merged)


@pytest.mark.parametrize("bounded", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("numel,sparsity", [(300_001, 1.0), (1_000_003, 1.9), (2**18, 1.5)])
def test_large_tensors_on_every_thread_count(numel, sparsity, threads, bounded):
    """Above 2^18 elements the kernels split work between threads; the bytes must not change."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(numel)
        segments = [numel // 3, 0, numel - numel // 3 - 7, 7]
        layout = Layout(segments)
        x, residual = torch.randn(numel, generator=generator), torch.randn(numel, generator=generator) * 0.2
        residual[: numel // 3] *= 50  # the first segment's residual dwarfs its gradient: the bound applies
        a = TORCH.encode(x, residual, layout, sparsity, bounded=bounded)
        b = NATIVE.encode(x, residual, layout, sparsity, bounded=bounded)
        assert same_encoded(a, b)
        payloads = [a.payload] + peer_payloads(layout, torch.float32, sparsity, 2, numel)
        out_a, out_b = torch.zeros(numel), torch.zeros(numel)
        TORCH.decode(payloads, layout, out_a)
        NATIVE.decode(payloads, layout, out_b)
        assert same(out_a, out_b)
        for world in (2, 5):
            absmax = NATIVE.absmax(x, residual, layout, bounded=bounded)
            assert same(absmax, TORCH.absmax(x, residual, layout, bounded=bounded))
            scales = scales_from_absmax(absmax, sparsity)
            wa, wb = (c.encode_lanes(x, residual, layout, scales, world) for c in (TORCH, NATIVE))
            assert same(wa[0], wb[0]) and same(wa[1], wb[1]) and wa[2] == wb[2]
            TORCH.decode_lanes(wa[0], layout, scales, world, out_a)
            NATIVE.decode_lanes(wa[0], layout, scales, world, out_b)
            assert same(out_a, out_b)
    finally:
        torch.set_num_threads(before)


def test_non_finite_input_sends_nothing_and_keeps_no_residual():
    x = torch.randn(100)
    x[50] = float("nan")
    for codec in (TORCH, NATIVE):
        encoded = codec.encode(x, None, Layout([40, 60]), 1.0)
        assert not encoded.finite and encoded.payload.numel() == 0 and encoded.residual is None
    assert same(TORCH.encode(x, None, Layout([40, 60]), 1.0).scales, NATIVE.encode(x, None, Layout([40, 60]), 1.0).scales)


def mutated(payload: bytes, generator: torch.Generator) -> bytes:
    data = bytearray(payload)
    for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
        if data:
            data[int(torch.randint(0, len(data), (1,), generator=generator))] = int(
                torch.randint(0, 256, (1,), generator=generator))
    cut = int(torch.randint(-3, 3, (1,), generator=generator))
    return bytes(data[:cut] if cut < 0 else data + bytes(cut))


def outcome(codec, payload: bytes, layout: Layout):
    out = torch.zeros(layout.numel)
    tensor = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
    try:
        codec.decode([tensor], layout, out, average=False)
    except threelc.DecodeError:
        return "DecodeError"
    return out


@pytest.mark.parametrize("seed", range(6))
def test_hostile_payloads_decode_alike_or_raise_decode_error_alike(seed):
    """Corrupted payloads: both decoders raise DecodeError, or both return the same floats."""
    generator = torch.Generator().manual_seed(seed)
    layouts = [Layout([0]), Layout([7]), Layout([130, 0, 44]), Layout([1000])]
    for layout in layouts:
        for sparsity in (1.0, 1.9):
            for zre in (True, False):
                x = torch.randn(layout.numel, generator=generator)
                payload = TORCH.encode(x, None, layout, sparsity, zre=zre).payload.numpy().tobytes()
                for _ in range(60):
                    candidate = mutated(payload, generator)
                    a, b = outcome(TORCH, candidate, layout), outcome(NATIVE, candidate, layout)
                    assert (isinstance(a, str) and isinstance(b, str)) or (
                        not isinstance(a, str) and not isinstance(b, str) and same(a, b)), (layout, candidate)


def test_hostile_payload_is_rejected_in_bounded_time():
    """A short body claiming a trillion values is refused from the header alone."""
    header = threelc.wire.HEADER.pack(threelc.wire.MAGIC, 1, 1, 1, 0, 10**12, 8, 1, 0)
    hostile = header + (10**12).to_bytes(8, "little") + b"\0\0\x80\x3f" + bytes([255] * 8)
    start = time.perf_counter()
    with pytest.raises(threelc.DecodeError, match="cannot hold"):
        NATIVE.decode([torch.frombuffer(bytearray(hostile), dtype=torch.uint8)], Layout([10]), torch.zeros(10),
                      average=False)
    assert time.perf_counter() - start < 1.0


def test_decode_names_the_payload_that_failed():
    layout = Layout([50])
    good = TORCH.encode(torch.randn(50), None, layout, 1.0).payload
    bad = good.clone()
    bad[0] = 0
    for codec in (TORCH, NATIVE):
        with pytest.raises(threelc.DecodeError) as raised:
            codec.decode([good, good, bad], layout, torch.zeros(50))
        assert raised.value.payload_index == 2


def test_backend_switch(monkeypatch):
    monkeypatch.setenv("THREELC_BACKEND", "torch")
    assert threelc.backend() == "torch"
    monkeypatch.setenv("THREELC_BACKEND", "native")
    assert threelc.backend() == "native"
    assert threelc.backend("meta") == "torch"  # no kernel for that device: the pure path
    monkeypatch.setenv("THREELC_BACKEND", "fastest")
    with pytest.raises(threelc.ConfigurationError, match="THREELC_BACKEND"):
        threelc.backend()
    monkeypatch.setattr(backends, "NATIVE", None)
    monkeypatch.setenv("THREELC_BACKEND", "native")
    with pytest.raises(threelc.ConfigurationError, match="not built"):
        threelc.backend()
    monkeypatch.setenv("THREELC_BACKEND", "auto")
    assert threelc.backend() == "torch"


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="CI builds the native codec; a developer may not")
def test_ci_built_the_native_codec():
    assert threelc.backend() == "native"


def test_native_rejects_what_it_cannot_take():
    layout = Layout([10])
    with pytest.raises(threelc.ConfigurationError):
        NATIVE.encode(torch.randn(20)[::2], None, layout, 1.0)  # not contiguous
    with pytest.raises(threelc.ConfigurationError):
        NATIVE.encode(torch.randn(5), None, layout, 1.0)  # shorter than its layout
    with pytest.raises(threelc.ConfigurationError):
        NATIVE.encode(torch.randn(10), torch.randn(10).double(), layout, 1.0)
    with pytest.raises(threelc.ConfigurationError):
        NATIVE.decode([TORCH.encode(torch.randn(10), None, layout, 1.0).payload], layout, torch.zeros(10).half())


@pytest.mark.parametrize("block", [1, 256, 1000])
def test_many_scale_blocks(block):
    """One scale per block: thousands of segments in one payload, bit-identical on both backends."""
    generator = torch.Generator().manual_seed(block)
    layout = Layout([300_001, 5, 0, 20_000]).in_blocks(block) if block > 1 else Layout([3001, 5]).in_blocks(1)
    x = torch.randn(layout.numel, generator=generator) * torch.rand(layout.numel, generator=generator) ** 4
    residual = torch.randn(layout.numel, generator=generator) * 0.05
    a = TORCH.encode(x, residual, layout, 1.9)
    b = NATIVE.encode(x, residual, layout, 1.9)
    assert same_encoded(a, b) and a.scales.numel() == len(layout.segments)
    out_a, out_b = torch.zeros(layout.numel), torch.ones(layout.numel)
    TORCH.decode([a.payload, b.payload], layout, out_a)
    NATIVE.decode([a.payload, b.payload], layout, out_b)
    assert same(out_a, out_b)
    with pytest.raises(threelc.DecodeError, match="segments"):  # a peer that cut no blocks is refused
        NATIVE.decode([NATIVE.encode(x, residual, Layout([layout.numel]), 1.9).payload], layout, out_b)
