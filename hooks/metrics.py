"""``state.stats`` as flat numbers for the loggers of training frameworks."""

from __future__ import annotations


def flat_stats(stats: dict) -> dict[str, float]:
    """``threelc/*`` figures from ``ThreeLCState.stats`` (None values, e.g. before any step, left out).

    Running totals: ``ratio`` (uncompressed / sent bytes), ``bytes_sent``,
    ``uncompressed_bytes``, ``codec_seconds`` (encode + decode), ``compressed_steps``,
    ``zero_fraction``; the last step: ``step_ratio``, ``step_bytes_sent``.
    """
    last = stats["last_step"]
    figures = {"threelc/compressed_steps": stats["compressed_steps"], "threelc/bytes_sent": stats["bytes_sent"],
               "threelc/uncompressed_bytes": stats["uncompressed_bytes"],
               "threelc/codec_seconds": stats["encode_seconds"] + stats["decode_seconds"],
               "threelc/ratio": stats["ratio"], "threelc/zero_fraction": stats["zero_fraction"],
               "threelc/step_bytes_sent": last["bytes_sent"], "threelc/step_ratio": last["ratio"]}
    return {key: float(value) for key, value in figures.items() if value is not None}
