"""The hierarchical transport (issue 12): 2 and 3 nodes of 2 ranks, bit for bit against the reference.

DDP runs on gloo processes (node layout from an explicit ``ranks_per_node`` or from
torchrun's environment variables); transport-level cases on in-process threads.
"""

from __future__ import annotations

import pytest
import torch

import threelc
from threelc.hooks.hierarchical import HierarchicalTransport, agree_node_layout, node_claim
from threelc.hooks.shm import SHM_DIR_ENV
from threelc.hooks.transports import choose_transport

from ranks import all_ok, run_ranks
from reference import Reference
from test_hook import assert_matches_reference, assert_ranks_agree, same_bits, train_carrier
from threaded import ThreadWorld

RANKS_PER_NODE = 2
LAYOUTS = {"2x2": 2, "3x2": 3}  # nodes of RANKS_PER_NODE ranks; 3 nodes: sharded between nodes


def torchrun_env(world, per_node=RANKS_PER_NODE):
    """What torchrun sets for ``world // per_node`` nodes of ``per_node`` ranks."""
    return {r: {"LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(r // per_node), "LOCAL_RANK": str(r % per_node),
                "RANK": str(r)} for r in range(world)}


def hierarchical_runs(rank, world):
    """Explicit layout, torchrun's layout under ``auto``, a poisoned step, and a checkpoint resume."""
    results = {}
    results["explicit"] = train_carrier(rank, world, "hierarchical", ranks_per_node=RANKS_PER_NODE)
    results["auto"] = train_carrier(rank, world, "auto", steps=4, env=torchrun_env(world))
    results["non-finite"] = train_carrier(rank, world, "hierarchical", steps=5, poison=(1, 2, 0),
                                          ranks_per_node=RANKS_PER_NODE)
    first = train_carrier(rank, world, "hierarchical", steps=3, ranks_per_node=RANKS_PER_NODE)
    states = [None] * world
    states[rank] = first["state"]
    results["resumed"] = train_carrier(rank, world, "hierarchical", steps=3, ranks_per_node=RANKS_PER_NODE,
                                       saved=states)
    results["blocks"] = train_carrier(rank, world, "hierarchical", steps=4, ranks_per_node=RANKS_PER_NODE,
                                      scale_block=64)
    # Last: it leaves shared memory off in this process. The node's exchange then runs
    # over the node's process group, as it does on NCCL.
    results["process group"] = train_carrier(rank, world, "hierarchical", ranks_per_node=RANKS_PER_NODE,
                                             env={rank: {SHM_DIR_ENV: ""}})
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(layout):
        if layout not in cache:
            world = LAYOUTS[layout] * RANKS_PER_NODE
            cache[layout] = all_ok(run_ranks(hierarchical_runs, world, workdir=tmp_path_factory.mktemp(layout),
                                             timeout=600))
        return cache[layout]
    return get


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ddp_equals_codec_reference_on_every_rank(layout, runs):
    per_rank = runs(layout)
    world = len(per_rank)
    for scenario, exchange in (("explicit", "shared memory"), ("auto", "shared memory"),
                               ("process group", "process group")):
        results = [r[scenario] for r in per_rank]
        assert_ranks_agree(results)
        assert results[0]["stats"]["transport"] == "hierarchical", scenario
        assert all(r["stats"]["node_exchange"] == exchange for r in results), scenario
        assert_matches_reference(results[0], world, "hierarchical", 1.5, ranks_per_node=RANKS_PER_NODE)
        stats = results[0]["stats"]
        assert 0 < stats["bytes_sent"] < stats["uncompressed_bytes"] * stats["steps"]
    blocks = [r["blocks"] for r in per_rank]  # one scale per 64 elements in every inter-node group
    assert_ranks_agree(blocks)
    assert_matches_reference(blocks[0], world, "hierarchical", 1.5, ranks_per_node=RANKS_PER_NODE, block=64)
    layouts = per_rank[0]["explicit"]["layouts"]
    first = [params for (it, _), params in sorted(layouts.items()) if it == 0]
    later = [params for (it, _), params in sorted(layouts.items()) if it == 3]
    assert first != later, "DDP did not rebuild its buckets: the test would not show residuals surviving it"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resume_from_checkpoint_is_bit_exact(layout, runs):
    per_rank = runs(layout)
    for rank_results in per_rank:
        whole, resumed = rank_results["explicit"]["history"], rank_results["resumed"]["history"]
        assert len(resumed) == 3
        for step, (x, y) in enumerate(zip(whole[3:], resumed)):
            assert all(same_bits(a, b) for a, b in zip(x, y)), f"step {step + 3} differs after the resume"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_gradient_on_one_rank_is_nan_everywhere(layout, runs):
    bad_step = 2
    results = [r["non-finite"] for r in runs(layout)]
    for result in results:
        assert result["residuals_finite"]
        # Rank 1 poisoned one element of parameter 0: on every rank all of the bucket is NaN.
        assert result["history"][bad_step][0].isnan().all(), "every rank must see the overflow"
        for step, grads in enumerate(result["history"]):
            if step != bad_step:
                assert all(torch.isfinite(g).all() for g in grads)
    assert_ranks_agree(results)


