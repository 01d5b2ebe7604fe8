"""Network benchmark (issue 4): every hook on shaped links, in one invocation.

    sudo python launch/bench_net.py                  # the full matrix -> results/bench_net.{json,png,md}
    sudo python launch/bench_net.py --quick          # 2 nodes, few cells, few steps -> results/raw/
    sudo python launch/bench_net.py --dry-run        # print the plan (cells, steps) and exit

Each *cell* is one launch/netlab.py run (``run_lab``): N network namespaces on a
bridge, each node's egress shaped with ``tbf`` to the cell's rate (``unlimited``:
no qdisc), one torchrun agent per node, launch/train.py on gloo.  The matrix is

    nodes x bandwidth x model x hook

with hooks ``none`` (DDP's fp32 all-reduce), ``fp16`` (fp16_compress_hook),
``powersgd`` (PyTorch's PowerSGD, rank 2, the whole model in one DDP bucket --
train.py's default on CPU), ``powersgd-multibucket`` (the same hook with several
DDP buckets, where PyTorch's PowerSGD aborts or hangs on gloo; run with a short
timeout, once per nodes x model at the first bandwidth unless
``--multibucket-rates`` says otherwise, so the failure is recorded) and
``threelc`` with each transport (allreduce, allgather, sharded) at each
sparsity multiplier (default 1.0 and 1.9).

Per cell: mean step time over the measured steps (train.py's window after
``--warmup-steps``), bytes on the wire per step (sum over nodes of the veth tx
counters, read by each rank around the same window), both as ratios to the
``none`` cell of the same nodes/bandwidth/model, final test accuracy, and the
time to reach the ``none`` cell's final accuracy: first evaluation (every
``--eval-every`` steps, plus the final one) whose accuracy is at least that
target, times the cell's mean step time.  ``mlp-wide`` runs only a few steps:
its cells report step time and bytes; its accuracy is not a convergence result.

Also measured, in the same invocation:

* ``auto_transport``: which 3LC transport was fastest at each world size among
  the measured cells, and whether ``choose_transport("auto", N)`` picks it;
* ``codec_profile`` (skip with ``--no-profile``): the 3LC hook's own
  ``state.stats`` (encode/decode seconds per step) with N gloo ranks on
  loopback, next to the compute-only step time, to explain where 3LC's step
  time goes on this machine.

A failing cell records its error (with a one-line summary) and the run goes
on; netlab always deletes its namespaces.  The JSON is rewritten after every
cell, so an interrupted run keeps what it measured; ``--resume PATH`` reuses
the successful cells of an earlier JSON made with the same settings.

Needs root and iproute2 (netlab).  Timings share the machine with whatever
else runs on it: ``machine.loadavg`` is recorded at the start, per cell and
at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from launch.runner import REPO

RATES = ("unlimited", "1gbit", "100mbit")
MODELS = ("mlp-wide", "digits-cnn")
HOOKS = ("none", "fp16", "powersgd", "powersgd-multibucket", "threelc")
TRANSPORTS = ("allreduce", "allgather", "sharded")
SPARSITIES = (1.0, 1.9)
# DDP bucket caps that give PowerSGD several buckets.  mlp-wide: 1 MB gives the
# same two buckets as DDP's default (1 MB first bucket, then 25 MB; train.py only
# uses the default for non-PowerSGD hooks).  digits-cnn (150 kB) fits one bucket
# under DDP's default, so 0.05 MB forces two.
MULTIBUCKET_CAP_MB = {"mlp-wide": 1.0, "digits-cnn": 0.05, "charlm": 0.1}

QUICK = {"nodes": [2], "rates": ["unlimited", "100mbit"], "models": list(MODELS),
         "sparsities": [1.9], "steps_digits": 40, "steps_mlp": 6}


# ----------------------------------------------------------------------------- plan


def _csv(kind):
    def parse(text: str) -> list:
        return [kind(x) for x in text.split(",") if x.strip()]
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=_csv(int), default=None, help="comma list (default 2,4)")
    p.add_argument("--rates", type=_csv(str), default=None,
                   help=f"comma list of tc rates or 'unlimited' (default {','.join(RATES)})")
    p.add_argument("--models", type=_csv(str), default=None, help=f"comma list (default {','.join(MODELS)})")
    p.add_argument("--hooks", type=_csv(str), default=None, help=f"comma list (default {','.join(HOOKS)})")
    p.add_argument("--transports", type=_csv(str), default=None,
                   help=f"3LC transports (default {','.join(TRANSPORTS)})")
    p.add_argument("--sparsities", type=_csv(float), default=None,
                   help=f"3LC sparsity multipliers (default {','.join(map(str, SPARSITIES))})")
    p.add_argument("--steps-digits", type=int, default=None, help="digits-cnn steps (default 300)")
    p.add_argument("--steps-mlp", type=int, default=None, help="mlp-wide steps (default 10)")
    p.add_argument("--steps-other", type=int, default=100, help="steps of any other model")
    p.add_argument("--eval-every", type=int, default=10, help="digits-cnn/charlm evaluation interval (steps)")
    p.add_argument("--warmup-steps", type=int, default=3, help="train.py --warmup-steps")
    p.add_argument("--tta-slack", type=float, default=0.01,
                   help="also report the time to reach none's final accuracy minus this (digits-cnn's test "
                        "set has 359 images: one image is 0.28 points)")
    p.add_argument("--powersgd-rank", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", type=_csv(str), default=[], metavar="NODES:RATE,...",
                   help="(nodes, bandwidth) pairs not to run, e.g. 4:1gbit")
    p.add_argument("--multibucket-rates", type=_csv(str), default=None,
                   help="bandwidths that get a powersgd-multibucket cell (default: the first of --rates)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    p.add_argument("--fail-timeout", type=float, default=45,
                   help="seconds per node for a powersgd-multibucket cell (its collectives time out after 30 s)")
    p.add_argument("--quick", action="store_true",
                   help="development run: 2 nodes, unlimited+100mbit, sparsity 1.9, 40/6 steps, "
                        "output under results/raw/")
    p.add_argument("--out", default=None, help="output prefix (default results/bench_net, "
                                               "--quick: results/raw/bench_net_quick)")
    p.add_argument("--resume", default=None, metavar="JSON", help="reuse the ok cells of this earlier output")
    p.add_argument("--no-profile", action="store_true", help="skip the loopback codec profile")
    p.add_argument("--profile-only", action="store_true",
                   help="only the codec profile (merged into --resume's JSON when given)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only rewrite the .md/.png (and derived fields of the .json) of an earlier output")
    a = p.parse_args(argv)
    q = QUICK if a.quick else {}
    a.nodes = a.nodes or q.get("nodes", [2, 4])
    a.rates = a.rates or q.get("rates", list(RATES))
    a.models = a.models or q.get("models", list(MODELS))
    a.hooks = a.hooks or list(HOOKS)
    a.transports = a.transports or list(TRANSPORTS)
    a.sparsities = a.sparsities or q.get("sparsities", list(SPARSITIES))
    a.steps_digits = a.steps_digits or q.get("steps_digits", 300)
    a.steps_mlp = a.steps_mlp or q.get("steps_mlp", 10)
    a.multibucket_rates = a.multibucket_rates or a.rates[:1]
    a.out = a.out or ("results/raw/bench_net_quick" if a.quick else "results/bench_net")
    bad = [h for h in a.hooks if h not in HOOKS] + [t for t in a.transports if t not in TRANSPORTS]
    if bad:
        p.error(f"unknown hook/transport {bad}")
    for pair in a.skip:
        if not re.fullmatch(r"\d+:\S+", pair):
            p.error(f"--skip expects NODES:RATE, got {pair!r}")
    return a


def steps_for(model: str, a) -> int:
    return {"digits-cnn": a.steps_digits, "mlp-wide": a.steps_mlp}.get(model, a.steps_other)


def converges(model: str) -> bool:
    """Whether the model's cells report accuracy/time-to-accuracy (enough steps to mean something)."""
    return model != "mlp-wide"


