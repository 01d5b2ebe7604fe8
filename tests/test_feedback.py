"""Error feedback: unbiased over time, bounded, safe with non-finite input, checkpointable."""

import io

import pytest
import torch

import threelc


@pytest.mark.parametrize("bounded", [False, True])
@pytest.mark.parametrize("sparsity", [1.0, 1.5, 1.9])
def test_sum_of_decoded_tracks_sum_of_inputs(sparsity, bounded):
    torch.manual_seed(1)
    memory = threelc.ErrorFeedback(sparsity, bounded=bounded)
    n, steps = 500, 200
    sent = torch.zeros(n, dtype=torch.float64)
    received = torch.zeros(n, dtype=torch.float64)
    largest_input = 0.0
    for step in range(steps):
        x = torch.randn(n) * (1 + step % 7)  # varying magnitudes
        largest_input = max(largest_input, x.abs().max().item())
        q, scale, finite, _ = memory.step("w", x)
        assert finite
        sent += x.double()
        received += threelc.dequantize(q, scale).double()
        residual = memory.residuals["w"]
        if bounded:  # the scale follows this step's gradient; values above it stay partly in the residual
            assert scale.item() <= sparsity * x.abs().max().item() * (1 + 1e-6)
            continue
        # Each step's quantization error is at most half a scale per element ...
        assert residual.abs().max().item() <= scale.item() / 2 * (1 + 1e-5)
    # ... and the residual *is* the whole accumulated difference (telescoping sum).
    gap = (sent - received).abs()
    if not bounded:
        assert gap.max().item() <= scale.item() / 2 * (1 + 1e-4) + 1e-3
    assert torch.allclose(sent - received, memory.residuals["w"].double(), atol=1e-3)
    assert memory.residuals["w"].abs().max().item() < 20 * largest_input


def test_small_coordinates_get_through_at_high_sparsity():
    memory = threelc.ErrorFeedback(1.9)
    gradient = torch.tensor([1.0, 0.01, -0.003])
    total = torch.zeros(3)
    first_sent = None
    for step in range(400):
        q, scale, _, _ = memory.step(0, gradient)
        total += threelc.dequantize(q, scale)
        if first_sent is None and q[1] != 0:
            first_sent = step
    assert first_sent is not None
    # over 400 steps the small coordinates received what was sent, to within one scale
    assert total[1].item() == pytest.approx(0.01 * 400, abs=scale.item())
    assert total[2].item() == pytest.approx(-0.003 * 400, abs=scale.item())
    assert total[2].item() < 0


def test_without_error_feedback_small_coordinates_never_move():
    memory = threelc.ErrorFeedback(1.9, enabled=False)
    for _ in range(50):
        q = memory.step(0, torch.tensor([1.0, 0.01])).q
        assert q[1] == 0
    assert not memory.residuals


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_leaves_the_residual_untouched(bad):
    memory = threelc.ErrorFeedback(1.5)
    memory.step("b", torch.randn(64))
    before = memory.residuals["b"].clone()
    x = torch.randn(64)
    x[10] = bad
    q, scale, finite, _ = memory.step("b", x)
    assert not finite and not q.any() and not torch.isfinite(scale).all()
    assert torch.equal(memory.residuals["b"], before)
    assert threelc.dequantize(q, scale).isnan().all()  # the overflow stays visible downstream


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_a_float32_residual(dtype):
    memory = threelc.ErrorFeedback(1.2)
    memory.step(0, torch.randn(32).to(dtype))
    assert memory.residuals[0].dtype == torch.float32


def test_size_change_resets_with_a_warning():
    memory = threelc.ErrorFeedback()
    memory.step(3, torch.randn(10))
    with pytest.warns(RuntimeWarning, match="resetting"):
        memory.step(3, torch.randn(12))
    assert memory.residuals[3].numel() == 12


def test_segments_are_quantized_separately():
    memory = threelc.ErrorFeedback()
    q, scale, _, _ = memory.step(0, torch.cat([torch.full((4,), 50.0), torch.full((4,), 0.5)]), [4, 4])
    assert scale.tolist() == [50.0, 0.5] and q.all()


def test_state_dict_round_trip_is_weights_only_loadable():
    torch.manual_seed(0)
    memory = threelc.ErrorFeedback(1.7)
    for key in (0, 1, "named"):
        memory.step(key, torch.randn(100))
    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    buffer.seek(0)
    restored = threelc.ErrorFeedback()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.sparsity == 1.7 and restored.residuals.keys() == memory.residuals.keys()
    x = torch.randn(100)
    a, b = memory.step(1, x), restored.step(1, x)
    assert torch.equal(a.q, b.q) and torch.equal(a.scale, b.scale)
    assert torch.equal(memory.residuals[1], restored.residuals[1])


def test_per_segment_keys_follow_their_tensor_across_regrouping():
    """One residual per key: regrouping the same tensors keeps every residual with its tensor."""
    torch.manual_seed(3)
    a, b, c = torch.randn(5), torch.randn(7), torch.randn(3)
    grouped = threelc.ErrorFeedback(1.5)
    grouped.step(["a", "b"], torch.cat([a, b]), [5, 7])
    grouped.step(["c"], c, [3])
    alone = threelc.ErrorFeedback(1.5)
    for key, x in (("a", a), ("b", b), ("c", c)):
        alone.step([key], x, [x.numel()])
    for key in "abc":
        assert torch.equal(grouped.residuals[key], alone.residuals[key])
    # regroup: c and a together, b alone; compensation must use each tensor's own residual
    x = torch.cat([c, a])
    expected = x + torch.cat([alone.residuals["c"], alone.residuals["a"]])
    assert torch.equal(grouped.compensate(["c", "a"], x, [3, 5]), expected)
    first = grouped.step(["c", "a"], x, [3, 5])
    second = alone.step(["c", "a"], x, [3, 5])
    assert torch.equal(first.q, second.q) and torch.equal(first.scale, second.scale)
