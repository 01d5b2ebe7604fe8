"""Model + data factories for the launch scripts and benchmarks.

Every task ships offline (no downloads) and is deterministic given a seed:

* ``digits-cnn`` -- a ~38k-parameter CNN on ``sklearn.datasets.load_digits``
  (8x8 images, 10 classes); fixed split (a constant shuffle, then the last
  20% of the samples are the test set).  Reaches >95% test accuracy in a few hundred SGD steps.
* ``charlm`` -- a ~120k-parameter character-level LSTM trained on the Python
  standard library's own source (a fixed list of modules, read in a fixed
  order, capped at ~1 MB); the metric is test loss in nats and bits per char.
* ``mlp-wide`` -- a ~5.3M-parameter MLP (width 2048) learning a fixed random
  teacher on synthetic Gaussian inputs.  Compute is tiny next to the 21 MB of
  fp32 gradients per step, so the network dominates the step time.

Sharding: a step's *global* batch is a pure function of ``(seed, step)``;
rank ``r`` of ``w`` gets the contiguous slice ``[r*B/w, (r+1)*B/w)`` of it.
Because DDP averages the per-rank mean losses of equal-sized shards, the
optimisation problem is the same for every world size (up to float summation
order).

Interface::

    task = build("digits-cnn", seed=0)            # -> Task
    x, y = task.train_batch(rank, world, step)   # this rank's shard
    loss = task.loss_fn(task.model(x), y)
    task.evaluate(task.model)                    # -> {"loss": .., "accuracy": ..}
    opt = task.make_optimizer(task.model.parameters(), lr=None)
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Task", "build", "TASKS", "shard", "gen"]

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Task:
    """A model with its data stream and metric.

    ``train_batch(rank, world, step)`` returns this rank's shard of the global
    batch of ``step`` (already on ``device``); ``evaluate(model)`` runs the
    fixed test set and returns plain floats (``loss`` always; ``accuracy`` or
    ``bpc`` depending on the task).
    """

    name: str
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_batch: Callable[[int, int, int], Batch]
    evaluate: Callable[[nn.Module], dict]
    batch_size: int  # global batch size (summed over ranks)
    lr: float  # default learning rate
    optimizer: str  # "sgd" (momentum 0.9) or "adam"

    def make_optimizer(self, params, lr: float | None = None, kind: str | None = None):
        """Build the task's default optimizer (overridable ``lr``/``kind``)."""
        lr = self.lr if lr is None else lr
        kind = kind or self.optimizer
        if kind == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=0.9)
        if kind == "adam":
            return torch.optim.Adam(params, lr=lr)
        raise ValueError(f"unknown optimizer {kind!r} (sgd|adam)")


# ----------------------------------------------------------------------------
# Deterministic helpers
# ----------------------------------------------------------------------------