def variants(a) -> list[dict]:
    out = []
    for hook in a.hooks:
        if hook == "threelc":
            for t in a.transports:
                for s in a.sparsities:
                    out.append({"variant": f"threelc-{t}-s{s:g}", "hook": "threelc", "transport": t, "sparsity": s})
        else:
            out.append({"variant": hook, "hook": "powersgd" if hook.startswith("powersgd") else hook,
                        "transport": None, "sparsity": None})
    return out


def plan(a) -> list[dict]:
    cells = []
    for nodes in a.nodes:
        for rate in a.rates:
            if f"{nodes}:{rate}" in a.skip:
                continue
            for model in a.models:
                for v in variants(a):
                    if v["variant"] == "powersgd-multibucket" and rate not in a.multibucket_rates:
                        continue
                    cid = f"n{nodes}-{rate}-{model}-{v['variant']}"
                    cells.append({"id": cid, "nodes": nodes, "rate": rate, "model": model, **v,
                                  "train_args": train_args(model, v, a)})
    return cells


def train_args(model: str, v: dict, a) -> list[str]:
    steps = steps_for(model, a)
    args = ["--model", model, "--hook", v["hook"], "--steps", str(steps), "--seed", str(a.seed),
            "--warmup-steps", str(a.warmup_steps), "--threads", "1"]
    if converges(model) and a.eval_every:
        args += ["--eval-every", str(a.eval_every)]
    if v["hook"] == "threelc":
        args += ["--transport", v["transport"], "--sparsity", f"{v['sparsity']:g}"]
    if v["hook"] == "powersgd":
        args += ["--powersgd-rank", str(a.powersgd_rank)]
    if v["variant"] == "powersgd-multibucket":
        # A mismatched gloo collective should fail, not wait for the default 300 s.
        args += ["--bucket-cap-mb", f"{MULTIBUCKET_CAP_MB.get(model, 1.0):g}", "--dist-timeout", "30"]
    else:
        args += ["--dist-timeout", "120"]
    return args


# ----------------------------------------------------------------------------- running


def machine_info() -> dict:
    import torch

    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception:  # noqa: BLE001
            return None

    mem = None
    try:
        mem = int(next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                       if ln.startswith("MemTotal"))) * 1024
    except (OSError, StopIteration):
        pass
    return {
        "hostname": platform.node(), "platform": platform.platform(), "kernel": platform.release(),
        "python": platform.python_version(), "torch": torch.__version__, "cpu": cpu,
        "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "mem_bytes": mem,
        "loadavg_start": list(os.getloadavg()),
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": git("status", "--porcelain", "--untracked-files=no"),
        "netem": "unavailable: delay/loss not emulated, rate only (tbf)",
    }


