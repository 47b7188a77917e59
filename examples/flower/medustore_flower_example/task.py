"""The model, the data and local training: a small MLP on scikit-learn's bundled digits.

Everything is seeded: a partition's data, the initial model and each client's local
training depend only on the seed, the partition id and the server round, so a run gives the
same archive whatever order Flower schedules its clients in.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

TEST_FRACTION = 0.2


class Net(nn.Module):
    """64 pixels -> 32 hidden units -> 10 digits. Its ``state_dict`` keys (``fc1.weight``,
    ``fc1.bias``, ``fc2.weight``, ``fc2.bias``) are the tensor names in the archive."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def initial_model(seed: int = 0) -> Net:
    """The global model of round 0."""
    torch.manual_seed(seed)
    return Net()


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (nothing is downloaded): read straight from its data
    file when it is there, so that a Ray worker does not pay for importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = (Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
            if spec is not None and spec.origin else None)
    if path is not None and path.is_file():
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


@lru_cache(maxsize=4)
def _digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = _load_digits()
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(TEST_FRACTION * len(y)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def load_partition(partition_id: int, num_partitions: int, seed: int = 0,
                   max_examples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training examples of one partition (contiguous shards of a seeded shuffle)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition id {partition_id} not in [0, {num_partitions})")
    x, y, _, _ = _digits(seed)
    part = np.array_split(np.arange(len(y)), num_partitions)[partition_id]
    if max_examples is not None:
        part = part[:max_examples]
    return torch.from_numpy(x[part]), torch.from_numpy(y[part]).long()


def load_test(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out examples the server evaluates on."""
    _, _, x, y = _digits(seed)
    return torch.from_numpy(x), torch.from_numpy(y).long()


def train(model: Net, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
          batch_size: int, seed: int) -> float:
    """Local SGD; returns the mean training loss of the last epoch."""
    torch.set_num_threads(1)  # one CPU per client: no oversubscription, same numbers
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    last = 0.0
    for _ in range(epochs):
        total, order = 0.0, torch.randperm(len(y), generator=gen)
        for start in range(0, len(y), batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        last = total / len(y)
    return last


@torch.no_grad()
def evaluate(model: Net, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(loss, accuracy)`` on ``x, y``."""
    model.eval()
    logits = model(x)
    loss = float(nn.functional.cross_entropy(logits, y))
    return loss, float((logits.argmax(1) == y).float().mean())
