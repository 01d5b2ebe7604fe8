"""launch/sparsity_study.py replays the transports' arithmetic: hold its pieces to the codec."""

import argparse

import torch

from launch import sparsity_study as study
from threelc import ErrorFeedback


def _args(**overrides):
    base = dict(transport="allgather", block=0, residual_decay=1.0, residual_clip=0, mean_scale=False, server_sparsity=None,
                bounded=False, server_cap=None)
    return argparse.Namespace(**(base | overrides))


def test_compress_matches_error_feedback():
    torch.manual_seed(0)
    x, residual = torch.randn(1000), torch.randn(1000) * 0.1
    memory = ErrorFeedback(1.9, bounded=False)  # the study replays the unbounded rule (README)
    memory.commit("t", residual.clone())
    expected = memory.step("t", x)
    decoded, new_residual, _ = study.compress(x, residual, 1.9, _args())
    assert torch.equal(new_residual, expected.residual)
    assert torch.equal(decoded, x + residual - expected.residual)


def test_sharded_recompresses_and_allreduce_agrees_on_one_scale():
    torch.manual_seed(1)
    grads = [torch.randn(500), torch.randn(500) * 3]
    zeros = [torch.zeros(500), torch.zeros(500)]
    flat, _ = study.average(grads, list(zeros), torch.zeros(500), 1.5, _args())
    two_way, server = study.average(grads, list(zeros), torch.zeros(500), 1.5, _args(transport="sharded"))
    assert not torch.equal(flat, two_way) and torch.equal(two_way + server, flat)
    summed, _ = study.average(grads, list(zeros), torch.zeros(500), 1.5, _args(transport="allreduce"))
    magnitudes = summed.abs()[summed != 0].unique()
    scale = 1.5 * max(float(g.abs().max()) for g in grads)
    assert torch.allclose(magnitudes, torch.tensor([scale / 2, scale])[: magnitudes.numel()], rtol=1e-6)


def test_bounded_server_cap_replays_the_hook_rule():
    torch.manual_seed(2)
    grads = [torch.randn(400), torch.randn(400) * 2]
    zeros = [torch.zeros(400), torch.zeros(400)]
    worker = ErrorFeedback(1.9)  # bounded, like the study's --bounded
    scales = torch.stack([worker.quantize("t", g).scale.reshape(-1) for g in grads])
    cap = float(scales.amax()) / 1.9  # min(N=2, s=1.9)
    args = _args(transport="sharded", bounded=True)
    uncapped, uncapped_residual = study.average(grads, list(zeros), torch.zeros(400), 1.9, args)
    capped, capped_residual = study.average(grads, list(zeros), torch.zeros(400), 1.9,
                                                 _args(transport="sharded", bounded=True, server_cap="hook"))
    assert float(uncapped.abs().max()) > cap * 1.01  # the cap binds on this input
    assert torch.allclose(capped.abs()[capped != 0].unique(), torch.tensor([cap]))
    assert torch.allclose(capped + capped_residual, uncapped + uncapped_residual)  # nothing lost, only held back


def test_divisor_scales_each_element_and_loses_nothing():
    torch.manual_seed(3)
    x, residual = torch.randn(600), torch.randn(600) * 0.1
    plain, plain_residual, _ = study.compress(x, residual, 1.5, _args(bounded=True))
    # A power of two divides and multiplies back exactly: the same stage.
    halved, halved_residual, _ = study.compress(x, residual, 1.5, _args(bounded=True), divisor=torch.full((600,), 2.0))
    assert torch.equal(halved, plain) and torch.equal(halved_residual, plain_residual)
    # Per element: each sent value is a multiple of its own divisor, and nothing is lost.
    divisor = 2.0 ** torch.randint(-4, 4, (600,)).float()
    decoded, new_residual, scales = study.compress(x, residual, 1.5, _args(bounded=True), divisor=divisor)
    assert set((decoded / divisor).abs().unique().tolist()) == {0.0, float(scales)}
    assert torch.allclose(decoded + new_residual, x + residual)


def test_short_run_trains():
    result = study.main(["--transport", "allgather", "--sparsity", "1.5", "--steps", "30"])
    assert result["accuracy"] > 0.5 and result["loss"] < 2.0
