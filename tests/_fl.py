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


@contextmanager
def tripwire(store: Any, wire: Tripwire) -> Iterator[Tripwire]:
    """Route the writes of a round through ``wire``: array item writes and resizes, group
    attribute writes, the commit (``"committed"``: the round is in once that write passed)
    and the compaction after it (``"compact"``).

    Format 2 writes through zarr arrays of an Icechunk session, so the tripwire patches
    those classes for the duration (every store of the process goes through it: use it
    around one store's calls). A write either happened whole or not at all when
    `Injected` propagates.
    """
    import icechunk
    import zarr
    from zarr.core.attributes import Attributes

    from medustore.archive.repository import Repository

    del store  # kept in the signature: every write of the process is routed
    saved = {(zarr.Array, "__setitem__"): zarr.Array.__setitem__,
             (zarr.Array, "resize"): zarr.Array.resize,
             (Attributes, "__setitem__"): Attributes.__setitem__,
             (icechunk.Session, "commit"): icechunk.Session.commit,
             (Repository, "compact"): Repository.compact}

    def setitem(self: Any, key: Any, value: Any) -> None:
        wire.tick(f"{self.path}[{key}]")
        saved[zarr.Array, "__setitem__"](self, key, value)

    def resize(self: Any, shape: Any) -> None:
        wire.tick(f"resize {self.path}")
        saved[zarr.Array, "resize"](self, shape)

    def set_attr(self: Any, key: str, value: Any) -> None:
        wire.tick(f"attrs[{key}]")
        saved[Attributes, "__setitem__"](self, key, value)

    def commit(self: Any, *args: Any, **kwargs: Any) -> Any:
        wire.tick("committed")
        return saved[icechunk.Session, "commit"](self, *args, **kwargs)

    def compact(self: Any, *args: Any, **kwargs: Any) -> Any:
        wire.tick("compact")
        return saved[Repository, "compact"](self, *args, **kwargs)

    patches = {(zarr.Array, "__setitem__"): setitem, (zarr.Array, "resize"): resize,
               (Attributes, "__setitem__"): set_attr, (icechunk.Session, "commit"): commit,
               (Repository, "compact"): compact}
    for (owner, name), fn in patches.items():
        setattr(owner, name, fn)
    try:
        yield wire
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)


# ---------------------------------------------------------------------------- killed writers

WRITER_USERS = ["a", "b", "c", "d", "e", "f"]


def writer_round(seed: int, t: int, m: int) -> Round:
    """Round ``t`` of the writer subprocess's deterministic history."""
    users = WRITER_USERS[t % 2:] if t % 3 else WRITER_USERS[:4]
    return make_round(seed, t, users, m)


def writer_history(seed: int, m: int, n_rounds: int) -> History:
    """The first ``n_rounds`` rounds the writer subprocess records (``w_0`` included)."""
    return History(make_w0(seed, m), [writer_round(seed, t, m) for t in range(n_rounds)])


