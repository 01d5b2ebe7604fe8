"""segment_absmax against a per-segment loop, bit for bit (a NaN matches any NaN).

segment_absmax takes a vectorised path (one pass over the data) when there are many
short segments and a loop of one aminmax per segment otherwise. The loop below is the
oracle both are held to; the fixtures pin which path the public function took, so the
vectorised one cannot hide behind the loop.
"""

import importlib

import pytest
import torch

from threelc.quantize import segment_absmax

quantize = importlib.import_module("threelc.quantize")  # the module: threelc.quantize is also a function's name

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN_BITS = {torch.float32: [0x7FC00001, -0x00400002, 0x7F800003], torch.float16: [0x7E01, -0x0200, 0x7C03],
            torch.bfloat16: [0x7FC1, -0x0040, 0x7F81]}  # a quiet NaN with a payload, a negative one, a signalling one
INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def oracle(flat: torch.Tensor, segments: list[int]) -> torch.Tensor:
    """One aminmax per segment in the input's dtype, as segment_absmax computed it before it was vectorised."""
    maxima, start = [], 0
    for n in segments:
        if n:
            low, high = torch.aminmax(flat[start:start + n])
            maxima.append(torch.maximum(low.abs(), high.abs()).float())
        else:
            maxima.append(torch.zeros((), dtype=torch.float32))
        start += n
    return torch.stack(maxima)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


def vectorised(flat: torch.Tensor, segments: list[int]) -> torch.Tensor:
    return quantize._segment_absmax_vectorised(flat, torch.tensor(segments, dtype=torch.int64))


def refuse(name):
    def refused(*args):
        raise AssertionError(f"segment_absmax took {name}")
    return refused


@pytest.fixture
def no_loop(monkeypatch):
    monkeypatch.setattr(quantize, "_segment_absmax_loop", refuse("the per-segment loop"))


@pytest.fixture
def no_vectorised(monkeypatch):
    monkeypatch.setattr(quantize, "_segment_absmax_vectorised", refuse("the vectorised path"))


def random_layout(generator: torch.Generator, count: int) -> list[int]:
    """``count`` lengths: a tenth empty, a tenth of one element, a few long, the rest 2..300."""
    kind = torch.randint(0, 20, (count,), generator=generator)
    lengths = torch.randint(2, 301, (count,), generator=generator)
    lengths = torch.where(kind < 2, 0, torch.where(kind < 4, 1, lengths))
    lengths = torch.where(kind == 19, torch.randint(1000, 5000, (count,), generator=generator), lengths)
    return lengths.tolist()