def summarize_error(text: str) -> str:
    """One line: hang or abort, and the most telling message in the logs."""
    parts = []
    if re.search(r"timeout after \d+", text):
        silent = not re.search(r"\[rank\d+\]:.*Error", text)
        parts.append("hang: killed after " + re.search(r"timeout after (\d+ s)", text).group(1)
                     + (", no worker error or result" if silent else ""))
    if "SIGABRT" in text or "exitcode  : -6" in text:
        parts.append("abort (SIGABRT)")
    if parts and parts[0].startswith("hang"):
        # What the workers print once the bench kills them (the store's host
        # agent goes first) says nothing about why they were stuck.
        text = "\n".join(ln for ln in text.splitlines()
                         if not re.search(r"C10d store|SignalException|got signal|DistNetworkError", ln))
    what = re.search(r"what\(\):\s*(.+)", text)
    if what:
        msg = re.sub(r"\[enforce fail at [^\]]*\]\s*", "", what.group(1)).strip()
        parts.append(msg[:220])
    else:
        errs = re.findall(r"(?:RuntimeError|DistBackendError|CommunicationError|LabError|TimeoutError|Error): (.+)", text)
        if errs:
            msg = errs[-1]
            msg = msg.split("RuntimeError: ")[-1]
            parts.append(msg.strip()[:220])
    if not parts:
        parts.append(text.strip().splitlines()[-1][:220] if text.strip() else "failed")
    return "; ".join(parts)


def run_cell(cell: dict, a, log_root: Path) -> dict:
    from launch.netlab import LabError, run_lab

    multibucket = cell["variant"] == "powersgd-multibucket"
    timeout = a.fail_timeout * cell["nodes"] if multibucket else a.timeout
    log_dir = log_root / cell["id"]
    shutil.rmtree(log_dir, ignore_errors=True)
    rec = {**cell, "status": "ok", "error": None, "error_summary": None, "timeout_s": timeout,
           "loadavg_before": list(os.getloadavg())}
    t0 = time.time()
    try:
        res = run_lab(cell["train_args"], nodes=cell["nodes"], rate=None if cell["rate"] == "unlimited" else cell["rate"],
                      timeout=timeout, strict=True, log_dir=str(log_dir))
        rec["result"] = res
        shutil.rmtree(log_dir, ignore_errors=True)  # kept only for failures
    except (LabError, OSError, ValueError, subprocess.SubprocessError) as e:
        logs = ""
        for f in sorted(log_dir.glob("node*.err")) if log_dir.exists() else []:
            logs += f"\n--- {f.name} ---\n" + f.read_text(errors="replace")
        rec.update(status="failed", error=str(e)[-6000:], error_summary=summarize_error(str(e) + logs),
                   log_dir=str(log_dir), result=None)
    rec["cell_wall_s"] = time.time() - t0
    rec["loadavg_after"] = list(os.getloadavg())
    return rec


# ----------------------------------------------------------------------------- analysis


def _get(rec: dict, *path):
    x = rec
    for k in path:
        if x is None:
            return None
        x = x.get(k) if isinstance(x, dict) else None
    return x


def _first_at(curve: list, target) -> int | None:
    return next((s for s, acc in curve if acc is not None and target is not None and acc >= target - 1e-9), None)


def derive(cells: list[dict], slack: float = 0.01) -> None:
    """Add ``metrics`` to each cell: figures, ratios to the group's ``none`` cell, time to accuracy."""
    base = {(c["nodes"], c["rate"], c["model"]): c for c in cells if c["variant"] == "none" and c["status"] == "ok"}
    for c in cells:
        m = {"step_time_s": None, "wire_bytes_per_step": None, "hook_bytes_per_step": None}
        if c["status"] == "ok":
            t, w = c["result"]["train"], c["result"]["wire"]
            m.update(step_time_s=t["mean_step_time_s"], wire_bytes_per_step=w["tx_bytes_per_step_steady"],
                     hook_bytes_per_step=t["bytes_per_step"], final_accuracy=t["final_accuracy"],
                     final_loss=t["final_loss"], measured_steps=t["measured_steps"], steps=t["steps"],
                     train_time_s=t["total_time_s"])
            if m["wire_bytes_per_step"] is not None:
                m["wire_bytes_per_step_per_node"] = m["wire_bytes_per_step"] / c["nodes"]
        b = base.get((c["nodes"], c["rate"], c["model"]))
        bm = b and b.get("metrics")
        if c["status"] == "ok" and bm:
            if bm.get("step_time_s") and m["step_time_s"]:
                m["step_time_vs_none"] = m["step_time_s"] / bm["step_time_s"]
            if bm.get("wire_bytes_per_step") and m["wire_bytes_per_step"]:
                m["bytes_fewer_than_none"] = bm["wire_bytes_per_step"] / m["wire_bytes_per_step"]
            if converges(c["model"]):
                target = bm.get("final_accuracy")
                curve = [(e["step"], e.get("accuracy")) for e in c["result"]["train"].get("evals", [])]
                curve.append((m["steps"], m["final_accuracy"]))
                hit = _first_at(curve, target)
                m["target_accuracy"] = target
                m["tta_step"] = hit
                m["tta_s"] = hit * m["step_time_s"] if hit is not None else None
                near = _first_at(curve, None if target is None else target - slack)
                m["tta_slack"] = slack
                m["tta_slack_step"] = near
                m["tta_slack_s"] = near * m["step_time_s"] if near is not None else None
        c["metrics"] = m
    # `none` reaches its own final accuracy at some evaluation too: ratios to that time.
    for c in cells:
        b = base.get((c["nodes"], c["rate"], c["model"]))
        for k, ratio in (("tta_s", "tta_vs_none"), ("tta_slack_s", "tta_slack_vs_none")):
            if b and c["metrics"].get(k) and b["metrics"].get(k):
                c["metrics"][ratio] = c["metrics"][k] / b["metrics"][k]


def _ok(cells, **kw):
    return [c for c in cells if c["status"] == "ok" and c["metrics"].get("step_time_s") is not None
            and all(c.get(k) == v for k, v in kw.items())]


