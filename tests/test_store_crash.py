"""Interrupted rounds: an exception part-way through a round, and a writer killed with
SIGKILL part-way through one. Only committed rounds may be visible afterwards, the next
round must record normally, and nothing the interrupted attempt wrote may leak into
results (records, accumulators, the user table, array shapes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from _fl import (
    History,
    Injected,
    Tripwire,
    helpers_dir,
    make_round,
    make_w0,
    rel_err,
    replay,
    tripwire,
)
from zarr.core.sync import sync

import medustore
from medustore import MeduPolicy

RTOL = 1e-6


# ---------------------------------------------------------------------------- scenario


M = 64
SEED = 41


def _history(committed: list[list[Any]]) -> History:
    rng = np.random.default_rng(SEED)
    return History(rng.normal(size=M),
                   [make_round(SEED, t, us, M) for t, us in enumerate(committed)])


def _check(store: medustore.UpdateStore, h: History) -> None:
    """The store answers exactly as FedAvg over ``h``'s rounds (and nothing else)."""
    assert store.rounds == [r.t for r in h.rounds]
    assert rel_err(store.latest("flat"), replay(h)) <= RTOL
    users = h.users
    assert set(users) <= set(store.users)
    for u in store.users:  # through the exact accumulators
        assert rel_err(store.unlearn(u, out="flat"), replay(h, [u])) <= RTOL, u
    for forget in (users[:1], users[1:3]):  # through the records
        assert rel_err(store.unlearn(forget, exact_accumulator=False if len(forget) == 1
                                     else None, out="flat"), replay(h, forget)) <= RTOL
    weight, stored = store.side("weight"), store.side("stored")
    for row, r in enumerate(h.rounds):  # only the round's own users took part or are stored
        took_part = {u for u, x in zip(store.users, weight[row], strict=True) if not np.isnan(x)}
        kept = {u for u, x in zip(store.users, stored[row], strict=True) if x}
        assert took_part == kept == set(r.updates), r.t


def _record_cols(store: medustore.UpdateStore, row: int) -> set[int]:
    """User columns of ``row`` that have a record chunk in the zarr store."""
    zstore = store._group.store

    async def keys() -> list[str]:
        return [k async for k in zstore.list_prefix(f"updates/c/{row}/")]

    # A writer killed mid-write may leave a temporary "*.partial" file: not a chunk.
    return {int(k.split("/")[3]) for k in sync(keys()) if k.rsplit("/", 1)[-1].isdigit()}


# Round 0 of scenario "first" grows every array from nothing; the interrupted round of
# "later" adds users (new columns, user table) and drops one that had taken part.
SCENARIOS = {
    "first": ([], ["a", "b", "c"], ["b", "c", "x"]),
    "later": ([["a", "b", "c"], ["a", "c"]], ["a", "b", "d", "e"], ["b", "c", "d"]),
}


def _base(name: str) -> tuple[History, zarr.storage.MemoryStore]:
    """The scenario's committed rounds, in an in-memory archive."""
    h = _history(SCENARIOS[name][0])
    zstore = zarr.storage.MemoryStore()
    store = medustore.open(zstore, "w", model=h.w0, policy="full", accumulators=True)
    for r in h.rounds:
        store.record_round(r.t, r.updates, weights=r.weights)
    return h, zstore


def _writes_of_attempt(name: str) -> list[str]:
    h, zstore = _base(name)
    store = medustore.open(zstore, "r+")
    attempt = make_round(SEED + 1, len(h.rounds), SCENARIOS[name][1], M)
    with tripwire(store, Tripwire()) as wire:
        store.record_round(attempt.t, attempt.updates, weights=attempt.weights)
    return wire.writes


def _kind(write: str) -> str:
    return write.split("[")[0].split(".")[0]


