"""The demo's model (a small MLP on the 8x8 digits) and its two metrics."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medustore.demo.data import Dataset, add_trigger

__all__ = ["accuracy", "backdoor_success", "make_model"]

#: Width of the hidden layer.
HIDDEN = 64


def make_model(seed: int = 0, hidden: int = HIDDEN) -> nn.Module:
    """A float32 MLP 64 -> ``hidden`` -> 10 with ReLU, initialised from ``seed``.

    The global torch generator is left untouched, so building a model never shifts any
    other random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Predicted classes of images ``x`` (shape ``(n, 8, 8)``)."""
    model.eval()
    return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).argmax(1).numpy()


def accuracy(model: nn.Module, data: Dataset) -> float:
    """Share of ``data`` classified correctly (clean accuracy)."""
    return float(np.mean(predict(model, data.x) == data.y))


def backdoor_success(model: nn.Module, data: Dataset, target: int) -> float:
    """Share of triggered images, of true class other than ``target``, classified as ``target``.

    Images already of class ``target`` are left out: the model would be right on them with
    or without a backdoor.
    """
    keep = data.y != target
    return float(np.mean(predict(model, add_trigger(data.x[keep])) == target))
