"""The allreduce transport's agreed scale: the mean of the ranks' proposals (bounded), the largest (unbounded).

Ranks whose gradients differ by powers of ten make the two rules far apart, so these
tests fail if the transport and tests/reference.py disagree on the rule or its order.
Threaded fake collectives.
"""

from __future__ import annotations

import pytest
import torch

from threelc.hooks.transports import AllreduceTransport, agreed_absmax

from reference import Reference
from test_hook import same_bits
from threaded import ThreadWorld

SEGMENTS = [300, 41, 1000]
SPARSITY = 1.5


def _gradient(rank: int, step: int, magnitudes) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return torch.cat([torch.randn(n, generator=generator) for n in SEGMENTS]) * magnitudes[rank]


def _run(world: int, magnitudes, bounded: bool, steps: int = 3) -> list[torch.Tensor]:
    """Every rank's averages over ``steps``, checked bit for bit against the reference; returns the reference's."""
    def body(rank, collectives):
        transport = AllreduceTransport(collectives, SPARSITY, True, bounded)
        return [transport.reduce(list(range(len(SEGMENTS))), _gradient(rank, step, magnitudes), SEGMENTS).clone()
                for step in range(steps)]

    results = ThreadWorld(world).run(body)
    reference = Reference("allreduce", world, SPARSITY, bounded=bounded)
    expected = [reference.average(list(range(len(SEGMENTS))), [_gradient(r, step, magnitudes) for r in range(world)],
                                  SEGMENTS) for step in range(steps)]
    for rank, got in enumerate(results):
        assert all(same_bits(x, y) for x, y in zip(got, expected)), f"rank {rank} differs from the reference"
    return expected


def test_agreed_absmax_is_the_rank_order_mean_bounded_and_the_largest_unbounded():
    proposals = torch.tensor([[1.0, 0.0, 3e-8], [0.5, 0.0, 1.0], [0.1, 2.0, 7.0]])
    total = proposals[0] + proposals[1] + proposals[2]  # left to right, as the rule promises
    assert same_bits(agreed_absmax(proposals, bounded=True), total / 3)
    assert same_bits(agreed_absmax(proposals, bounded=False), torch.tensor([1.0, 2.0, 7.0]))


@pytest.mark.parametrize("world", [2, 3])
def test_bounded_scale_is_the_mean_of_the_proposals(world):
    magnitudes = [10.0 ** -r for r in range(world)]  # rank r's gradients are 10^r times smaller
    first = _run(world, magnitudes, bounded=True)[0]
    # At the first step the residuals are 0, so each proposal is max|g|: the scale is
    # s x their mean, and the average of ternaries times that scale reaches it only
    # where every rank sends the same sign, so it is at most the scale and above 0.
    maxima = [float(_gradient(r, 0, magnitudes)[:SEGMENTS[0]].abs().max()) for r in range(world)]
    scale = SPARSITY * sum(maxima) / world
    segment = first[:SEGMENTS[0]]
    assert 0 < float(segment.abs().max()) <= scale * (1 + 1e-6)
    # Each value is (sum of the ranks' ternaries) x scale / N: a whole number of scale / N
    # under the mean, not under the largest rank's scale (about twice it here).
    units = segment * world / scale
    assert torch.allclose(units, units.round(), atol=1e-4), "not the mean of the proposals"


def test_unbounded_scale_is_the_largest_proposal():
    magnitudes = [1.0, 0.1]
    first = _run(2, magnitudes, bounded=False)[0]
    largest = float(_gradient(0, 0, magnitudes)[:SEGMENTS[0]].abs().max())
    # Rank 0's largest element is sent as +scale, rank 1's elements are far below half of
    # it: the average holds scale / 2 = s x largest / 2.
    assert float(first[:SEGMENTS[0]].abs().max()) == pytest.approx(SPARSITY * largest / 2, rel=1e-6)


def test_a_rank_with_nothing_to_send_lowers_the_scale_but_does_not_stop_the_others():
    """A rank whose gradient is all zero (e.g. one that has joined) proposes 0."""
    steps = _run(3, [1.0, 0.0, 0.5], bounded=True)
    assert all(bool((step != 0).any()) for step in steps)
    assert all(bool((step == 0).all()) for step in _run(2, [0.0, 0.0], bounded=True))
