"""Pipelined rounds (``medustore.open(..., pipeline=N)``): the archive is the one a plain
writer makes, reads wait for queued rounds, close commits them, and a round failing in the
background commits nothing, drops the rounds behind it and is raised by the next call."""

from __future__ import annotations

import itertools
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _fl import History, check_answers, make_round, make_w0

import medustore
from medustore import ConcurrentWriteError
from medustore.pipeline import Pipeline

_names = itertools.count()


def _history(seed: int, m: int, n: int) -> History:
    rng = np.random.default_rng(seed)
    rounds = [make_round(seed + t, t, [int(u) for u in rng.choice(9, size=4, replace=False)]
                         + (["late"] if t == n - 1 else []), m) for t in range(n)]
    return History(make_w0(seed, m), rounds)


def _record(location: str, h: History, **kwargs) -> list:
    with medustore.open(location, "w", model=h.w0, **kwargs) as store:
        return [store.record_round(r.t, r.updates, weights=r.weights) for r in h.rounds]


@pytest.mark.parametrize("policy", ["full", "medu"])
def test_pipelined_archive_equals_the_plain_one(tmp_path: Path, policy: str) -> None:
    # a seeded policy: dithers derived from the content, so both archives code alike
    policy = replace(medustore.PRESETS[policy], seed=12)
    h = _history(5, 40, 7)
    plain = _record(str(tmp_path / "plain"), h, policy=policy, accumulators=True)
    piped = _record(str(tmp_path / "piped"), h, policy=policy, accumulators=True, pipeline=2)
    assert [s.nbytes for s in piped] == [None] * 7  # not written when record_round returned
    assert [tuple(s)[:3] for s in piped] == [tuple(s)[:3] for s in plain]
    with medustore.open(tmp_path / "plain") as a, medustore.open(tmp_path / "piped") as b:
        assert a.index.digest == b.index.digest and a.users == b.users
        np.testing.assert_array_equal(a.latest("flat"), b.latest("flat"))
        for u in a.users:  # the accumulators too (read back in the background)
            np.testing.assert_array_equal(a.accumulator(u), b.accumulator(u))
        if policy.lattice is None:
            check_answers(b, h)


def test_reads_wait_for_the_queue_and_close_commits_it(tmp_path: Path) -> None:
    h = _history(6, 24, 5)
    store = medustore.open(tmp_path / "a", "w", model=h.w0, policy="full", pipeline=3)
    for r in h.rounds[:3]:
        store.record_round(r.t, r.updates, weights=r.weights)
        assert store._pipeline.pending <= 3
    assert store.rounds == [0, 1, 2]  # a read: waits for the queued rounds
    np.testing.assert_allclose(store.latest("flat"), h.w0 + sum(r.aggregate()
                                                                 for r in h.rounds[:3]),
                               rtol=1e-6)
    for r in h.rounds[3:]:
        store.record_round(r.t, r.updates, weights=r.weights)
    store.close()
    with medustore.open(tmp_path / "a") as reader:
        check_answers(reader, h)


def test_local_models_do_not_wait_for_the_queue(tmp_path: Path) -> None:
    # models= and global_before= need the layout only: record_round must not flush
    h = _history(9, 12, 3)
    with medustore.open(tmp_path / "a", "w", model=h.w0, policy="full", pipeline=4) as s:
        gate = threading.Event()
        s._pipeline.submit(lambda: gate.wait(10), "the gate")
        w = h.w0.astype(np.float64)
        for r in h.rounds:
            s.record_round(r.t, models={u: w + v for u, v in r.updates.items()},
                           global_before=w)
            w = w + r.aggregate()
        assert s._pipeline.pending == 4  # the gate and the three rounds, none committed
        gate.set()
    with medustore.open(tmp_path / "a") as reader:
        assert reader.rounds == [0, 1, 2]


def test_bad_input_is_refused_at_once(tmp_path: Path) -> None:
    h = _history(7, 16, 2)
    with medustore.open(tmp_path / "a", "w", model=h.w0, policy="full", pipeline=2) as s:
        s.record_round(0, h.rounds[0].updates)
        with pytest.raises(ValueError, match="not above the last committed round"):
            s.record_round(0, h.rounds[1].updates)  # planned against the queued round 0
        s.record_round(1, h.rounds[1].updates)
    with medustore.open(tmp_path / "a") as reader:
        assert reader.rounds == [0, 1]
    with pytest.raises(ValueError, match="queues rounds for a writer"):
        medustore.open(tmp_path / "a", "r", pipeline=1)


def test_a_background_failure_commits_nothing_and_is_raised(tmp_path: Path) -> None:
    # Two writers of one memory:// archive (no lock there): the pipelined writer's queued
    # rounds meet the other's commit and fail at their own commit, in the background.
    m, location = 20, f"memory://pipe-{next(_names)}"
    h = _history(8, m, 4)
    with medustore.open(location, "w", model=h.w0, policy="full") as s:
        s.record_round(0, h.rounds[0].updates, weights=h.rounds[0].weights)
    piped = medustore.open(location, "a", pipeline=4)
    other = medustore.open(location, "a")
    other.record_round(1, h.rounds[1].updates, weights=h.rounds[1].weights)
    other.close()
    gate = threading.Event()  # holds the commit thread until both rounds are queued
    piped._pipeline.submit(lambda: gate.wait(10), "the gate")
    piped.record_round(2, h.rounds[2].updates)  # planned: queued, fails at its commit
    piped.record_round(3, h.rounds[3].updates)  # queued behind it: dropped
    gate.set()
    with pytest.raises(ConcurrentWriteError) as err:
        piped.flush()
    assert "background commit of round 2" in "".join(err.value.__notes__)
    with pytest.raises(ConcurrentWriteError):  # the store refuses more rounds
        piped.record_round(9, h.rounds[3].updates)
    with pytest.raises(ConcurrentWriteError):
        piped.close()  # raised, and the archive released
    with medustore.open(location, "r") as reader:
        assert reader.rounds == [0, 1]  # the other writer's round, nothing of 2 or 3


def test_queue_is_bounded() -> None:
    gate, started = threading.Event(), []
    pipe = Pipeline(2)

    def job(i: int):
        def run() -> None:
            started.append(i)
            gate.wait(5)
        return run

    done = threading.Event()

    def producer() -> None:
        for i in range(4):
            pipe.submit(job(i), f"job {i}")
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    assert not done.wait(0.3)  # the third submit waits for a slot
    gate.set()
    t.join(5)
    pipe.close()
    assert done.is_set() and started == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="depth"):
        Pipeline(0)