def _points(name: str, writes: list[str]) -> list[tuple[int, bool]]:
    """``(write index, same_object)`` pairs to fail at.

    Each write is failed with a reopen, except that resizes behave alike (the first, the
    middle and the last are kept) and "first" skips the kinds of write "later" covers.
    Continuing with the same object matters where memory can drift from disk: the user
    table, the commit and after it; other writes get it every third one.
    """
    covered = {_kind(w) for w in _writes_of_attempt("later")} if name == "first" else set()
    resizes = [i for i, w in enumerate(writes) if w.startswith("resize")]
    keep = set(resizes[:1] + resizes[len(resizes) // 2:][:1] + resizes[-1:])
    commit = next(i for i, w in enumerate(writes) if w.startswith("committed"))
    out = []
    for i, w in enumerate(writes):
        if (w.startswith("resize") and i not in keep) or _kind(w) in covered - {"attrs"}:
            continue
        out.append((i, False))
        if w.startswith(("attrs", "resize")) or i >= commit or i % 3 == 0:
            out.append((i, True))
    return out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_exception_mid_round_leaves_it_invisible(name: str) -> None:
    _, attempt_users, retry_users = SCENARIOS[name]
    writes = _writes_of_attempt(name)
    assert len(writes) >= 15  # the tripwire sees the round's writes
    commit = next(i for i, w in enumerate(writes) if w.startswith("committed"))
    assert commit >= len(writes) - 2  # the commit is (nearly) the last write
    h0, template = _base(name)
    for at, same_object in _points(name, writes):
        h = History(h0.w0, list(h0.rounds))
        zstore = zarr.storage.MemoryStore(store_dict=dict(template._store_dict))
        store = medustore.open(zstore, "r+")
        t = len(h.rounds)
        bad = make_round(SEED + 1, t, attempt_users, M)
        with tripwire(store, Tripwire(at)), pytest.raises(Injected):
            store.record_round(t, bad.updates, weights=bad.weights)
        if not same_object:
            store = medustore.open(zstore, "r+")
        if at > commit:  # only cleanup after the commit failed: the round is in
            h.rounds.append(bad)
        assert store.rounds == [r.t for r in h.rounds], (at, writes[at], same_object)
        # The retry has other users and other data; a dropped user's chunk must go.
        t = len(h.rounds)
        good = make_round(SEED + 2, t, retry_users, M)
        store.record_round(t, good.updates, weights=good.weights)
        h.rounds.append(good)
        nxt = make_round(SEED + 3, t + 1, [retry_users[0], attempt_users[-1]], M)
        store.record_round(nxt.t, nxt.updates, weights=nxt.weights)
        h.rounds.append(nxt)
        reopened = medustore.open(zstore, "r")
        try:
            _check(reopened, h)
            cols = {reopened.users.index(u) for u in good.updates}
            assert _record_cols(reopened, t) == cols
        except AssertionError as err:
            raise AssertionError(f"before write {at} ({writes[at]}), {same_object=}: "
                                 f"{err}") from err


def test_rows_of_a_failed_round_are_reused_not_skipped() -> None:
    h = _history([["a", "b"]])
    store = medustore.open(zarr.storage.MemoryStore(), "w", model=h.w0, policy="full")
    store.record_round(0, h.rounds[0].updates, weights=h.rounds[0].weights)
    for at in (3, 6, 9):  # fail the same round three times, at different writes
        bad = make_round(SEED + at, 5, ["a", "z"], M)
        with tripwire(store, Tripwire(at)), pytest.raises(Injected):
            store.record_round(5, bad.updates, weights=bad.weights)
    good = make_round(SEED, 5, ["b"], M)
    store.record_round(5, good.updates, weights=good.weights)
    h.rounds.append(good)
    assert list(store.iter_rows()) == [(0, 0), (1, 5)]
    _check(store, h)


# ---------------------------------------------------------------------------- SIGKILL


WRITER = textwrap.dedent("""
    import itertools, sys, time
    sys.path.insert(0, sys.argv[1])
    from zarr.storage import LocalStore
    import medustore
    from _fl import make_round, make_w0
    path, progress = sys.argv[2], sys.argv[3]
    seed, m, block_round, block_at = (int(a) for a in sys.argv[4:8])
    users = ["a", "b", "c", "d", "e", "f"]
    state = {"armed": False, "n": 0}
    original = LocalStore.set

    async def set_(self, key, value, *args, **kwargs):
        if state["armed"]:
            if state["n"] == block_at:  # stop here, mid-round, until the parent kills us
                with open(progress, "a") as f:
                    f.write(f"blocked {key}\\n")
                time.sleep(600)
            state["n"] += 1
        return await original(self, key, value, *args, **kwargs)

    LocalStore.set = set_
    w0 = make_w0(seed, m)
    policy = medustore.MeduPolicy(chunk_size=max(64, m // 4 + 1))
    store = medustore.open(path, "w", model=w0, policy=policy, accumulators=True)
    for t in itertools.count():
        r = make_round(seed, t, users[t % 2:] if t % 3 else users[:4], m)
        state["armed"] = t == block_round
        with open(progress, "a") as f:
            f.write(f"start {t}\\n")
        store.record_round(t, r.updates, weights=r.weights)
""")


def _writer_history(seed: int, m: int, n_rounds: int) -> History:
    users = ["a", "b", "c", "d", "e", "f"]
    w0 = make_w0(seed, m)
    return History(w0, [make_round(seed, t, users[t % 2:] if t % 3 else users[:4], m)
                        for t in range(n_rounds)])


def _start_writer(tmp: Path, seed: int, m: int, block_round: int, block_at: int
                  ) -> tuple[subprocess.Popen, Path, Path]:
    path, progress = tmp / "run.zarr", tmp / "progress.txt"
    progress.write_text("")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, helpers_dir(), str(path),
                             str(progress), str(seed), str(m), str(block_round), str(block_at)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, path, progress


def _wait_for(proc: subprocess.Popen, progress: Path, line: str) -> None:
    """Poll the writer's progress file (a hang guard, not a timing check)."""
    for _ in range(12000):
        if any(x.startswith(line) for x in progress.read_text().splitlines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early: {proc.stderr.read().decode()}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError(f"writer never reported {line!r}")


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    proc.stderr.close()


def _verify_after_kill(path: Path, seed: int, m: int, committed: int) -> None:
    h = _writer_history(seed, m, committed)
    with medustore.open(path, "r") as store:
        assert store.rounds == list(range(committed))
        assert rel_err(store.latest("flat"), replay(h)) <= RTOL
    with medustore.open(path, "r+") as store:
        # The next round records normally, with users other than the interrupted one's.
        r = make_round(seed + 1, committed, ["b", "zz"], m)
        store.record_round(r.t, r.updates, weights=r.weights)
        h.rounds.append(r)
    with medustore.open(path, "r") as store:
        assert store.rounds == list(range(committed + 1))
        assert set(h.users) <= set(store.users)
        for u in store.users:  # users the killed round added, if it got that far, too
            want = replay(h, [u])
            assert rel_err(store.unlearn(u, out="flat"), want) <= RTOL, u
            assert rel_err(store.unlearn([u], exact_accumulator=False, out="flat"),
                           want) <= RTOL, u
        forget = store.users[:2]
        assert rel_err(store.unlearn(forget, rounds=(1, None), out="flat"),
                       replay(h, forget, (1, None))) <= RTOL
        assert _record_cols(store, committed) == {store.users.index(u) for u in ("b", "zz")}


def _count_sets(tmp: Path, seed: int, m: int, round_: int) -> int:
    """How many store writes the writer makes in ``round_`` (same code, same data)."""
    from zarr.storage import LocalStore

    h = _writer_history(seed, m, round_ + 1)
    count = {"armed": False, "n": 0}
    original = LocalStore.set

    async def counting(self: Any, key: str, value: Any, *args: Any, **kwargs: Any) -> None:
        count["n"] += count["armed"]
        return await original(self, key, value, *args, **kwargs)

    policy = MeduPolicy(chunk_size=max(64, m // 4 + 1))
    LocalStore.set = counting  # type: ignore[method-assign]
    try:
        with medustore.open(tmp / "count.zarr", "w", model=h.w0, policy=policy,
                            accumulators=True) as store:
            for r in h.rounds:
                count["armed"] = r.t == round_
                store.record_round(r.t, r.updates, weights=r.weights)
    finally:
        LocalStore.set = original  # type: ignore[method-assign]
    return count["n"]


@pytest.mark.parametrize("k", [0, 2])
def test_sigkill_mid_round_at_seeded_points(tmp_path: Path, k: int) -> None:
    # Round 0 also creates the user table and grows every array from nothing.
    seed, m = 5, 2000
    total = _count_sets(tmp_path, seed, m, k)
    assert total > 20
    points = sorted(np.random.default_rng([seed, k]).choice(total, size=2, replace=False))
    for at in points:
        tmp = tmp_path / f"at{at}"
        tmp.mkdir()
        proc, path, progress = _start_writer(tmp, seed, m, k, at)
        _wait_for(proc, progress, "blocked")
        _kill(proc)
        try:
            _verify_after_kill(path, seed, m, committed=k)
        except AssertionError as err:
            raise AssertionError(f"killed before store write {at} of {total}: {err}") from err


def test_sigkill_at_a_seeded_moment(tmp_path: Path) -> None:
    # A bigger model, killed asynchronously a seeded delay after round 2 starts: wherever
    # the kill lands (a chunk write, the commit, between rounds), the archive holds a
    # prefix of the rounds and the next round records normally.
    seed, m = 6, 100_000
    delay = float(np.random.default_rng(seed).uniform(0.0, 0.3))
    proc, path, progress = _start_writer(tmp_path, seed, m, block_round=-1, block_at=-1)
    _wait_for(proc, progress, "start 2")
    time.sleep(delay)
    _kill(proc)
    with medustore.open(path, "r") as store:
        committed = len(store.rounds)
    assert committed >= 2
    _verify_after_kill(path, seed, m, committed)