# The writer subprocess: records rounds of `writer_history` and, in its armed phase (one
# round, or the final compaction), reports reaching a hook to the progress file and then
# blocks there until it is killed ("hold"), or carries on (the test kills it after a delay).
# Hooks: "set" (the at-th store write of the round), "commit" (before Icechunk's commit),
# "committed" (right after it), "expire" (before expiring versions), "gc" (after expiring,
# before the garbage collection). With "watch" set to a folder of the repository, the
# armed commit kills its own process (SIGKILL, from a thread) as soon as a new object
# appears there: inside the commit. Before each round t listed in "gates" (t = "rounds":
# before the final compaction) it waits until the test creates the file GATE<t>.
_WRITER = """
import json, sys, time
from pathlib import Path

cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["helpers"])
import icechunk
import icechunk.store
import medustore
from _fl import make_w0, writer_round

progress = Path(cfg["progress"])
hook, at, hold = cfg["hook"], cfg["at"], cfg["hold"]
state = {"armed": False, "n": 0}


def say(line):
    with progress.open("a") as f:
        f.write(line + "\\n")


def reached(name):
    if state["armed"] and hook == name:
        if state["n"] == at:
            say(f"hit {cfg['label']}")
            if hold:
                time.sleep(600)
        state["n"] += 1


orig_set = icechunk.store.IcechunkStore.set


async def set_(self, key, value):
    reached("set")
    return await orig_set(self, key, value)


orig_commit = icechunk.Session.commit


def watch(kind):
    # SIGKILL this process as soon as an object of `kind` (a folder of the repository)
    # appears: from inside the commit, between its writes.
    import os
    import signal
    import threading

    root = Path(cfg["path"]) / kind

    def names():
        return {n for n in os.listdir(root) if "#" not in n} if root.exists() else set()

    before = names()

    def run():
        while not names() - before:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=run, daemon=True).start()


def commit(self, *args, **kwargs):
    reached("commit")
    if state["armed"] and cfg["watch"]:
        say(f"watching {cfg['watch']}")
        watch(cfg["watch"])
    sid = orig_commit(self, *args, **kwargs)
    reached("committed")
    return sid


def wrap(name):
    original = getattr(icechunk.Repository, name)

    def patched(self, *args, **kwargs):
        reached(name)
        return original(self, *args, **kwargs)

    return patched


icechunk.store.IcechunkStore.set = set_
icechunk.Session.commit = commit
icechunk.Repository.expire_snapshots = wrap("expire_snapshots")
icechunk.Repository.garbage_collect = wrap("garbage_collect")

seed, m = cfg["seed"], cfg["m"]
retention = medustore.Retention(**cfg["retention"])
if cfg["create"]:
    store = medustore.open(cfg["path"], "w", model=make_w0(seed, m), policy=cfg["policy"],
                           accumulators=cfg["accumulators"], retention=retention)
else:
    store = medustore.open(cfg["path"], "a", retention=retention)
say("open")


def wait_gate(t):
    if t in cfg["gates"]:
        say(f"waiting {t}")
        gate = Path(cfg["gate"] + str(t))
        for _ in range(60000):
            if gate.exists():
                return
            time.sleep(0.01)
        sys.exit("gate never opened")


for t in range(len(store.rounds), cfg["rounds"]):
    wait_gate(t)
    r = writer_round(seed, t, m)
    state["armed"] = t == cfg["arm_round"]
    say(f"start {t}")
    store.record_round(t, r.updates, weights=r.weights)
    say(f"done {t}")
state["armed"] = cfg["arm_round"] == "compact"
wait_gate(cfg["rounds"])
if cfg["compact"]:
    say("compact")
    store.compact(grace=0)
state["armed"] = False
store.close()
say("end")
"""

_HOOKS = {"expire": "expire_snapshots", "gc": "garbage_collect"}


