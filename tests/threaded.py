"""In-process fake collectives: N ranks as N threads, for fast transport unit tests."""

from __future__ import annotations

import threading

import torch

from threelc.hooks.collectives import Collectives


class ThreadWorld:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots: list = [None] * world_size
        self._subworlds: dict = {}
        self._lock = threading.Lock()

    def subworld(self, ranks):
        """One shared world per set of ranks (its members' collectives meet in it)."""
        with self._lock:
            return self._subworlds.setdefault(tuple(ranks), ThreadWorld(len(ranks)))

    def exchange(self, rank, value):
        """Every rank's ``value``, in rank order."""
        self.slots[rank] = value
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()
        return everyone

    def run(self, fn):
        """``fn(rank, collectives)`` on every rank in its own thread; results in rank order."""
        results, errors = [None] * self.world_size, []

        def target(rank):
            try:
                results[rank] = fn(rank, ThreadCollectives(self, rank))
            except BaseException as error:  # noqa: BLE001
                errors.append(error)
                self.barrier.abort()
                for sub in list(self._subworlds.values()):
                    sub.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class ThreadCollectives(Collectives):
    def __init__(self, world: ThreadWorld, rank: int):
        super().__init__()
        self.world, self.rank, self.world_size = world, rank, world.world_size

    def subgroup(self, ranks):
        return self._adopt(ThreadCollectives(self.world.subworld(ranks), list(ranks).index(self.rank)))

    def allreduce(self, tensor, op):
        everyone = self.world.exchange(self.rank, tensor.clone())
        result = everyone[0].clone()
        for other in everyone[1:]:
            result = result + other if op == "sum" else torch.maximum(result, other)
        self._count(tensor, result)
        return result

    def allgather(self, tensor):
        result = torch.stack(self.world.exchange(self.rank, tensor.clone()))
        self._count(tensor, result)
        return result

    def alltoall(self, tensor, send_splits, recv_splits):
        everyone = self.world.exchange(self.rank, list(tensor.clone().split(send_splits)))
        result = torch.cat([pieces[self.rank] for pieces in everyone])
        assert result.numel() == sum(recv_splits)
        self._count(tensor, result)
        return result
