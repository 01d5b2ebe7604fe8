"""Traffic counters of one rank: totals since the start and the last finished step."""

from __future__ import annotations

from typing import Any

STAT_KEYS = ("bytes_sent", "bytes_received", "node_bytes_sent", "node_bytes_received", "uncompressed_bytes", "numel",
             "zeros", "encode_seconds", "decode_seconds")
# Counted by the collectives and the transport as running totals (the rest per bucket here).
RUNNING_KEYS = ("bytes_sent", "bytes_received", "node_bytes_sent", "node_bytes_received", "zeros", "encode_seconds",
                "decode_seconds")


class TrafficStats:
    """Per-bucket additions and running counters, folded into per-step figures at each step's end."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(("steps", "compressed_steps", *STAT_KEYS), 0)
        self.last_step = dict.fromkeys(STAT_KEYS, 0)
        self._current = dict.fromkeys(STAT_KEYS, 0)
        self._marks: dict = {}

    def add_bucket(self, uncompressed_bytes: int, compressed_numel: int) -> None:
        self._current["uncompressed_bytes"] += uncompressed_bytes
        self._current["numel"] += compressed_numel

    def end_step(self, running: dict, compressed: bool) -> None:
        """``running``: the RUNNING_KEYS counters as they stand now."""
        # Buckets overlap inside a step, so per-step figures are differences of running
        # counters between step ends; the last bucket finishes after every other one.
        self.last_step = {**self._current, **{k: v - self._marks.get(k, 0) for k, v in running.items()}}
        self._marks = dict(running)
        self._current = dict.fromkeys(STAT_KEYS, 0)
        self.totals["steps"] += 1
        self.totals["compressed_steps"] += int(compressed)
        for key in STAT_KEYS:
            self.totals[key] += self.last_step[key]

    def report(self, **context) -> dict[str, Any]:
        """Totals, ``last_step``, and for both ``ratio`` and ``zero_fraction``; ``context`` added at the top."""
        totals, last = dict(self.totals), dict(self.last_step)
        for record in (totals, last):
            record["ratio"] = record["uncompressed_bytes"] / record["bytes_sent"] if record["bytes_sent"] else None
            record["zero_fraction"] = record["zeros"] / record["numel"] if record["numel"] else None
        return {**totals, **context, "last_step": last}
