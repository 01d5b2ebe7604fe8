"""Lossy links on the testbed: 2% of packets dropped on every node's veth (nftables).

Skipped unless running as root with iproute2 and nftables (``ip``, ``tc``, ``nft``).
This kernel has no ``sch_netem``, so loss is an nftables rule (launch/testbed/netloss.py) and
delay cannot be emulated. TCP retransmits what is dropped, so a run on the lossy link
must end with exactly the parameters of the run on a clean link; ``-s`` prints the
slowdown. About 10 s per run, 4 runs.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch


if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "tc", "nft")):
    pytest.skip("lossy links need root, iproute2 (ip, tc) and nftables (nft)", allow_module_level=True)

from launch.testbed.lab import run_lab

TRAIN = ["--model", "digits-cnn", "--steps", "30", "--warmup-steps", "3", "--seed", "1"]
HOOKS = {"none": ["--hook", "none"], "threelc": ["--hook", "threelc", "--sparsity", "1.0", "--transport", "allgather"]}
LOSS_PERCENT = 2.0


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_lossy_link_same_parameters(tmp_path, hook):
    runs = {}
    for loss in (0.0, LOSS_PERCENT):
        params = tmp_path / f"params-{loss}.pt"
        res = run_lab(TRAIN + HOOKS[hook] + ["--save-params", str(params)], nodes=2, rate="1gbit", loss=loss,
                      timeout=150)
        runs[loss] = (res, torch.load(params, weights_only=True))
    (clean, clean_params), (lossy, lossy_params) = runs[0.0], runs[LOSS_PERCENT]
    assert clean["lab"]["loss_dropped_packets"] is None
    dropped = lossy["lab"]["loss_dropped_packets"]
    assert len(dropped) == 2 and all(d > 0 for d in dropped), f"the loss rule dropped nothing: {dropped}"
    sent = sum(n["tx_packets"] for n in lossy["wire"]["per_node"])
    assert sum(dropped) < 0.1 * sent  # about 2% of what left the nodes, not a broken link
    assert clean_params.keys() == lossy_params.keys()
    for key in clean_params:
        assert torch.equal(clean_params[key], lossy_params[key]), f"{hook}: {key} differs after a lossy run"
    assert clean["train"]["final_loss"] == lossy["train"]["final_loss"]
    step = {loss: res["train"]["mean_step_time_s"] for loss, (res, _) in runs.items()}
    wall = {loss: res["lab"]["wall_s"] for loss, (res, _) in runs.items()}
    print(f"\n{hook}: {LOSS_PERCENT}% loss dropped {dropped} of {sent} packets; step "
          f"{step[0.0] * 1e3:.1f} -> {step[LOSS_PERCENT] * 1e3:.1f} ms ({step[LOSS_PERCENT] / step[0.0]:.2f}x), "
          f"whole run {wall[0.0]:.1f} -> {wall[LOSS_PERCENT]:.1f} s")
