"""Smoke test of the Horovod (PyTorch, Gloo, CPU) features the 3LC Horovod integration needs.

Run with two workers:

    horovodrun -np 2 -H localhost:2 --gloo python launch/horovod_smoke.py

Every rank runs the same checks in the same order (so a failing check cannot leave
the other rank waiting in a collective); each check prints ``PASS``/``FAIL`` with
rank prefix, rank 0 prints a summary, and the exit status is non-zero if any check
failed on any rank. A watchdog aborts the run if a collective hangs.

Covered: init/gloo, allreduce Sum/Max/Min/Average over dtypes (and which dtypes
Horovod rejects), allgather with different first-dimension sizes per rank
(including an empty contribution), the same-shape "stack" all-gather, alltoall with
explicit splits (including zero splits), async handles (allreduce_async_,
allgather_async, alltoall_async, poll, synchronize) with op=Max, collectives issued
from a background thread, broadcast of parameters/optimizer state/objects,
reducescatter, grouped allreduce, barrier, and hvd.DistributedOptimizer on a tiny
model (the update must equal the mean of the per-rank gradients).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import traceback

import torch

import horovod
import horovod.torch as hvd

WATCHDOG_S = float(os.environ.get("HVD_SMOKE_WATCHDOG_S", "120"))
faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
RESULTS: list[tuple[str, bool, str]] = []


def log(msg: str) -> None:
    print(f"[rank {RANK}] {msg}", flush=True)


def check(name):
    def deco(fn):
        try:
            info = fn() or ""
            RESULTS.append((name, True, info))
            log(f"PASS {name}{': ' + info if info else ''}")
        except Exception as e:  # noqa: BLE001 - we report every failure
            RESULTS.append((name, False, repr(e)))
            log(f"FAIL {name}: {e!r}")
            traceback.print_exc()
        return fn

    return deco


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.equal(a, b), (a, b)


# ----------------------------------------------------------------------------- init
@check("init")
def _():
    assert SIZE == 2, f"run me with -np 2 (size={SIZE})"
    assert hvd.gloo_built() and hvd.gloo_enabled(), "gloo not active"
    assert not hvd.mpi_enabled()
    return (f"horovod {horovod.__version__}, torch {torch.__version__}, size={SIZE}, "
            f"local_rank={hvd.local_rank()}, local_size={hvd.local_size()}, "
            f"gloo_enabled={hvd.gloo_enabled()}, mpi_built={hvd.mpi_built()}")


# ------------------------------------------------------------------------ allreduce
ALLREDUCE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int32, torch.int64]


@check("allreduce Sum/Max/Min over float32/64/16, int32/64")
def _():
    for dt in ALLREDUCE_DTYPES:
        # rank 0: [1, 5, -3], rank 1: [2, 4, -7]
        x = torch.tensor([[1, 5, -3], [2, 4, -7]][RANK], dtype=dt)
        same(hvd.allreduce(x, op=hvd.Sum, name=f"sum.{dt}"), torch.tensor([3, 9, -10], dtype=dt))
        same(hvd.allreduce(x, op=hvd.Max, name=f"max.{dt}"), torch.tensor([2, 5, -3], dtype=dt))
        same(hvd.allreduce(x, op=hvd.Min, name=f"min.{dt}"), torch.tensor([1, 4, -7], dtype=dt))
        same(x, torch.tensor([[1, 5, -3], [2, 4, -7]][RANK], dtype=dt))  # input untouched
    # multi-dim tensor, unnamed op
    y = torch.arange(12, dtype=torch.float32).reshape(3, 4) * (RANK + 1)
    same(hvd.allreduce(y, op=hvd.Max), torch.arange(12, dtype=torch.float32).reshape(3, 4) * 2)


@check("allreduce default op is Average (pass op= explicitly!)")
def _():
    x = torch.tensor([float(RANK + 1)])
    same(hvd.allreduce(x), torch.tensor([1.5]))
    same(hvd.allreduce(x, op=hvd.Average), torch.tensor([1.5]))


@check("allreduce rejects uint8/int8/int16/bool/bfloat16 (ValueError before enqueue)")
def _():
    rejected = []
    for dt in [torch.uint8, torch.int8, torch.int16, torch.bool, torch.bfloat16]:
        try:
            hvd.allreduce(torch.zeros(3, dtype=dt), op=hvd.Sum, name=f"bad.{dt}")
        except ValueError:
            rejected.append(str(dt).replace("torch.", ""))
        else:
            raise AssertionError(f"allreduce unexpectedly accepted {dt}")
    return "rejected: " + ",".join(rejected)


@check("allreduce rejects non-contiguous tensors")
def _():
    t = torch.zeros(4, 4)[:, 0]
    try:
        hvd.allreduce(t, op=hvd.Sum)
    except ValueError:
        return "ValueError (call .contiguous() first)"
    raise AssertionError("accepted a non-contiguous tensor")


# ------------------------------------------------------------------------ allgather
@check("allgather with different first-dim sizes (float32 2-D, uint8 1-D)")
def _():
    rows = [2, 5][RANK]
    x = torch.full((rows, 3), float(RANK + 1))
    out = hvd.allgather(x, name="ag.var.f32")
    same(out, torch.cat([torch.full((2, 3), 1.0), torch.full((5, 3), 2.0)]))
    b = torch.arange([7, 3][RANK], dtype=torch.uint8) + 100 * RANK
    outb = hvd.allgather(b, name="ag.var.u8")
    same(outb, torch.cat([torch.arange(7, dtype=torch.uint8), torch.arange(3, dtype=torch.uint8) + 100]))


@check("allgather where one rank contributes 0 rows")
def _():
    b = torch.arange([0, 4][RANK], dtype=torch.uint8)
    same(hvd.allgather(b, name="ag.empty.u8"), torch.arange(4, dtype=torch.uint8))


@check("allgather supports uint8/int8/int16/int32/int64/f16/f32/f64")
def _():
    for dt in [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
               torch.float16, torch.float32, torch.float64]:
        x = torch.full((2,), RANK + 1, dtype=dt)
        same(hvd.allgather(x, name=f"ag.{dt}"), torch.tensor([1, 1, 2, 2], dtype=dt))
    for dt in [torch.bool, torch.bfloat16]:
        try:
            hvd.allgather(torch.zeros(2, dtype=dt), name=f"ag.bad.{dt}")
        except ValueError:
            pass
        else:
            raise AssertionError(f"allgather unexpectedly accepted {dt}")
    return "bool/bfloat16 rejected"


@check("same-shape stack gather: allgather(t.unsqueeze(0)) -> (world, *shape)")
def _():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * RANK
    out = hvd.allgather(t.unsqueeze(0), name="ag.stack")
    same(out, torch.stack([torch.arange(6.0).reshape(2, 3), torch.arange(6.0).reshape(2, 3) + 10]))


# ------------------------------------------------------------------------- alltoall
@check("alltoall with explicit splits (float32, uint8, zero splits)")
def _():
    # rank r sends send_splits[r][j] rows to rank j; rows are tagged src*100 + dst*10
    send_splits = [[1, 3], [2, 0]][RANK]
    x = torch.cat([torch.full((n, 2), float(RANK * 100 + j * 10)) for j, n in enumerate(send_splits)])
    out, recv = hvd.alltoall(x, splits=send_splits, name="a2a.f32")
    expect_recv = [[1, 2], [3, 0]][RANK]  # recv_splits[j] = send_splits_of_rank_j[RANK]
    assert recv.tolist() == expect_recv, recv
    assert recv.dtype == torch.int32
    expect = torch.cat([torch.full((n, 2), float(j * 100 + RANK * 10)) for j, n in enumerate(expect_recv)])
    same(out, expect)

    # uint8 payload, splits given as an int32 tensor
    b = torch.arange(sum(send_splits), dtype=torch.uint8) + 50 * RANK
    outb, recvb = hvd.alltoall(b, splits=torch.tensor(send_splits, dtype=torch.int32), name="a2a.u8")
    assert recvb.tolist() == expect_recv
    src = [torch.arange(4, dtype=torch.uint8).split([1, 3]), (torch.arange(2, dtype=torch.uint8) + 50).split([2, 0])]
    same(outb, torch.cat([src[0][RANK], src[1][RANK]]))


@check("alltoall without splits (equal split of dim 0)")
def _():
    x = torch.arange(4, dtype=torch.int64) + 10 * RANK  # rank0: 0..3, rank1: 10..13
    out = hvd.alltoall(x, name="a2a.eq")
    same(out, torch.tensor([[0, 1, 10, 11], [2, 3, 12, 13]][RANK]))


# ----------------------------------------------------------------------------- async
@check("async: allreduce_async_(op=Max) + allgather_async + alltoall_async, poll, synchronize")
def _():
    a = torch.tensor([float(RANK), 10.0 - RANK, 3.0])
    b = torch.arange([3, 1][RANK], dtype=torch.uint8)
    c = torch.arange(2, dtype=torch.float64) + RANK
    h1 = hvd.allreduce_async_(a, op=hvd.Max, name="async.max")  # in place
    h2 = hvd.allgather_async(b, name="async.ag")
    h3 = hvd.alltoall_async(c, splits=[1, 1], name="async.a2a")
    h4 = hvd.allreduce_async(torch.tensor([RANK + 1], dtype=torch.int64), op=hvd.Sum, name="async.sum")
    r1 = hvd.synchronize(h1)
    assert r1 is a, "allreduce_async_ should return the input tensor"
    same(a, torch.tensor([1.0, 10.0, 3.0]))
    assert hvd.poll(h2) in (True, False)
    same(hvd.synchronize(h2), torch.cat([torch.arange(3, dtype=torch.uint8), torch.arange(1, dtype=torch.uint8)]))
    out3, recv3 = hvd.synchronize(h3)
    same(out3, torch.tensor([[0.0, 1.0], [1.0, 2.0]][RANK], dtype=torch.float64))
    assert recv3.tolist() == [1, 1]
    same(hvd.synchronize(h4), torch.tensor([3], dtype=torch.int64))


@check("async: many outstanding unnamed allreduce_async_ Max handles")
def _():
    ts = [torch.full((5,), float(RANK * i)) for i in range(8)]
    hs = [hvd.allreduce_async_(t, op=hvd.Max) for t in ts]
    for i, h in enumerate(hs):
        hvd.synchronize(h)
        same(ts[i], torch.full((5,), float(i)))


@check("collectives from a background (communication) thread")
def _():
    box: dict = {}

    def worker():
        try:
            box["sum"] = hvd.allreduce(torch.tensor([RANK + 1.0]), op=hvd.Sum, name="thr.sum")
            box["ag"] = hvd.allgather(torch.arange([1, 2][RANK], dtype=torch.uint8), name="thr.ag")
            box["a2a"] = hvd.alltoall(torch.arange(2, dtype=torch.int32) + 10 * RANK, splits=[1, 1], name="thr.a2a")[0]
        except Exception as e:  # noqa: BLE001
            box["err"] = e

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    th.join(timeout=60)
    assert not th.is_alive(), "thread hung"
    if "err" in box:
        raise box["err"]
    same(box["sum"], torch.tensor([3.0]))
    same(box["ag"], torch.tensor([0, 0, 1], dtype=torch.uint8))
    same(box["a2a"], torch.tensor([[0, 10], [1, 11]][RANK], dtype=torch.int32))


# ---------------------------------------------------------------- misc collectives
@check("broadcast / broadcast_object / allgather_object / barrier / grouped_allreduce / reducescatter")
def _():
    t = torch.tensor([float(RANK + 7)])
    same(hvd.broadcast(t, root_rank=0, name="bc"), torch.tensor([7.0]))
    assert hvd.broadcast_object({"r": RANK}, root_rank=1) == {"r": 1}
    assert hvd.allgather_object(("x", RANK)) == [("x", 0), ("x", 1)]
    hvd.barrier()
    g = hvd.grouped_allreduce([torch.tensor([1.0 + RANK]), torch.tensor([2, 3 * RANK], dtype=torch.int64)],
                              op=hvd.Sum, name="grp")
    same(g[0], torch.tensor([3.0]))
    same(g[1], torch.tensor([4, 3], dtype=torch.int64))
    rs = hvd.reducescatter(torch.arange(4, dtype=torch.float32) + RANK, op=hvd.Sum, name="rs")
    same(rs, (torch.arange(4, dtype=torch.float32) * 2 + 1)[2 * RANK: 2 * RANK + 2])


# ------------------------------------------------------------ DistributedOptimizer
@check("DistributedOptimizer (SGD) on a tiny model: update == -lr * mean of rank grads")
def _():
    torch.manual_seed(1234 + RANK)  # different init per rank -> broadcast must fix it
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    lr = 0.1
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(), op=hvd.Average)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)

    gen = torch.Generator().manual_seed(99 + RANK)  # different data per rank
    for step in range(3):
        x = torch.randn(8, 4, generator=gen)
        y = torch.randn(8, 1, generator=gen)
        before = [p.detach().clone() for p in model.parameters()]
        # reference: local grads computed on a copy, averaged by hand
        ref = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
        h = torch.tanh(x @ ref[0].T + ref[1]) @ ref[2].T + ref[3]
        torch.nn.functional.mse_loss(h, y).backward()
        mean_grads = [hvd.allreduce(r.grad, op=hvd.Average, name=f"ref.{step}.{i}") for i, r in enumerate(ref)]

        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        for p, g in zip(model.parameters(), mean_grads):
            assert torch.allclose(p.grad, g, atol=1e-6), (p.grad, g)
        if step == 0:  # momentum buffer is empty on the first step: plain SGD update
            for p, b0, g in zip(model.parameters(), before, mean_grads):
                assert torch.allclose(p.detach(), b0 - lr * g, atol=1e-6)
    # parameters identical on all ranks
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    both = hvd.allgather(flat.unsqueeze(0), name="params.check")
    same(both[0], both[1])
    return f"final loss on rank {RANK}: {loss.item():.4f}"


@check("DistributedOptimizer with op=Sum and Compression.fp16")
def _():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                   named_parameters=model.named_parameters(),
                                   op=hvd.Sum, compression=hvd.Compression.fp16)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    x = torch.tensor([[1.0, 2.0, 3.0]]) * (RANK + 1)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    same(model.weight.grad, torch.tensor([[3.0, 6.0, 9.0]]))  # 1*x + 2*x summed


# --------------------------------------------------------------------------- summary
faulthandler.cancel_dump_traceback_later()
n_fail = sum(not ok for _, ok, _ in RESULTS)
fails_all = hvd.allreduce(torch.tensor([n_fail], dtype=torch.int32), op=hvd.Sum, name="smoke.fails").item()
if RANK == 0:
    print(f"HOROVOD_SMOKE {'OK' if fails_all == 0 else 'FAILED'}: {len(RESULTS)} checks x {SIZE} ranks, "
          f"{fails_all} failures (horovod {horovod.__version__}, torch {torch.__version__})", flush=True)
hvd.shutdown()
sys.exit(0 if fails_all == 0 else 1)
