"""The launch/bench_net.py report: derived figures, goals, Markdown and plot.

Pure functions of the benchmark's JSON: ``python launch/bench_net.py --render
launch/results/bench_net.json`` rewrites the .md/.png from it, and tests/test_bench_report.py
checks that the committed launch/results/bench_net.md is exactly what this renders.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

from launch.bench.plan import RATES, converges, steps_for, variants
from launch.bench.record import save_json

def field(rec: dict, *path):
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
    for c in cells:  # first every cell's own figures, so the ratios below never see stale ones
        m = {"step_time_s": None, "wire_bytes_per_step": None, "hook_bytes_per_step": None}
        if c["status"] == "ok":
            t, w = c["result"]["train"], c["result"]["wire"]
            m.update(step_time_s=t["mean_step_time_s"], wire_bytes_per_step=w["tx_bytes_per_step_steady"],
                     hook_bytes_per_step=t["bytes_per_step"], final_accuracy=t["final_accuracy"],
                     final_loss=t["final_loss"], measured_steps=t["measured_steps"], steps=t["steps"],
                     train_time_s=t["total_time_s"])
            if m["wire_bytes_per_step"] is not None:
                m["wire_bytes_per_step_per_node"] = m["wire_bytes_per_step"] / c["nodes"]
        c["metrics"] = m
    for c in cells:
        m = c["metrics"]
        b = base.get((c["nodes"], c["rate"], c["model"]))
        bm = b and b["metrics"]
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
    derive(doc["cells"], doc["settings"].get("tta_slack", 0.01))
    if final:
        doc["auto_transport"] = auto_transport_eval(doc["cells"])
        doc["goals"] = goals(doc["cells"], argparse.Namespace(**doc["settings"]))
    save_json(doc, out)
    if final:
        out.with_suffix(".md").write_text(markdown(doc) + "\n")
        try:
            plot(doc, out.with_suffix(".png"))
        except Exception as e:  # noqa: BLE001 - the numbers matter more than the picture
            print(f"[bench_net] plot failed: {e}", file=sys.stderr)
