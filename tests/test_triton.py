"""The Triton codec, bit for bit against the reference, through Triton's interpreter on CPU.

tests/triton_suite.py runs in a subprocess because TRITON_INTERPRET must be set before
triton is imported. Without triton the test skips, except in CI, which installs it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def test_triton_codec_through_the_interpreter():
    if importlib.util.find_spec("triton") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI installs triton (.ci/run); it does not import")
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1", THREELC_BACKEND="triton", THREELC_TEST_DEVICE="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             str(TESTS / "triton_suite.py")], env=env, cwd=TESTS.parent, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


def test_backend_switch(monkeypatch):
    """auto takes triton for CUDA tensors when it imports; THREELC_BACKEND=triton forces it where it can run."""
    import threelc
    from threelc import backends

    class Fake:
        name = "triton"

    monkeypatch.setattr(backends, "_TRITON", [None])
    monkeypatch.setenv("THREELC_BACKEND", "triton")
    with pytest.raises(threelc.ConfigurationError, match="triton does not import"):
        threelc.backend("cuda")
    monkeypatch.setenv("THREELC_BACKEND", "auto")
    assert threelc.backend("cuda") == "torch"
    monkeypatch.setattr(backends, "_TRITON", [Fake()])
    assert threelc.backend("cuda") == "triton"
    assert threelc.backend("cpu") == ("native" if backends.NATIVE is not None else "torch")
    monkeypatch.setenv("THREELC_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert threelc.backend("cpu") != "triton"  # compiled kernels take CUDA tensors only
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert threelc.backend("cpu") == "triton"
    monkeypatch.setenv("THREELC_BACKEND", "torch")
    assert threelc.backend("cuda") == "torch"
