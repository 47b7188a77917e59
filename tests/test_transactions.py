"""Transactions and versions of format-2 archives.

One round is one commit: a second writer is refused (local archives: by the writer's lock;
elsewhere: by the commit, when the archive moved since the writer read it) and nothing of
its round shows; a reader answers from the version it opened whatever writers commit; a
writer killed in its commit or in its garbage collection leaves whole rounds only; old
versions are kept as retention says, and nothing per round outlives compaction but the
round's own data.
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

import numpy as np
import pytest
from _fl import (
    History,
    Round,
    Writer,
    check_after_kill,
    check_answers,
    make_round,
    race_commits,
    rel_err,
    replay,
    writer_history,
)

import medustore
from medustore import ConcurrentWriteError, Retention, VersionNotKeptError

RTOL = 1e-6
_names = itertools.count()


# ---------------------------------------------------------------------------- two writers


def test_second_writer_process_is_refused(tmp_path: Path) -> None:
    seed, m = 11, 40
    path = tmp_path / "run"
    writer = Writer(path, tmp_path / "progress.txt", seed=seed, m=m, rounds=6, gates=[3])
    writer.wait_for("waiting 3")  # rounds 0-2 in, the writer holds the archive
    for mode in ("a", "r+", "w", "w-"):  # "w" must not wipe another writer's archive
        with pytest.raises(ConcurrentWriteError, match=re.escape(str(path))):
            medustore.open(path, mode, model=np.zeros(m))
    with medustore.open(path, "r") as reader:  # readers need no lock
        check_answers(reader, writer_history(seed, m, 3))
    writer.open_gate(3)
    writer.finish()
    h = writer_history(seed, m, 6)
    with medustore.open(path, "r") as store:  # every round of the first writer is intact
        check_answers(store, h)
    with medustore.open(path, "a") as store:  # the lock went with the first writer
        r = make_round(seed + 1, 6, ["a", "new"], m)
        store.record_round(r.t, r.updates, weights=r.weights)
        h.rounds.append(r)
    with medustore.open(path, "r") as store:
        check_answers(store, h)


def test_second_writer_in_one_process_is_refused(tmp_path: Path) -> None:
    seed, m = 12, 40
    path = tmp_path / "run"
    h = writer_history(seed, m, 4)
    first = medustore.open(path, "w", model=h.w0, policy="full", accumulators=True)
    for r in h.rounds[:2]:
        first.record_round(r.t, r.updates, weights=r.weights)
    for mode in ("a", "r+", "w", "w-"):
        with pytest.raises(ConcurrentWriteError, match=re.escape(str(path))):
            medustore.open(path, mode, model=h.w0)
    for r in h.rounds[2:]:  # the refusals cost the first writer nothing
        first.record_round(r.t, r.updates, weights=r.weights)
    check_answers(first, h)
    first.close()
    with medustore.open(path, "a") as second:
        check_answers(second, h)
        r = make_round(seed + 1, 4, ["b", "z"], m)
        second.record_round(r.t, r.updates, weights=r.weights)
        h.rounds.append(r)
    with medustore.open(path, "r") as store:
        check_answers(store, h)


def _pair(m: int, seed: int) -> tuple[str, History]:
    """A memory:// archive with two committed rounds (no lock there)."""
    h = writer_history(seed, m, 2)
    location = f"memory://tx-{next(_names)}"
    with medustore.open(location, "w", model=h.w0, policy="full", accumulators=True) as s:
        for r in h.rounds:
            s.record_round(r.t, r.updates, weights=r.weights)
    return location, h


def _state(location: str) -> tuple:
    with medustore.open(location, "r") as store:
        return (store.rounds, store.users, store.index.digest, store.snapshot_id,
                store.latest("flat").tobytes())