def issue_rule(world_size: int) -> str:
    """The rule issue 4 asked to check (hooks/transports.py before commit 8c37433)."""
    return "allgather" if world_size <= 4 else "sharded"


def auto_transport_eval(cells: list[dict]) -> dict:
    """For each world size: which transport was fastest per (bandwidth, model, sparsity), and auto's pick.

    ``auto`` is ``choose_transport("auto", N)`` of the code that evaluates (it may be
    newer than the cells); ``issue_rule`` is the rule issue 4 asked about.
    """
    from threelc.hooks.transports import choose_transport

    out = {}
    for nodes in sorted({c["nodes"] for c in cells}):
        auto = choose_transport("auto", nodes)
        groups, wins, slow = [], {}, {}
        keys = sorted({(c["rate"], c["model"], c["sparsity"]) for c in _ok(cells, nodes=nodes, hook="threelc")},
                      key=lambda k: (RATES.index(k[0]) if k[0] in RATES else 99, k[1], k[2]))
        for rate, model, s in keys:
            times = {c["transport"]: c["metrics"]["step_time_s"]
                     for c in _ok(cells, nodes=nodes, hook="threelc", rate=rate, model=model, sparsity=s)}
            if len(times) < 2:
                continue
            best = min(times, key=times.get)
            wins[best] = wins.get(best, 0) + 1
            for t, v in times.items():
                slow.setdefault(t, []).append(v / times[best])
            groups.append({"rate": rate, "model": model, "sparsity": s, "step_time_s": times, "fastest": best,
                           "auto": auto, "auto_is_fastest": best == auto,
                           "auto_slowdown_vs_fastest": times[auto] / times[best] if auto in times else None})
        geo = {t: math.exp(statistics.fmean(math.log(x) for x in v)) for t, v in slow.items()}
        overall = min(geo, key=geo.get) if geo else None
        out[str(nodes)] = {
            "auto_picks": auto, "issue_rule_picks": issue_rule(nodes), "cells": groups, "wins": wins,
            "geomean_slowdown_vs_fastest": geo, "fastest_overall": overall,
            "auto_is_fastest_overall": overall == auto if overall else None,
            "auto_fastest_in": sum(g["auto_is_fastest"] for g in groups), "groups": len(groups),
        }
    return out


def goals(cells: list[dict], a) -> dict:
    """The issue's targets, per (nodes, model) cell group."""
    res = {"fastest_at_100mbit": [], "bytes_40x_at_100mbit": [], "overhead_unlimited": []}
    others = ("none", "fp16", "powersgd")
    for nodes in a.nodes:
        for model in a.models:
            slow = "100mbit"
            tlc = _ok(cells, nodes=nodes, model=model, rate=slow, hook="threelc")
            oth = [c for c in _ok(cells, nodes=nodes, model=model, rate=slow) if c["variant"] in others]
            if tlc and oth:
                best_t = min(tlc, key=lambda c: c["metrics"]["step_time_s"])
                best_o = min(oth, key=lambda c: c["metrics"]["step_time_s"])
                beaten_by = [c["variant"] for c in tlc if c["metrics"]["step_time_s"] >= best_o["metrics"]["step_time_s"]]
                res["fastest_at_100mbit"].append({
                    "nodes": nodes, "model": model, "best_threelc": best_t["variant"],
                    "best_threelc_s": best_t["metrics"]["step_time_s"], "best_other": best_o["variant"],
                    "best_other_s": best_o["metrics"]["step_time_s"],
                    "met": best_t["metrics"]["step_time_s"] < best_o["metrics"]["step_time_s"],
                    "margin": best_o["metrics"]["step_time_s"] / best_t["metrics"]["step_time_s"],
                    "threelc_variants_not_fastest": beaten_by})
            if tlc:
                ratios = {c["variant"]: c["metrics"].get("bytes_fewer_than_none") for c in tlc}
                vals = {k: v for k, v in ratios.items() if v}
                fastest = min(tlc, key=lambda c: c["metrics"]["step_time_s"])["variant"]
                res["bytes_40x_at_100mbit"].append({
                    "nodes": nodes, "model": model, "ratios": ratios,
                    "best": max(vals, key=vals.get) if vals else None,
                    "fastest_threelc": fastest, "fastest_threelc_ratio": ratios.get(fastest),
                    "met_by_fastest": (ratios.get(fastest) or 0) >= 40,
                    "met_by": sorted(k for k, v in vals.items() if v >= 40),
                    "missed_by": sorted(k for k, v in vals.items() if v < 40)})
            tlc_u = _ok(cells, nodes=nodes, model=model, rate="unlimited", hook="threelc")
            none_u = _ok(cells, nodes=nodes, model=model, rate="unlimited", variant="none")
            if tlc_u and none_u:
                rel = {c["variant"]: c["metrics"]["step_time_s"] / none_u[0]["metrics"]["step_time_s"] for c in tlc_u}
                best = min(rel, key=rel.get)
                res["overhead_unlimited"].append({
                    "nodes": nodes, "model": model, "none_s": none_u[0]["metrics"]["step_time_s"],
                    "relative": rel, "best": best, "best_relative": rel[best], "met": rel[best] <= 1.10,
                    "met_by": sorted(k for k, v in rel.items() if v <= 1.10)})
    return res


# ----------------------------------------------------------------------------- codec profile (loopback)


