"""hooks/shm.py: collectives through shared memory equal gloo's, bit for bit; files go away; no shared host, no shm."""

from __future__ import annotations

import os
import resource
import signal

import torch

from threelc.hooks.collectives import TorchCollectives
from threelc.hooks.shm import MIN_CAPACITY, SharedMemoryCollectives, host_collectives

from ranks import all_ok, run_ranks

WORLD = 3


def tensors(rank: int, step: int):
    """Per step: a float tensor to split unevenly and an int64 matrix, growing past the first capacities."""
    g = torch.Generator().manual_seed(100 * step + rank)
    rows = [1, 7, 300, 20_000, 3, 2 * MIN_CAPACITY, 50][step]
    values = torch.randn(rows * WORLD + rank, generator=g)  # ranks send different totals
    matrix = torch.randint(-2**40, 2**40, (rows, 3), generator=g)
    return values, matrix


def reduce_scatter_case(plain, values, rank, world):
    """Pieces cut across the uneven splits (one rank's split empty at first), and the rank-order sum they must give."""
    n = (values.numel() // world) * world  # the same on every rank
    x = values[:n] * (rank + 1) + 0.1 * rank  # sums that rounding makes order-dependent
    rows = n // world
    splits = [rows + 1, rows - 1, rows] if rows else [0, 0, 0]
    cuts = [0, min(1, n), n // 2, n]
    pieces = [x[a:b] for a, b in zip(cuts, cuts[1:])]
    everyone = plain.allgather(x)
    start = sum(splits[:rank])
    part = everyone[:, start:start + splits[rank]]
    expected = part[0].clone()
    for row in part[1:]:
        expected = expected + row
    return pieces, splits, expected


def allgather_to_case(collectives, plain, tensor, world):
    """Every rank's last element and first half, placed into rows of a matrix (the rest left alone)."""
    flat = tensor.reshape(-1)
    n = flat.numel()
    placed = torch.full((world, 2 + n // 2), -5, dtype=flat.dtype)
    targets = [[(n - 1, placed[r, :1]), (0, placed[r, 2:])] for r in range(world)]
    rows = torch.full((world, n), -7, dtype=flat.dtype)
    collectives.allgather_to(flat, targets, rows)
    everyone = plain.allgather(flat)
    ok = (torch.equal(placed[:, 0], everyone[:, -1]) and bool((placed[:, 1] == -5).all())
          and torch.equal(placed[:, 2:], everyone[:, :n // 2]))
    return placed, rows, ok


def exchanges(rank, world, directory):
    plain = TorchCollectives().subgroup(list(range(world)))
    shared = host_collectives(plain, directory)
    out = {"kind": type(shared).__name__, "equal": [], "leftover": None}
    for step in range(7):
        values, matrix = tensors(rank, step)
        # Split j of rank r: its own lengths; the receivers' lengths follow from the senders'.
        send = [values.numel() // world + (1 if j < values.numel() % world else 0) for j in range(world)]
        lengths = plain.allgather(torch.tensor(send)).tolist()
        recv = [lengths[j][rank] for j in range(world)]
        pending = shared.allgather_async(matrix)
        a = shared.alltoall(values, send, recv)
        total = shared.allreduce(torch.tensor([float(step + rank)]), "sum")
        gathered = pending.wait()
        b = shared.allgather(values[:2].clone())
        into = torch.full((world, *matrix.shape), -1, dtype=matrix.dtype)
        c = shared.allgather_into(matrix, into)
        placed, rows, placed_ok = allgather_to_case(shared, plain, matrix, world)
        pieces, splits, expected = reduce_scatter_case(plain, values, rank, world)
        summed = shared.reduce_scatter(pieces, splits)
        buffer = torch.full((splits[rank],), float("nan"))
        summed_into = shared.reduce_scatter(pieces, splits, out=buffer)
        # Every rank runs the same collectives before comparing (a short-circuit would skip some on one rank only).
        plain_a, plain_matrix = plain.alltoall(values, send, recv), plain.allgather(matrix)
        plain_b, plain_summed = plain.allgather(values[:2].clone()), plain.reduce_scatter(pieces, splits)
        out["equal"].append(torch.equal(a, plain_a) and torch.equal(gathered, plain_matrix)
                            and torch.equal(b, plain_b) and c is into and torch.equal(into, plain_matrix)
                            and placed_ok and bool((rows == -7).all())  # shared memory skips the rows
                            and torch.equal(summed, expected) and summed_into is buffer
                            and torch.equal(buffer, expected) and torch.equal(plain_summed, expected)
                            and float(total) == sum(step + r for r in range(world)))
    for _ in range(2):  # no growth: the files of the last growth are unlinked after the next barriers
        shared.allgather(torch.ones(4))
    plain.allgather(torch.zeros(1))  # every rank is past those barriers before anyone looks
    out["leftover"] = sorted(os.listdir(directory)) if directory and os.path.isdir(directory) else []
    return out


def separate_directories(rank, world, root):
    """Each rank sees its own directory: they share no memory, so the group must stay as it was."""
    directory = os.path.join(root, f"rank{rank}")
    os.makedirs(directory, exist_ok=True)
    plain = TorchCollectives().subgroup(list(range(world)))
    chosen = host_collectives(plain, directory)
    return {"same": chosen is plain, "off": host_collectives(plain, "") is plain, "files": os.listdir(directory)}


def no_room_on_rank_1(rank, world, directory):
    """Rank 1's files may not grow past 1 MB (as in a full tmpfs): every rank falls back at the same collective."""
    plain = TorchCollectives().subgroup(list(range(world)))
    shared = host_collectives(plain, directory)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1]))
    equal, fallen = [], []
    try:
        for n in (1000, 20_000, 1_000_000, 10):  # the third: 4 MB, past rank 1's limit
            x = torch.arange(n * world, dtype=torch.float32) + 1000 * rank
            # reduce_scatter first: at the third size it is the collective that finds no room
            summed = shared.reduce_scatter([x[:5], x[5:]], [n] * world)
            pending = shared.allgather_async(x[:n])
            a = shared.alltoall(x, [n] * world, [n] * world)
            into = shared.allgather_into(x[:n], torch.empty(world, n))
            gathered = pending.wait()
            *_, placed_ok = allgather_to_case(shared, plain, x[:n], world)
            plain_a, plain_gathered = plain.alltoall(x, [n] * world, [n] * world), plain.allgather(x[:n])
            plain_summed = plain.reduce_scatter([x], [n] * world)
            equal.append(placed_ok and torch.equal(a, plain_a) and torch.equal(gathered, plain_gathered)
                         and torch.equal(into, plain_gathered) and torch.equal(summed, plain_summed))
            fallen.append(shared._fallen_back)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    return {"equal": equal, "fallen": fallen}


def test_a_segment_without_room_moves_every_rank_to_the_process_group(tmp_path):
    directory = tmp_path / "shm"
    directory.mkdir()
    results = all_ok(run_ranks(no_room_on_rank_1, WORLD, str(directory), workdir=tmp_path / "run", timeout=300))
    for result in results:
        assert all(result["equal"]), result
        assert result["fallen"] == [False, False, True, True], result


def test_shared_memory_collectives_equal_gloo_and_leave_no_files(tmp_path):
    directory = tmp_path / "shm"
    directory.mkdir()
    results = all_ok(run_ranks(exchanges, WORLD, str(directory), workdir=tmp_path / "run", timeout=300))
    for rank, result in enumerate(results):
        assert result["kind"] == SharedMemoryCollectives.__name__, rank
        assert all(result["equal"]), (rank, result["equal"])
        assert result["leftover"] == [], result["leftover"]


def test_ranks_that_share_no_directory_keep_their_process_group(tmp_path):
    results = all_ok(run_ranks(separate_directories, WORLD, str(tmp_path / "dirs"), workdir=tmp_path / "run"))
    assert all(r["same"] and r["off"] for r in results)
    assert all(r["files"] == [] for r in results)


def test_non_gloo_or_single_rank_groups_are_left_alone():
    class Fake(TorchCollectives):
        def __init__(self):  # no process group needed: the world size decides first
            self.world_size, self.rank, self.parent = 1, 0, None

    fake = Fake()
    assert host_collectives(fake, "/dev/shm") is fake
