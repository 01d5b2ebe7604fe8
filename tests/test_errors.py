"""threelc/errors.py promises every deliberate error is a ThreeLCError: hold the source to it."""

import ast
import builtins
from pathlib import Path

import threelc

ROOT = Path(__file__).resolve().parent.parent
# Errors whose type is a protocol, not threelc's choice: an abstract method's
# NotImplementedError, ImportError at import time, a module __getattr__'s AttributeError.
ALLOWED = {"NotImplementedError", "ImportError", "AttributeError"}
# The Horovod optimizer raises what horovod.torch.DistributedOptimizer raises for the same misuse.
ALLOWED_IN = {"hooks/horovod.py": {"AssertionError"}}
BUILTIN_ERRORS = {name for name, value in vars(builtins).items()
                  if isinstance(value, type) and issubclass(value, BaseException)} - ALLOWED


def _bare_raises(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name) \
                and node.exc.func.id in BUILTIN_ERRORS - ALLOWED_IN.get(str(path.relative_to(ROOT)), set()):
            yield f"{path.relative_to(ROOT)}:{node.lineno}: raise {node.exc.func.id}"


def test_library_raises_only_threelc_errors():
    sources = sorted((ROOT / "threelc").rglob("*.py")) + sorted((ROOT / "hooks").rglob("*.py"))
    assert len(sources) > 10
    assert [hit for path in sources for hit in _bare_raises(path)] == []


def test_scanner_finds_a_bare_raise(tmp_path):
    bad = ROOT / "tests" / "_bare_raise_probe.py"
    try:
        bad.write_text("def f():\n    raise ValueError('x')\n")
        assert list(_bare_raises(bad)) == ["tests/_bare_raise_probe.py:2: raise ValueError"]
    finally:
        bad.unlink()


def test_error_classes_keep_their_builtin_bases():
    # Callers that caught ValueError / RuntimeError before still do.
    assert issubclass(threelc.ConfigurationError, ValueError) and issubclass(threelc.DecodeError, ValueError)
    assert issubclass(threelc.CommunicationError, RuntimeError)
    assert all(issubclass(e, threelc.ThreeLCError)
               for e in (threelc.ConfigurationError, threelc.DecodeError, threelc.CommunicationError))
