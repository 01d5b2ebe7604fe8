"""The DDP hook on real gloo ranks: exact against the codec reference, identical everywhere."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import threelc
from threelc.hooks import FLAT_TRANSPORTS, ThreeLCState, threelc_hook

from ranks import all_ok, run_ranks
from reference import Reference

SHAPES = [(40, 30), (30,), (7, 5, 3), (1,), (300,), (20, 20)]
TRANSPORTS = FLAT_TRANSPORTS
# The hook runs on every codec backend this checkout has; each must equal the reference.
BACKENDS = ["native", "torch"] if threelc.backends.NATIVE is not None else ["torch"]


class Carrier(nn.Module):
    """loss = sum(p_i * g_i): the gradient of p_i is exactly the g_i we feed in."""

    def __init__(self, shapes=SHAPES, dtype=torch.float32, unused=False):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes)
        self.unused = nn.Parameter(torch.zeros(UNUSED_SHAPE, dtype=dtype)) if unused else torch.empty(0)

    def forward(self, grads):
        return sum((p * g).sum() for p, g in zip(self.weights, grads))


UNUSED_SHAPE = (3,)
WARMUP = 3  # sparsity warm-up steps in these runs: the schedule ramps, then holds, within a test


def gradients(rank, step, shapes=SHAPES, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return [(torch.randn(s, generator=generator) * 10.0 ** -(i % 3)).to(dtype) for i, s in enumerate(shapes)]


def train_carrier(rank, world, transport, sparsity=1.5, steps=6, dtype=torch.float32, bucket_view=False,
                  unused=False, start_iter=1, poison=None, backend="auto", sparsity_warmup=WARMUP,
                  ranks_per_node=None, env=None, saved=None, bounded_scale=True, scale_block=0):
    """DDP over the carrier model; returns every step's averaged gradients and bucket layouts.

    ``env`` (per-rank environment, e.g. torchrun's node layout) is set first; ``saved``
    (a hook state_dict) is loaded before the first step and the run starts at its iteration.
    """
    os.environ["THREELC_BACKEND"] = backend
    os.environ.update((env or {}).get(rank, {}))
    model = Carrier(dtype=dtype, unused=unused)
    ddp = DDP(model, bucket_cap_mb=0.0005, gradient_as_bucket_view=bucket_view, find_unused_parameters=unused)
    state = ThreeLCState(sparsity=sparsity, transport=transport, start_iter=start_iter,
                         sparsity_warmup=sparsity_warmup, ranks_per_node=ranks_per_node, bounded_scale=bounded_scale,
                         scale_block=scale_block)
    if saved is not None:
        state.load_state_dict(saved[rank])
    # The unused parameter gets the last index (model.parameters() would list it first).
    index_of = {p.data_ptr(): i for i, p in enumerate([*model.weights, model.unused])}
    layouts = {}

    def recording_hook(state, bucket):
        layouts[(state.iter, bucket.index())] = [index_of[p.data_ptr()] for p in bucket.parameters()]
        return threelc_hook(state, bucket)

    ddp.register_comm_hook(state, recording_hook)
    history = []
    for step in range(state.iter, state.iter + steps):
        grads = gradients(rank, step, dtype=dtype)
        if poison is not None and poison[:2] == (rank, step):
            grads[poison[2]].view(-1)[0] = float("nan")
        model.zero_grad()
        ddp(grads).backward()
        history.append([p.grad.detach().clone() for p in model.weights])
    residuals_finite = all(bool(torch.isfinite(r).all()) for r in _residuals(state))
    return {"history": history, "layouts": layouts, "stats": state.stats, "residuals_finite": residuals_finite,
            "state": state.state_dict()}


def run_scenarios(rank, world, scenarios):
    """Several runs in one set of processes (process start-up dominates on 2 cores)."""
    results = []
    for scenario in scenarios:
        try:
            results.append(train_carrier(rank, world, **scenario))
        except Exception as error:  # noqa: BLE001 - some scenarios are meant to fail
            results.append({"error": f"{type(error).__name__}: {error}"})
    return results


def scenario_results(world, scenarios, workdir):
    per_rank = all_ok(run_ranks(run_scenarios, world, scenarios, workdir=workdir))
    return [[per_rank[r][i] for r in range(world)] for i in range(len(scenarios))]


def _residuals(state):
    saved = state.state_dict()["transport"]
    for memory in ("worker", "server"):
        if memory in saved:
            yield from saved[memory]["residuals"].values()


def reference_history(world, transport, sparsity, steps, layouts, start_iter=1, dtype=torch.float32,
                      ranks_per_node=1, bounded=True, block=0):
    reference = Reference(transport, world, sparsity, ranks_per_node=ranks_per_node, bounded=bounded, block=block)
    schedule = ThreeLCState(sparsity=sparsity, start_iter=start_iter, sparsity_warmup=WARMUP)
    expected = []
    for step in range(steps):
        reference.set_sparsity(schedule.sparsity_at(step))
        per_rank = [gradients(r, step, dtype=dtype) + [torch.zeros(UNUSED_SHAPE, dtype=dtype)] for r in range(world)]
        if step < start_iter:
            expected.append(None)
            continue
        grads = [torch.zeros_like(g, dtype=torch.float32) for g in per_rank[0]]
        buckets = sorted((b, params) for (it, b), params in layouts.items() if it == step)
        assert buckets, "no bucket was recorded"
        for index, params in buckets:
            segments = [per_rank[0][i].numel() for i in params]
            flat = [torch.cat([per_rank[r][i].reshape(-1) for i in params]) for r in range(world)]
            average = reference.average(params, flat, segments).to(dtype).float()
            for i, part in zip(params, average.split(segments)):
                grads[i] = part.view_as(grads[i])
        expected.append(grads[: len(SHAPES)])
    return expected


def same_bits(x, y):
    """Bit equality, NaN included (torch.equal treats NaN as unequal to itself)."""
    return x.dtype == y.dtype and torch.equal(x.view(-1).view(torch.int16 if x.element_size() == 2 else torch.int32),
                                              y.view(-1).view(torch.int16 if y.element_size() == 2 else torch.int32))


def assert_ranks_agree(results):
    for result in results:
        assert "error" not in result, result.get("error")
    for other in results[1:]:
        for a, b in zip(results[0]["history"], other["history"]):
            assert all(same_bits(x, y) for x, y in zip(a, b)), "ranks disagree"


def assert_matches_reference(result, world, transport, sparsity, dtype=torch.float32, start_iter=1,
                             ranks_per_node=1, bounded=True, block=0):
    steps = len(result["history"])
    expected = reference_history(world, transport, sparsity, steps, result["layouts"], start_iter, dtype,
                                 ranks_per_node, bounded, block)
    for step, (got, want) in enumerate(zip(result["history"], expected)):
        if want is None:  # warm-up: plain all-reduce in gloo's own summation order
            mean = [sum(g[i] for g in (gradients(r, step, dtype=dtype) for r in range(world))) / world
                    for i in range(len(SHAPES))]
            assert all(torch.allclose(x.float(), m.float(), atol=1e-2) for x, m in zip(got, mean))
            continue
        for i, (x, y) in enumerate(zip(got, want)):
            assert torch.equal(x.float(), y), f"step {step} param {i}: hook differs from the codec reference"


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory):
    """For each world size, one process set running every transport."""
    cache = {}

    def get(world):
        if world not in cache:
            runs = [(t, b) for t in TRANSPORTS for b in BACKENDS]
            scenarios = [{"transport": t, "backend": b} for t, b in runs]
            results = scenario_results(world, scenarios, tmp_path_factory.mktemp(f"world{world}"))
            cache[world] = dict(zip(runs, results))
        return cache[world]
    return get


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_hook_equals_codec_reference_and_ranks_agree(world, transport, backend, exact_runs):
    results = exact_runs(world)[(transport, backend)]
    assert_ranks_agree(results)
    assert max(b for _, b in results[0]["layouts"]) >= 2, "the test needs several buckets"
    assert_matches_reference(results[0], world, transport, 1.5)
    stats = results[0]["stats"]
    assert stats["compressed_steps"] == len(results[0]["history"]) - 1 and stats["transport"] == transport
    assert 0 < stats["bytes_sent"] < stats["uncompressed_bytes"]


VARIANTS = {
    "fp16": {"transport": "allgather", "sparsity": 1.2, "steps": 4, "dtype": torch.float16},
    "bf16": {"transport": "allgather", "sparsity": 1.2, "steps": 4, "dtype": torch.bfloat16},
    **{f"bucket-view-unused-{t}": {"transport": t, "steps": 4, "bucket_view": True, "unused": True}
       for t in TRANSPORTS},
    "auto": {"transport": "auto", "steps": 3},
    **{f"{name}-{t}-torch-backend": {"transport": t, "sparsity": 1.2, "steps": 4, "dtype": dtype, "backend": "torch"}
       for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)) for t in TRANSPORTS},
    **{f"{name}-{t}": {"transport": t, "sparsity": 1.2, "steps": 4, "dtype": dtype}
       for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)) for t in ("allreduce", "sharded")},
    # The unbounded scale (bounded_scale=False) against the reference built the same way.
    **{f"unbounded-{t}": {"transport": t, "sparsity": 1.9, "steps": 5, "bounded_scale": False} for t in TRANSPORTS},
    # One scale per block of each tensor (64: tensors of 1 to 20 blocks; 7: sharded's pieces cut again).
    **{f"scale-block-64-{t}": {"transport": t, "sparsity": 1.9, "steps": 5, "scale_block": 64} for t in TRANSPORTS},
    "scale-block-7-sharded": {"transport": "sharded", "sparsity": 1.9, "steps": 5, "scale_block": 7},
    "scale-block-64-sharded-torch-backend": {"transport": "sharded", "sparsity": 1.9, "steps": 5, "scale_block": 64,
                                             "backend": "torch"},
}


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory):
    results = scenario_results(2, list(VARIANTS.values()), tmp_path_factory.mktemp("variants"))
    return dict(zip(VARIANTS, results))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dtypes_bucket_views_and_unused_parameters(variant, variant_runs):
    settings, results = VARIANTS[variant], variant_runs[variant]
    assert_ranks_agree(results)
    dtype = settings.get("dtype", torch.float32)
    assert results[0]["history"][-1][0].dtype == dtype
    transport = results[0]["stats"]["transport"]
    assert transport == (settings["transport"] if settings["transport"] != "auto" else "allgather")
    assert_matches_reference(results[0], 2, transport, settings.get("sparsity", 1.5), dtype,
                             bounded=settings.get("bounded_scale", True), block=settings.get("scale_block", 0))
    assert results[0]["state"]["settings"]["bounded_scale"] == settings.get("bounded_scale", True)
    assert results[0]["state"]["settings"]["scale_block"] == settings.get("scale_block", 0)
    if settings.get("scale_block"):  # the blocks change the bits: one scale per tensor is not what ran
        with pytest.raises(AssertionError, match="differs from the codec reference"):
            assert_matches_reference(results[0], 2, transport, settings["sparsity"], dtype)


@pytest.fixture(scope="module")
def non_finite_runs(tmp_path_factory):
    runs = [(t, b) for t in TRANSPORTS for b in BACKENDS]
    scenarios = [{"transport": t, "backend": b, "steps": 5, "poison": (1, 2, 0)}  # rank 1, step 2, param 0
                 for t, b in runs]
    return dict(zip(runs, scenario_results(3, scenarios, tmp_path_factory.mktemp("nonfinite"))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_non_finite_gradient_on_one_rank(transport, backend, non_finite_runs):
    bad_step, results = 2, non_finite_runs[(transport, backend)]
    for result in results:
        assert result["residuals_finite"]
        assert result["history"][bad_step][0].isnan().any(), "every rank must see the overflow"
        for step, grads in enumerate(result["history"]):
            if step != bad_step:
                assert all(torch.isfinite(g).all() for g in grads)
    assert_ranks_agree(results)


MISMATCHES = {"sparsity": 1.25, "transport": "sharded", "start_iter": 3, "sparsity_warmup": 5, "bounded_scale": False,
              "scale_block": 64}


def mismatched(rank, world):
    results = []
    for field, other in MISMATCHES.items():
        settings = {"transport": "allgather", "sparsity": 1.5, "start_iter": 1, "steps": 3}
        if rank == 1:
            settings[field] = other
        results.append(run_scenarios(rank, world, [settings])[0])
    return results


def test_mismatched_settings_fail_on_every_rank(tmp_path):
    per_rank = all_ok(run_ranks(mismatched, 2, workdir=tmp_path, timeout=120))
    for rank_results in per_rank:
        for field, result in zip(MISMATCHES, rank_results):
            assert "settings differ across ranks" in result.get("error", ""), field


def subgroup_run(rank, world):
    group = dist.new_group([0, 1])
    if rank == 2:
        return None
    model = Carrier()
    ddp = DDP(model, process_group=group, bucket_cap_mb=0.0005)
    state = ThreeLCState(process_group=group, sparsity=1.3, transport="sharded", start_iter=1)
    ddp.register_comm_hook(state, threelc_hook)
    for step in range(4):
        model.zero_grad()
        ddp(gradients(rank, step)).backward()
    return {"grads": [p.grad.clone() for p in model.weights], "stats": state.stats}


def test_sub_process_group(tmp_path):
    results = all_ok(run_ranks(subgroup_run, 3, workdir=tmp_path))
    assert results[2] is None
    assert all(torch.equal(x, y) for x, y in zip(results[0]["grads"], results[1]["grads"]))
    for r in results[:2]:  # 3 of 4 steps compressed (start_iter=1), among the 2 members only
        assert r["stats"]["compressed_steps"] == 3 and r["stats"]["last_step"]["ratio"] > 2, r["stats"]


class _OddBucket:
    """A bucket whose buffer is longer than its parameters (a layout the hook does not know)."""

    def __init__(self, buffer, params):
        self._buffer, self._params = buffer, params

    def buffer(self):
        return self._buffer

    def parameters(self):
        return self._params

    def index(self):
        return 0

    def is_last(self):
        return True


def odd_layout_run(rank, world, transport):
    params = [torch.zeros(3), torch.zeros(4)]  # 7 elements in a 10-element buffer
    state = ThreeLCState(sparsity=1.5, transport=transport, start_iter=0, sparsity_warmup=0)
    out = []
    for step in range(4):
        buffer = torch.randn(10, generator=torch.Generator().manual_seed(100 * step + rank))
        out.append(threelc_hook(state, _OddBucket(buffer, params)).wait().clone())
    state.close()
    return out


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_bucket_layout_gets_one_scale(tmp_path, transport):
    world = 2
    results = all_ok(run_ranks(odd_layout_run, world, transport, workdir=tmp_path))
    reference = Reference(transport, world, 1.5)
    for step in range(4):
        grads = [torch.randn(10, generator=torch.Generator().manual_seed(100 * step + r)) for r in range(world)]
        expected = reference.average([("bucket",)], grads, [10])
        assert all(torch.equal(r[step], expected) for r in results), step


def layout_change_run(rank, world):
    """Resume a 2-layer model's hook state on a 3-layer one (another first bucket layout), and on itself."""
    import warnings

    def train(model, state, steps):
        ddp = DDP(model, bucket_cap_mb=0.0001)  # a bucket per parameter
        ddp.register_comm_hook(state, threelc_hook)
        generator = torch.Generator().manual_seed(rank)
        for _ in range(steps):
            ddp(torch.randn(4, 8, generator=generator)).square().mean().backward()
        return state

    def two_layers():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))

    saved = train(two_layers(), ThreeLCState(sparsity=1.5, start_iter=1), 3).state_dict()
    out = {"saved": len(saved["transport"]["worker"]["residuals"])}
    def three_layers():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 4))

    for name, model in (("same", two_layers()), ("other", three_layers()), ("fresh", three_layers())):
        state = ThreeLCState(sparsity=1.5, start_iter=1)
        if name == "fresh":  # no checkpoint: what "other" must equal
            state.iter = saved["iter"]
        else:
            state.load_state_dict(saved)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(model, state, 1)
        out[name] = {"warned": any("bucket layout differs" in str(w.message) for w in caught),
                     "residuals": state.state_dict()["transport"]["worker"]["residuals"]}
        state.close()
    out["loaded"] = saved["transport"]["worker"]["residuals"]
    return out


