"""Worker for tests/test_horovod.py, run under horovodrun (every rank runs it).

    horovodrun -np 2 -H localhost:2 --gloo python tests/horovod_worker.py OUT_DIR SUITE [SUITE ...]

Suites (run in the order given; every rank runs the same scenarios in the same order):
``exact`` (each transport on a carrier model whose gradients we choose), ``variants``
(op=Sum, backward passes, a parameter only rank 0 uses, overlap off, fp16),
``nonfinite`` (one rank's gradient turns NaN), ``mismatch`` (one rank's settings
differ), ``checkpoint`` (save/resume the 3LC state), ``digits`` (digits-cnn with the
3LC optimizer against hvd.DistributedOptimizer), ``train_entry`` (launch/train_horovod.py's
training loop with a checkpoint round trip, files in OUT_DIR). Each rank saves its results to
OUT_DIR/rank<r>.pt; a scenario that raises records ``{"error": ...}`` instead.

Importing this module needs no Horovod (the test imports ``gradients`` from it).
"""

from __future__ import annotations

import faulthandler
import io
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn

from threelc.hooks import FLAT_TRANSPORTS

REPO = Path(__file__).resolve().parents[1]

SHAPES = [(40, 30), (30,), (7, 5, 3), (1,), (300,), (20, 20)]
PARTIAL_SHAPE = (3,)  # the parameter only rank 0 uses (variant "partial")
CAP_MB = 0.002  # 2097 bytes: the carrier's fp32 gradients make 3 buckets
TRANSPORTS = FLAT_TRANSPORTS
EXACT_STEPS = 20


def gradients(rank, step, shapes=SHAPES, dtype=torch.float32):
    """The gradients rank ``rank`` feeds in for backward pass ``step``."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return [(torch.randn(s, generator=generator) * 10.0 ** -(i % 3)).to(dtype) for i, s in enumerate(shapes)]


def partial_gradient(step, dtype=torch.float32):
    return (torch.randn(PARTIAL_SHAPE, generator=torch.Generator().manual_seed(77 + step))).to(dtype)


class Carrier(nn.Module):
    """loss = sum(p_i * g_i): the gradient of p_i is exactly the g_i we feed in."""

    def __init__(self, dtype=torch.float32, partial=False):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(torch.zeros(s, dtype=dtype)) for s in SHAPES)
        self.partial = nn.Parameter(torch.zeros(PARTIAL_SHAPE, dtype=dtype)) if partial else None

    def forward(self, grads, partial_grad=None):
        loss = sum((p * g).sum() for p, g in zip(self.weights, grads))
        if partial_grad is not None:
            loss = loss + (self.partial * partial_grad).sum()
        return loss

    def ordered(self):
        """Parameters in index order: the weights, then the partial one."""
        return [*self.weights, *([self.partial] if self.partial is not None else [])]


# ---------------------------------------------------------------------- scenarios

def carrier_run(hvd, transport, sparsity=1.5, steps=EXACT_STEPS, start_iter=2, dtype=torch.float32, op="average",
                passes=1, partial=False, overlap=True, poison=None, bucket_cap_mb=CAP_MB, momentum=0.0,
                resume_at=None, scale_block=0):
    """Train the carrier; every step's averaged gradients, the final parameters and the layout."""
    from threelc.hooks.horovod import DistributedOptimizer

    rank = hvd.rank()
    model = Carrier(dtype, partial)

    def make():
        base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum)
        return DistributedOptimizer(base, model.named_parameters(), sparsity=sparsity, transport=transport,
                                    start_iter=start_iter, sparsity_warmup=WARMUP,
                                    backward_passes_per_step=passes, overlap=overlap,
                                    op=hvd.Sum if op == "sum" else hvd.Average, bucket_cap_mb=bucket_cap_mb,
                                    scale_block=scale_block)

    opt = make()
    index_of = {id(p): i for i, p in enumerate(model.ordered())}
    names = dict(model.named_parameters())
    buckets = [[index_of[id(names[n])] for n in bucket] for bucket in opt.buckets]
    history = []
    for step in range(steps):
        if step == resume_at:  # checkpoint round trip through bytes, as torch.save would write it
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "threelc": opt.threelc.state_dict()},
                       buffer)
            opt.remove_hooks()
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            model = Carrier(dtype, partial)
            model.load_state_dict(saved["model"])
            opt = make()
            opt.load_state_dict(saved["opt"])
            opt.threelc.load_state_dict(saved["threelc"])
        opt.zero_grad()
        for k in range(passes):
            grads = gradients(rank, step * passes + k, dtype=dtype)
            if poison is not None and poison[:2] == (rank, step):
                grads[poison[2]].view(-1)[0] = float("nan")
            model(grads, partial_gradient(step, dtype) if partial and rank == 0 else None).backward()
        opt.step()
        history.append([p.grad.detach().clone() for p in model.ordered()])
    saved = opt.threelc.state_dict()["transport"]
    residuals = [r for memory in ("worker", "server") if memory in saved for r in saved[memory]["residuals"].values()]
    return {"history": history, "params": [p.detach().clone() for p in model.ordered()], "buckets": buckets,
            "stats": opt.stats, "residuals_finite": all(bool(torch.isfinite(r).all()) for r in residuals)}


