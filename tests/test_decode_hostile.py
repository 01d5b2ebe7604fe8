"""decode() of truncated, corrupted and hostile payloads: only DecodeError escapes."""

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import threelc
from threelc.wire import HEADER, MAGIC


def payload_of(x, sparsity=1.5, segments=None):
    return threelc.encode(x, sparsity, segments)


def header_bytes(version=1, dtype=1, flags=1, numel=10, body=2, segments=1):
    return HEADER.pack(MAGIC, version, dtype, flags, 0, numel, body, segments, 0)


def test_twenty_bytes_claiming_a_trillion_elements():
    hostile = header_bytes(numel=10**12, body=4)[:20]
    with pytest.raises(threelc.DecodeError, match="truncated"):
        threelc.decode(hostile)


def test_small_body_claiming_a_trillion_elements_is_rejected_before_allocating():
    body = bytes([255] * 8)
    hostile = header_bytes(numel=10**12, body=len(body)) + struct.pack("<Qf", 10**12, 1.0) + body
    with pytest.raises(threelc.DecodeError, match="cannot hold"):
        threelc.decode(hostile)


def test_huge_segment_count_is_rejected():
    hostile = header_bytes(segments=2**32 - 1) + b"\0" * 40
    with pytest.raises(threelc.DecodeError, match="describes"):
        threelc.decode(hostile)


@pytest.mark.parametrize("field,value,message", [
    (slice(0, 4), b"XLC\x00", "magic"),
    (slice(4, 5), b"\x02", "version 2"),
    (slice(5, 6), b"\x09", "dtype"),
    (slice(6, 7), b"\x80", "flags"),
])
def test_header_fields_are_checked(field, value, message):
    payload = bytearray(payload_of(torch.randn(50)).numpy().tobytes())
    payload[field] = value
    with pytest.raises(threelc.DecodeError, match=message):
        threelc.decode(bytes(payload))


def test_truncated_and_extended_payloads():
    payload = payload_of(torch.randn(300)).numpy().tobytes()
    for cut in (0, 1, 31, 32, 43, len(payload) - 1):
        with pytest.raises(threelc.DecodeError):
            threelc.decode(payload[:cut])
    with pytest.raises(threelc.DecodeError):
        threelc.decode(payload + b"\0")


def test_wrong_segment_sum_negative_scale_and_bad_run_length():
    x = torch.randn(100)
    good = bytearray(payload_of(x, segments=[60, 40]).numpy().tobytes())
    bad = bytearray(good)
    bad[32:40] = struct.pack("<Q", 61)
    with pytest.raises(threelc.DecodeError, match="sum"):
        threelc.decode(bytes(bad))
    bad = bytearray(good)
    bad[48:52] = struct.pack("<f", -1.0)
    with pytest.raises(threelc.DecodeError, match="negative"):
        threelc.decode(bytes(bad))
    zeros = bytearray(payload_of(torch.zeros(140)).numpy().tobytes())  # body: two 255 bytes
    zeros[-1] = 254
    with pytest.raises(threelc.DecodeError, match="expands"):
        threelc.decode(bytes(zeros))


def test_wrong_input_types():
    with pytest.raises(threelc.DecodeError):
        threelc.decode(torch.zeros(40, dtype=torch.float32))
    with pytest.raises(threelc.DecodeError):
        threelc.decode("not a payload")


SEEDS = [payload_of(torch.randn(n) * 3, s).numpy().tobytes()
         for n, s in [(0, 1.0), (7, 1.0), (123, 1.9), (1000, 1.5)]]
SEEDS.append(payload_of(torch.randn(200), 1.2, segments=[50, 0, 150]).numpy().tobytes())


def decode_or_decode_error(data):
    try:
        out = threelc.decode(data)
    except threelc.DecodeError:
        return None
    assert out.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    decode_or_decode_error(data)
    decode_or_decode_error(MAGIC + b"\x01" + data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
       st.integers(-3, 3))
def test_fuzz_mutated_payloads(seed, edits, length_change):
    data = bytearray(seed)
    for position, value in edits:
        if data:
            data[position % len(data)] = value
    if length_change < 0:
        data = data[:length_change]
    else:
        data += bytes(length_change)
    decode_or_decode_error(bytes(data))
