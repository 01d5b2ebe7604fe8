"""PowerSGD's hook state as tensors and plain types, for ``torch.load(weights_only=True)`` checkpoints.

``PowerSGDState`` pickles with a numpy RandomState inside; the benchmark's
checkpoints hold only tensors and plain types, so it is taken apart and put back here.
"""

from __future__ import annotations

import numpy as np
import torch


def state_dict(state) -> dict:
    name, keys, pos, has_gauss, cached = state.rng.get_state()
    return {
        "iter": int(state.iter),
        "error_dict": {int(k): v.detach().cpu() for k, v in state.error_dict.items()},
        "p_memory_dict": {int(k): v.detach().cpu() for k, v in state.p_memory_dict.items()},
        "q_memory_dict": {int(k): v.detach().cpu() for k, v in state.q_memory_dict.items()},
        # numpy's MT19937 state as a tensor + ints (torch.load(weights_only=True) safe).
        "rng": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "total_numel_before_compression": int(state.total_numel_before_compression),
        "total_numel_after_compression": int(state.total_numel_after_compression),
    }


def load_state_dict(state, d: dict) -> None:
    # Buffers must live where the buckets live (the GPU under NCCL).
    dev = _state_device()

    def to_dev(src: dict) -> dict:
        return {int(k): v.to(dev) for k, v in src.items()}

    state.iter = int(d["iter"])
    state.error_dict = to_dev(d["error_dict"])
    state.p_memory_dict = to_dev(d["p_memory_dict"])
    state.q_memory_dict = to_dev(d["q_memory_dict"])
    r = d["rng"]
    state.rng.set_state((r["name"], r["keys"].numpy().astype(np.uint32), r["pos"], r["has_gauss"], r["cached_gaussian"]))
    state.total_numel_before_compression = int(d["total_numel_before_compression"])
    state.total_numel_after_compression = int(d["total_numel_after_compression"])


def _state_device() -> torch.device:
    if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
