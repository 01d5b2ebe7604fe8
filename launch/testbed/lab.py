"""A multi-node testbed on one machine: network namespaces, a bridge, shaped links.

The command line is launch/netlab.py.
Builds, for a run with N nodes (names carry a unique prefix ``tlc<pid>x<k>``):

* namespace ``<prefix>-br`` holding bridge ``br0`` and ports ``port0..portN-1``;
* namespaces ``<prefix>-n<i>``, each with ``lo`` up and ``veth<i>`` (the peer
  of ``port<i>``) addressed ``10.77.0.<i+1>/24`` -- addresses exist only there;
* per-node egress shaping on ``veth<i>``: ``tbf`` for ``--rate``; ``netem``
  for ``--delay`` (with ``--rate`` folded into netem); ``--loss`` (percent) is an
  nftables rule dropping that share of the packets leaving ``veth<i>``
  (launch/testbed/netloss.py; needs ``nft``, not netem).

It then runs one torchrun agent per namespace (``--nnodes N --nproc-per-node
P``, c10d rendezvous at node 0, ``GLOO_SOCKET_IFNAME=veth<i>``), collects the
rank-0 result line of launch/train.py, and reads each veth's tx/rx byte
counters before and after.  The P processes of a node reach each other at the
node's own address, which the kernel routes over loopback: only traffic between
nodes crosses (and is shaped and counted on) the veths.  The root namespace is never modified except for
adding and deleting the namespaces above, and teardown deletes only
namespaces this process created (which removes their links with them); it
runs on normal exit, exceptions, SIGINT/SIGTERM and at interpreter exit.

Kernels without ``sch_netem`` cannot emulate delay: a run asking for it fails
with an explanation, or, with ``strict=False`` / ``--best-effort``, proceeds
without delay and records what was skipped.

From Python: ``run_lab(["--model", "mlp-wide", "--hook", "fp16"], nodes=2,
rate="100mbit", procs_per_node=2)`` returns the same object the CLI prints.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from launch.common.runner import parse_result, torchrun_cmd, worker_env
from launch.testbed import netloss

_lab_ids = itertools.count()
_RATE_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
               "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}  # tc: "bps" = bytes/s


class LabError(RuntimeError):
    """The testbed cannot be built or a run inside it failed."""


def preflight() -> None:
    """Raise LabError unless this process can build namespaces and shape links."""
    if os.geteuid() != 0:
        raise LabError("netlab needs root (it creates network namespaces, veth pairs and tc qdiscs); "
                       "run it as root or with sudo")
    missing = [t for t in ("ip", "tc") if shutil.which(t) is None]
    if missing:
        raise LabError(f"netlab needs {' and '.join(missing)} from iproute2 (apt-get install iproute2)")


def rate_bytes_per_s(rate: str) -> float:
    """Parse a tc rate such as ``100mbit`` or ``12.5mbps`` into bytes/s."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]+)\s*", rate)
    if not m or m.group(2).lower() not in _RATE_UNITS:
        raise LabError(f"rate {rate!r} not understood; use e.g. 100mbit, 1gbit, 500kbit, 10mbps")
    return float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        raise LabError(f"`{' '.join(cmd)}` failed: {p.stderr.strip() or p.stdout.strip()}")
    return p