class Writer:
    """A writer subprocess (see `_WRITER`) and its progress file.

    Parameters: ``rounds`` (record rounds up to this one, exclusive), ``arm_round`` (the
    round whose ``hook`` is armed, or ``"compact"`` for the final compaction), ``at`` (the
    hook's occurrence to stop at), ``hold`` (block there until killed), ``gates`` (rounds
    to wait for the test before), ``create`` (a new archive, else mode "a"), ``compact``
    (compact with grace 0 at the end), ``retention`` (keyword arguments of `Retention`),
    ``watch`` (kill itself inside the armed commit once an object of that kind is written).
    """

    def __init__(self, path: Path, progress: Path, *, seed: int, m: int, rounds: int,
                 hook: str | None = None, arm_round: int | str | None = None, at: int = 0,
                 hold: bool = True, gates: Sequence[int] = (), create: bool = True,
                 compact: bool = False, policy: str = "full", accumulators: bool = True,
                 retention: dict | None = None, watch: str | None = None) -> None:
        import json
        import subprocess
        import sys

        self.path, self.progress = Path(path), Path(progress)
        self.progress.write_text("")
        self.gate = str(self.progress) + ".gate"
        cfg = {"helpers": helpers_dir(), "path": str(path), "progress": str(progress),
               "seed": seed, "m": m, "rounds": rounds, "hook": _HOOKS.get(hook, hook),
               "label": hook, "arm_round": arm_round, "at": at, "hold": hold, "gates": list(gates),
               "gate": self.gate, "create": create, "compact": compact, "policy": policy,
               "accumulators": accumulators, "retention": retention or {}, "watch": watch}
        self.stderr = self.progress.with_suffix(".stderr")
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-c", _WRITER, json.dumps(cfg)],
                                         stdout=subprocess.DEVNULL, stderr=err)

    def lines(self) -> list[str]:
        return self.progress.read_text().splitlines()

    def wait_for(self, line: str, guard_s: float = 120.0) -> None:
        """Poll the progress file until a line starts with ``line`` (a hang guard, not a
        timing check)."""
        import time

        for _ in range(int(guard_s / 0.005)):
            if any(x.startswith(line) for x in self.lines()):
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"writer exited (rc {self.proc.returncode}) before "
                                     f"{line!r}: {self.stderr.read_text()[-3000:]}")
            time.sleep(0.005)
        self.proc.kill()
        raise AssertionError(f"writer never reported {line!r}")

    def open_gate(self, t: int) -> None:
        Path(self.gate + str(t)).touch()

    def kill(self) -> None:
        """SIGKILL (the writer gets no chance to clean up or release anything)."""
        import signal

        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait_killed(self, guard_s: float = 120.0) -> None:
        """Wait for the writer to die of SIGKILL (it kills itself: ``watch``)."""
        import signal

        rc = self.proc.wait(guard_s)
        assert rc == -signal.SIGKILL, f"writer was not killed (rc {rc}): " \
            f"{self.stderr.read_text()[-3000:]}"

    def finish(self, guard_s: float = 120.0) -> None:
        """Wait for a clean exit."""
        rc = self.proc.wait(guard_s)
        assert rc == 0, f"writer failed (rc {rc}): {self.stderr.read_text()[-3000:]}"


def check_answers(store: Any, h: History, rtol: float = 1e-6) -> None:
    """``store`` holds exactly ``h``'s rounds and answers as FedAvg over them: the latest
    model, and each user's unlearning through the exact accumulators and (for the first
    user) through the records."""
    assert store.rounds == [r.t for r in h.rounds]
    assert store.users == h.users
    assert rel_err(store.latest("flat"), replay(h)) <= rtol
    for u in store.users:
        assert rel_err(store.unlearn(u, out="flat"), replay(h, [u])) <= rtol, u
    if h.users:
        u = h.users[0]
        assert rel_err(store.unlearn([u], exact_accumulator=False, out="flat"),
                       replay(h, [u])) <= rtol, u


def staging_files(path: str | Path) -> list[Path]:
    """Half-written objects of a local Icechunk repository: its file storage writes an
    object to ``NAME#N`` and renames it when complete, so a writer killed mid-write leaves
    one behind (listings, hence garbage collection, skip such names)."""
    return sorted(p for p in Path(path).rglob("*#*") if p.is_file())


def object_counts(path: str | Path) -> dict[str, int]:
    """Objects of a local Icechunk repository, per kind (chunks, manifests, snapshots,
    transaction logs); half-written ones (`staging_files`) are not objects."""
    root = Path(path)
    return {d: sum(1 for p in (root / d).rglob("*") if p.is_file() and "#" not in p.name)
            for d in ("chunks", "manifests", "snapshots", "transactions")}


_TWINS: dict[tuple, dict[str, int]] = {}


def clean_twin(path: str | Path, h: History, policy: str = "full",
               accumulators: bool = True) -> dict[str, int]:
    """Record ``h`` without interruption at ``path``, compact it, and count its objects:
    what a compacted archive of the same rounds holds."""
    import medustore

    with medustore.open(path, "w", model=h.w0, policy=policy, accumulators=accumulators,
                        retention=medustore.Retention(every=0)) as store:
        record(store, h)
        store.compact(grace=0)
    return object_counts(path)