def gen(seed: int, *keys) -> torch.Generator:
    """A CPU generator seeded by ``(seed, *keys)``.

    A hash (not ``seed + step``) so that streams for different keys never
    overlap, and CPU generation so that data is identical on any device.
    """
    digest = hashlib.sha256(repr((int(seed),) + keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous, equal-sized slice of a global batch."""
    n = t.shape[0]
    if n % world:
        raise ValueError(f"global batch {n} is not divisible by world size {world}")
    per = n // world
    return t[rank * per : (rank + 1) * per]


def _epoch_indices(seed: int, n: int, batch: int, step: int) -> torch.Tensor:
    """Sample indices of a global batch: a fresh permutation every epoch.

    Position ``p = step*batch + j`` of the infinite stream lives in epoch
    ``p // n`` at offset ``p % n``; this is DistributedSampler's behaviour
    without its dependence on the world size.
    """
    pos = torch.arange(step * batch, (step + 1) * batch)
    epochs = pos // n
    out = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        out[sel] = _perm(seed, n, e)[pos[sel] % n]
    return out


@lru_cache(maxsize=4)
def _perm(seed: int, n: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=gen(seed, "perm", epoch))


def _classification_eval(x, y, batch=1024):
    """An ``evaluate`` for a fixed labelled test set (loss + accuracy)."""

    def evaluate(model: nn.Module) -> dict:
        was_training = model.training
        model.eval()
        dev = next(model.parameters()).device
        loss_sum, correct = 0.0, 0
        with torch.no_grad():
            for i in range(0, x.shape[0], batch):
                xb, yb = x[i : i + batch].to(dev), y[i : i + batch].to(dev)
                out = model(xb)
                loss_sum += F.cross_entropy(out, yb, reduction="sum").item()
                correct += (out.argmax(1) == yb).sum().item()
        model.train(was_training)
        return {"loss": loss_sum / x.shape[0], "accuracy": correct / x.shape[0]}

    return evaluate


# ----------------------------------------------------------------------------
# digits-cnn
# ----------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """conv16-conv32-pool-fc64-fc10: ~38k parameters, 8x8 single-channel input."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _digits(seed: int, batch_size: int, device) -> Task:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    # Fixed split, independent of the run seed: a constant shuffle, then the
    # last 20% is the test set.  (sklearn's file order puts a harder group of
    # writers at the end; an unshuffled tail split plateaus near 95%.)
    order = torch.randperm(len(y), generator=gen(0, "digits-split"))
    x, y = x[order], y[order]
    n_train = int(round(0.8 * len(y)))
    # Standardize with *train* statistics only, so the test set stays unseen.
    mean, std = x[:n_train].mean(), x[:n_train].std()
    x = (x - mean) / std
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]

    with torch.random.fork_rng(devices=[]):  # don't disturb the caller's RNG
        torch.manual_seed(seed)
        model = DigitsCNN().to(device)

    def train_batch(rank: int, world: int, step: int) -> Batch:
        idx = shard(_epoch_indices(seed, n_train, batch_size, step), rank, world)
        return xtr[idx].to(device), ytr[idx].to(device)

    return Task(
        "digits-cnn", model, F.cross_entropy, train_batch, _classification_eval(xte, yte),
        batch_size, lr=0.05, optimizer="sgd",
    )


# ----------------------------------------------------------------------------
# charlm
# ----------------------------------------------------------------------------

# A fixed list (rather than a directory listing) keeps the corpus stable across
# Python versions that add or move modules; files that are missing are skipped.
_STDLIB_FILES = [
    "argparse.py", "ast.py", "calendar.py", "collections/__init__.py", "configparser.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py",
    "enum.py", "fractions.py", "functools.py", "gettext.py", "heapq.py", "inspect.py",
    "json/decoder.py", "json/encoder.py", "logging/__init__.py", "os.py", "pprint.py",
    "queue.py", "random.py", "shlex.py", "shutil.py", "statistics.py", "string.py",
    "subprocess.py", "tarfile.py", "textwrap.py", "threading.py", "tokenize.py",
    "typing.py", "uuid.py", "warnings.py",
]
VOCAB = 128  # ASCII; any byte >= 127 is folded into the (otherwise unused) DEL code


def stdlib_text(max_bytes: int = 1 << 20) -> bytes:
    """Concatenated source of a fixed list of stdlib modules, capped at ``max_bytes``."""
    root = os.path.dirname(os.__file__)
    parts, total = [], 0
    for rel in _STDLIB_FILES:
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        parts.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(parts)[:max_bytes]


class CharLSTM(nn.Module):
    """Embedding(128, 64) -> LSTM(128) -> Linear(128): ~120k parameters."""

    def __init__(self, vocab=VOCAB, emb=64, hidden=128):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x):  # (B, T) -> (B, T, V)
        h, _ = self.lstm(self.emb(x))
        return self.head(h)


