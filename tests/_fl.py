"""Test helpers: synthetic federated histories and an independent FedAvg replay.

The references here never call medustore: they recompute FedAvg from the raw updates in
float64, so a test compares the store against the unlearning rule itself, not against
another path through the same code.
"""

from __future__ import annotations

import os
import random
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

UserId = int | str
Window = tuple[int | None, int | None]


@dataclass
class Round:
    """One FL round as the server saw it: raw float32 updates and weights."""

    t: int
    updates: dict[UserId, np.ndarray]
    weights: dict[UserId, float]

    def aggregate(self, users: Sequence[UserId] | None = None) -> np.ndarray:
        """FedAvg of ``users`` (default: every participant), in float64."""
        users = list(self.updates) if users is None else list(users)
        P = sum(self.weights[u] for u in users)
        out = np.zeros(next(iter(self.updates.values())).size)
        for u in users:
            out += self.weights[u] * self.updates[u].astype(np.float64)
        return out / P


@dataclass
class History:
    """``w_0`` and the rounds, in order."""

    w0: np.ndarray
    rounds: list[Round] = field(default_factory=list)

    @property
    def users(self) -> list[UserId]:
        seen: dict[UserId, None] = {}
        for r in self.rounds:
            for u in r.updates:
                seen.setdefault(u, None)
        return list(seen)


def make_round(seed: int, t: int, users: Sequence[UserId], m: int, scale: float = 0.1,
               weights: Sequence[float] | None = None) -> Round:
    """A round of random float32 updates (a per-user offset makes users differ)."""
    rng = np.random.default_rng([seed, t])
    ups = {u: (scale * rng.normal(size=m) + 0.02 * rng.normal()).astype(np.float32)
           for u in users}
    if weights is None:
        weights = [float(rng.integers(1, 9)) for _ in users]
    return Round(t, ups, {u: float(w) for u, w in zip(users, weights, strict=True)})


def make_w0(seed: int, m: int) -> np.ndarray:
    """A reproducible initial model (float64)."""
    return np.random.default_rng([seed, 2**31]).normal(size=m)


def make_history(seed: int, m: int, participants: Sequence[Sequence[UserId]],
                 rounds: Sequence[int] | None = None, scale: float = 0.1) -> History:
    """A history with the given participants per round (round numbers default 0, 1, ...)."""
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=m)
    ts = list(range(len(participants))) if rounds is None else list(rounds)
    return History(w0, [make_round(seed, t, us, m, scale) for t, us in zip(ts, participants,
                                                                          strict=True)])


def record(store: Any, history: History, start: int = 0) -> None:
    """Record ``history.rounds[start:]`` into ``store`` as flat vectors."""
    for r in history.rounds[start:]:
        store.record_round(r.t, r.updates, weights=r.weights)


def in_window(t: int, window: Window | None) -> bool:
    if window is None:
        return True
    a, b = window
    return (a is None or t >= a) and (b is None or t < b)


def replay(history: History, forget: Sequence[UserId] = (),
           window: Window | None = None) -> np.ndarray:
    """FedAvg replayed from ``w_0`` without ``forget`` (only inside ``window``), float64."""
    gone = set(forget)
    w = history.w0.astype(np.float64).copy()
    for r in history.rounds:
        users = [u for u in r.updates if not (in_window(r.t, window) and u in gone)]
        if users:  # a round left without participants changes nothing
            w += r.aggregate(users)
    return w


def skewed_unlearn(history: History, forget: Sequence[UserId], window: Window | None,
                   alpha: float) -> np.ndarray:
    """Fast-FedUL's rule: ``w_T - C`` with ``C <- (1 + alpha) C + c_t`` over the window's
    rounds, ``c_t`` the change of round t's aggregate when ``forget`` is removed."""
    gone = set(forget)
    corr = np.zeros(history.w0.size)
    for r in history.rounds:
        if not in_window(r.t, window):
            continue
        corr *= 1.0 + alpha
        kept = [u for u in r.updates if u not in gone]
        new = r.aggregate(kept) if kept else 0.0
        corr += r.aggregate() - new
    return replay(history) - corr


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """``||got - want|| / ||want||`` in float64."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def snapshot(path: str | Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (directories implied by the names)."""
    root = Path(path)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@contextmanager
def seeded_dither(seed: int) -> Iterator[None]:
    """Make lattice coding reproducible: seed the per-chunk dither seeds and code chunks
    one at a time, so the n-th seed always goes to the same chunk."""
    import zarr

    import medustore.codecs.lattice as lattice_mod

    rng = random.Random(seed)
    saved = lattice_mod.__dict__.get("secrets")
    lattice_mod.secrets = types.SimpleNamespace(randbits=rng.getrandbits)  # type: ignore[attr-defined]
    try:
        with zarr.config.set({"async.concurrency": 1}):
            yield
    finally:
        if saved is None:
            del lattice_mod.secrets
        else:
            lattice_mod.secrets = saved  # type: ignore[attr-defined]


def helpers_dir() -> str:
    return os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------- failing writes


class Injected(RuntimeError):
    """The failure a test injects into a write."""


class Tripwire:
    """Counts the writes of a round and raises `Injected` instead of the ``at``-th one."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.writes: list[str] = []

    def tick(self, what: str) -> None:
        if self.at is not None and len(self.writes) == self.at:
            raise Injected(f"injected before write {self.at}: {what}")
        self.writes.append(what)


class _ArrayProxy:
    """A zarr array whose writes (item, orthogonal, resize) go through a tripwire."""

    def __init__(self, arr: Any, wire: Tripwire, name: str) -> None:
        self._arr, self._wire, self._name = arr, wire, name

    def __getattr__(self, key: str) -> Any:
        return getattr(self._arr, key)

    def __getitem__(self, key: Any) -> Any:
        return self._arr[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._wire.tick(f"{self._name}[{key}]")
        self._arr[key] = value

    def resize(self, shape: Any) -> None:
        self._wire.tick(f"resize {self._name}")
        self._arr.resize(shape)

    @property
    def oindex(self) -> Any:
        proxy = self

        class _OIndex:
            def __getitem__(self, key: Any) -> Any:
                return proxy._arr.oindex[key]

            def __setitem__(self, key: Any, value: Any) -> None:
                proxy._wire.tick(f"{proxy._name}.oindex[{key}]")
                proxy._arr.oindex[key] = value

        return _OIndex()


class _GroupProxy:
    """The archive's group, whose attribute writes (the user table) go through a tripwire."""

    def __init__(self, group: Any, wire: Tripwire) -> None:
        self._group, self._wire = group, wire

    def __getattr__(self, key: str) -> Any:
        return getattr(self._group, key)

    @property
    def attrs(self) -> Any:
        group, wire = self._group, self._wire

        class _Attrs:
            def __getitem__(self, key: str) -> Any:
                return group.attrs[key]

            def __contains__(self, key: str) -> bool:
                return key in group.attrs

            def get(self, key: str, default: Any = None) -> Any:
                return group.attrs.get(key, default)

            def __setitem__(self, key: str, value: Any) -> None:
                wire.tick(f"attrs[{key}]")
                group.attrs[key] = value

        return _Attrs()


@contextmanager
def tripwire(store: Any, wire: Tripwire) -> Iterator[Tripwire]:
    """Route every write ``store`` makes through ``wire`` (array by array, synchronously:
    a write either happened whole or not at all when `Injected` propagates)."""
    arrays, group = store._a, store._group
    store._a = {k: _ArrayProxy(v, wire, k) for k, v in arrays.items()}
    store._group = _GroupProxy(group, wire)
    try:
        yield wire
    finally:
        store._a, store._group = arrays, group
