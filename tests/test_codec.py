"""The codec against docs/algorithm.md: hand-computed vectors, round trips, edge cases."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import threelc
from threelc.packing import ZERO_GROUP

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def identical(a, b):
    """Bit-for-bit equality that treats NaN as equal to NaN."""
    return a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def ternary(values):
    return torch.tensor(values, dtype=torch.int8)


# ---------------------------------------------------------------- quantize

def test_quantize_hand_vector():
    x = torch.tensor([4.0, -4.0, 2.0, 2.1, -2.1, 1.9, 0.0])
    q, scale = threelc.quantize(x, sparsity=1.0)
    assert scale.dtype == torch.float32 and scale.dim() == 0 and scale.item() == 4.0
    # 2.0 / 4 = 0.5 rounds half to even -> 0; 2.1 / 4 -> 1
    assert q.tolist() == [1, -1, 0, 1, -1, 0, 0]
    assert q.dtype == torch.int8 and q.shape == x.shape


def test_quantize_sparsity_scales_and_sparsifies():
    x = torch.tensor([10.0, 6.0, 9.6, -9.0])
    q, scale = threelc.quantize(x, sparsity=1.9)
    assert scale.item() == pytest.approx(19.0)
    assert q.tolist() == [1, 0, 1, 0]  # 9.6 / 19 > 0.5 > 9 / 19


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_zero_gives_scale_zero_and_no_nan(dtype):
    x = torch.zeros(17, dtype=dtype)
    q, scale = threelc.quantize(x, 1.5)
    assert scale.item() == 0.0 and not q.any()
    decoded = threelc.decode(threelc.encode(x, 1.5))
    assert decoded.dtype == dtype and not decoded.isnan().any() and not decoded.any()


@pytest.mark.parametrize("bad", [0.99, 2.0, 2.5, -1.0, float("nan")])
def test_sparsity_out_of_range_is_a_value_error(bad):
    with pytest.raises(ValueError, match=r"\[1.0, 2.0\)"):
        threelc.quantize(torch.ones(3), bad)
    with pytest.raises(threelc.ConfigurationError):
        threelc.ErrorFeedback(bad)


def test_unsupported_dtype_is_rejected():
    with pytest.raises(threelc.ConfigurationError, match="float32"):
        threelc.quantize(torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_the_formula(dtype):
    torch.manual_seed(0)
    x = torch.randn(1000).to(dtype)
    for s in (1.0, 1.3, 1.9):
        q, scale = threelc.quantize(x, s)
        expected_scale = x.float().abs().max() * torch.tensor(s, dtype=torch.float32)
        assert scale.item() == expected_scale.item()
        assert torch.equal(q, torch.round(x.float() / expected_scale).to(torch.int8))


def test_segments_give_one_scale_each_and_keep_small_layers():
    big, small = torch.full((100,), 100.0), torch.full((7,), 0.01)
    x = torch.cat([big, small])
    q_one, _ = threelc.quantize(x)
    assert not q_one[100:].any()  # one scale rounds the small layer away
    q, scales = threelc.quantize(x, segments=[100, 7])
    assert scales.tolist() == pytest.approx([100.0, 0.01])
    assert q.all()
    assert torch.equal(threelc.decode(threelc.encode(x, segments=[100, 7])), threelc.dequantize(q, scales, [100, 7]))


def test_segments_must_cover_the_tensor():
    with pytest.raises(ValueError, match="sum"):
        threelc.quantize(torch.ones(10), segments=[3, 3])


def test_empty_segment_is_allowed():
    x = torch.tensor([1.0, -2.0, 3.0])
    q, scales = threelc.quantize(x, segments=[0, 2, 0, 1])
    assert scales.tolist() == [0.0, 2.0, 0.0, 3.0]
    assert torch.equal(threelc.decode(threelc.encode(x, segments=[0, 2, 0, 1])), threelc.dequantize(q, scales, [0, 2, 0, 1]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_decodes_to_nan_in_its_segment_only(bad):
    x = torch.tensor([1.0, bad, 2.0, 4.0, -4.0])
    q, scales = threelc.quantize(x, segments=[2, 3])
    assert not q[:2].any() and not math.isfinite(scales[0].item())
    decoded = threelc.decode(threelc.encode(x, segments=[2, 3]))
    assert decoded[:2].isnan().all()
    assert decoded[2:].tolist() == [0.0, 4.0, -4.0]


def test_huge_finite_values_do_not_overflow_the_scale():
    x = torch.tensor([3.0e38, -1.0e38, 1.0])
    q, scale = threelc.quantize(x, 1.9)
    assert math.isfinite(scale.item()) and q.tolist() == [1, 0, 0]


# ---------------------------------------------------------------- pack

def test_pack_hand_vector():
    # numel 7 -> padded to 10 with t = 1; parts are contiguous halves of length 2
    q = ternary([1, -1, 0, 1, 1, -1, 0])
    # t = [2,0,1,2,2,0,1,1,1,1]; p0=[2,0] p1=[1,2] p2=[2,0] p3=[1,1] p4=[1,1]
    expected = [81 * 2 + 27 * 1 + 9 * 2 + 3 * 1 + 1, 81 * 0 + 27 * 2 + 9 * 0 + 3 * 1 + 1]
    packed = threelc.pack(q)
    assert packed.dtype == torch.uint8 and packed.tolist() == expected
    assert torch.equal(threelc.unpack(packed, 7), q)


def test_pack_zero_group_is_121_and_lengths():
    assert threelc.pack(torch.zeros(10, dtype=torch.int8)).tolist() == [ZERO_GROUP, ZERO_GROUP]
    assert threelc.pack(ternary([-1] * 5)).tolist() == [0]
    assert threelc.pack(ternary([1] * 5)).tolist() == [242]
    for n in range(0, 13):
        assert threelc.pack(torch.zeros(n, dtype=torch.int8)).numel() == -(-n // 5)
    assert threelc.pack(torch.zeros(0, dtype=torch.int8)).numel() == 0
    assert threelc.unpack(torch.zeros(0, dtype=torch.uint8), 0).numel() == 0


def test_pack_rejects_non_ternary():
    with pytest.raises(ValueError):
        threelc.pack(ternary([0, 2]))
    with pytest.raises(ValueError):
        threelc.pack(torch.zeros(3))


def test_unpack_rejects_bad_input():
    with pytest.raises(threelc.DecodeError, match="above 242"):
        threelc.unpack(torch.tensor([243], dtype=torch.uint8), 5)
    with pytest.raises(threelc.DecodeError, match="cannot hold"):
        threelc.unpack(torch.tensor([1, 2], dtype=torch.uint8), 5)
    with pytest.raises(threelc.DecodeError, match="padding"):
        threelc.unpack(torch.tensor([0], dtype=torch.uint8), 3)  # padding trits would be -1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-1, 1), max_size=300))
def test_pack_round_trip(values):
    q = ternary(values)
    assert torch.equal(threelc.unpack(threelc.pack(q), len(values)), q)


def test_pack_round_trip_2d():
    q = torch.randint(-1, 2, (7, 13), dtype=torch.int8)
    assert torch.equal(threelc.unpack(threelc.pack(q), q.numel()).view(7, 13), q)


# ---------------------------------------------------------------- zero-run encoding

def zeros_run(k):
    return [ZERO_GROUP] * k


@pytest.mark.parametrize("k,expected", [
    (1, [121]), (2, [243]), (13, [254]), (14, [255]), (15, [255, 121]),
    (16, [255, 243]), (28, [255, 255]), (29, [255, 255, 121]), (30, [255, 255, 243]),
])
def test_zre_hand_vectors(k, expected):
    stream = torch.tensor([7] + zeros_run(k) + [242], dtype=torch.uint8)
    encoded = threelc.zre_encode(stream)
    assert encoded.tolist() == [7] + expected + [242]
    assert torch.equal(threelc.zre_decode(encoded), stream)
    alone = threelc.zre_encode(torch.tensor(zeros_run(k), dtype=torch.uint8))
    assert alone.tolist() == expected


def test_zre_several_runs_and_empty():
    stream = torch.tensor(zeros_run(3) + [5] + zeros_run(1) + [6, 0] + zeros_run(14), dtype=torch.uint8)
    assert threelc.zre_encode(stream).tolist() == [244, 5, 121, 6, 0, 255]
    assert threelc.zre_encode(torch.zeros(0, dtype=torch.uint8)).numel() == 0
    assert threelc.zre_decode(torch.zeros(0, dtype=torch.uint8)).numel() == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.just(ZERO_GROUP), st.integers(0, 242)), max_size=400))
def test_zre_round_trip(values):
    stream = torch.tensor(values, dtype=torch.uint8)
    encoded = threelc.zre_encode(stream)
    assert encoded.numel() <= stream.numel()
    assert torch.equal(threelc.zre_decode(encoded), stream)


def test_zre_decode_checks_expected_length():
    with pytest.raises(threelc.DecodeError, match="expands to 14"):
        threelc.zre_decode(torch.tensor([255], dtype=torch.uint8), expected_length=13)


# ---------------------------------------------------------------- encode / decode

floats = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(floats, max_size=200), st.sampled_from([1.0, 1.25, 1.5, 1.9, 1.999]),
       st.sampled_from(DTYPES))
def test_decode_encode_equals_dequantize_quantize(values, sparsity, dtype):
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    q, scale = threelc.quantize(x, sparsity)
    decoded = threelc.decode(threelc.encode(x, sparsity))
    assert decoded.dtype == dtype
    assert identical(decoded, threelc.dequantize(q, scale, dtype=dtype))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.data())
def test_segmented_round_trip(segments, data):
    values = data.draw(st.lists(floats, min_size=sum(segments), max_size=sum(segments)))
    x = torch.tensor(values, dtype=torch.float32)
    q, scales = threelc.quantize(x, 1.5, segments)
    assert torch.equal(threelc.decode(threelc.encode(x, 1.5, segments)), threelc.dequantize(q, scales, segments))


def test_header_fields():
    x = torch.randn(1000, dtype=torch.bfloat16)
    payload = threelc.encode(x, 1.9, segments=[600, 400])
    header = threelc.read_header(payload)
    assert header.dtype == torch.bfloat16 and header.numel == 1000 and header.zre
    assert header.segments == [600, 400]
    assert payload[:4].tolist() == list(b"3LC\x00") and payload[4].item() == 1
    assert payload.numel() == 32 + 12 * 2 + header.body_length


def test_dense_data_costs_1_6_bits_and_zero_runs_cost_far_less():
    torch.manual_seed(0)
    n = 100_000
    dense = threelc.encode(torch.rand(n) * 2 - 1, 1.0).numel()  # half the values non-zero
    assert n / 5 < dense <= n / 5 + 64  # 5 values a byte, almost no all-zero groups to elide
    sparse_input = torch.zeros(n)
    sparse_input[torch.randperm(n)[: n // 100]] = torch.randn(n // 100)
    sparse = threelc.encode(sparse_input, 1.0).numel()
    assert sparse < dense / 8  # at most 1% of groups are non-zero: runs collapse 14 to 1


def test_encode_accepts_any_shape_and_decode_bytes():
    x = torch.randn(3, 4, 5)
    payload = threelc.encode(x)
    assert torch.equal(threelc.decode(bytes(payload.numpy())), threelc.decode(payload))
    assert threelc.decode(payload).shape == (60,)


def test_whole_payload_matches_docs_example():
    """The worked example in docs/wire-format.md, byte for byte."""
    payload = bytes(threelc.encode(torch.tensor([1.0, -1.0, 0.0])).numpy())
    assert payload.hex() == (
        "334c4300" "01010100" "0300000000000000" "0100000000000000" "01000000" "00000000"
        "0300000000000000" "0000803f" "af"
    )


def _division_reference(x, scale):
    return torch.round(x.float() / scale).to(torch.int8)


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=1.401298464324817e-45, max_value=3.3999999521443642e+38, width=32), st.data())
def test_threshold_quantizer_equals_round_of_division(scale_value, data):
    """Comparisons against the rounding thresholds give exactly round(x / scale)."""
    scale = torch.tensor(scale_value, dtype=torch.float32)
    from threelc.quantize import quantize_with_scales, round_thresholds
    t = round_thresholds(scale.reshape(1))[0]
    near = [t, torch.nextafter(t, torch.tensor(0.0)), torch.nextafter(t, torch.tensor(float("inf"))), scale * 0.5, scale]
    extra = data.draw(st.lists(st.floats(0, 1, width=32), max_size=20))
    x = torch.stack([v.reshape(()) for v in near] + [scale * v for v in torch.tensor(extra, dtype=torch.float32)])
    x = torch.cat([x, -x]).clamp(-scale, scale)
    assert torch.equal(quantize_with_scales(x, scale.reshape(1), [x.numel()]), _division_reference(x, scale))


@pytest.mark.parametrize("scale", [1e-45, 3e-45, 1.1754942e-38, 1.0, 0.1, 3.3e38])
def test_threshold_quantizer_at_extreme_scales(scale):
    from threelc.quantize import quantize_with_scales
    scale = torch.tensor(scale, dtype=torch.float32)
    x = torch.linspace(-1, 1, 2001) * scale
    x = torch.cat([x, torch.nextafter(x, torch.zeros(())), torch.nextafter(x, x.sign() * float("inf"))]).clamp(-scale, scale)
    assert torch.equal(quantize_with_scales(x, scale.reshape(1), [x.numel()]), _division_reference(x, scale))


def test_layout_in_blocks_cuts_every_segment_at_its_own_offset():
    from threelc.backends import Layout

    layout = Layout([5, 0, 3], [10, 0, 2])
    blocked = layout.in_blocks(2)
    assert blocked.segments == (2, 2, 1, 0, 2, 1) and blocked.offsets == (10, 12, 14, 0, 2, 4)
    assert blocked.numel == layout.numel and layout.in_blocks(0) is layout
    assert Layout([4]).in_blocks(4) == Layout([4]) and Layout([4]).in_blocks(9) == Layout([4])
    for bad in (-1, 1.5, True):
        with pytest.raises(threelc.ConfigurationError, match="scale block"):
            layout.in_blocks(bad)