def _lm_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _charlm(seed: int, batch_size: int, device, text_bytes: int = 1 << 20, seq_len: int = 64) -> Task:
    raw = torch.frombuffer(bytearray(stdlib_text(int(text_bytes))), dtype=torch.uint8)
    data = raw.clamp(max=VOCAB - 1).long()
    n_train = int(0.9 * len(data))  # last 10% of the corpus is the test text
    train, test = data[:n_train], data[n_train:]
    seq_len = int(seq_len)

    # Fixed test windows: evenly spaced, non-overlapping, length 256.
    t_len = 256
    n_win = min(32, (len(test) - 1) // t_len)
    starts = torch.linspace(0, len(test) - t_len - 1, n_win).long()
    xte = torch.stack([test[s : s + t_len] for s in starts])
    yte = torch.stack([test[s + 1 : s + t_len + 1] for s in starts])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CharLSTM().to(device)

    def train_batch(rank: int, world: int, step: int) -> Batch:
        # Random windows; the starts of the whole global batch come from one
        # (seed, step) generator so the batch does not depend on world size.
        s = torch.randint(0, n_train - seq_len - 1, (batch_size,), generator=gen(seed, "lm", step))
        s = shard(s, rank, world)
        offs = s[:, None] + torch.arange(seq_len + 1)
        w = train[offs]
        return w[:, :-1].to(device), w[:, 1:].to(device)

    def evaluate(m: nn.Module) -> dict:
        was_training = m.training
        m.eval()
        dev = next(m.parameters()).device
        with torch.no_grad():
            loss = _lm_loss(m(xte.to(dev)), yte.to(dev)).item()
        m.train(was_training)
        return {"loss": loss, "bpc": loss / math.log(2)}

    return Task(
        "charlm", model, _lm_loss, train_batch, evaluate, batch_size, lr=3e-3, optimizer="adam",
    )


# ----------------------------------------------------------------------------
# mlp-wide
# ----------------------------------------------------------------------------


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _mlp_wide(seed: int, batch_size: int, device, width: int = 2048, depth: int = 3,
              in_dim: int = 512, classes: int = 10) -> Task:
    width, depth, in_dim, classes = int(width), int(depth), int(in_dim), int(classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # The teacher is small and fixed: labels are argmax of a random MLP.
        teacher = _mlp([in_dim, 64, classes]).eval()
        model = _mlp([in_dim] + [width] * (depth - 1) + [classes]).to(device)

    def labelled(g: torch.Generator, n: int) -> Batch:
        x = torch.randn(n, in_dim, generator=g)
        with torch.no_grad():
            y = teacher(x).argmax(1)
        return x, y

    xte, yte = labelled(gen(seed, "mlp-test"), 4096)

    def train_batch(rank: int, world: int, step: int) -> Batch:
        x, y = labelled(gen(seed, "mlp-train", step), batch_size)
        return shard(x, rank, world).to(device), shard(y, rank, world).to(device)

    return Task(
        "mlp-wide", model, F.cross_entropy, train_batch, _classification_eval(xte, yte),
        batch_size, lr=1e-3, optimizer="adam",
    )


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------

# name -> (factory, default global batch size)
TASKS: dict[str, tuple[Callable[..., Task], int]] = {
    "digits-cnn": (_digits, 64),
    "charlm": (_charlm, 32),
    "mlp-wide": (_mlp_wide, 64),
}


def build(name: str, seed: int = 0, *, batch_size: int | None = None, device=None, **options) -> Task:
    """Build task ``name`` deterministically from ``seed``.

    ``batch_size`` is the *global* batch (default per task); ``device``
    defaults to CPU; ``options`` are task-specific knobs (``charlm``:
    ``text_bytes``, ``seq_len``; ``mlp-wide``: ``width``, ``depth``,
    ``in_dim``, ``classes``).
    """
    if name not in TASKS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(TASKS)}")
    factory, default_bs = TASKS[name]
    return factory(int(seed), int(batch_size or default_bs), torch.device(device or "cpu"), **options)
