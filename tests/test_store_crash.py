"""Interrupted rounds: an exception part-way through a round, and a writer killed with
SIGKILL part-way through one. Only committed rounds may be visible afterwards, the next
round must record normally, and nothing the interrupted attempt wrote may leak into
results (records, accumulators, the user table, the index, the model).

Format 2 writes a round inside one Icechunk transaction: what the attempt wrote before the
failure sits in a session that is never committed (or in unreferenced objects of a killed
writer, which the next compaction deletes).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _fl import (
    History,
    Injected,
    Tripwire,
    Writer,
    check_after_kill,
    check_answers,
    make_round,
    rel_err,
    replay,
    staging_files,
    tripwire,
    writer_history,
    writer_round,
)

import medustore
from medustore import Retention

RTOL = 1e-6

# ---------------------------------------------------------------------------- exceptions


M = 64
SEED = 41
_names = itertools.count()


def _history(committed: list[list[Any]]) -> History:
    rng = np.random.default_rng(SEED)
    return History(rng.normal(size=M),
                   [make_round(SEED, t, us, M) for t, us in enumerate(committed)])


def _check(store: medustore.UpdateStore, h: History) -> None:
    """The store answers exactly as FedAvg over ``h``'s rounds (and nothing else)."""
    assert store.rounds == [r.t for r in h.rounds]
    assert store.users == h.users  # an attempt's new users never reach the user table
    assert rel_err(store.latest("flat"), replay(h)) <= RTOL
    for u in store.users:  # through the exact accumulators
        assert rel_err(store.unlearn(u, out="flat"), replay(h, [u])) <= RTOL, u
    users = h.users
    for forget in (users[:1], users[1:3]):  # through the records
        assert rel_err(store.unlearn(forget, exact_accumulator=False if len(forget) == 1
                                     else None, out="flat"), replay(h, forget)) <= RTOL
    weight, stored = store.side("weight"), store.side("stored")
    for row, r in enumerate(h.rounds):  # only the round's own users took part or are stored
        took_part = {u for u, x in zip(store.users, weight[row], strict=True) if not np.isnan(x)}
        kept = {u for u, x in zip(store.users, stored[row], strict=True) if x}
        assert took_part == kept == set(r.updates), r.t
        hbar = r.aggregate()
        for u in store.users:  # each record is the round's own differential
            rec = store.record(r.t, u, out="flat")
            if u in r.updates:
                want = r.updates[u].astype(np.float64) - hbar
                assert rel_err(rec, want) <= RTOL, (r.t, u)
            else:
                assert rec is None, (r.t, u)


def _state(location: str) -> tuple:
    """What a reader of the archive sees: rounds, users, the index digest, the version and
    the latest model's bytes."""
    with medustore.open(location, "r") as store:
        return (store.rounds, store.users, store.index.digest, store.snapshot_id,
                store.latest("flat").tobytes())


# Round 0 of scenario "first" grows every array from nothing; the interrupted round of
# "later" adds users (new columns, user table) and drops one that had taken part.
SCENARIOS = {
    "first": ([], ["a", "b", "c"], ["b", "c", "x"]),
    "later": ([["a", "b", "c"], ["a", "c"]], ["a", "b", "d", "e"], ["b", "c", "d"]),
}
NO_COMPACTION = Retention(every=0)


def _base(name: str, retention: Retention = NO_COMPACTION) -> tuple[History, str]:
    """The scenario's committed rounds, in a new in-memory archive."""
    h = _history(SCENARIOS[name][0])
    location = f"memory://crash-{name}-{next(_names)}"
    with medustore.open(location, "w", model=h.w0, policy="full", accumulators=True,
                        retention=retention) as store:
        for r in h.rounds:
            store.record_round(r.t, r.updates, weights=r.weights)
    return h, location


def _writes_of_attempt(name: str, retention: Retention = NO_COMPACTION) -> list[str]:
    h, location = _base(name, retention)
    attempt = make_round(SEED + 1, len(h.rounds), SCENARIOS[name][1], M)
    with medustore.open(location, "r+", retention=retention) as store, \
            tripwire(store, Tripwire()) as wire:
        store.record_round(attempt.t, attempt.updates, weights=attempt.weights)
    return wire.writes