def uneven_nodes(rank, world):
    """3 ranks: nodes of 2 and 1, claimed explicitly, then by torchrun's variables."""
    env = {0: {"LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"}, 1: {"LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"},
           2: {"LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "1"}}
    scenarios = [{"transport": "hierarchical", "ranks_per_node": 2, "steps": 2},
                 {"transport": "auto", "env": env, "steps": 2}]
    out = []
    for scenario in scenarios:
        try:
            train_carrier(rank, world, **scenario)
            out.append("no error")
        except Exception as error:  # noqa: BLE001 - the error is the point
            out.append(f"{type(error).__name__}: {error}")
    return out


def test_nodes_of_different_sizes_fail_on_every_rank_alike(tmp_path):
    per_rank = all_ok(run_ranks(uneven_nodes, 3, workdir=tmp_path, timeout=240))
    for scenario in range(2):
        errors = [r[scenario] for r in per_rank]
        # DDP re-raises a hook's error as a RuntimeError carrying its message.
        assert all("threelc step 0, bucket 0: threelc: every node must run the same number of ranks" in e
                   for e in errors), errors
        assert len(set(errors)) == 1, errors  # the same message on every rank, whichever rank's claim was odd


# ----------------------------------------------------------------------------- transport level, threads

SEGMENTS = [1200, 30, 105, 1, 300]


def _gradient(rank, step, segments=SEGMENTS):
    generator = torch.Generator().manual_seed(100 * step + rank)
    return torch.cat([torch.randn(n, generator=generator) * 10.0 ** -(i % 3) for i, n in enumerate(segments)])


@pytest.mark.parametrize("nodes,per_node", [(2, 2), (3, 2), (2, 3)])
@pytest.mark.parametrize("segments", [SEGMENTS, [1]], ids=["tensors", "one-element"])
def test_transport_equals_reference_with_regrouped_tensors(nodes, per_node, segments):
    """Tensors regrouped into other buckets mid-run keep their residuals (one per piece)."""
    world, steps = nodes * per_node, 4
    keys = list(range(len(segments)))
    # Steps 2 and 3 take the tensors in reverse order, as two buckets.
    half = len(segments) // 2

    def buckets(step):
        if step < 2 or len(segments) == 1:
            return [keys]
        return [keys[::-1][:half], keys[::-1][half:]]

    def pieces(grad, bucket):
        parts = grad.split(segments)
        return torch.cat([parts[k] for k in bucket]), [segments[k] for k in bucket]

    def body(rank, collectives):
        transport = HierarchicalTransport(collectives, 1.5, True, per_node)
        out = []
        for step in range(steps):
            for bucket in buckets(step):
                flat, lengths = pieces(_gradient(rank, step, segments), bucket)
                out.append(transport.reduce(bucket, flat, lengths).clone())
        return out

    results = ThreadWorld(world).run(body)
    reference, expected = Reference("hierarchical", world, 1.5, ranks_per_node=per_node), []
    for step in range(steps):
        for bucket in buckets(step):
            grads = [pieces(_gradient(r, step, segments), bucket) for r in range(world)]
            expected.append(reference.average(bucket, [g for g, _ in grads], grads[0][1]))
    for rank, got in enumerate(results):
        assert all(same_bits(x, y) for x, y in zip(got, expected)), f"rank {rank} differs from the reference"


def test_traffic_between_nodes_is_one_shard_per_rank():
    """Inter-node groups carry 1/L of the bucket each; the job counts them, the node groups count apart."""
    def body(rank, collectives):
        transport = HierarchicalTransport(collectives, 1.0, True, 2)
        transport.reduce(list(range(len(SEGMENTS))), _gradient(rank, 0), SEGMENTS)
        return transport.across.bytes_sent, transport.node_traffic(), collectives.bytes_sent, transport.inner.name

    for across, (node_sent, node_received), total, inner in ThreadWorld(4).run(body):
        assert inner == "allgather" and total == across > 0  # the job's count is the traffic between nodes
        assert across < sum(SEGMENTS) * 4 / 2  # under half an fp32 copy of the bucket
        # fp32 inside the node: the whole bucket to the all-to-all, a shard (+ status) to the all-gather
        assert node_sent >= sum(SEGMENTS) * 4 * 3 / 2 and node_received >= node_sent


def test_layout_agreement():
    assert node_claim(3, 2) == (2, 1)
    assert node_claim(3, None, {"LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "5"}) == (4, 5)
    assert node_claim(5, None, {"LOCAL_WORLD_SIZE": "4", "RANK": "5"}) == (4, 1)
    assert node_claim(0, None, {}) == (-1, -1)

    def agree(claims, required=False):
        world = ThreadWorld(len(claims))
        outcomes = [None] * len(claims)

        def body(rank, collectives):
            try:
                outcomes[rank] = agree_node_layout(collectives, claims[rank], required)
            except threelc.ConfigurationError as error:
                outcomes[rank] = str(error)
        world.run(body)
        return outcomes

    assert agree([(2, 0), (2, 0), (2, 1), (2, 1)]) == [2] * 4
    assert agree([(-1, 0), (-1, 0), (-1, 1), (-1, 1)]) == [2] * 4  # node ids alone: sizes counted
    assert agree([(-1, -1)] * 2) == [None] * 2
    assert all("needs the node layout" in o for o in agree([(-1, -1)] * 2, required=True))
    for claims in ([(2, 0), (2, 1), (2, 0), (2, 1)],  # a node's ranks not consecutive
                   [(2, 0), (2, 0), (2, 1), (1, 1)],  # one rank claims another node size
                   [(2, 0), (2, 0), (2, 1)]):  # 2 + 1
        outcomes = agree(claims)
        assert len(set(outcomes)) == 1 and "same number of ranks" in outcomes[0], outcomes


def test_auto_rule_picks_hierarchical_for_several_nodes_of_several_ranks():
    assert choose_transport("auto", 16, 8) == "hierarchical"
    assert choose_transport("auto", 4, 2) == "hierarchical"
    assert choose_transport("auto", 8, 8) == "sharded"  # one node
    assert choose_transport("auto", 8, 1) == "sharded"  # one rank per node
    assert choose_transport("auto", 2) == "allgather"


def test_undecodable_payload_between_nodes_fails_every_rank_alike():
    """Rank 1 sends garbage to its inter-node group at step 1: the group's members cannot
    decode it, the status exchange tells their node peers, and all four ranks raise the
    same DecodeError instead of some waiting on the others."""
    world, outcomes = ThreadWorld(4), [None] * 4
    import threading

    def body(rank):
        from threaded import ThreadCollectives
        transport = HierarchicalTransport(ThreadCollectives(world, rank), 1.5, True, 2)
        if rank == 1:
            honest, calls = transport.across.allgather_bytes_async, []

            def hostile(payload, sizes, room=None):
                calls.append(1)
                if len(calls) == 2:  # step 1's payload
                    payload = torch.full_like(payload, 0xA5)
                return honest(payload, sizes, None)
            transport.across.allgather_bytes_async = hostile
        try:
            outcomes[rank] = [transport.reduce(list(range(len(SEGMENTS))), _gradient(rank, step), SEGMENTS)
                              for step in range(3)]
        except BaseException as error:  # noqa: BLE001 - what each rank ends with is the point
            outcomes[rank] = error

    threads = [threading.Thread(target=body, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    assert all(isinstance(o, threelc.DecodeError) for o in outcomes), outcomes
    assert all("inter-node group(s) of local rank(s) [1] could not decode" in str(o) for o in outcomes), outcomes


def pipeline_orders(rank, world):
    """Rank 0 finishes bucket 0 before bucket 1 is queued; its node peer queues bucket 1 first (as timing may have it)."""
    import datetime
    import time

    from threelc.hooks.collectives import TorchCollectives
    from threelc.hooks.pipeline import CommPipeline

    collectives = TorchCollectives(timeout=datetime.timedelta(seconds=10)).subgroup(list(range(world)))
    transport = HierarchicalTransport(collectives, 1.5, True, 2)
    grads = [torch.randn(1000, generator=torch.Generator().manual_seed(10 * rank + b)) for b in range(2)]
    pipeline = CommPipeline()
    first = pipeline.submit(lambda: transport.start(["a"], grads[0], [1000]), torch.device("cpu"), flush=False)
    if rank == 0:
        time.sleep(1.0)  # bucket 0's transfer is done and nothing is queued: the pipeline finishes it now
    second = pipeline.submit(lambda: transport.start(["b"], grads[1], [1000]), torch.device("cpu"), flush=True)
    return [first.wait(), second.wait()]


def test_ranks_that_finish_and_start_in_different_orders_do_not_wait_on_each_other(tmp_path):
    """Finishing by timing alone, rank 0 waits in the node all-gather and rank 1 in the reduce-scatter until the timeout."""
    results = all_ok(run_ranks(pipeline_orders, 4, workdir=tmp_path, timeout=120, pg_timeout=10))
    for result in results[1:]:
        assert all(same_bits(a, b) for a, b in zip(result, results[0]))