def _profile_worker(rank: int, world: int, port: int, jobs: list[dict], out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from launch import models
    from launch.comm import setup_comm

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    rows = []
    try:
        for job in jobs:
            task = models.build(job["model"], 0)
            steps, warm = job["steps"], job["warm"]
            if job["variant"] == "compute-only":  # no DDP, no communication: forward/backward/step
                opt = task.make_optimizer(task.model.parameters())
                times = []
                for step in range(steps):
                    x, y = task.train_batch(rank, world, step)
                    t0 = time.perf_counter()
                    loss = task.loss_fn(task.model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    times.append(time.perf_counter() - t0)
                dist.barrier()
                rows.append({**job, "rank": rank, "step_time_s": statistics.fmean(times[warm:])})
                continue
            ddp = DDP(task.model)
            comm = setup_comm(ddp, job["hook"], sparsity=job.get("sparsity") or 1.0,
                              transport=job.get("transport") or "allgather", start_iter=2)
            opt = task.make_optimizer(ddp.parameters())
            times, snap = [], None
            for step in range(steps):
                if step == warm and comm.state is not None:
                    snap = dict(comm.state.stats)
                x, y = task.train_batch(rank, world, step)
                t0 = time.perf_counter()
                loss = task.loss_fn(ddp(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            row = {**job, "rank": rank, "step_time_s": statistics.fmean(times[warm:])}
            if comm.state is not None:
                end, n = comm.state.stats, steps - warm
                row.update(encode_s=(end["encode_seconds"] - snap["encode_seconds"]) / n,
                           decode_s=(end["decode_seconds"] - snap["decode_seconds"]) / n,
                           bytes_sent=(end["bytes_sent"] - snap["bytes_sent"]) / n,
                           bytes_received=(end["bytes_received"] - snap["bytes_received"]) / n,
                           zero_fraction=end["last_step"]["zero_fraction"])
            comm.close()
            dist.barrier()
            rows.append(row)
            del ddp, comm, opt
        Path(f"{out}.rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def codec_profile(a) -> dict:
    """The 3LC hook's encode/decode seconds per step, N gloo ranks on loopback (no shaping)."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    results = {"note": "N gloo ranks on 127.0.0.1 in one namespace, no rate limit, one thread each; "
                       "encode_s/decode_s are threelc state.stats seconds per step on each rank (wall-clock "
                       "on the hook's thread, so CPU contention is included), averaged over ranks",
               "runs": []}
    for nodes in a.nodes:
        jobs = []
        for model in a.models:
            steps = 8 if model == "mlp-wide" else 30
            warm = 3
            jobs.append({"model": model, "variant": "compute-only", "hook": None, "steps": steps, "warm": warm})
            jobs.append({"model": model, "variant": "none", "hook": "none", "steps": steps, "warm": warm})
            for v in variants(a):
                if v["hook"] == "threelc":
                    jobs.append({"model": model, **v, "steps": steps, "warm": warm})
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        tmp = tempfile.mkdtemp(prefix="bench_net_profile_")
        t0 = time.time()
        err = None
        try:
            ctx = mp.get_context("spawn")
            procs = [ctx.Process(target=_profile_worker, args=(r, nodes, port, jobs, f"{tmp}/out")) for r in range(nodes)]
            for p in procs:
                p.start()
            deadline = time.time() + 900
            for p in procs:
                p.join(max(1.0, deadline - time.time()))
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
                    err = "timeout"
            per_rank = []
            for r in range(nodes):
                f = Path(f"{tmp}/out.rank{r}.json")
                if not f.exists():
                    err = err or f"rank {r} wrote no result (exit {procs[r].exitcode})"
                    continue
                per_rank.append(json.loads(f.read_text()))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rows = []
        if per_rank and len(per_rank) == nodes:
            for i, job in enumerate(jobs):
                rs = [pr[i] for pr in per_rank]
                row = {k: v for k, v in job.items() if k not in ("steps", "warm")}
                row.update(nodes=nodes, steps=job["steps"], measured=job["steps"] - job["warm"])
                for k in ("step_time_s", "encode_s", "decode_s", "bytes_sent", "bytes_received", "zero_fraction"):
                    vals = [r[k] for r in rs if r.get(k) is not None]
                    row[k] = statistics.fmean(vals) if vals else None
                rows.append(row)
        results["runs"].append({"nodes": nodes, "wall_s": time.time() - t0, "error": err, "rows": rows})
        print(f"[bench_net] codec profile, {nodes} ranks: {time.time() - t0:.0f} s{' ERROR ' + err if err else ''}",
              file=sys.stderr, flush=True)
    return results


# ----------------------------------------------------------------------------- output


def _fmt_bytes(x) -> str:
    if x is None:
        return "-"
    for unit, k in (("MB", 1e6), ("kB", 1e3)):
        if x >= k:
            return f"{x / k:.3g} {unit}"
    return f"{x:.0f} B"


def _fmt(x, spec=".3g", suffix="") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _bw(rate: str) -> str:
    return {"unlimited": "unlimited", "1gbit": "1 Gbit/s", "100mbit": "100 Mbit/s"}.get(rate, rate)


def markdown(doc: dict) -> str:
    cells, a = doc["cells"], doc["settings"]
    L = ["# Network benchmark: 3LC vs. PyTorch's DDP hooks on shaped links", "",
         "Produced by:", "", "```", doc["command"], "```", ""]
    mi = doc["machine"]
    L += [f"Machine: {mi['cpu']} ({mi['affinity']} CPUs usable), {mi['platform']}, Python {mi['python']}, "
          f"torch {mi['torch']}, gloo over veth pairs in network namespaces (launch/netlab.py). "
          f"Load average at start {mi['loadavg_start'][0]:.1f}, at end {mi.get('loadavg_end', [0])[0]:.1f} "
          f"(the machine is shared). Wall time {doc['wall_s'] / 60:.1f} min. "
          "Rate limits are tbf egress shaping per node; this kernel has no sch_netem, so no delay/loss."]
    crowded = [n for n in a["nodes"] if n > mi["affinity"]]
    if crowded:
        L[-1] += (f" With {', '.join(map(str, crowded))} nodes, {'/'.join(map(str, crowded))} training processes "
                  f"(plus their torchrun agents) share {mi['affinity']} CPUs: CPU contention, not the network, "
                  "dominates those step times where little is sent.")
    during = mi.get("git_log_during_run")
    if during:
        L[-1] += (f" The working tree moved from {mi['git_commit'][:7]} to {mi['git_commit_end'][:7]} during the run "
                  f"({len(during)} commits, listed in the JSON's machine.git_log_during_run)"
                  + (f"; {mi['git_note']}" if mi.get("git_note") else "") + ".")
    skipped = a.get("skip") or []
    if skipped:
        L[-1] += f" Not run (to fit the time budget): {', '.join(skipped)} (nodes:bandwidth)."
    L.append("")
    L += ["Columns: *step* = mean step time over the measured steps (after "
          f"{a['warmup_steps']} warm-up steps) on rank 0; *x none* = step time relative to `none`; "
          "*wire/step* = bytes on the wire per step, all nodes' veth tx counters over the same window; "
          "*fewer bytes* = `none`'s wire bytes / this cell's; *acc* = final test accuracy; "
          "*TTA* = time to reach `none`'s final accuracy (first evaluation at or above it, every "
          f"{a['eval_every']} steps, x mean step time; includes the fp32 warm-up steps at the same rate); "
          f"the second TTA column allows {a.get('tta_slack', 0.01) * 100:g} accuracy points less "
          "(on digits-cnn's 359 test images one image is 0.28 points).", ""]
    for model in a["models"]:
        conv = converges(model)
        steps = steps_for(model, argparse.Namespace(**a))
        L += [f"## {model} ({steps} steps" + ("" if conv else
              "; step time and bytes only: too few steps for accuracy to mean anything") + ")", ""]
        head = ["nodes", "bandwidth", "hook", "step", "x none", "wire/step", "fewer bytes"]
        slack = a.get("tta_slack", 0.01)
        if conv:
            head += ["acc", "TTA", "TTA x none", f"TTA to acc - {slack * 100:g} pt", "x none"]
        L += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
        for nodes in a["nodes"]:
            for rate in a["rates"]:
                group = [c for c in cells if c["nodes"] == nodes and c["rate"] == rate and c["model"] == model]
                if not group:
                    continue
                ok = _ok(group)
                fastest = min(ok, key=lambda c: c["metrics"]["step_time_s"])["id"] if ok else None
                for c in group:
                    m = c["metrics"]
                    name = c["variant"] + (" **(fastest)**" if c["id"] == fastest else "")
                    if c["status"] != "ok":
                        row = [str(nodes), _bw(rate), name, f"FAILED: {c['error_summary']}"] + [""] * (len(head) - 4)
                    else:
                        row = [str(nodes), _bw(rate), name, _fmt(m["step_time_s"] * 1e3, ".1f", " ms"),
                               _fmt(m.get("step_time_vs_none"), ".2f"), _fmt_bytes(m["wire_bytes_per_step"]),
                               _fmt(m.get("bytes_fewer_than_none"), ".1f", "x")]
                        if conv:
                            tta = m.get("tta_s")
                            near = m.get("tta_slack_s")
                            loss = m.get("final_loss")
                            diverged = loss is not None and not math.isfinite(loss)
                            row += [_fmt(m.get("final_accuracy"), ".3f") + (" (loss NaN: diverged)" if diverged else ""),
                                    f"{tta:.2f} s (step {m['tta_step']})" if tta is not None else "not reached",
                                    _fmt(m.get("tta_vs_none"), ".2f"),
                                    f"{near:.2f} s (step {m['tta_slack_step']})" if near is not None else "not reached",
                                    _fmt(m.get("tta_slack_vs_none"), ".2f")]
                    L.append("| " + " | ".join(row) + " |")
        L.append("")

    g = doc["goals"]
    L += ["## Goals", ""]
    L += ["**At 100 Mbit/s, 3LC is the fastest hook** (best 3LC configuration vs. the best of none/fp16/powersgd):", ""]
    for r in g["fastest_at_100mbit"]:
        L.append(f"- {r['nodes']} nodes, {r['model']}: {'met' if r['met'] else 'MISSED'} -- "
                 f"{r['best_threelc']} {r['best_threelc_s'] * 1e3:.1f} ms vs. {r['best_other']} "
                 f"{r['best_other_s'] * 1e3:.1f} ms ({r['margin']:.2f}x); 3LC configurations not faster than "
                 f"{r['best_other']}: {', '.join(r['threelc_variants_not_fastest']) or 'none'}")
    L += ["", "**At 100 Mbit/s, 3LC moves at least 40x fewer bytes than none** (wire bytes):", ""]
    for r in g["bytes_40x_at_100mbit"]:
        rs = ", ".join(f"{k.removeprefix('threelc-')} {v:.1f}x" for k, v in r["ratios"].items() if v)
        L.append(f"- {r['nodes']} nodes, {r['model']}: met by {len(r['met_by'])} of {len(r['ratios'])} "
                 f"configurations; the fastest 3LC configuration ({r['fastest_threelc'].removeprefix('threelc-')}) "
                 f"{_fmt(r['fastest_threelc_ratio'], '.1f', 'x')} ({'met' if r['met_by_fastest'] else 'MISSED'}); "
                 f"all: {rs}")
    L += ["", "**At unlimited bandwidth, 3LC costs at most 10% more step time than none:**", ""]
    for r in g["overhead_unlimited"]:
        rs = ", ".join(f"{k.removeprefix('threelc-')} {v:.2f}x" for k, v in r["relative"].items())
        L.append(f"- {r['nodes']} nodes, {r['model']} (none {r['none_s'] * 1e3:.1f} ms): "
                 f"{'met' if r['met'] else 'MISSED'}, best {r['best'].removeprefix('threelc-')} "
                 f"{r['best_relative']:.2f}x; all: {rs}")
    L.append("")

    L += ["## The `auto` transport rule", "",
          "Issue 4's rule: allgather for N <= 4, sharded above. `choose_transport(\"auto\", N)` in "
          "hooks/transports.py as of this report: "
          + ", ".join(f"N={n}: {e['auto_picks']}" for n, e in doc["auto_transport"].items())
          + ". Fastest transport per (bandwidth, model, sparsity) among the measured cells:", ""]
    for nodes, e in doc["auto_transport"].items():
        geo = e["geomean_slowdown_vs_fastest"]
        ir = e.get("issue_rule_picks")
        if ir and ir in geo:
            L.append(f"- {nodes} nodes, issue 4's rule picks **{ir}**: "
                     + ("the fastest overall." if ir == e["fastest_overall"] else
                        f"NOT the fastest overall ({ir} {geo[ir]:.2f}x vs. {e['fastest_overall']} "
                        f"{geo[e['fastest_overall']]:.2f}x)."))
        L.append(f"- {nodes} nodes: auto picks **{e['auto_picks']}**; fastest in "
                 + ", ".join(f"{t}: {n}" for t, n in sorted(e["wins"].items())) + f" of {e['groups']} groups; "
                 f"auto was fastest in {e['auto_fastest_in']}/{e['groups']}. Geometric-mean slowdown vs. the "
                 "fastest transport per group: "
                 + ", ".join(f"{t} {v:.2f}x" for t, v in sorted(e["geomean_slowdown_vs_fastest"].items()))
                 + f" -> fastest overall: **{e['fastest_overall']}** "
                 + ("(auto's pick)." if e["auto_is_fastest_overall"] else "(NOT auto's pick)."))
        for grp in e["cells"]:
            ts = ", ".join(f"{t} {v * 1e3:.1f} ms" for t, v in grp["step_time_s"].items())
            L.append(f"  - {_bw(grp['rate'])}, {grp['model']}, s={grp['sparsity']:g}: {ts} -> {grp['fastest']}")
    L.append("")

    prof = doc.get("codec_profile")
    if prof and prof.get("runs"):
        L += ["## Where 3LC's time goes (loopback profile)", "", prof["note"] + ".", "",
              "| nodes | model | hook | step | encode/step | decode/step | codec share |",
              "|---|---|---|---|---|---|---|"]
        for run in prof["runs"]:
            if run.get("error"):
                L.append(f"| {run['nodes']} | | FAILED: {run['error']} | | | | |")
            for r in run["rows"]:
                codec = (r.get("encode_s") or 0) + (r.get("decode_s") or 0)
                share = f"{codec / r['step_time_s']:.0%}" if r.get("encode_s") is not None and r["step_time_s"] else "-"
                L.append(f"| {r['nodes']} | {r['model']} | {r['variant']} | {_fmt(r['step_time_s'] * 1e3, '.1f', ' ms')} | "
                         f"{_fmt(r['encode_s'] and r['encode_s'] * 1e3, '.1f', ' ms')} | "
                         f"{_fmt(r['decode_s'] and r['decode_s'] * 1e3, '.1f', ' ms')} | {share} |")
        L.append("")
    fails = [c for c in cells if c["status"] != "ok"]
    if fails:
        L += ["## Failed cells", ""]
        for c in fails:
            L.append(f"- `{c['id']}`: {c['error_summary']}")
        L.append("")
    return "\n".join(L)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, a = doc["cells"], doc["settings"]
    names = [v["variant"] for v in variants(argparse.Namespace(**a))]
    rows = [(model, metric) for model in a["models"] for metric in ("step_time_s", "wire_bytes_per_step")]
    fig, axes = plt.subplots(len(rows), len(a["rates"]), figsize=(5.2 * len(a["rates"]), 3.6 * len(rows)),
                             squeeze=False)
    width = 0.8 / max(1, len(a["nodes"]))
    for r, (model, metric) in enumerate(rows):
        for col, rate in enumerate(a["rates"]):
            ax = axes[r][col]
            for k, nodes in enumerate(a["nodes"]):
                xs, ys, bad = [], [], []
                for i, name in enumerate(names):
                    c = next((c for c in cells if c["nodes"] == nodes and c["rate"] == rate and c["model"] == model
                              and c["variant"] == name), None)
                    if c is None:
                        continue
                    x = i + (k - (len(a["nodes"]) - 1) / 2) * width
                    v = c["metrics"].get(metric) if c["status"] == "ok" else None
                    if v is None:
                        if c["status"] != "ok":
                            bad.append(x)
                        continue
                    xs.append(x)
                    ys.append(v * (1e3 if metric == "step_time_s" else 1))
                ax.bar(xs, ys, width, label=f"{nodes} nodes")
                for x in bad:  # at the bottom of the panel: a log axis has no 0
                    ax.text(x, 0.02, "x", ha="center", va="bottom", color="red", fontsize=12, fontweight="bold",
                            transform=ax.get_xaxis_transform())
            ax.set_yscale("log")
            ax.set_xticks(range(len(names)))
            ax.set_xticklabels([n.replace("threelc-", "3lc-").replace("powersgd-multibucket", "psgd-multi")
                                for n in names], rotation=60, ha="right", fontsize=7)
            ax.set_title(f"{model}, {_bw(rate)}", fontsize=9)
            ax.set_ylabel("step time (ms)" if metric == "step_time_s" else "wire bytes / step")
            ax.grid(axis="y", alpha=0.3, which="both")
            if r == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle("launch/bench_net.py: step time and bytes on the wire per step (log scale; red x = failed)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(doc: dict, out: Path, final: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    derive(doc["cells"], doc["settings"].get("tta_slack", 0.01))
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, out.with_suffix(".json"))
    if final:
        doc["auto_transport"] = auto_transport_eval(doc["cells"])
        doc["goals"] = goals(doc["cells"], argparse.Namespace(**doc["settings"]))
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        out.with_suffix(".md").write_text(markdown(doc) + "\n")
        try:
            plot(doc, out.with_suffix(".png"))
        except Exception as e:  # noqa: BLE001 - the numbers matter more than the picture
            print(f"[bench_net] plot failed: {e}", file=sys.stderr)


# ----------------------------------------------------------------------------- main


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    cells = plan(a)
    settings = {k: v for k, v in vars(a).items() if k not in ("resume", "dry_run", "profile_only")}
    if a.render:
        path = Path(a.render)
        doc = json.loads(path.read_text())
        for c in doc["cells"]:
            if c["status"] != "ok":
                logs = "".join(f"\n--- {f.name} ---\n" + f.read_text(errors="replace")
                               for f in sorted(Path(c.get("log_dir") or "/nonexistent").glob("node*.err")))
                c["error_summary"] = summarize_error((c["error"] or "") + logs)
        write_outputs(doc, path.with_suffix(""), final=True)
        print(f"[bench_net] rendered {path.with_suffix('.md')} and .png", file=sys.stderr)
        return 0
    if a.dry_run:
        for c in cells:
            print(c["id"], " ".join(c["train_args"]))
        print(f"{len(cells)} cells", file=sys.stderr)
        return 0
    # A background job of a non-interactive shell starts with SIGINT ignored, and
    # SIGTERM/SIGHUP would skip netlab's teardown: raise instead.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)

    from launch.netlab import cleanup_stale, preflight

    out = Path(a.out) if Path(a.out).is_absolute() else REPO / a.out
    command = " ".join(["python", "launch/bench_net.py", *map(shlex.quote, argv)])  # as root, from the repo root
    doc = {"command": command, "argv": argv, "settings": settings, "machine": machine_info(),
           "started": datetime.datetime.now().isoformat(timespec="seconds"), "cells": []}
    previous = {}
    if a.resume:
        old = json.loads(Path(a.resume).read_text())
        if a.profile_only:
            doc = {**old, "profile_command": command}
        else:
            previous = {c["id"]: c for c in old.get("cells", []) if c["status"] == "ok"}
            doc["resumed_from"] = a.resume
    t_start = time.time()
    if not a.profile_only:
        preflight()
        stale = cleanup_stale()
        if stale:
            print(f"[bench_net] removed stale namespaces {stale}", file=sys.stderr)
        log_root = out.parent / "raw" / f"{out.name}_logs" if out.parent.name != "raw" else out.parent / f"{out.name}_logs"
        for i, cell in enumerate(cells):
            if cell["id"] in previous and previous[cell["id"]]["train_args"] == cell["train_args"]:
                rec = {**previous[cell["id"]], "resumed": True}
            else:
                print(f"[bench_net] {i + 1}/{len(cells)} {cell['id']} ...", file=sys.stderr, flush=True)
                rec = run_cell(cell, a, log_root)
                m = _get(rec, "result", "train", "mean_step_time_s")
                wb = _get(rec, "result", "wire", "tx_bytes_per_step_steady")
                print(f"[bench_net]   {rec['status']} in {rec['cell_wall_s']:.0f} s"
                      + (f": step {m * 1e3:.1f} ms, wire {wb / 1e3:.1f} kB/step" if m is not None and wb is not None else "")
                      + (f": {rec['error_summary']}" if rec["error_summary"] else ""), file=sys.stderr, flush=True)
            doc["cells"].append(rec)
            doc["wall_s"] = time.time() - t_start
            write_outputs(doc, out, final=False)
    if not a.no_profile:
        try:
            doc["codec_profile"] = codec_profile(a)
        except Exception as e:  # noqa: BLE001
            doc["codec_profile"] = {"error": f"{type(e).__name__}: {e}", "runs": []}
    doc["machine"]["loadavg_end"] = list(os.getloadavg())
    end = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    doc["machine"]["git_commit_end"] = end
    if end and end != doc["machine"].get("git_commit"):
        doc["machine"]["git_log_during_run"] = subprocess.run(
            ["git", "log", "--format=%h %ad %s", "--date=iso", f"{doc['machine']['git_commit']}..{end}"],
            cwd=REPO, capture_output=True, text=True).stdout.strip().splitlines()
    doc["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    if a.profile_only:
        doc["profile_wall_s"] = time.time() - t_start
    else:
        doc["wall_s"] = time.time() - t_start
    write_outputs(doc, out, final=True)
    n_fail = sum(c["status"] != "ok" for c in doc["cells"])
    print(f"[bench_net] {len(doc['cells'])} cells ({n_fail} failed) in {doc['wall_s'] / 60:.1f} min -> "
          f"{out.with_suffix('.json')}, .md, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