def test_stale_writer_is_refused_and_leaves_nothing() -> None:
    seed, m = 13, 30
    location, h = _pair(m, seed)
    a = medustore.open(location, "a")
    b = medustore.open(location, "a")
    r = make_round(seed, 2, ["a", "b"], m)
    a.record_round(r.t, r.updates, weights=r.weights)
    h.rounds.append(r)
    seen = _state(location)
    stale = make_round(seed + 1, 3, ["c", "intruder"], m)
    with pytest.raises(ConcurrentWriteError, match=re.escape(location)):
        b.record_round(stale.t, stale.updates, weights=stale.weights)
    assert _state(location) == seen  # nothing of b's round
    with medustore.open(location, "r") as store:
        check_answers(store, h)
        assert "intruder" not in store.users
    b.close()
    r = make_round(seed + 2, 3, ["a", "c"], m)  # the first writer carries on
    a.record_round(r.t, r.updates, weights=r.weights)
    h.rounds.append(r)
    a.close()
    with medustore.open(location, "a") as b:  # reopened, b records normally
        again = Round(4, stale.updates, stale.weights)
        b.record_round(again.t, again.updates, weights=again.weights)
        h.rounds.append(again)
    with medustore.open(location, "r") as store:
        check_answers(store, h)


def test_writers_racing_to_commit() -> None:
    # Both writers start their round from the same version; the first commits while the
    # second is committing: the second commit is refused whole (Icechunk's conflict check),
    # however much of its round it had written.

    seed, m = 14, 30
    location, h = _pair(m, seed)
    a = medustore.open(location, "a")
    b = medustore.open(location, "a")
    r = make_round(seed, 2, ["a", "x"], m)
    loser = make_round(seed + 1, 2, ["b", "y"], m)
    race_commits(a, b, r, loser, location)
    h.rounds.append(r)
    with medustore.open(location, "r") as store:
        check_answers(store, h)
        assert "y" not in store.users
    with pytest.raises(ConcurrentWriteError):  # b stays stale until reopened
        b.record_round(3, loser.updates, weights=loser.weights)
    b.close()
    a.close()


# ---------------------------------------------------------------------------- readers


def test_readers_see_whole_committed_prefixes_during_appends(tmp_path: Path) -> None:
    seed, m, n = 15, 16, 51
    path = tmp_path / "run"
    h = writer_history(seed, m, n)
    with medustore.open(path, "w", model=h.w0, policy="full",
                        retention=Retention(every=0)) as store:
        store.record_round(0, h.rounds[0].updates, weights=h.rounds[0].weights)
    # The answers of every prefix, from FedAvg over the seeded updates.
    latest = [replay(History(h.w0, h.rounds[:k])) for k in range(n + 1)]
    unlearned = [replay(History(h.w0, h.rounds[:k]), ["a"]) for k in range(n + 1)]
    taken = [sum("a" in r.updates for r in h.rounds[:k]) for k in range(n + 1)]
    gap = min(rel_err(latest[k], latest[k + 1]) for k in range(n))
    assert gap > 1e4 * RTOL  # neighbouring prefixes answer differently

    def check(store: medustore.UpdateStore) -> int:
        k = len(store.rounds)
        assert store.rounds == list(range(k))
        assert store.users == History(h.w0, h.rounds[:k]).users
        assert rel_err(store.latest("flat"), latest[k]) <= RTOL
        assert rel_err(store.unlearn("a", out="flat"), unlearned[k]) <= RTOL
        budget = store.error_budget("a")
        assert (budget.records_used, budget.rounds, budget.records_missing) == \
            (taken[k], taken[k], 0)
        assert budget.deterministic == budget.rms == 0.0
        return k

    held = medustore.open(path, "r")  # opened before the appends: it keeps round 0
    assert check(held) == 1
    gates = [11, 21, 31, 41]
    # Keep every replaced version for the test's length: the held reader's included.
    writer = Writer(path, tmp_path / "progress.txt", seed=seed, m=m, rounds=n, gates=gates,
                    create=False, accumulators=False,
                    retention={"grace": 3600.0, "every": 8})
    seen = set()
    for _ in range(20_000):  # a hang guard
        done = writer.proc.poll() is not None
        with medustore.open(path, "r") as store:
            k = check(store)
        seen.add(k)
        for g in gates:  # the writer waits at round g until a reader saw g rounds
            if k >= g:
                writer.open_gate(g)
        assert check(held) == 1  # snapshot isolation, all along
        if done:
            break
    writer.finish()
    assert {11, 21, 31, 41, n} <= seen
    with medustore.open(path, "r") as store:
        assert check(store) == n
    assert check(held) == 1
    held.close()