def existing_namespaces() -> set[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


class NetLab:
    """N namespaces on a bridge; use as a context manager (setup/teardown)."""

    def __init__(self, nodes: int = 2, rate: str | None = None, delay: str | None = None, loss: float = 0.0,
                 subnet: str = "10.77.0", strict: bool = True, procs_per_node: int = 1):
        if not 1 <= nodes <= 200:
            raise LabError("nodes must be in 1..200")
        if not 1 <= procs_per_node <= 64:
            raise LabError("procs_per_node must be in 1..64")
        self.nodes, self.rate, self.delay, self.procs_per_node = nodes, rate, delay, procs_per_node
        try:
            self.loss = netloss.check_percent(loss or 0)
        except netloss.LossError as error:
            raise LabError(str(error)) from None
        self.subnet, self.strict = subnet, strict
        self.prefix = f"tlc{os.getpid()}x{next(_lab_ids)}"
        self.bridge_ns = f"{self.prefix}-br"
        self.created: list[str] = []  # namespaces *we* created: the only ones we ever delete
        self.emulation: dict = {}
        self._procs: list[subprocess.Popen] = []
        self._old_sigterm = None

    # -- naming ---------------------------------------------------------------
    def ns(self, i: int) -> str:
        return f"{self.prefix}-n{i}"

    def ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    @staticmethod
    def iface(i: int) -> str:
        return f"veth{i}"  # name inside node i's namespace (names are per-namespace)

    # -- lifecycle --------------------------------------------------------------
    def __enter__(self) -> "NetLab":
        preflight()
        atexit.register(self.teardown)
        if threading.current_thread() is threading.main_thread():
            # SIGTERM would otherwise kill us without running `finally`/atexit.
            self._old_sigterm = signal.signal(signal.SIGTERM, raise_system_exit)
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def _add_ns(self, name: str) -> None:
        if name in existing_namespaces():
            raise LabError(f"namespace {name} already exists and was not created by this run; refusing to touch it")
        _run(["ip", "netns", "add", name])
        self.created.append(name)

    def setup(self) -> None:
        self._add_ns(self.bridge_ns)
        br = ["ip", "-n", self.bridge_ns]
        _run(br + ["link", "add", "br0", "type", "bridge"])
        _run(br + ["link", "set", "br0", "addrgenmode", "none"], check=False)
        _run(br + ["link", "set", "br0", "up"])
        for i in range(self.nodes):
            ns, dev, port = self.ns(i), self.iface(i), f"port{i}"
            self._add_ns(ns)
            node = ["ip", "-n", ns]
            # Created inside the bridge namespace with its peer placed directly
            # into the node namespace: nothing appears in the root namespace.
            _run(br + ["link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns])
            for cmd, dv in ((br, port), (node, dev)):
                # No IPv6 link-local addresses: keeps ND/MLD chatter off the counters.
                _run(cmd + ["link", "set", dv, "addrgenmode", "none"], check=False)
            _run(br + ["link", "set", port, "master", "br0"])
            _run(br + ["link", "set", port, "up"])
            _run(node + ["link", "set", "lo", "up"])  # torchrun/gloo also talk to themselves
            _run(node + ["addr", "add", f"{self.ip(i)}/24", "dev", dev])
            _run(node + ["link", "set", dev, "up"])
            self._shape(ns, dev)
            if self.loss > 0:
                try:
                    netloss.install(ns, dev, self.loss)
                except netloss.LossError as error:
                    raise LabError(str(error)) from None

    def _shape(self, ns: str, dev: str) -> None:
        """Egress shaping of one node's link: tbf for rate, netem for delay (loss: nftables)."""
        tc = ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root"]
        if self.delay and self.delay not in ("0", "0ms"):
            args = ["netem", "delay", self.delay]
            if self.rate:
                args += ["rate", self.rate]
            # Deep enough queue that shaping delays packets instead of dropping them.
            p = _run(tc + args + ["limit", "10000"], check=False)
            if p.returncode == 0:
                self.emulation = {"qdisc": "netem", "rate": self.rate, "delay": self.delay}
                return
            msg = (f"cannot emulate delay: `tc qdisc add ... netem` failed ({p.stderr.strip()}); "
                   "this kernel lacks sch_netem. Use --delay 0 (rate shaping uses tbf, --loss nftables), "
                   "or --best-effort to run without delay")
            if self.strict:
                raise LabError(msg)
            print(f"[netlab] warning: {msg}", file=sys.stderr)
            self.emulation = {"unsupported": ["delay"], "reason": "sch_netem unavailable"}
        if self.rate:
            bps = rate_bytes_per_s(self.rate)
            # burst must cover one timer tick and a full GSO packet; the queue
            # holds ~100 ms so a shaped link delays rather than drops.
            burst = int(max(64 * 1024, bps / 250))
            limit = int(max(4 * burst, bps * 0.1))
            _run(tc + ["tbf", "rate", self.rate, "burst", str(burst), "limit", str(limit)])
            self.emulation = {**self.emulation, "qdisc": "tbf", "rate": self.rate, "burst": burst, "limit": limit}

    def teardown(self) -> None:
        """Kill our torchrun process groups, then delete our namespaces (idempotent)."""
        for p in self._procs:
            _kill_group(p)
        self._procs.clear()
        while self.created:
            _run(["ip", "netns", "del", self.created.pop()], check=False)
        atexit.unregister(self.teardown)
        if self._old_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    # -- measurement ----------------------------------------------------------
    def counters(self) -> list[dict]:
        """tx/rx bytes and packets of every node's veth, read inside its namespace."""
        out = []
        for i in range(self.nodes):
            info = json.loads(_run(["ip", "-n", self.ns(i), "-s", "-j", "link", "show", "dev", self.iface(i)]).stdout)
            s = info[0]["stats64"]
            out.append({"tx_bytes": s["tx"]["bytes"], "rx_bytes": s["rx"]["bytes"],
                        "tx_packets": s["tx"]["packets"], "rx_packets": s["rx"]["packets"],
                        "tx_dropped": s["tx"]["dropped"]})
        return out

    # -- running ----------------------------------------------------------------
    def run_training(self, train_args: list[str], timeout: float = 600, port: int = 29500,
                     log_dir: str | None = None) -> dict:
        """Run launch/train.py on every node; return the lab result (see run_lab)."""
        if any(a == "--wire-iface" or a.startswith("--wire-iface=") for a in train_args):
            raise LabError("--wire-iface is set by netlab per node; do not pass it")
        logs = Path(log_dir or tempfile.mkdtemp(prefix=f"{self.prefix}-logs-"))
        logs.mkdir(parents=True, exist_ok=True)
        before = self.counters()
        t0 = time.time()
        files = []
        for i in range(self.nodes):
            rdzv = [f"--nnodes={self.nodes}", f"--nproc-per-node={self.procs_per_node}", f"--node-rank={i}",
                    "--rdzv-backend=c10d", f"--rdzv-endpoint={self.ip(0)}:{port}", f"--rdzv-id={self.prefix}",
                    f"--rdzv-conf=is_host={int(i == 0)},join_timeout=120", f"--local-addr={self.ip(i)}",
                    "--max-restarts=0"]
            cmd = ["ip", "netns", "exec", self.ns(i)] + torchrun_cmd(rdzv, list(train_args) + ["--no-progress"])
            env = worker_env({"GLOO_SOCKET_IFNAME": self.iface(i), "TLC_WIRE_IFACE": self.iface(i)})
            out, err = open(logs / f"node{i}.out", "w"), open(logs / f"node{i}.err", "w")
            files += [out, err]
            # Own session per agent: we can signal its whole process tree by id.
            self._procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True))
        try:
            failed = self._wait(timeout)
        finally:
            for f in files:
                f.close()
        wall = time.time() - t0
        after = self.counters()
        dropped = [netloss.dropped(self.ns(i)) for i in range(self.nodes)] if self.loss > 0 else None
        outs = [(logs / f"node{i}.out").read_text() for i in range(self.nodes)]
        if failed:
            tails = "\n".join(f"--- node {i} stderr ---\n{(logs / f'node{i}.err').read_text()[-2500:]}"
                              for i in range(self.nodes))
            raise LabError(f"training failed ({failed}); logs in {logs}\n{tails}")
        train = None
        for text in outs:  # rendezvous decides which node hosts rank 0
            try:
                train = parse_result(text)
                break
            except ValueError:
                continue
        if train is None:
            raise LabError(f"no result line from any node; logs in {logs}")
        if log_dir is None:
            shutil.rmtree(logs, ignore_errors=True)
        return self._result(train, before, after, wall, dropped)

    def _wait(self, timeout: float) -> str | None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            codes = [p.poll() for p in self._procs]
            bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                return f"node {bad[0][0]} exited with {bad[0][1]}"
            if all(c == 0 for c in codes):
                self._procs.clear()
                return None
            time.sleep(0.2)
        return f"timeout after {timeout:.0f} s"

    def _result(self, train: dict, before: list, after: list, wall: float, dropped: list | None) -> dict:
        steps = max(1, train["steps"] - train.get("start_step", 0))
        steady = {}
        for w in train.get("wire") or []:
            if w:
                steady[int(w["iface"].removeprefix("veth"))] = w
        per_node = []
        for i, (b, a) in enumerate(zip(before, after)):
            d = {k: a[k] - b[k] for k in a}
            per_node.append({
                "node": i, "ns": self.ns(i), "iface": self.iface(i), "ip": self.ip(i), **d,
                "tx_bytes_per_step": d["tx_bytes"] / steps, "rx_bytes_per_step": d["rx_bytes"] / steps,
                "tx_bytes_per_step_steady": steady.get(i, {}).get("tx_bytes_per_step"),
                "rx_bytes_per_step_steady": steady.get(i, {}).get("rx_bytes_per_step"),
            })
        total = sum(n["tx_bytes"] for n in per_node)
        st = [n["tx_bytes_per_step_steady"] for n in per_node]
        return {
            "lab": {"nodes": self.nodes, "procs_per_node": self.procs_per_node, "rate": self.rate, "delay": self.delay, "loss": self.loss,
                    "emulation": self.emulation, "prefix": self.prefix, "wall_s": wall,
                    "loss_dropped_packets": dropped},  # per node, by the nftables loss rule
            "train": train,
            "wire": {
                "per_node": per_node,
                "total_tx_bytes": total,  # whole run: rendezvous, DDP init, warm-up included
                "tx_bytes_per_step": total / steps,  # all nodes, whole run / steps run
                # all nodes, measured steps only (train.py's window after --warmup-steps)
                "tx_bytes_per_step_steady": sum(st) if all(v is not None for v in st) else None,
                "steps": steps,
            },
        }


def raise_system_exit(signum, frame):
    raise SystemExit(128 + signum)


def _kill_group(p: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, the process group of one agent we started."""
    if p.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_lab(train_args: list[str], nodes: int = 2, rate: str | None = None, delay: str | None = None,
            loss: float = 0.0, timeout: float = 600, strict: bool = True, port: int = 29500,
            log_dir: str | None = None, procs_per_node: int = 1) -> dict:
    """Build a lab, run launch/train.py ``train_args`` on ``nodes`` nodes, tear down.

    Returns ``{"lab": {...}, "train": <rank-0 result of train.py>, "wire": {...}}``;
    ``wire.per_node[i]`` has the tx/rx bytes (and packets) that crossed node
    i's veth during the run, whole-run per-step figures and, when train.py
    ran its measured window, ``*_per_step_steady`` figures for it.
    """
    with NetLab(nodes, rate=rate, delay=delay, loss=loss, strict=strict, procs_per_node=procs_per_node) as lab:
        return lab.run_training(train_args, timeout=timeout, port=port, log_dir=log_dir)


def cleanup_stale() -> list[str]:
    """Delete ``tlc<pid>x<k>-*`` namespaces whose creating process is gone."""
    removed = []
    for name in sorted(existing_namespaces()):
        m = re.fullmatch(r"tlc(\d+)x\d+-(br|n\d+)", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _run(["ip", "netns", "del", name], check=False)
            removed.append(name)
    return removed
