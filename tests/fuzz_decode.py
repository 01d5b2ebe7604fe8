"""Coverage-guided fuzz target for ``threelc.decode`` (atheris / libFuzzer).

The contract under test: whatever bytes arrive, ``decode`` / ``decode_quantized``
return ternary values and a float tensor of the length the header declares, or raise
``threelc.DecodeError``; the native decoder (when built) raises only ``DecodeError``
for any expected layout, and decodes every payload the reference decodes to the same
floats. Any other exception, a crash, a hang (``-timeout``) or a huge allocation
(``-rss_limit_mb``) is a finding.

Run (the corpus directory is optional; valid payloads are seeded into it)::

    python tests/fuzz_decode.py -max_total_time=60 /tmp/3lc-corpus
    python tests/fuzz_decode.py -runs=100000
    python tests/fuzz_decode.py crash-<hash>        # replay one finding

libFuzzer flags go through unchanged. tests/test_faults.py runs it for a few
seconds. Only threelc's modules are instrumented (torch and numpy are imported first).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fuzz this checkout's threelc

import atheris
import torch  # before instrumentation: only threelc's own modules are instrumented

with atheris.instrument_imports(include=["threelc"]):
    import threelc
    from threelc.backends import NATIVE, Layout
    from threelc.wire import MAGIC, VERSION

torch.set_num_threads(1)
FIXED_LAYOUTS = [Layout([7]), Layout([100, 0, 200])]  # what a transport would expect from a peer
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def seed_payloads() -> list[bytes]:
    """Valid payloads of every kind (empty, tiny, ZRE-heavy, several segments, fp16, no ZRE)."""
    generator = torch.Generator().manual_seed(0)
    seeds = []
    for numel, sparsity, segments in [(0, 1.0, None), (1, 1.0, None), (7, 1.0, None), (123, 1.9, None),
                                      (300, 1.5, [100, 0, 200]), (1000, 1.99, None), (400, 1.0, None)]:
        x = torch.randn(numel, generator=generator) * 3
        seeds.append(threelc.encode(x, sparsity, segments).numpy().tobytes())
    seeds.append(threelc.encode(torch.zeros(140)).numpy().tobytes())  # all zero: ZRE runs of 14
    seeds.append(threelc.encode(torch.randn(50, generator=generator).half(), 1.2).numpy().tobytes())
    q, scale = threelc.quantize(torch.randn(64, generator=generator), 1.0)
    seeds.append(threelc.encode_quantized(q, scale, zre=False).numpy().tobytes())
    return seeds


def native_decode(candidate: bytes, layout):
    """The native decoder on ``candidate`` as one payload of ``layout``: floats, or "DecodeError"."""
    out = torch.zeros(layout.numel)
    payload = torch.frombuffer(bytearray(candidate), dtype=torch.uint8) if candidate else torch.empty(0, dtype=torch.uint8)
    try:
        NATIVE.decode([payload], layout, out, average=False)
    except threelc.DecodeError:
        return "DecodeError"
    return out


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris's name
    for candidate in (data, MAGIC + bytes([VERSION]) + data[5:]):  # also with a valid magic and version
        if NATIVE is not None:  # the native decoder must refuse whatever the layout, or agree with the reference
            for layout in FIXED_LAYOUTS:
                native_decode(candidate, layout)
        try:
            q, scales, header = threelc.decode_quantized(candidate)
            out = threelc.decode(candidate)
        except threelc.DecodeError:
            continue
        if NATIVE is not None and header.numel <= 1 << 20:
            native = native_decode(candidate, Layout(header.segments))
            assert not isinstance(native, str), "the native decoder refused a payload the reference decodes"
            reference = threelc.dequantize(q, scales, header.segments)  # float32, before the cast to header.dtype
            assert torch.equal(torch.isnan(native), torch.isnan(reference)), "NaN positions differ"
            keep = ~torch.isnan(reference)
            assert torch.equal(native[keep].view(torch.int32), reference[keep].view(torch.int32)), "decoders differ"
        # What decoding promises: ternary values, one non-negative (or NaN) scale per
        # segment, and a float tensor of the declared length.
        assert q.dtype == torch.int8 and q.numel() == header.numel == sum(header.segments), header
        assert q.numel() == 0 or (int(q.min()) >= -1 and int(q.max()) <= 1), "a value outside {-1, 0, 1}"
        assert scales.numel() == len(header.segments) and not bool((scales < 0).any()), scales
        assert out.dim() == 1 and out.numel() == header.numel and out.dtype in FLOAT_DTYPES, out.dtype


def main(argv: list[str]) -> None:
    corpus = [a for a in argv[1:] if not a.startswith("-") and os.path.isdir(a)]
    for directory in corpus[:1]:
        for i, seed in enumerate(seed_payloads()):
            path = os.path.join(directory, f"seed-{i}")
            if not os.path.exists(path):
                with open(path, "wb") as f:
                    f.write(seed)
    # Bound single inputs and memory: a payload that makes decode allocate or loop
    # far beyond its size is a finding, not a slow test.
    defaults = ["-timeout=10", "-rss_limit_mb=4096", "-max_len=4096"]
    given = {a.split("=")[0] for a in argv[1:]}
    atheris.Setup([argv[0], *[d for d in defaults if d.split("=")[0] not in given], *argv[1:]], TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