# ---------------------------------------------------------------------------- SIGKILL


KILL_SEED, KILL_M = 21, 2000


def _kill_each(tmp_path: Path, gate: int, cases: list[dict], **config) -> None:
    """Start one writer per case side by side, each waiting at ``gate``; then one at a time:
    let it go and kill it (SIGKILL) where the case says, and check the archive.

    A case gives ``hook`` and ``hold`` (see `Writer`), ``delay`` (seconds from reaching the
    hook to the kill) or ``watch`` (the writer kills itself from inside its commit when an
    object of that kind appears), and ``committed`` (the round counts it may leave).
    """
    writers = [Writer(tmp_path / f"w{i}" / "run", tmp_path / f"p{i}.txt", seed=KILL_SEED,
                      m=KILL_M, hook=case["hook"], hold=case.get("hold", False),
                      watch=case.get("watch"), gates=[gate], **config)
               for i, case in enumerate(cases)]
    for w in writers:
        w.wait_for(f"waiting {gate}")
    for i, (w, case) in enumerate(zip(writers, cases, strict=True)):
        w.open_gate(gate)
        if case.get("watch"):
            w.wait_killed()
        else:
            w.wait_for(f"hit {case['hook']}")
            time.sleep(case.get("delay", 0.0))
            w.kill()
        try:
            check_after_kill(w.path, KILL_SEED, KILL_M, case["committed"],
                             twin=tmp_path / f"twin{i}")
        except AssertionError as err:
            raise AssertionError(f"killed at {case}: {err}") from err


def test_sigkill_in_the_commit(tmp_path: Path) -> None:
    # Killed right before Icechunk's commit of round 3 (round 3 is not in), right after it
    # (it is), and from inside it: the commit writes manifests, the snapshot and the
    # transaction log, then moves the branch; the writer kills itself as soon as its new
    # snapshot, or its transaction log, is written (whether the branch moved by then is a
    # race: round 3 is in whole or not at all, and its orphans go at the next compaction).
    cases = [{"hook": "commit", "hold": True, "committed": [3]},
             {"hook": "committed", "hold": True, "committed": [4]},
             {"hook": "commit", "watch": "snapshots", "committed": [3, 4]},
             {"hook": "commit", "watch": "transactions", "committed": [3, 4]}]
    _kill_each(tmp_path, 3, cases, rounds=6, arm_round=3)


def test_sigkill_in_the_compaction(tmp_path: Path) -> None:
    # Eight rounds without compaction leave plenty to expire and collect; the writer is
    # killed before expiring anything, between expiring versions and collecting garbage,
    # and a seeded moment into each.
    delays = np.random.default_rng(KILL_SEED).uniform(0.0, 0.03, size=2)
    cases = [{"hook": "expire", "hold": True, "committed": [8]},
             {"hook": "gc", "hold": True, "committed": [8]},
             {"hook": "expire", "delay": float(delays[0]), "committed": [8]},
             {"hook": "gc", "delay": float(delays[1]), "committed": [8]}]
    _kill_each(tmp_path, 8, cases, rounds=8, arm_round="compact", compact=True,
               retention={"every": 0, "grace": 0.0})


# ---------------------------------------------------------------------------- versions


