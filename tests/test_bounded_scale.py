"""The bounded scale, sparsity * min(max|g + r|, max|g|), on hand vectors, for every CPU codec.

The hypothesis tests (test_native.py, triton_suite.py) hold the backends to the
reference bit for bit; these pin the reference itself to the rule.
"""

import math

import pytest
import torch

import threelc
from threelc import ConfigurationError
from threelc.backends import NATIVE, TORCH, Layout
from threelc.quantize import bounded_absmax, scales_from_absmax

CODECS = [TORCH] + ([NATIVE] if NATIVE is not None else [])
SPARSITY = 1.5
# max|g| = 1 and max|g + r| = 10 = 10 * max|g|.
GRADIENT = torch.tensor([1.0, -0.5, 0.25, 0.0])
RESIDUAL = torch.tensor([9.0, 0.0, 0.0, -10.0])


def check_rule(codec, device="cpu"):
    """The hand-vector expectations for ``codec`` (also run by triton_suite.py)."""
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    layout = Layout([4])
    bounded = codec.encode(on(GRADIENT), on(RESIDUAL), layout, SPARSITY)
    # scale = s * max|g|, not s * max|g + r|; 10 and -10 are sent as +-scale and the rest of
    # them stays in the residual, -0.5 and 0.25 are below half the scale.
    assert bounded.scales.cpu().tolist() == [1.5]
    assert bounded.residual.cpu().tolist() == [8.5, -0.5, 0.25, -8.5]
    assert bounded.zeros == 2
    decoded = torch.zeros(4, device=device)
    codec.decode([bounded.payload], layout, decoded, average=False)
    assert decoded.cpu().tolist() == [1.5, 0.0, 0.0, -1.5]
    assert codec.absmax(on(GRADIENT), on(RESIDUAL), layout).cpu().tolist() == [1.0]

    unbounded = codec.encode(on(GRADIENT), on(RESIDUAL), layout, SPARSITY, bounded=False)
    assert unbounded.scales.cpu().tolist() == [15.0]
    assert unbounded.residual.cpu().tolist() == [-5.0, -0.5, 0.25, 5.0]
    assert codec.absmax(on(GRADIENT), on(RESIDUAL), layout, bounded=False).cpu().tolist() == [10.0]

    # Without a residual both rules are today's scale, s * max|g|.
    for flag in (True, False):
        plain = codec.encode(on(GRADIENT), None, layout, SPARSITY, bounded=flag)
        assert plain.scales.cpu().tolist() == [1.5] == threelc.quantize(GRADIENT, SPARSITY, [4])[1].tolist()

    # An all-zero gradient bounds the scale to 0: nothing is sent, the residual is kept whole.
    idle = codec.encode(on(torch.zeros(4)), on(RESIDUAL), layout, SPARSITY)
    assert idle.finite and idle.scales.cpu().tolist() == [0.0] and idle.zeros == 4
    assert idle.residual.cpu().tolist() == RESIDUAL.tolist()

    # NaN or inf in g or in r still makes the scale non-finite: nothing is sent, with a cap too.
    for g_bad, r_bad in ((math.nan, 0.0), (math.inf, 0.0), (0.0, math.nan), (0.0, math.inf), (math.inf, -math.inf)):
        g, r = GRADIENT.clone(), RESIDUAL.clone()
        g[1], r[1] = g_bad, r_bad
        encoded = codec.encode(on(g), on(r), layout, SPARSITY)
        assert not encoded.finite and not bool(torch.isfinite(encoded.scales).any()), (g_bad, r_bad)
        assert not bool(torch.isfinite(codec.absmax(on(g), on(r), layout)).any()), (g_bad, r_bad)
        capped = codec.encode(on(g), on(r), layout, SPARSITY, scale_cap=on(torch.tensor([1.0])))
        assert not capped.finite and not bool(torch.isfinite(capped.scales).any()), (g_bad, r_bad)

    # A scale cap (the sharded server's, transports.server_scale_cap) lowers the scale:
    # 10 and -10 are still sent, as +-1, and more of them stays in the residual.
    capped = codec.encode(on(GRADIENT), on(RESIDUAL), layout, SPARSITY, scale_cap=on(torch.tensor([1.0])))
    assert capped.scales.cpu().tolist() == [1.0] and capped.zeros == 2
    assert capped.residual.cpu().tolist() == [9.0, -0.5, 0.25, -9.0]
    # It never raises a scale, and a zero cap sends nothing and keeps everything.
    assert codec.encode(on(GRADIENT), on(RESIDUAL), layout, SPARSITY,
                        scale_cap=on(torch.tensor([2.0]))).scales.cpu().tolist() == [1.5]
    closed = codec.encode(on(GRADIENT), on(RESIDUAL), layout, SPARSITY, scale_cap=on(torch.tensor([0.0])))
    assert closed.finite and closed.zeros == 4 and closed.residual.cpu().tolist() == [10.0, -0.5, 0.25, -10.0]
    for bad in (torch.tensor([-1.0]), torch.tensor([-0.0]), torch.tensor([math.nan]), torch.tensor([math.inf]),
                torch.tensor([1.0, 1.0]), torch.tensor([1.0], dtype=torch.float64), [1.0]):
        cap = on(bad) if torch.is_tensor(bad) else bad
        with pytest.raises(ConfigurationError, match="scale cap"):
            codec.encode(on(GRADIENT), on(RESIDUAL), layout, SPARSITY, scale_cap=cap)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
