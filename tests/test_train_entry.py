"""launch/train.py under ``torchrun --standalone --nproc-per-node 2`` (gloo, CPU).

* the rank-0 JSON result line has the documented fields and byte counts;
* a checkpoint round trip is bit-exact: 10 steps in one go == 5 steps, save,
  resume, 5 more (final parameters compared with ``torch.equal``), for DDP's
  own all-reduce, for PowerSGD (per-bucket state; train.py settles DDP's
  bucket layout before resuming) and for 3LC (residuals travel in the
  checkpoint);
* the data factories shard a global batch independently of world size.

Each torchrun costs ~5-15 s (mostly importing torch in 3 processes).
"""

from __future__ import annotations

import json

import pytest
import torch


from launch.common import models
from launch.common.runner import run_standalone

DIGITS_PARAMS = 38282  # DigitsCNN
BASE = ["--model", "digits-cnn", "--seed", "7", "--no-progress"]
REQUIRED = {"model", "hook", "transport", "sparsity", "world_size", "steps", "mean_step_time_s",
            "bytes_per_step", "uncompressed_bytes_per_step", "final_loss", "final_accuracy"}

ROUNDTRIP_HOOKS = ["none", "powersgd", "threelc"]


def _hook_args(hook: str) -> list[str]:
    args = ["--hook", hook]
    if hook == "threelc":
        args += ["--sparsity", "1.75", "--transport", "allgather", "--sparsity-warmup", "4"]
    return args


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """10-step runs in one go, final parameters saved; shared by the tests below."""
    out = {}
    d = tmp_path_factory.mktemp("full")
    for hook in sorted({"none", "fp16", *ROUNDTRIP_HOOKS}):
        params = d / f"{hook}.pt"
        res = run_standalone(BASE + _hook_args(hook) + ["--steps", "10", "--save-params", str(params),
                                                        "--json", str(d / f"{hook}.json")], timeout=300)
        out[hook] = (res, params, d / f"{hook}.json")
    return out


@pytest.mark.parametrize("hook,bytes_per_elem", [("none", 4), ("fp16", 2)])
def test_result_line(full_runs, hook, bytes_per_elem):
    res, _, json_path = full_runs[hook]
    assert REQUIRED <= set(res)
    assert res["model"] == "digits-cnn" and res["hook"] == hook
    assert res["world_size"] == 2 and res["steps"] == 10
    assert res["transport"] is None and res["sparsity"] is None
    assert res["num_params"] == DIGITS_PARAMS
    assert res["uncompressed_bytes_per_step"] == DIGITS_PARAMS * 4
    assert res["bytes_per_step"] == DIGITS_PARAMS * bytes_per_elem
    assert res["whole_run"] == {"bytes_sent": 10 * DIGITS_PARAMS * bytes_per_elem,
                                "uncompressed_bytes": 10 * DIGITS_PARAMS * 4, "ratio": 4 / bytes_per_elem}
    assert res["target_sparsity_bytes_per_step"] is None
    assert res["measured_steps"] == 10 - 3  # default --warmup-steps 3
    assert 0 < res["mean_step_time_s"] < 5
    assert 0 <= res["final_accuracy"] <= 1 and res["final_loss"] > 0
    assert res["backend"] == "gloo"
    assert json.loads(json_path.read_text()) == res  # --json writes the same object


def test_result_line_threelc(full_runs):
    res, _, _ = full_runs["threelc"]
    assert res["transport"] == "allgather" and res["sparsity"] == 1.75
    assert res["uncompressed_bytes_per_step"] == DIGITS_PARAMS * 4
    assert 0 < res["bytes_per_step"] < DIGITS_PARAMS * 4 / 4  # well below fp32
    # The whole run counts the two fp32 steps before start_iter; the target-sparsity
    # figure only steps 5..9 (start_iter 2 + warm-up 4 - 1 is the first at s = 1.75).
    whole = res["whole_run"]
    assert whole["uncompressed_bytes"] == 10 * DIGITS_PARAMS * 4
    assert 2 * DIGITS_PARAMS * 4 < whole["bytes_sent"] < 2 * DIGITS_PARAMS * 4 + 8 * res["bytes_per_step"] * 1.5
    assert whole["ratio"] == whole["uncompressed_bytes"] / whole["bytes_sent"]
    assert 0 < res["target_sparsity_bytes_per_step"] <= res["bytes_per_step"] * 1.5


@pytest.mark.parametrize("hook", ROUNDTRIP_HOOKS)
def test_checkpoint_resume_bit_exact(full_runs, tmp_path, hook):
    ckpt = tmp_path / "ckpt.pt"
    common = BASE + _hook_args(hook) + ["--checkpoint", str(ckpt), "--checkpoint-every", "5"]
    first = run_standalone(common + ["--steps", "5"], timeout=300)
    assert first["steps"] == 5 and first["start_step"] == 0

    saved = torch.load(ckpt, weights_only=True)  # only tensors and plain types
    assert saved["step"] == 5 and saved["world_size"] == 2 and len(saved["ranks"]) == 2
    assert {"model", "optimizer", "meta"} <= set(saved)
    if hook == "threelc":
        assert all(r["hook"] is not None for r in saved["ranks"])

    resumed_params = tmp_path / "resumed.pt"
    second = run_standalone(common + ["--steps", "10", "--save-params", str(resumed_params)], timeout=300)
    assert second["start_step"] == 5 and second["steps"] == 10

    a = torch.load(full_runs[hook][1], weights_only=True)
    b = torch.load(resumed_params, weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{hook}: parameter {k} differs after resume"
    assert not list(tmp_path.glob("*.tmp.*")), "atomic save left a temporary file"


def test_resume_refuses_other_run(tmp_path):
    """A checkpoint from another model/seed/hook must not be silently resumed."""
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format": 1, "step": 3, "world_size": 2, "meta": {"model": "charlm", "seed": 7,
                "batch_size": 64, "hook": "none"}, "model": {}, "optimizer": {}, "ranks": [None, None]}, ckpt)
    from launch.common.runner import RunError

    with pytest.raises(RunError, match="different run"):
        run_standalone(BASE + ["--hook", "none", "--steps", "6", "--checkpoint", str(ckpt)], timeout=300)


@pytest.mark.parametrize("name", sorted(models.TASKS))
def test_models_shard_independent_of_world(name):
    opts = {"text_bytes": 1 << 16} if name == "charlm" else {"width": 64} if name == "mlp-wide" else {}
    task = models.build(name, seed=3, batch_size=8, **opts)
    for step in (0, 5, 1000):
        x1, y1 = task.train_batch(0, 1, step)
        parts = [task.train_batch(r, 4, step) for r in range(4)]
        assert torch.equal(x1, torch.cat([p[0] for p in parts]))
        assert torch.equal(y1, torch.cat([p[1] for p in parts]))
    again = models.build(name, seed=3, batch_size=8, **opts)
    assert torch.equal(task.train_batch(1, 2, 9)[0], again.train_batch(1, 2, 9)[0])
    sd1, sd2 = task.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)  # same seed, same init
    metrics = task.evaluate(task.model)
    assert metrics["loss"] > 0 and ("accuracy" in metrics or "bpc" in metrics)
