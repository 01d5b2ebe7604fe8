"""The launch/bench_net.py matrix: which cells it runs and train.py's arguments for each.

Shared by the runner (launch/bench_net.py) and the report
(launch/bench/report.py), which re-derives its goals from the same plan.
"""

from __future__ import annotations

from threelc.hooks import FLAT_TRANSPORTS

RATES = ("unlimited", "1gbit", "100mbit")
MODELS = ("mlp-wide", "digits-cnn")
HOOKS = ("none", "fp16", "powersgd", "powersgd-multibucket", "threelc")
TRANSPORTS = FLAT_TRANSPORTS
SPARSITIES = (1.0, 1.9)
# DDP bucket caps that give PowerSGD several buckets.  mlp-wide: 1 MB gives the
# same two buckets as DDP's default (1 MB first bucket, then 25 MB; train.py only
# uses the default for non-PowerSGD hooks).  digits-cnn (150 kB) fits one bucket
# under DDP's default, so 0.05 MB forces two.
MULTIBUCKET_CAP_MB = {"mlp-wide": 1.0, "digits-cnn": 0.05, "charlm": 0.1}

QUICK = {"nodes": [2], "rates": ["unlimited", "100mbit"], "models": list(MODELS),
         "sparsities": [1.9], "steps_digits": 40, "steps_mlp": 6}


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
        if getattr(a, "sparsity_warmup", None) is not None:
            args += ["--sparsity-warmup", str(a.sparsity_warmup)]
    if v["hook"] == "powersgd":
        args += ["--powersgd-rank", str(a.powersgd_rank)]
    if v["variant"] == "powersgd-multibucket":
        # A mismatched gloo collective should fail, not wait for the default 300 s.
        args += ["--bucket-cap-mb", f"{MULTIBUCKET_CAP_MB.get(model, 1.0):g}", "--dist-timeout", "30"]
    else:
        args += ["--dist-timeout", "120"]
    return args