def test_the_rule_on_a_hand_vector(codec):
    check_rule(codec)


def test_bounded_absmax_keeps_non_finite_values():
    nan, inf = math.nan, math.inf
    compensated = torch.tensor([10.0, 1.0, nan, inf, 2.0, 3.0, inf])
    gradient = torch.tensor([1.0, 5.0, 1.0, 1.0, nan, inf, nan])
    got = bounded_absmax(compensated, gradient)
    assert got[:2].tolist() == [1.0, 1.0]  # the smaller where both are finite
    assert math.isnan(got[2]) and got[3] == inf and math.isnan(got[4]) and got[5] == inf and math.isnan(got[6])
    assert not bool(torch.isfinite(scales_from_absmax(got[2:], 1.9)).any())


def test_error_feedback_uses_the_rule():
    memory = threelc.ErrorFeedback(SPARSITY)
    memory.commit("w", RESIDUAL.clone())
    result = memory.step("w", GRADIENT)
    assert result.scale.tolist() == [1.5] and result.q.tolist() == [1, 0, 0, -1]
    assert memory.residuals["w"].tolist() == [8.5, -0.5, 0.25, -8.5]
    unbounded = threelc.ErrorFeedback(SPARSITY, bounded=False)
    unbounded.commit("w", RESIDUAL.clone())
    assert unbounded.step("w", GRADIENT).scale.tolist() == [15.0]
    assert unbounded.state_dict()["bounded"] is False
    restored = threelc.ErrorFeedback(SPARSITY)
    restored.load_state_dict(unbounded.state_dict())
    assert restored.bounded is False


def test_a_residual_far_above_the_gradient_drains_as_a_stream():
    """The burst mechanism: unbounded, one step kicks by s * max|g + r|; bounded, every kick is at most s * max|g|."""
    gradient = torch.tensor([1.0, 0.01, -0.01, 0.02])
    for bounded in (True, False):
        memory = threelc.ErrorFeedback(1.9, bounded=bounded)
        memory.commit("w", torch.tensor([0.0, 40.0, -30.0, 0.0]))
        kicks = [threelc.dequantize(*memory.step("w", gradient)[:2]).abs().max().item() for _ in range(30)]
        if bounded:
            assert max(kicks) <= 1.9 * 1.0 * (1 + 1e-6)
        else:
            assert max(kicks) > 20  # the residual goes out in one burst