def test_bucket_layout_change_resets_residuals(tmp_path):
    """Another model's checkpoint: a warning and fresh residuals, even before the transport exists."""
    for out in all_ok(run_ranks(layout_change_run, 2, workdir=tmp_path)):
        assert out["saved"] == 4 and not out["same"]["warned"] and out["other"]["warned"], out
        # The same model continues from the checkpoint's residuals; the other has only this step's.
        assert set(out["same"]["residuals"]) == set(out["loaded"])
        assert any(not torch.equal(out["same"]["residuals"][k], out["loaded"][k]) for k in out["loaded"])
        other, fresh = out["other"]["residuals"], out["fresh"]["residuals"]
        assert set(other) == set(fresh) and all(torch.equal(other[k], fresh[k]) for k in fresh)


def test_auto_transport_rule():
    from threelc.hooks.transports import choose_transport
    assert [choose_transport("auto", n) for n in (1, 2, 3, 4, 64)] == ["allgather"] * 2 + ["sharded"] * 3
    assert all(choose_transport(t, 8) == t for t in TRANSPORTS)


def test_state_validation_and_pickling():
    with pytest.raises(threelc.ConfigurationError, match="transport"):
        ThreeLCState(transport="ring")
    with pytest.raises(ValueError, match=r"\[1.0, 2.0\)"):
        ThreeLCState(sparsity=2.0)
    with pytest.raises(threelc.ConfigurationError, match="start_iter"):
        ThreeLCState(start_iter=-1)
    with pytest.raises(threelc.ConfigurationError, match="sparsity_warmup"):
        ThreeLCState(sparsity_warmup=-1)
    with pytest.raises(threelc.ConfigurationError, match="bounded_scale"):
        ThreeLCState(bounded_scale="no")
    assert ThreeLCState().settings.bounded_scale is True  # the default
    assert threelc.hooks.settings.STATE_VERSION == 5
    unbounded = ThreeLCState(sparsity=1.7, bounded_scale=False)
    assert pickle.loads(pickle.dumps(unbounded)).settings.bounded_scale is False
    assert unbounded.state_dict()["settings"]["bounded_scale"] is False
    with pytest.raises(threelc.ConfigurationError, match="differ"):  # checkpoints carry it
        ThreeLCState(sparsity=1.7).load_state_dict(unbounded.state_dict())
    state = ThreeLCState(sparsity=1.7, transport="sharded", start_iter=5, sparsity_warmup=7)
    state.iter = 9
    restored = pickle.loads(pickle.dumps(state))
    settings = restored.settings
    assert (settings.sparsity, settings.transport, settings.start_iter, restored.iter) == (1.7, "sharded", 5, 9)
    assert restored.settings.sparsity_warmup == 7 and restored.settings.bounded_scale is True
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    other = ThreeLCState(sparsity=1.7, transport="sharded", start_iter=5, sparsity_warmup=7)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.iter == 9
    with pytest.raises(threelc.ConfigurationError, match="differ"):
        ThreeLCState(sparsity=1.2, transport="sharded", start_iter=5).load_state_dict(state.state_dict())
    with pytest.raises(threelc.ConfigurationError, match="differ"):  # the schedule is a setting too
        ThreeLCState(sparsity=1.7, transport="sharded", start_iter=5, sparsity_warmup=8).load_state_dict(
            state.state_dict())
    with pytest.raises(threelc.ConfigurationError, match="scale_block"):
        ThreeLCState(scale_block=-64)
    blocked = ThreeLCState(sparsity=1.7, transport="sharded", start_iter=5, sparsity_warmup=7, scale_block=256)
    assert pickle.loads(pickle.dumps(blocked)).settings.scale_block == 256
    with pytest.raises(threelc.ConfigurationError, match="differ"):  # checkpoints carry the blocks
        blocked.load_state_dict(state.state_dict())
    # Hook state of version 4 (before scale_block) resumes as one scale per tensor.
    old = state.state_dict()
    old = {**old, "version": 4, "settings": {k: v for k, v in old["settings"].items() if k != "scale_block"}}
    other.load_state_dict(old)
    assert other.iter == 9
    with pytest.raises(threelc.ConfigurationError, match="differ"):
        blocked.load_state_dict(old)
    with pytest.raises(threelc.ConfigurationError, match="version 3"):
        other.load_state_dict({**old, "version": 3})


def test_sparsity_warmup_schedule():
    """Compression from the first compressed step, at s = 1 + (target - 1) * k / warmup for its k-th step."""
    state = ThreeLCState(sparsity=1.9, start_iter=2, sparsity_warmup=4)
    assert [round(state.sparsity_at(i), 6) for i in range(2, 8)] == [1.225, 1.45, 1.675, 1.9, 1.9, 1.9]
    assert ThreeLCState(sparsity=1.9, start_iter=2, sparsity_warmup=0).sparsity_at(2) == 1.9
    assert ThreeLCState(sparsity=1.9).settings.sparsity_warmup == threelc.hooks.settings.DEFAULT_SPARSITY_WARMUP