VARIANTS = {
    "sum-allreduce": {"transport": "allreduce", "op": "sum", "steps": 6},
    "passes2-sharded": {"transport": "sharded", "passes": 2, "steps": 6},
    "partial-allgather": {"transport": "allgather", "partial": True, "steps": 6},
    "partial-sharded-no-overlap": {"transport": "sharded", "partial": True, "overlap": False, "steps": 6},
    "fp16-allgather": {"transport": "allgather", "dtype": torch.float16, "sparsity": 1.2, "steps": 6},
    "scale-block-sharded": {"transport": "sharded", "sparsity": 1.9, "scale_block": 64, "steps": 6},
}

MISMATCHES = {"sparsity": 1.25, "transport": "sharded", "start_iter": 3, "op": "sum", "passes": 2,
              "bucket_cap_mb": 1.0}

WARMUP = 4  # sparsity warm-up steps of the carrier runs (test_horovod.py follows the same schedule)
CHECKPOINT = {"transport": "sharded", "steps": 12, "momentum": 0.9, "start_iter": 2}


def suite_exact(hvd):
    return {t: carrier_run(hvd, t) for t in TRANSPORTS}


def suite_exact_torch(hvd):
    """``exact`` again on the pure-PyTorch codec backend (``exact`` runs the default one)."""
    os.environ["THREELC_BACKEND"] = "torch"
    try:
        return suite_exact(hvd)
    finally:
        del os.environ["THREELC_BACKEND"]


def suite_variants(hvd):
    return {name: carrier_run(hvd, **settings) for name, settings in VARIANTS.items()}


def suite_nonfinite(hvd):
    # rank 1, step 3, parameter 0 (its own bucket: 1200 floats > the cap)
    return {t: carrier_run(hvd, t, steps=5, poison=(1, 3, 0)) for t in TRANSPORTS}


def suite_mismatch(hvd):
    out = {}
    for field, other in MISMATCHES.items():
        settings = {"transport": "allgather", "steps": 3}
        if hvd.rank() == 1:
            settings[field] = other
        out[field] = guarded(carrier_run, hvd, **settings)
    return out


def suite_checkpoint(hvd):
    return {"continuous": carrier_run(hvd, **CHECKPOINT), "resumed": carrier_run(hvd, **CHECKPOINT, resume_at=6)}


DIGITS_STEPS = 300
DIGITS_THREELC = {"sparsity": 1.0, "transport": "allgather", "start_iter": 2}