def test_compactions_are_spaced_in_proportion_to_the_archive(tmp_path: Path) -> None:
    # Garbage collection walks the whole archive: with spacing s, a compaction follows
    # at least s x rounds after the previous one, so the versions in between stay kept.
    retention = Retention(grace=0, every=2, spacing=0.25)
    assert [retention.due(since, 40) for since in (2, 9, 10)] == [False, False, True]
    assert not Retention(every=0).due(100, 100) and Retention(spacing=0).due(1, 10**6)
    h = writer_history(17, 8, 30)
    since = 0
    with medustore.open(tmp_path / "run", "w", model=h.w0, policy="full",
                        retention=retention) as store:
        for n, r in enumerate(h.rounds, start=1):
            store.record_round(r.t, r.updates, weights=r.weights)
            since += 1
            if since >= max(2, 0.25 * n):
                since = 0
            # kept: the latest, and the rounds committed since the last compaction
            assert len(store.versions()) == min(n, 1 + since), (n, since)
    assert since > 0  # the run ended between compactions: close compacted the rest
    with medustore.open(tmp_path / "run", "r") as reader:
        assert reader.versions() == [h.rounds[-1].t]


def test_retention_keeps_the_last_versions_and_tagged_ones(tmp_path: Path) -> None:
    seed, m = 16, 24
    path = tmp_path / "run"
    h = writer_history(seed, m, 10)
    store = medustore.open(path, "w", model=h.w0, policy="full", accumulators=True,
                           retention=Retention(keep_versions=3, grace=0, every=1))
    for r in h.rounds:
        store.record_round(r.t, r.updates, weights=r.weights)
        tagged = [3] if r.t > 5 else []  # kept for good once tagged, listed with the others
        assert store.versions() == tagged + list(range(max(0, r.t - 2), r.t + 1))
        if r.t == 3:
            store.tag(3)
    store.compact(grace=0)
    assert store.versions() == [3, 7, 8, 9]
    for t in (3, 7, 8, 9):  # the kept versions and the tagged one read as they were then
        with medustore.open(path, as_of_round=t) as past:
            check_answers(past, History(h.w0, h.rounds[:t + 1]))
            assert past.snapshot_id != store.snapshot_id or t == 9
    for t in (0, 4, 6, 42):
        with pytest.raises(VersionNotKeptError, match=r"kept: 3, 7, 8, 9\b"):
            medustore.open(path, as_of_round=t)
    with pytest.raises(ValueError):
        medustore.open(path, "r+", as_of_round=9)
    store.close()
    with medustore.open(path, "r") as reader:  # what a reader of the archive is told
        assert reader.versions() == [3, 7, 8, 9]
        check_answers(reader, h)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_compacted_archive_grows_by_the_rounds_data_only(tmp_path: Path) -> None:
    # Rounds of 3 users of a 1000-value model: 3 records and 1 aggregate (4 vectors of
    # about 4 kB) per round. Keeping a copy of the 8 kB float64 model per round, or
    # anything else per round of that size, would show.
    m, users = 1000, ["a", "b", "c"]
    path = tmp_path / "run"
    w0 = np.random.default_rng(17).normal(size=m)
    sizes, records = {}, {}
    with medustore.open(path, "w", model=w0, policy="full",
                        retention=Retention(every=0)) as store:
        for t in range(40):
            r = make_round(17, t, users, m)
            store.record_round(t, r.updates, weights=r.weights)
            if t + 1 in (20, 40):
                store.compact(grace=0)
                sizes[t + 1] = _size(path)
        records = store.nbytes_by_round()
    data = sum(b for t, b in records.items() if t >= 20) * (1 + 1 / len(users))
    grew = sizes[40] - sizes[20]
    model_copy = 8 * m
    assert 0.97 * data <= grew <= 1.03 * data + 20 * 512, (grew, data)
    assert grew < data + 20 * model_copy / 4  # the bound is meaningful
