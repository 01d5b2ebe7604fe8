"""threelc where users train: Lightning, accelerate, the HF Trainer, torch.compile.

Each test runs one of launch/examples/*.py on 2 gloo processes (torchrun, or Lightning's
ddp_spawn) and checks, on every rank, that the hook was registered and compressed
(``compressed_steps > 0``, ratio > 2) and that the final parameters are bit-identical
across ranks. The README's "Use it with ..." code blocks must appear verbatim in the
example each names, so the README cannot drift from what runs here. Skipped per
framework when it is not installed (``pip install -e ".[integrations]"``; CI installs it).
About 10-40 s per test (torch.compile's inductor build dominates its test).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch


from launch.common.runner import REPO, worker_env

EXAMPLES = REPO / "launch" / "examples"
STEPS, START_ITER = 8, 2  # the examples' max_steps and ThreeLCState's default start_iter


def needs(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} not installed (pip install -e '.[integrations]')")


def run_example(name: str, out: Path, *args: str, torchrun: bool = True, timeout: float = 150) -> list[dict]:
    script = [str(EXAMPLES / name), str(out), *args]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *script] if torchrun
           else [sys.executable, *script])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env(), cwd=REPO)
    assert p.returncode == 0, f"{name} exited {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def check_compressed_and_identical(ranks: list[dict]) -> None:
    for rank in ranks:
        stats = rank["stats"]
        assert stats["steps"] == STEPS and stats["compressed_steps"] == STEPS - START_ITER
        assert stats["ratio"] > 2 and stats["last_step"]["ratio"] > 20
    first, second = (r["params"] for r in ranks)
    assert first.keys() == second.keys() and first
    for key in first:
        assert torch.equal(first[key], second[key]), f"parameter {key} differs across ranks"


def readme_blocks() -> dict[str, list[str]]:
    """README code blocks introduced by ``<!-- tested in launch/examples/NAME -->``, by NAME."""
    text = (REPO / "README.md").read_text()
    blocks: dict[str, list[str]] = {}
    for name, code in re.findall(r"<!-- tested in launch/examples/(\S+) -->\s*```python\n(.*?)```", text, re.S):
        blocks.setdefault(name, []).append(code)
    return blocks


def test_readme_blocks_are_the_examples():
    blocks = readme_blocks()
    assert set(blocks) == {"lightning_ddp.py", "accelerate_ddp.py", "hf_trainer.py", "compile_ddp.py"}
    for name, codes in blocks.items():
        example = [line.strip() for line in (EXAMPLES / name).read_text().splitlines()]
        for code in codes:
            lines = [line.strip() for line in code.strip().splitlines()]
            starts = [i for i in range(len(example)) if example[i:i + len(lines)] == lines]
            assert starts, f"README block for launch/examples/{name} is not in it verbatim:\n{code}"


def test_import_threelc_needs_no_framework():
    code = ("import sys, threelc, threelc.hooks, threelc.hooks.hf; "
            "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'accelerate', 'transformers') "
            "if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=worker_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


@needs("lightning")
@pytest.mark.parametrize("spawn", [False, True], ids=["torchrun-ddp", "ddp_spawn"])
def test_lightning(tmp_path, spawn):
    ranks = run_example("lightning_ddp.py", tmp_path, *(["--spawn"] if spawn else []), torchrun=not spawn)
    check_compressed_and_identical(ranks)
    for rank in ranks:  # ThreeLCStatsLogger's figures equal the state's
        assert rank["metrics"]["threelc/compressed_steps"] == STEPS - START_ITER
        assert rank["metrics"]["threelc/ratio"] == pytest.approx(rank["stats"]["ratio"])
    (csv,) = tmp_path.glob("lightning_logs/*/metrics.csv")  # rank 0's logger: every log_every_n_steps=2
    header, *rows = [line.split(",") for line in csv.read_text().splitlines()]
    logged = [dict(zip(header, row)) for row in rows]
    assert [int(r["step"]) for r in logged] == [2, 4, 6, 8]
    assert float(logged[-1]["threelc/ratio"]) == pytest.approx(ranks[0]["stats"]["ratio"])


@needs("lightning")
def test_lightning_refuses_other_hooks():
    from threelc import ConfigurationError
    from threelc.hooks import threelc_hook
    from threelc.hooks.lightning import ThreeLCStrategy

    with pytest.raises(ConfigurationError, match="ddp_comm_hook"):
        ThreeLCStrategy(ddp_comm_hook=threelc_hook)
    with pytest.raises(ConfigurationError, match="ThreeLCState"):
        ThreeLCStrategy(state="allgather")


@needs("accelerate")
def test_accelerate(tmp_path):
    ranks = run_example("accelerate_ddp.py", tmp_path)
    check_compressed_and_identical(ranks)
    assert all(rank["world_size"] == 2 for rank in ranks)


def test_register_refuses_a_model_without_ddp():
    from threelc import ConfigurationError
    from threelc.hooks.hf import register

    with pytest.raises(ConfigurationError, match="accelerate launch --cpu"):
        register(torch.nn.Linear(2, 2))


@needs("transformers")
def test_hf_trainer(tmp_path):
    ranks = run_example("hf_trainer.py", tmp_path)
    check_compressed_and_identical(ranks)
    for rank in ranks:
        history = rank["log_history"]
        ours = [entry for entry in history if "threelc/ratio" in entry]
        assert [entry["step"] for entry in ours] == [2, 4, 6, 8]  # logging_steps=2
        assert ours[-1]["threelc/ratio"] == pytest.approx(rank["stats"]["ratio"])
        assert len([entry for entry in history if "loss" in entry]) == 4  # the Trainer's own entries stay


def test_compile(tmp_path):
    ranks = run_example("compile_ddp.py", tmp_path, timeout=240)
    check_compressed_and_identical(ranks)
    assert all(rank["graphs"] >= 1 for rank in ranks)  # dynamo did compile the module