def check_after_kill(path: Path, seed: int, m: int, committed: Sequence[int],
                     twin: Path) -> History:
    """After a writer of `writer_history` was killed: the archive opens and holds a whole
    prefix of its rounds (as many as one of ``committed``) answering as FedAvg; its stale
    lock does not stop the next writer, whose round records normally; a compaction then
    leaves exactly the objects of a clean archive of the same rounds (the dead writer's
    uncommitted objects are gone; its half-written `staging_files`, which compaction does
    not see yet, are not objects). Returns the history now in the archive."""
    import medustore

    with medustore.open(path, "r") as store:
        n = len(store.rounds)
        assert n in committed, (n, committed)
        h = writer_history(seed, m, n)
        check_answers(store, h)
    with medustore.open(path, "r+", retention=medustore.Retention(every=0)) as store:
        r = make_round(seed + 1, n, ["b", "zz"], m)  # zz: a user the dead writer never had
        store.record_round(r.t, r.updates, weights=r.weights)
        h.rounds.append(r)
        store.compact(grace=0)
        left = store.garbage()
        assert (left.chunks_deleted, left.manifests_deleted, left.snapshots_deleted,
                left.transaction_logs_deleted) == (0, 0, 0, 0), left
    with medustore.open(path, "r") as store:
        check_answers(store, h)
    key = (seed, m, n)  # the same rounds make the same objects: build each twin once
    if key not in _TWINS:
        _TWINS[key] = clean_twin(twin, h)
    counts, twin_counts = object_counts(path), _TWINS[key]
    assert counts == twin_counts, (counts, twin_counts)
    return h


# ---------------------------------------------------------------------------- format 2 helpers


def tree_digest(path: str | Path) -> dict[str, str]:
    """Every file under ``path`` (relative path) with the SHA-256 of its bytes."""
    import hashlib

    root = Path(path)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def memory_url(prefix: str = "test") -> str:
    """A fresh ``memory://`` archive location (unique in this process)."""
    import uuid

    return f"memory://{prefix}-{uuid.uuid4().hex}"


def version_keys(store: Any) -> dict[str, bytes]:
    """Every key of the version an open `UpdateStore` reads, with its stored bytes (the
    Zarr store under ``store.reader``: metadata documents and coded chunks, as written)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    zstore = store.reader.arrays["model"].store

    async def keys() -> list[str]:
        return [k async for k in zstore.list()]

    proto = default_buffer_prototype()
    out = {}
    for key in sorted(sync(keys())):
        buf = sync(zstore.get(key, prototype=proto))
        assert buf is not None, key
        out[key] = buf.to_bytes()
    return out


def export_zip(store: Any, out: str | Path, edit: Any = None) -> Path:
    """Copy the version an open `UpdateStore` reads into a zip, byte for byte (a plain,
    read-only Zarr v3 archive). ``edit(key, data) -> data`` may change entries on the way."""
    import zipfile

    out = Path(out)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for key, data in version_keys(store).items():
            zf.writestr(key, edit(key, data) if edit else data)
    return out


def race_commits(a: Any, b: Any, r: Any, loser: Any, location: str) -> None:
    """Writer ``b`` records ``loser`` while, inside b's commit, writer ``a`` commits ``r``
    first: b must be refused with `ConcurrentWriteError` naming ``location``."""
    import re

    import icechunk
    import pytest

    from medustore import ConcurrentWriteError

    original = icechunk.Session.commit
    fired: list[int] = []

    def commit(self: Any, *args: Any, **kwargs: Any) -> Any:  # b's commit: a commits first
        if not fired:
            fired.append(1)
            a.record_round(r.t, r.updates, weights=r.weights)
        return original(self, *args, **kwargs)

    icechunk.Session.commit = commit
    try:
        with pytest.raises(ConcurrentWriteError, match=re.escape(location)):
            b.record_round(loser.t, loser.updates, weights=loser.weights)
    finally:
        icechunk.Session.commit = original
    assert fired