def random_data(generator: torch.Generator, segments: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Normal values, each segment at its own magnitude, so maxima span the dtype's exponents."""
    exponent = {torch.float16: 12.0, torch.bfloat16: 100.0, torch.float32: 100.0}[dtype]
    scale = torch.pow(2.0, torch.empty(len(segments)).uniform_(-exponent, exponent, generator=generator))
    scale = torch.repeat_interleave(scale, torch.tensor(segments, dtype=torch.int64), output_size=sum(segments))
    return (torch.randn(sum(segments), generator=generator) * scale).to(dtype)


def special_segments(dtype: torch.dtype) -> list[torch.Tensor]:
    """Segments of one dtype that hold NaN, infinities, signed zeros, subnormals, extremes."""
    info = torch.finfo(dtype)
    nan, inf = float("nan"), float("inf")
    smallest = info.smallest_normal * info.eps  # the smallest subnormal
    subnormal = info.smallest_normal / 4
    pieces = [
        [nan], [1.0, nan, -2.0], [-3.0, 2.0, nan], [nan, 5.0], [nan, inf], [-inf, nan], [nan, nan],
        [inf], [-inf], [1.0, -inf], [-inf, inf], [inf, 1.0, 2.0], [-2.0, -inf, 3.0],
        [-0.0], [0.0], [0.0, -0.0], [-0.0, 0.0], [-0.0, -0.0, -0.0], [0.0] * 7,
        [smallest], [-smallest], [subnormal, -smallest], [-subnormal, 0.0], [0.0, -0.0, smallest, -0.0],
        [info.max], [-info.max], [info.max, -info.max], [-5.0, 3.0], [3.0, -5.0], [-1.0, 1.0],
        [info.smallest_normal, -subnormal], [-info.smallest_normal, subnormal],
    ]
    segments = [torch.tensor(piece, dtype=torch.float32).to(dtype) for piece in pieces]
    for bits in NAN_BITS[dtype]:  # NaNs with a payload, a sign, or signalling, as raw bits
        raw = torch.tensor([bits], dtype=INT[dtype]).view(dtype)
        seven = torch.tensor([7.0], dtype=dtype)
        segments += [raw, torch.cat([seven, raw]), torch.cat([raw, -seven])]
    long = torch.linspace(-100.0, 50.0, 999).to(dtype)
    segments += [long.clone(), long.clone().index_fill_(0, torch.tensor([500]), nan),
                 long.clone().index_fill_(0, torch.tensor([998]), -inf)]
    return segments


def specials_among_random(generator: torch.Generator, dtype: torch.dtype, count: int = 4000):
    """The special segments, each many times, shuffled between random ones (with empty ones)."""
    specials = special_segments(dtype)
    layout = random_layout(generator, count)
    data = random_data(generator, layout, dtype)
    pieces = list(torch.split(data, layout))
    for i in torch.randperm(count, generator=generator)[: 10 * len(specials)].tolist():
        pieces[i] = specials[i % len(specials)]
    return torch.cat(pieces), [p.numel() for p in pieces]


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_segments(dtype, no_loop):
    generator = torch.Generator().manual_seed(1)
    segments = random_layout(generator, 3000)
    assert 0 in segments and 1 in segments
    flat = random_data(generator, segments, dtype)
    want = oracle(flat, segments)
    assert_same(segment_absmax(flat, segments), want)
    assert_same(vectorised(flat, segments), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values(dtype, no_loop):
    generator = torch.Generator().manual_seed(2)
    flat, segments = specials_among_random(generator, dtype)
    want = oracle(flat, segments)
    assert bool(torch.isnan(want).any()) and bool(torch.isinf(want).any())
    assert_same(segment_absmax(flat, segments), want)
    # Only the special segments, end to end, and each one on its own.
    specials = special_segments(dtype)
    flat, segments = torch.cat(specials), [s.numel() for s in specials]
    assert_same(segment_absmax(flat, segments), oracle(flat, segments))
    for segment in specials:
        assert_same(vectorised(segment, [segment.numel()]), oracle(segment, [segment.numel()]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_and_empty_segments(dtype, no_loop):
    segments = [0, 3, 0, 0, 1, 5, 0] * 500
    flat = torch.zeros(sum(segments), dtype=dtype)
    flat[::3] = -0.0
    got = segment_absmax(flat, segments)
    assert_same(got, oracle(flat, segments))
    assert not bool(got.view(torch.int32).any())  # +0.0 everywhere, never -0.0
    assert_same(segment_absmax(torch.zeros(0, dtype=dtype), [0] * 3000), torch.zeros(3000))


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_segment(dtype, no_vectorised):
    generator = torch.Generator().manual_seed(3)
    flat = random_data(generator, [100_000], dtype)
    flat[70_000] = -float("inf")
    assert_same(segment_absmax(flat, [100_000]), oracle(flat, [100_000]))
    flat[12_345] = float("nan")
    assert_same(segment_absmax(flat, [100_000]), oracle(flat, [100_000]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_segment_vectorised(dtype):
    generator = torch.Generator().manual_seed(4)
    flat = random_data(generator, [100_000], dtype)
    assert_same(vectorised(flat, [100_000]), oracle(flat, [100_000]))
    flat[99_999] = float("nan")
    assert_same(vectorised(flat, [100_000]), oracle(flat, [100_000]))


def test_long_segments_take_the_loop(no_vectorised):
    segments = [quantize._VECTORISED_MEAN_LENGTH] * 3
    flat = torch.randn(sum(segments))
    assert_same(segment_absmax(flat, segments), oracle(flat, segments))


def test_lengths_that_do_not_add_up_take_the_loop(no_vectorised):
    # Not valid input (check_segments rejects it), but the unchecked reduction must never see it.
    flat = torch.randn(100)
    assert_same(segment_absmax(flat, [10, 0, 20]), oracle(flat, [10, 0, 20]))