def _retry(store: medustore.UpdateStore, h: History, name: str) -> None:
    """Record the scenario's retry (other users, other data) and one more round."""
    _, attempt_users, retry_users = SCENARIOS[name]
    t = len(h.rounds)
    good = make_round(SEED + 2, t, retry_users, M)
    store.record_round(t, good.updates, weights=good.weights)
    h.rounds.append(good)
    nxt = make_round(SEED + 3, t + 1, [retry_users[0], attempt_users[-1]], M)
    store.record_round(nxt.t, nxt.updates, weights=nxt.weights)
    h.rounds.append(nxt)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_exception_mid_round_leaves_it_invisible(name: str) -> None:
    attempt_users = SCENARIOS[name][1]
    writes = _writes_of_attempt(name)
    kinds = {w.split("[")[0].split(" ")[-1] for w in writes}
    assert {"records", "rounds", "round_facts", "entries", "entry_facts", "users", "acc",
            "aggregate", "model", "attrs", "committed"} <= kinds, writes  # every write seen
    assert writes[-1] == "committed"  # the commit is the last write of the round
    h, location = _base(name)
    before = _state(location)
    store = medustore.open(location, "r+", retention=NO_COMPACTION)
    for at in range(len(writes)):  # fail before each write in turn, on the same archive
        if at % 2:  # every other attempt from a freshly opened writer
            store.close()
            store = medustore.open(location, "r+", retention=NO_COMPACTION)
        bad = make_round(SEED + 1 + at, len(h.rounds), attempt_users, M)
        with tripwire(store, Tripwire(at)), pytest.raises(Injected):
            store.record_round(bad.t, bad.updates, weights=bad.weights)
        # A reader sees exactly what it saw before the attempt; so does the writer.
        assert _state(location) == before, f"failed before write {at} ({writes[at]})"
        assert (store.rounds, store.users) == before[:2]
    # The writer whose commit failed records the retry: a dropped user's record must go.
    _retry(store, h, name)
    store.close()
    with medustore.open(location, "r") as reopened:
        _check(reopened, h)


@pytest.mark.parametrize("same_object", [True, False])
def test_failure_after_the_commit_keeps_the_round(same_object: bool) -> None:
    # Compacting after every round puts a write (the compaction) after the commit.
    retention = Retention(grace=0, every=1)
    writes = _writes_of_attempt("later", retention)
    assert writes[-2:] == ["committed", "compact"]
    h, location = _base("later", retention)
    store = medustore.open(location, "r+", retention=retention)
    bad = make_round(SEED + 1, len(h.rounds), SCENARIOS["later"][1], M)
    with tripwire(store, Tripwire(len(writes) - 1)), pytest.raises(Injected):
        store.record_round(bad.t, bad.updates, weights=bad.weights)
    h.rounds.append(bad)
    assert _state(location)[:2] == ([r.t for r in h.rounds], h.users)
    if not same_object:
        store.close()
        store = medustore.open(location, "r+", retention=retention)
    assert store.rounds == [r.t for r in h.rounds]
    _retry(store, h, "later")
    store.close()
    with medustore.open(location, "r") as reopened:
        _check(reopened, h)


def test_rows_of_a_failed_round_are_reused_not_skipped() -> None:
    h = _history([["a", "b"]])
    store = medustore.open(f"memory://crash-rows-{next(_names)}", "w", model=h.w0,
                           policy="full", accumulators=True)
    store.record_round(0, h.rounds[0].updates, weights=h.rounds[0].weights)
    for at in (3, 6, 9):  # fail the same round three times, at different writes
        bad = make_round(SEED + at, 5, ["a", "z"], M)
        with tripwire(store, Tripwire(at)), pytest.raises(Injected):
            store.record_round(5, bad.updates, weights=bad.weights)
    good = make_round(SEED, 5, ["b"], M)
    store.record_round(5, good.updates, weights=good.weights)
    h.rounds.append(good)
    assert list(store.iter_rows()) == [(0, 0), (1, 5)]
    assert store.index.n_records == 3  # record numbers of the failed attempts are reused
    _check(store, h)
    store.close()


# ---------------------------------------------------------------------------- SIGKILL


