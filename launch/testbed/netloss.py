"""Random packet loss on netlab's links with nftables (kernels without ``sch_netem``).

netem cannot run on kernels built without ``sch_netem``; nftables usually is built in.
:func:`install` adds, inside one node's namespace, a table ``inet threelc_loss`` whose
output-hook rule drops each packet leaving ``dev`` with probability ``percent``/100
(``numgen random mod 10000 < percent*100``: 0.01% steps) and counts what it drops;
:func:`dropped` reads that counter. Delay cannot be emulated this way. The table lives
in the node's namespace and disappears with it.
"""

from __future__ import annotations

import json
import shutil
import subprocess

TABLE, CHAIN = "threelc_loss", "egress"


class LossError(RuntimeError):
    """nftables is missing or refused the loss rule."""


def check_percent(percent: float) -> float:
    percent = float(percent)
    if not 0 <= percent < 100:
        raise LossError(f"loss must be a percentage in [0, 100); got {percent}")
    return percent


def install(ns: str, dev: str, percent: float) -> None:
    """Drop ``percent`` % of the packets node namespace ``ns`` sends out of ``dev``."""
    threshold = round(check_percent(percent) * 100)
    if shutil.which("nft") is None:
        raise LossError("packet loss needs nftables' `nft` (apt-get install nftables); this kernel has no sch_netem")
    ruleset = (f"table inet {TABLE} {{\n chain {CHAIN} {{\n  type filter hook output priority 0; policy accept;\n"
               f"  oifname \"{dev}\" numgen random mod 10000 < {threshold} counter drop\n }}\n}}\n")
    p = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset, capture_output=True, text=True)
    if p.returncode != 0:
        raise LossError(f"nft refused the loss rule in {ns}: {p.stderr.strip()}")


def dropped(ns: str) -> int:
    """Packets the loss rule of namespace ``ns`` has dropped so far."""
    p = subprocess.run(["ip", "netns", "exec", ns, "nft", "-j", "list", "chain", "inet", TABLE, CHAIN],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise LossError(f"cannot read the loss counter in {ns}: {p.stderr.strip()}")
    for item in json.loads(p.stdout)["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    return 0
