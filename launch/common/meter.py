"""What each gradient-communication scheme hands to collectives, counted per rank.

``counters()`` are the cumulative bytes *this rank handed to collectives* (not
the bytes on the wire, which depend on the collective algorithm; the testbed,
launch/netlab.py, measures those). launch/common/schemes.py says how each scheme's
bytes are counted.
"""

from __future__ import annotations

from launch.common import powersgd_state


class ByteMeter:
    """A registered scheme plus its cumulative byte counters for this rank."""

    def __init__(self, kind: str, numel: int, state=None, bytes_per_element: int | None = None):
        """``numel`` gradient elements are synchronized per step. ``bytes_per_element``:
        what a step hands over per element when no hook meters it (DDP's own
        all-reduce: 4; Horovod's fp16 compression: 2); metered hooks count themselves."""
        self.kind = kind
        self.state = state
        self._numel = numel
        self._step_bytes = bytes_per_element
        self._sent = 0
        self._uncompressed = 0

    @property
    def numel(self) -> int:
        """Number of gradient elements DDP synchronizes per step."""
        return self._numel

    # -- accounting -----------------------------------------------------------
    def add(self, sent: int, uncompressed: int) -> None:
        """Count one exchange: ``sent`` bytes handed over for ``uncompressed`` fp32 bytes."""
        self._sent += int(sent)
        self._uncompressed += int(uncompressed)

    def step_done(self) -> None:
        """Call after every optimizer step (counts the unmetered exchange, if any)."""
        if self._step_bytes is not None:
            self.add(self._numel * self._step_bytes, self._numel * 4)

    def counters(self) -> dict:
        """Cumulative bytes this rank handed to collectives (snapshot-friendly)."""
        if self.kind == "threelc":
            s = self.state.stats
            return {
                "sent": int(s["bytes_sent"]),
                "received": int(s.get("bytes_received", 0)),
                "uncompressed": int(s["uncompressed_bytes"]),
            }
        # For all-reduce based schemes the result buffer a rank gets back is
        # as large as what it handed in.
        return {"sent": self._sent, "received": self._sent, "uncompressed": self._uncompressed}

    def close(self) -> None:
        """Stop the 3LC hook's communication thread (it also stops at interpreter exit)."""
        close = getattr(self.state, "close", None)
        if callable(close):
            close()

    # -- checkpointing (tensors and plain types only) ------------------------
    def state_dict(self) -> dict | None:
        if self.kind == "threelc":
            return self.state.state_dict()
        if self.kind in ("powersgd", "batched-powersgd"):
            return powersgd_state.state_dict(self.state)
        return None

    def load_state_dict(self, d: dict | None) -> None:
        if d is None:
            return
        if self.kind == "threelc":
            self.state.load_state_dict(d)
        elif self.kind in ("powersgd", "batched-powersgd"):
            powersgd_state.load_state_dict(self.state, d)