def _count_sets(seed: int, m: int, round_: int) -> int:
    """How many store writes the writer subprocess makes in ``round_`` (same code, same
    data, in memory)."""
    import icechunk.store

    h = writer_history(seed, m, round_ + 1)
    count = {"armed": False, "n": 0}
    original = icechunk.store.IcechunkStore.set

    async def counting(self: Any, key: str, value: Any) -> None:
        count["n"] += count["armed"]
        return await original(self, key, value)

    icechunk.store.IcechunkStore.set = counting  # type: ignore[method-assign]
    try:
        with medustore.open(f"memory://crash-count-{next(_names)}", "w", model=h.w0,
                            policy="full", accumulators=True) as store:
            for r in h.rounds:
                count["armed"] = r.t == round_
                store.record_round(r.t, r.updates, weights=r.weights)
    finally:
        icechunk.store.IcechunkStore.set = original  # type: ignore[method-assign]
    return count["n"]


@pytest.mark.parametrize("k", [0, 2])
def test_sigkill_mid_round_at_seeded_points(tmp_path: Path, k: int) -> None:
    # Round 0 also creates the user table and grows every array from nothing. The model
    # is big enough that records are objects of their own, not inlined in manifests.
    seed, m = 5, 2000
    total = _count_sets(seed, m, k)
    assert total > 15
    points = sorted(np.random.default_rng([seed, k]).choice(total, size=2, replace=False))
    writers = {}
    for at in points:  # the writers run side by side; each stops at its own write
        tmp = tmp_path / f"at{at}"
        tmp.mkdir()
        writers[at] = Writer(tmp / "run", tmp / "progress.txt", seed=seed, m=m,
                             rounds=k + 5, hook="set", arm_round=k, at=int(at))
    for at, writer in writers.items():
        writer.wait_for("hit set")
        writer.kill()
        try:
            check_after_kill(writer.path, seed, m, [k], twin=writer.path.parent / "twin")
        except AssertionError as err:
            raise AssertionError(f"killed before store write {at} of {total}: {err}") from err


def test_sigkill_at_a_seeded_moment(tmp_path: Path) -> None:
    # A bigger model, killed asynchronously a seeded delay after round 2 starts: wherever
    # the kill lands (a chunk write, the commit, between rounds), the archive holds a
    # prefix of the rounds and the next round records normally.
    import time

    seed, m = 6, 100_000
    delay = float(np.random.default_rng(seed).uniform(0.0, 0.3))
    writer = Writer(tmp_path / "run", tmp_path / "progress.txt", seed=seed, m=m, rounds=12)
    writer.wait_for("start 2")
    time.sleep(delay)
    writer.kill()
    check_after_kill(writer.path, seed, m, range(2, 13), twin=tmp_path / "twin")


def test_writer_history_is_what_the_writer_records(tmp_path: Path) -> None:
    # The references above rebuild the subprocess's rounds: check they are the same ones.
    seed, m = 7, 50
    writer = Writer(tmp_path / "run", tmp_path / "progress.txt", seed=seed, m=m, rounds=4)
    writer.finish()
    h = writer_history(seed, m, 4)
    assert [writer_round(seed, t, m).updates.keys() for t in range(4)] == \
        [r.updates.keys() for r in h.rounds]
    with medustore.open(writer.path, "r") as store:
        for r in h.rounds:
            for u, upd in r.updates.items():
                want = upd.astype(np.float64) - r.aggregate()
                assert rel_err(store.record(r.t, u, out="flat"), want) <= RTOL
        assert rel_err(store.latest("flat"), replay(h)) <= RTOL


def test_compaction_removes_half_written_objects(tmp_path: Path) -> None:
    # Icechunk's local storage writes an object to NAME#N and renames it when complete: a
    # writer killed mid-write (test_sigkill_at_a_seeded_moment lands there at times) leaves
    # the NAME#N file. Compaction must delete it like any other object of a dead writer.
    import os
    import time

    seed, m = 8, 2000
    h = writer_history(seed, m, 2)
    path = tmp_path / "run"
    with medustore.open(path, "w", model=h.w0, policy="full", accumulators=True,
                        retention=Retention(every=0)) as store:
        r = h.rounds[0]
        store.record_round(r.t, r.updates, weights=r.weights)
        leftover = path / "chunks" / "Q0KPA4T8ZCSBQ8MN70F0#1"  # as a killed writer left one
        leftover.write_bytes(bytes(4096))
        old = time.time() - 3600
        os.utime(leftover, (old, old))
        r = h.rounds[1]
        store.record_round(r.t, r.updates, weights=r.weights)
        store.compact(grace=0)
        check_answers(store, h)
    assert staging_files(path) == []
