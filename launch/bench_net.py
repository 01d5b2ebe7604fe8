"""Network benchmark (issue 4): every hook on shaped links, in one invocation.

    sudo python launch/bench_net.py                  # the full matrix -> launch/results/bench_net.{json,png,md}
    sudo python launch/bench_net.py --quick          # 2 nodes, few cells, few steps -> launch/results/raw/
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

from launch.bench.plan import HOOKS, MODELS, QUICK, RATES, SPARSITIES, TRANSPORTS, plan, variants
from launch.bench.report import field, write_outputs
from launch.common.runner import REPO

# ----------------------------------------------------------------------------- command line


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
    p.add_argument("--sparsity-warmup", type=int, default=None,
                   help="3LC cells: train.py --sparsity-warmup (default: threelc's; 0 measures each sparsity from "
                        "the first compressed step)")
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
                        "output under launch/results/raw/")
    p.add_argument("--out", default=None, help="output prefix (default launch/results/bench_net, "
                                               "--quick: launch/results/raw/bench_net_quick)")
    p.add_argument("--resume", default=None, metavar="JSON", help="reuse the ok cells of this earlier output")
    p.add_argument("--no-profile", action="store_true", help="skip the loopback codec profile")
    p.add_argument("--profile-only", action="store_true",
                   help="only the codec profile, merged into --resume's JSON (required)")
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
    if a.profile_only and not a.resume:
        p.error("--profile-only merges into an earlier output: give --resume JSON")
    default_out = str(Path(a.resume).with_suffix("")) if a.profile_only else (
        "launch/results/raw/bench_net_quick" if a.quick else "launch/results/bench_net")
    a.out = a.out or default_out
    bad = [h for h in a.hooks if h not in HOOKS] + [t for t in a.transports if t not in TRANSPORTS]
    if bad:
        p.error(f"unknown hook/transport {bad}")
    for pair in a.skip:
        if not re.fullmatch(r"\d+:\S+", pair):
            p.error(f"--skip expects NODES:RATE, got {pair!r}")
    return a


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
    from launch.testbed.lab import LabError, run_lab

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


# ----------------------------------------------------------------------------- codec profile (loopback)


def _profile_worker(rank: int, world: int, port: int, jobs: list[dict], out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from launch.common import models
    from launch.common.schemes import register_scheme

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    rows = []
    try:
        for job in jobs:
            os.environ["THREELC_BACKEND"] = job.get("backend", "auto")
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
            meter = register_scheme(ddp, job["hook"], sparsity=job.get("sparsity") or 1.0,
                              sparsity_warmup=job.get("sparsity_warmup"),
                              transport=job.get("transport") or "allgather", start_iter=2)
            opt = task.make_optimizer(ddp.parameters())
            times, snap = [], None
            for step in range(steps):
                if step == warm and meter.state is not None:
                    snap = dict(meter.state.stats)
                x, y = task.train_batch(rank, world, step)
                t0 = time.perf_counter()
                loss = task.loss_fn(ddp(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
            row = {**job, "rank": rank, "step_time_s": statistics.fmean(times[warm:])}
            if meter.state is not None:
                end, n = meter.state.stats, steps - warm
                row.update(encode_s=(end["encode_seconds"] - snap["encode_seconds"]) / n,
                           decode_s=(end["decode_seconds"] - snap["decode_seconds"]) / n,
                           bytes_sent=(end["bytes_sent"] - snap["bytes_sent"]) / n,
                           bytes_received=(end["bytes_received"] - snap["bytes_received"]) / n,
                           zero_fraction=end["last_step"]["zero_fraction"])
            meter.close()
            dist.barrier()
            rows.append(row)
            del ddp, meter, opt
        Path(f"{out}.rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def codec_backends() -> list[str]:
    from threelc.backends import NATIVE
    return ["native", "torch"] if NATIVE is not None else ["torch"]


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
                    # Each 3LC cell on the native codec and again on the pure-PyTorch reference.
                    for backend in codec_backends():
                        label = v["variant"] + ("" if backend == "native" else f" ({backend} codec)")
                        jobs.append({"model": model, **v, "variant": label, "backend": backend, "steps": steps,
                                     "warm": warm, "sparsity_warmup": a.sparsity_warmup})
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

    from launch.testbed.lab import cleanup_stale, preflight

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
                m = field(rec, "result", "train", "mean_step_time_s")
                wb = field(rec, "result", "wire", "tx_bytes_per_step_steady")
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
    if not a.profile_only:  # (a profile merged later must not report commits as made "during" the matrix)
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
