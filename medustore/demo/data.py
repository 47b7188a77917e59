"""The demo's data: scikit-learn's digits, user splits and a pixel backdoor.

The digits (1797 images of 8x8 pixels, 10 classes) ship with scikit-learn, so the demo runs
offline. Pixels are scaled to [0, 1] and not centred: background pixels stay exactly 0, which
is what lets a corner trigger survive honest users' updates (their gradients on the weights
of always-dark pixels are zero), as pixel backdoors do on MNIST.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Dataset",
    "add_trigger",
    "assign_users",
    "load_digits_dataset",
    "poison",
    "split_users",
]

#: Side of the square images.
SIDE = 8
#: Rows and columns of the trigger: the top-left 3x3 corner, mostly dark in the digits.
TRIGGER = (slice(0, 3), slice(0, 3))


@dataclass(frozen=True)
class Dataset:
    """Images and labels.

    Attributes
    ----------
    x : numpy.ndarray
        float32 images, shape ``(n, 8, 8)``, values in [0, 1].
    y : numpy.ndarray
        int64 labels, shape ``(n,)``.
    """

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: np.ndarray) -> Dataset:
        """The samples at ``index`` (copies)."""
        return Dataset(self.x[index].copy(), self.y[index].copy())


def load_digits_dataset(test_fraction: float = 0.25, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Load the digits and split them into a train and a test set, stratified by class.

    Parameters
    ----------
    test_fraction : float
        Share of the samples held out for testing.
    seed : int
        Seed of the split.

    Returns
    -------
    (Dataset, Dataset)
        The train and the test set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Dataset(x_tr, y_tr), Dataset(x_te, y_te)


def split_users(
    labels: np.ndarray,
    n_users: int,
    split: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Partition sample indices among users.

    Parameters
    ----------
    labels : numpy.ndarray
        Class of each sample.
    n_users : int
        Number of users.
    split : {"iid", "dirichlet"}
        ``"iid"``: a random permutation cut into near-equal parts. ``"dirichlet"``: for each
        class, shares drawn from Dirichlet(alpha) over the users (the usual label-skew
        non-IID split); smaller ``alpha`` means more skew.
    alpha : float
        Concentration of the Dirichlet split.
    seed : int
        Seed of the split.
    min_size : int
        Dirichlet only: draws are repeated until every user holds at least this many samples
        (a user with no data cannot train).

    Returns
    -------
    list of numpy.ndarray
        Sorted int64 indices of each user's samples; together they cover every sample once.
    """
    n = len(labels)
    if n_users < 1 or n_users > n:
        raise ValueError(f"n_users must be in [1, {n}], got {n_users}")
    rng = np.random.default_rng(seed)
    if split == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), n_users)]
    if split != "dirichlet":
        raise ValueError(f"split must be 'iid' or 'dirichlet', got {split!r}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    min_size = min(min_size, n // n_users)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_users)]
        for c in np.unique(labels):
            index = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(n_users, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(index)).astype(np.int64)
            for u, piece in enumerate(np.split(index, cuts)):
                parts[u].append(piece)
        users = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(u) for u in users) >= min_size:
            return users
    raise RuntimeError(
        f"no Dirichlet(alpha={alpha}) split gave every user {min_size} samples; raise alpha"
    )


def assign_users(
    labels: np.ndarray,
    n_users: int,
    n_malicious: int = 0,
    malicious_share: float | None = None,
    split: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Partition sample indices among users, the first ``n_malicious`` of them malicious.

    Parameters
    ----------
    labels : numpy.ndarray
        Class of each sample.
    n_users : int
        Number of users, malicious ones included.
    n_malicious : int
        Number of malicious users; they come first in the returned list.
    malicious_share : float or None
        Share of all samples the malicious users hold together, drawn uniformly at random
        and split evenly among them; the honest users split the rest with `split_users`.
        ``None``: no special share, every user is placed by `split_users`.
    split, alpha, seed
        As in `split_users`.

    Returns
    -------
    list of numpy.ndarray
        Sorted indices of each user's samples; together they cover every sample once.
    """
    if not 0 <= n_malicious < n_users:
        raise ValueError(f"n_malicious must be in [0, {n_users - 1}], got {n_malicious}")
    if malicious_share is None or n_malicious == 0:
        return split_users(labels, n_users, split, alpha, seed)
    if not 0.0 < malicious_share < 1.0:
        raise ValueError(f"malicious_share must be in (0, 1), got {malicious_share}")
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = round(malicious_share * len(labels))
    bad = [np.sort(part) for part in np.array_split(order[:cut], n_malicious)]
    rest = np.sort(order[cut:])
    honest = split_users(labels[rest], n_users - n_malicious, split, alpha, seed)
    return bad + [rest[part] for part in honest]


def add_trigger(x: np.ndarray) -> np.ndarray:
    """Return a copy of images ``x`` (shape ``(..., 8, 8)``) with the bright corner patch."""
    out = np.array(x, dtype=np.float32, copy=True)
    out[(..., *TRIGGER)] = 1.0
    return out


def poison(data: Dataset, fraction: float, target: int, seed: int = 0) -> Dataset:
    """Plant the backdoor in a user's data: trigger and relabel a fraction of its samples.

    Parameters
    ----------
    data : Dataset
        The user's clean samples.
    fraction : float
        Share of the samples (rounded, at least one) that get the trigger and label ``target``.
    target : int
        The class the trigger maps to.
    seed : int
        Seed of the choice of samples.

    Returns
    -------
    Dataset
        A copy with the chosen samples replaced by their poisoned version.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    k = max(1, round(fraction * len(data)))
    chosen = np.random.default_rng(seed).choice(len(data), size=k, replace=False)
    x, y = data.x.copy(), data.y.copy()
    x[chosen] = add_trigger(x[chosen])
    y[chosen] = target
    return Dataset(x, y)
