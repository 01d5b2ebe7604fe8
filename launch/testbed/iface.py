"""The testbed's interface counters as a rank sees them, and interface names carried in gathered rows.

A rank of a netlab run reads the tx/rx counters of its namespace's veth around the
measured steps; rank 0 collects every rank's counters and interface name with one
float all-gather (launch/common/gather.py), so names travel as byte values.
"""

from __future__ import annotations

IFNAMSIZ = 16  # Linux: an interface name is at most 15 bytes plus the NUL


def read_iface(iface: str | None) -> dict | None:
    """tx/rx byte counters of ``iface`` as seen from this process's netns."""
    if not iface:
        return None
    base = f"/sys/class/net/{iface}/statistics"
    try:
        with open(f"{base}/tx_bytes") as t, open(f"{base}/rx_bytes") as r:
            return {"tx": int(t.read()), "rx": int(r.read())}
    except OSError:
        return None


def encode_name(name: str | None, width: int) -> list[float]:
    """``name`` as ``width`` byte values (0-padded) for :func:`all_gather_rows`."""
    data = (name or "").encode()
    if len(data) > width:
        raise ValueError(f"{name!r} is longer than {width} bytes")
    return [float(b) for b in data.ljust(width, b"\0")]


def decode_name(values: list[float]) -> str | None:
    """Inverse of :func:`encode_name`; None for an empty name."""
    data = bytes(int(v) for v in values).rstrip(b"\0")
    return data.decode() if data else None
