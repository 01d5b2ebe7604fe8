"""Horovod has no buckets: the optimizer makes its own, and names its parameters."""

from __future__ import annotations

import hashlib

import torch

from threelc import ConfigurationError


def make_buckets(params: list[torch.Tensor], cap_bytes: float) -> list[list[torch.Tensor]]:
    """Consecutive groups of ``params`` in reverse order, each at most ``cap_bytes``."""
    buckets: list[list[torch.Tensor]] = []
    current: list[torch.Tensor] = []
    size, key = 0, None
    for p in reversed(params):
        nbytes = p.numel() * p.element_size()
        if current and ((p.dtype, p.device) != key or size + nbytes > cap_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(p)
        size += nbytes
        key = (p.dtype, p.device)
    if current:
        buckets.append(current)
    return buckets


def layout_digest(buckets: list[list[torch.Tensor]]) -> int:
    """Sizes and dtypes of every bucket, hashed: ranks compare it in the settings agreement."""
    layout = repr([[(p.numel(), str(p.dtype)) for p in bucket] for bucket in buckets]).encode()
    return int.from_bytes(hashlib.sha256(layout).digest()[:8], "little") >> 1  # non-negative int64


def parameter_names(named_parameters, param_groups) -> dict:
    """``{parameter: name}``, validated as Horovod does."""
    if named_parameters is None:
        return {p: f"threelc.noname.{i}.{j}" for i, group in enumerate(param_groups)
                for j, p in enumerate(group["params"])}
    named = list(named_parameters)
    if any(not isinstance(item, tuple) for item in named):
        raise ConfigurationError("named_parameters should be a sequence of (name, parameter) tuples, usually "
                         "model.named_parameters()")
    names = [name for name, _ in named]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigurationError(f"parameter names in named_parameters must be unique; duplicates: {', '.join(duplicates)}")
    by_id = {id(p): name for name, p in named}
    unnamed = [p for group in param_groups for p in group["params"] if id(p) not in by_id]
    if unnamed:
        raise ConfigurationError(f"named_parameters was given, but {len(unnamed)} optimizer parameter(s) are not in it")
    return {p: by_id[id(p)] for group in param_groups for p in group["params"]}