def digits_run(hvd, kind, steps=DIGITS_STEPS, **settings):
    sys.path.insert(0, str(REPO))
    from launch.common import models
    from threelc.hooks.horovod import DistributedOptimizer

    rank, world = hvd.rank(), hvd.size()
    task = models.build("digits-cnn", seed=0)
    base = task.make_optimizer(task.model.parameters())
    if kind == "hvd":
        opt = hvd.DistributedOptimizer(base, named_parameters=task.model.named_parameters())
    else:
        opt = DistributedOptimizer(base, task.model.named_parameters(), **settings)
    times = []
    for step in range(steps):
        x, y = task.train_batch(rank, world, step)
        start = time.perf_counter()
        loss = task.loss_fn(task.model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    flat = torch.cat([p.detach().reshape(-1) for p in task.model.parameters()])
    gathered = hvd.allgather(flat.unsqueeze(0), name=f"test.params.{kind}")
    return {"metrics": task.evaluate(task.model), "step_times": times,
            "params_agree": all(torch.equal(gathered[0], g) for g in gathered),
            "stats": getattr(opt, "stats", None)}


def suite_digits(hvd):
    return {"hvd": digits_run(hvd, "hvd"), "threelc": digits_run(hvd, "threelc", **DIGITS_THREELC)}


def suite_api(hvd):
    """Argument checks and Horovod's optimizer protocol (each check returns plain values)."""
    import warnings

    import threelc
    from threelc.hooks.horovod import DistributedOptimizer

    out = {}

    def fresh(**settings):
        model = Carrier()
        base = torch.optim.SGD(model.parameters(), lr=0.01)
        return model, DistributedOptimizer(base, model.named_parameters(), start_iter=0, **settings)

    for name, settings in {"adasum": {"op": hvd.Adasum}, "ring": {"transport": "ring"},
                           "passes0": {"backward_passes_per_step": 0}, "sparsity2": {"sparsity": 2.0},
                           "cap0": {"bucket_cap_mb": 0}}.items():
        try:
            fresh(**settings)
            out[name] = None
        except threelc.ConfigurationError as error:
            out[name] = str(error)

    model, opt = fresh()
    out["names"] = opt.buckets
    out["isinstance_sgd"] = isinstance(opt, torch.optim.SGD) and type(opt).__name__ == "SGD"
    model(gradients(hvd.rank(), 0)).backward()
    try:
        opt.zero_grad()
        out["zero_grad_after_backward"] = None
    except AssertionError as error:
        out["zero_grad_after_backward"] = str(error)
    try:
        model(gradients(hvd.rank(), 1)).backward()
        out["second_backward"] = None
    except Exception as error:  # noqa: BLE001 - raised from inside autograd
        out["second_backward"] = f"{type(error).__name__}: {error}"
    opt.synchronize()
    with opt.skip_synchronize():
        opt.step()
    out["steps_after_skip"] = opt.stats["steps"]
    opt.zero_grad()
    model(gradients(hvd.rank(), 2)).backward()
    opt.synchronize()
    synced = [p.grad.clone() for p in model.ordered()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()  # without skip_synchronize: warns, does not exchange again
    out["double_step_warned"] = any("skip_synchronize" in str(w.message) for w in caught)
    out["steps_after_double"] = opt.stats["steps"]
    out["grads_kept"] = all(torch.equal(a, p.grad) for a, p in zip(synced, model.ordered()))
    opt.zero_grad()
    out["grads_none"] = all(p.grad is None for p in model.ordered())
    opt.remove_hooks()
    return out


TRAIN_ARGS = ["--model", "digits-cnn", "--seed", "7", "--no-progress", "--hook", "threelc", "--sparsity", "1.75",
              "--transport", "allgather"]


def suite_train_entry(hvd, out):
    """launch/train_horovod.py's training, in process: 10 steps vs 5, checkpoint, resume to 10."""
    sys.path.insert(0, str(REPO))
    from launch import train, train_horovod

    def run(*extra):
        args = train.parse_args(TRAIN_ARGS + list(extra))
        return train_horovod._train(args, hvd, hvd.rank(), hvd.size(), torch.device("cpu"))

    ckpt = ["--checkpoint", str(out / "ckpt.pt"), "--checkpoint-every", "5"]
    return {"full": run("--steps", "10", "--save-params", str(out / "full.pt")),
            "first": run(*ckpt, "--steps", "5"),
            "resumed": run(*ckpt, "--steps", "10", "--save-params", str(out / "resumed.pt"))}


def guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - some scenarios are meant to fail
        return {"error": f"{type(error).__name__}: {error}", "type": type(error).__name__}


def main(argv):
    faulthandler.dump_traceback_later(float(os.environ.get("THREELC_HVD_WATCHDOG_S", "240")), exit=True)
    out, suites = Path(argv[0]), argv[1:]
    torch.set_num_threads(1)
    import horovod.torch as hvd

    hvd.init()
    results = {"world": hvd.size(), "seconds": {}}
    try:
        for suite in suites:
            start = time.perf_counter()
            fn = globals()[f"suite_{suite}"]
            results[suite] = fn(hvd, out) if suite == "train_entry" else fn(hvd)
            results["seconds"][suite] = time.perf_counter() - start
        torch.save(results, out / f"rank{hvd.rank()}.pt")
    except BaseException:
        (out / f"rank{hvd.rank()}.err").write_text(traceback.format_exc())
        raise
    finally:
        faulthandler.cancel_dump_traceback_later()
    hvd.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
