"""The sharded server's scale cap, max_r S_r / min(N, s): the rule, what it lets through, bit-exactness.

Threaded fake collectives; tests/reference.py implements the cap on its own.
"""

from __future__ import annotations

import math

import pytest
import torch

from threelc.hooks.transports import ShardedTransport, server_scale_cap

from reference import Reference
from test_hook import same_bits
from threaded import ThreadWorld


def test_the_cap_is_the_largest_worker_scale_over_min_of_world_and_sparsity():
    scales = torch.tensor([[3.0, 0.0, 6.0, 1.0], [1.5, 2.0, 1.0, 4.0]])
    assert same_bits(server_scale_cap(scales, 1.9), torch.tensor([3.0, 2.0, 6.0, 4.0]) / torch.tensor(1.9))
    assert same_bits(server_scale_cap(scales, 1.0), torch.tensor([3.0, 2.0, 6.0, 4.0]))  # s = 1: never binds
    four = torch.cat([scales, scales / 8])
    assert same_bits(server_scale_cap(four, 1.5), torch.tensor([3.0, 2.0, 6.0, 4.0]) / torch.tensor(1.5))
    # A non-finite worker scale makes that segment non-finite anyway; the cap stays valid (0).
    bad = torch.tensor([[1.0, math.nan, math.inf], [1.0, 1.0, 1.0]])
    assert server_scale_cap(bad, 1.9).tolist()[1:] == [0.0, 0.0]


def _first_average(pieces: dict, bounded: bool) -> torch.Tensor:
    """Rank 0's first-step average of one 8-element tensor on 2 ranks (s = 1.9): rank r sends pieces[r] + 4 zeros."""
    def body(rank, collectives):
        gradient = torch.tensor(pieces[rank] + [0.0] * 4)
        return ShardedTransport(collectives, 1.9, True, bounded).reduce([0], gradient, [8])

    return ThreadWorld(2).run(body)[0]


def test_a_value_one_worker_sent_passes_the_server_at_once():
    # Server 0 serves elements 0-3. Both workers send element 0 (+1.9 each, scale 1.9 x 1.0),
    # only worker 0 sends element 1: the average is [1.9, 0.95, 0, 0].
    pieces = {0: [1.0, 1.0, 0.0, 0.0], 1: [1.0, 0.0, 0.0, 0.0]}
    capped = _first_average(pieces, bounded=True)
    # Capped at 1.9 / min(2, 1.9) = 1: both values go out as +1, the rest waits at the server.
    assert capped[:4].tolist() == [1.0, 1.0, 0.0, 0.0]
    # Uncapped (the paper's rule) the server's threshold is 1.9 x 1.9 / 2 = 1.805: element 1 waits.
    uncapped = _first_average(pieces, bounded=False)
    assert uncapped[:4].tolist() == [pytest.approx(3.61), 0.0, 0.0, 0.0]


@pytest.mark.parametrize("world,block", [(3, 0), (4, 7)])
def test_ranks_equal_the_reference_bit_for_bit(world, block):
    """Gradients 10^r apart, so the cap, taken from the largest worker, binds on every step."""
    segments = [300, 41, 1000]

    def grads(rank, step):
        generator = torch.Generator().manual_seed(100 * rank + step)
        return torch.randn(sum(segments), generator=generator) * 10.0 ** -rank

    def body(rank, collectives):
        transport = ShardedTransport(collectives, 1.9, True, True, block)
        return [transport.reduce([0, 1, 2], grads(rank, step), segments).clone() for step in range(4)]

    results = ThreadWorld(world).run(body)
    reference = Reference("sharded", world, 1.9, block=block)
    expected = [reference.average([0, 1, 2], [grads(r, step) for r in range(world)], segments) for step in range(4)]
    for rank, got in enumerate(results):
        assert all(same_bits(x, y) for x, y in zip(got, expected)), f"rank {rank} differs from the reference"
