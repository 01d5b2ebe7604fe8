"""The Triton codec against the pure-PyTorch one, bit for bit (run by tests/test_triton.py).

Runs under ``TRITON_INTERPRET=1 THREELC_BACKEND=triton`` on CPU tensors, or on CUDA
(``THREELC_TEST_DEVICE=cuda``, launch/gpu_check.sh). The cases are those of
tests/test_native.py at sizes the interpreter gets through in a minute or two: every
kernel boundary that matters here is the 1024-element chunk and byte block, the
five-part packing, zero runs across blocks and the 14-group run limit.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

import threelc
from threelc.backends import TORCH, Layout, codec_for
from threelc.lanes import pack_lanes
from threelc.quantize import scales_from_absmax
from test_bounded_scale import check_rule
from test_native import (CAP_FRACTIONS, SENTINEL, SPARSITY_EDGES, cases, check_residual_stays_in_its_layout,
                         layout_positions, mutated, same, same_encoded, scale_cap, scattered_layouts, server_layouts)

DEVICE = torch.device(os.environ.get("THREELC_TEST_DEVICE", "cpu"))
CODEC = codec_for(DEVICE)
# No shrinking: through the interpreter it takes many minutes; the failing example is
# reported as drawn.
SETTINGS = dict(max_examples=int(os.environ.get("THREELC_TRITON_EXAMPLES", "12")), deadline=None,
                phases=(Phase.explicit, Phase.reuse, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
small_cases = cases(max_numel=2500)


def on(t):
    return None if t is None else t.to(DEVICE)


def test_the_codec_under_test_is_in_use():
    """triton (the default here), or torch on CUDA when launch/gpu_check.sh holds the reference to itself."""
    expected = os.environ.get("THREELC_BACKEND", "triton")
    assert CODEC.name == expected and threelc.backend(DEVICE) == expected


def encode_both(x, residual, layout, sparsity, **options):
    a = TORCH.encode(x, residual, layout, sparsity, **options)
    b = CODEC.encode(on(x), on(residual), layout, sparsity, **(options | {"scale_cap": on(options.get("scale_cap"))}))
    return a, b._replace(payload=b.payload.cpu(), scales=b.scales.cpu(), residual=on_cpu(b.residual), room=None)


def on_cpu(t):
    return None if t is None else t.cpu()


@pytest.mark.parametrize("bounded", [True, False])
@settings(**SETTINGS)
@given(small_cases, st.booleans(), st.booleans(), CAP_FRACTIONS)
def test_encode_is_bit_identical(bounded, case, feedback, zre, cap_fraction):
    x, residual, layout, sparsity = case
    cap = scale_cap(x, residual, layout, cap_fraction)
    a, b = encode_both(x, residual, layout, sparsity, feedback=feedback, zre=zre, bounded=bounded, scale_cap=cap)
    assert same_encoded(a, b)


def test_the_bounded_rule_on_a_hand_vector():
    check_rule(CODEC, DEVICE)


def decode_both(payloads, layout, average=True):
    a, b = torch.full((layout.extent(),), 7.0), torch.full((layout.extent(),), -7.0, device=DEVICE)
    TORCH.decode(payloads, layout, a, average=average)
    CODEC.decode([on(p) for p in payloads], layout, b, average=average)
    return a, b.cpu()


@settings(**SETTINGS)
@given(small_cases, st.integers(1, 4), st.booleans(), st.booleans(), st.integers(0, 1000))
def test_decode_sum_is_bit_identical(case, count, average, zre, seed):
    x, residual, layout, sparsity = case
    own = TORCH.encode(x, residual, layout, sparsity, zre=zre)
    if not own.finite:
        return
    generator = torch.Generator().manual_seed(seed)
    payloads = [own.payload] + [TORCH.encode(torch.randn(layout.numel, generator=generator).to(x.dtype), None, layout,
                                             sparsity, zre=zre).payload for _ in range(count - 1)]
    a, b = decode_both(payloads if average else payloads[:1], layout, average)
    assert same(a, b)


@pytest.mark.parametrize("bounded", [True, False])
@settings(**SETTINGS)
@given(small_cases, st.integers(1, 40), st.integers(0, 1000))
def test_lanes_are_bit_identical(bounded, case, world, seed):
    x, residual, layout, sparsity = case
    absmax = TORCH.absmax(x, residual, layout, bounded=bounded)
    assert same(absmax, CODEC.absmax(on(x), on(residual), layout, bounded=bounded).cpu())
    scales = scales_from_absmax(absmax, sparsity)
    if not bool(torch.isfinite(scales).all()):
        return
    a = TORCH.encode_lanes(x, residual, layout, scales, world)
    b = CODEC.encode_lanes(on(x), on(residual), layout, on(scales), world)
    assert same(a[0], b[0].cpu()) and same(a[1], on_cpu(b[1])) and a[2] == b[2]
    generator = torch.Generator().manual_seed(seed)
    summed = a[0].clone()
    for _ in range(world - 1):
        summed += pack_lanes(torch.randint(-1, 2, (layout.numel,), generator=generator, dtype=torch.int8), world)
    out_a, out_b = torch.zeros(layout.numel), torch.ones(layout.numel, device=DEVICE)
    TORCH.decode_lanes(summed, layout, scales, world, out_a)
    CODEC.decode_lanes(on(summed), layout, on(scales), world, out_b)
    assert same(out_a, out_b.cpu())


@pytest.mark.parametrize("segments", [[0], [1], [4, 5, 6], [1024, 1, 1025], [3000, 0, 7]])
@pytest.mark.parametrize("zre", [True, False])
def test_edges_of_chunks_blocks_and_runs(segments, zre):
    """Long zero runs (all-zero segments) across byte blocks, -0.0, and every residual path."""
    generator = torch.Generator().manual_seed(sum(segments))
    layout = Layout(segments)
    x = torch.randn(layout.numel, generator=generator)
    x[: segments[0]] = -0.0
    residual = torch.randn(layout.numel, generator=generator) * 0.1
    for sparsity in (SPARSITY_EDGES[0], SPARSITY_EDGES[-1]):
        for r in (None, residual):
            a, b = encode_both(x, r, layout, sparsity, zre=zre)
            assert same_encoded(a, b)
            assert same(*decode_both([a.payload], layout, average=False))
            assert same(*decode_both([a.payload, a.payload], layout))


def test_scattered_layouts_as_the_sharded_transport_cuts_them():
    generator = torch.Generator().manual_seed(3)
    x, residual = torch.randn(900, generator=generator), torch.randn(900, generator=generator) * 0.1
    out_a, out_b = torch.zeros(900), torch.zeros(900, device=DEVICE)
    residual_a, residual_b = torch.zeros(900), torch.zeros(900, device=DEVICE)
    for layout in (Layout([100, 200], [0, 500]), Layout([400, 200], [100, 700])):
        a = TORCH.encode(x, residual, layout, 1.5, residual_out=residual_a)
        b = CODEC.encode(on(x), on(residual), layout, 1.5, residual_out=residual_b)
        assert same(a.payload, b.payload.cpu())
        TORCH.decode([a.payload], layout, out_a, average=False)
        CODEC.decode([b.payload], layout, out_b, average=False)
    assert same(out_a, out_b.cpu()) and same(residual_a, residual_b.cpu())


@pytest.mark.parametrize("block", [0, 33])
def test_residual_out_is_written_only_at_the_layout_positions(block):
    """As tests/test_native.py: positions of ``residual_out`` outside the layout keep their
    values, and one buffer given to every server's encode ends up with each server's residual."""
    generator = torch.Generator().manual_seed(11 + block)
    numel, segments = 2600, [1100, 5, 0, 1495]  # chunks of 1024 cross segment and layout edges
    x, residual = torch.randn(numel, generator=generator), torch.randn(numel, generator=generator) * 0.1
    for r in (None, residual):
        for layout in scattered_layouts(numel):
            check_residual_stays_in_its_layout(CODEC, x, r, layout.in_blocks(block), 1.9, DEVICE)
        shared, merged = torch.full((numel,), SENTINEL, device=DEVICE), torch.full((numel,), SENTINEL)
        for layout in server_layouts(segments, 3):
            layout = layout.in_blocks(block)
            expected = check_residual_stays_in_its_layout(CODEC, x, r, layout, 1.9, DEVICE, shared=shared)
            merged[layout_positions(layout)] = expected[layout_positions(layout)]
        assert not bool((merged == SENTINEL).any()) and same(shared.cpu(), merged)
    check_residual_stays_in_its_layout(CODEC, x.bfloat16(), residual, server_layouts(segments, 3)[1], 1.9, DEVICE)


def test_non_finite_input_sends_nothing_and_keeps_the_residual_buffer():
    x = torch.randn(100)
    x[50] = float("nan")
    kept = torch.full((100,), 3.0, device=DEVICE)
    a = TORCH.encode(x, None, Layout([40, 60]), 1.0)
    b = CODEC.encode(on(x), None, Layout([40, 60]), 1.0, residual_out=kept)
    assert not b.finite and b.payload.numel() == 0 and b.residual is None and b.zeros == 0
    assert same(a.scales, b.scales.cpu()) and bool((kept == 3.0).all())


def outcome(codec, payload: bytes, layout: Layout, device):
    out = torch.zeros(layout.numel, device=device)
    tensor = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
    try:
        codec.decode([tensor.to(device)], layout, out, average=False)
    except threelc.DecodeError:
        return "DecodeError"
    return out.cpu()


@pytest.mark.parametrize("seed", range(2))
def test_hostile_payloads_decode_alike_or_raise_decode_error_alike(seed):
    generator = torch.Generator().manual_seed(seed)
    for layout in (Layout([0]), Layout([7]), Layout([130, 0, 44])):
        for zre in (True, False):
            x = torch.randn(layout.numel, generator=generator)
            payload = TORCH.encode(x, None, layout, 1.9, zre=zre).payload.numpy().tobytes()
            for _ in range(15):
                candidate = mutated(payload, generator)
                a, b = outcome(TORCH, candidate, layout, "cpu"), outcome(CODEC, candidate, layout, DEVICE)
                assert (isinstance(a, str) and isinstance(b, str)) or (
                    not isinstance(a, str) and not isinstance(b, str) and same(a, b)), (layout, candidate)


def test_body_faults_the_header_cannot_see_raise_decode_error():
    """A byte above 242, a zero-run body of the wrong expansion, bad padding, a negative scale."""
    layout = Layout([7])
    plain = TORCH.encode(torch.randn(7), None, layout, 1.0, zre=False).payload
    body = plain.numel() - 2
    faults = []
    for at, value in ((body, 250), (body + 1, 242), (plain.numel() - 3, 0x80 | int(plain[plain.numel() - 3]))):
        bad = plain.clone()
        bad[at] = value
        faults.append(bad)
    runs = TORCH.encode(torch.randn(700), None, Layout([700]), 1.0).payload.clone()
    runs[-1] = 250  # now stands for nine zero groups: the body expands past its values
    faults.append(runs)
    for bad, layout in zip(faults, [layout] * 3 + [Layout([700])]):
        assert outcome(TORCH, bad.numpy().tobytes(), layout, "cpu") == "DecodeError"
        assert outcome(CODEC, bad.numpy().tobytes(), layout, DEVICE) == "DecodeError"


def test_hostile_payload_is_rejected_in_bounded_time():
    header = threelc.wire.HEADER.pack(threelc.wire.MAGIC, 1, 1, 1, 0, 10**12, 8, 1, 0)
    hostile = header + (10**12).to_bytes(8, "little") + b"\0\0\x80\x3f" + bytes([255] * 8)
    start = time.perf_counter()
    with pytest.raises(threelc.DecodeError, match="cannot hold"):
        CODEC.decode([torch.frombuffer(bytearray(hostile), dtype=torch.uint8).to(DEVICE)], Layout([10]),
                     torch.zeros(10, device=DEVICE), average=False)
    assert time.perf_counter() - start < 5.0


def test_decode_names_the_payload_that_failed():
    layout = Layout([50])
    good = TORCH.encode(torch.randn(50), None, layout, 1.0).payload
    header_bad, body_bad = good.clone(), TORCH.encode(torch.randn(50), None, layout, 1.0, zre=False).payload.clone()
    header_bad[0] = 0
    body_bad[-1] = 243  # only the device sees this one
    for payloads, index in (([good, good, header_bad], 2), ([good, body_bad, header_bad], 1)):
        with pytest.raises(threelc.DecodeError) as raised:
            CODEC.decode([on(p) for p in payloads], layout, torch.zeros(50, device=DEVICE))
        assert raised.value.payload_index == index


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_subnormals_convert_exactly(dtype):
    tiny = torch.tensor([1.8367e-40, -3e-39, 0.0, -0.0, 1e-42], dtype=torch.float32) if dtype == torch.bfloat16 \
        else torch.tensor([6e-8, -3e-6, 0.0, -0.0, 1e-5])
    x = tiny.to(dtype)
    layout = Layout([1, 4])
    assert same(TORCH.absmax(x, None, layout), CODEC.absmax(on(x), None, layout).cpu())
    a, b = encode_both(x, None, layout, 1.0)
    assert same_encoded(a, b)


def test_scale_blocks():
    """One scale per block (ThreeLCState(scale_block=...)): many short segments, scattered too."""
    generator = torch.Generator().manual_seed(5)
    x, residual = torch.randn(900, generator=generator), torch.randn(900, generator=generator) * 0.1
    a, b = encode_both(x, residual, Layout([700, 3, 197]).in_blocks(64), 1.9)
    assert same_encoded(a, b) and a.scales.numel() == 16
    assert same(*decode_both([a.payload, b.payload], Layout([700, 3, 197]).in_blocks(64)))
    out_a, out_b = torch.zeros(900), torch.zeros(900, device=DEVICE)
    residual_a, residual_b = torch.zeros(900), torch.zeros(900, device=DEVICE)
    for layout in (Layout([100, 200], [0, 500]).in_blocks(33), Layout([400, 200], [100, 700]).in_blocks(33)):
        a = TORCH.encode(x, residual, layout, 1.9, residual_out=residual_a)
        b = CODEC.encode(on(x), on(residual), layout, 1.9, residual_out=residual_b)
        assert same(a.payload, b.payload.cpu()) and same(a.scales, b.scales.cpu())
        TORCH.decode([a.payload], layout, out_a, average=False)
        CODEC.decode([b.payload], layout, out_b, average=False)
    assert same(out_a, out_b.cpu()) and same(residual_a, residual_b.cpu())
