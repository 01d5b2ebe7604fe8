"""A user's recipe at the highest sparsity: launch/train.py's defaults with only ``--sparsity 1.9``.

digits-cnn, 2 ranks, 300 steps, constant learning rate 0.05 with momentum 0.9,
compression from the third step. Every transport must end within 1 point of the
uncompressed run's test accuracy, and send far fewer bytes over the whole run
(warm-up included). Without the bounded scale (``ThreeLCState(bounded_scale=...)``),
this recipe diverged on sharded and lost 1-2 points on the others.

About a minute: four torchruns of ~10 s each.
"""

from __future__ import annotations

import pytest

from launch.common.runner import run_standalone
from threelc.hooks import FLAT_TRANSPORTS

RECIPE = ["--model", "digits-cnn", "--steps", "300", "--no-progress"]
SPARSITY = "1.9"


@pytest.fixture(scope="module")
def uncompressed():
    return run_standalone(RECIPE + ["--hook", "none"], timeout=600)


@pytest.mark.parametrize("transport", FLAT_TRANSPORTS)
def test_highest_sparsity_keeps_accuracy(uncompressed, transport):
    result = run_standalone(RECIPE + ["--hook", "threelc", "--sparsity", SPARSITY, "--transport", transport],
                            timeout=600)
    baseline = uncompressed["final_accuracy"]
    assert result["final_accuracy"] >= baseline - 0.01, (transport, result["final_accuracy"], baseline)
    # Whole run, the uncompressed warm-up steps included: allreduce's lanes cost 2 bits a value at 2 ranks.
    least = 8 if transport == "allreduce" else 20
    assert result["whole_run"]["ratio"] >= least, (transport, result["whole_run"])
