"""A state machine of record / fail / reopen / unlearn against an in-memory model.

The model is a list of rounds (raw updates and weights); with the ``full`` preset every
answer of the store must equal the model's independent FedAvg replay.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import icechunk
import icechunk.store
import numpy as np
import pytest
from _fl import (
    History,
    Round,
    make_round,
    make_w0,
    rel_err,
    replay,
    skewed_unlearn,
    snapshot,
)
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import medustore
from medustore import ReadOnlyError

M = 48
RTOL = 1e-6
POOL = ["a", "b", "c", 1, 2]

class Injected(RuntimeError):
    """The failure injected into a round's writes."""


@contextmanager
def failing_writes(at: int) -> Iterator[list[str]]:
    """Raise `Injected` instead of the ``at``-th write of the Icechunk session (a chunk or
    metadata key) or, once every key is written, instead of the commit. Yields the writes
    that went through ("commit" last when the commit did)."""
    writes: list[str] = []
    original_set, original_commit = icechunk.store.IcechunkStore.set, icechunk.Session.commit

    def tick(what: str) -> None:
        if len(writes) == at:
            raise Injected(f"injected before write {at}: {what}")
        writes.append(what)

    async def set_(self: Any, key: str, value: Any) -> None:
        tick(key)
        await original_set(self, key, value)

    def commit(self: Any, *args: Any, **kwargs: Any) -> Any:
        tick("commit")
        return original_commit(self, *args, **kwargs)

    icechunk.store.IcechunkStore.set, icechunk.Session.commit = set_, commit
    try:
        yield writes
    finally:
        icechunk.store.IcechunkStore.set, icechunk.Session.commit = original_set, original_commit


participants = st.lists(st.sampled_from(POOL), min_size=1, max_size=4, unique=True)
weights = st.lists(st.sampled_from([0.5, 1.0, 2.0, 7.0]), min_size=4, max_size=4)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="medustore-sm-"))
        self.path = self.dir / "run.zarr"
        self.model = History(make_w0(0, M))
        self.next_round = 0

    @initialize(accumulators=st.booleans())
    def create(self, accumulators: bool) -> None:
        self.store = medustore.open(self.path, "w", model=self.model.w0, policy="full",
                                    accumulators=accumulators)

    def _round(self, users: list, gap: int, seed: int, w: list[float]) -> Round:
        return make_round(seed, self.next_round + gap, users, M, weights=w[: len(users)])

    @rule(users=participants, gap=st.integers(0, 2), seed=st.integers(0, 999), w=weights)
    def record(self, users: list, gap: int, seed: int, w: list[float]) -> None:
        r = self._round(users, gap, seed, w)
        summary = self.store.record_round(r.t, r.updates, weights=r.weights)
        assert summary.participants == summary.stored == len(users)
        self.model.rounds.append(r)
        self.next_round = r.t + 1

    @rule(users=participants, seed=st.integers(0, 999), w=weights, at=st.integers(0, 40))
    def record_fails_part_way(self, users: list, seed: int, w: list[float], at: int) -> None:
        r = self._round(users, 0, seed, w)
        digest = self.store.index.digest
        try:
            with failing_writes(at) as writes:
                self.store.record_round(r.t, r.updates, weights=r.weights)
        except Injected:
            # Nothing of the round is visible: not to this writer, nor to a new reader.
            assert "commit" not in writes
            assert self.store.index.digest == digest
            with medustore.open(self.path, "r") as other:
                assert other.index.digest == digest
            return
        # The round is in exactly when its commit was written.
        assert writes[-1] == "commit"
        self.model.rounds.append(r)
        self.next_round = r.t + 1

    @rule(data=st.data())
    def bad_record_changes_nothing(self, data: st.DataObject) -> None:
        good = make_round(0, self.next_round, ["a"], M)
        nan = {"a": np.full(M, np.nan, np.float32)}
        cases = [({}, self.next_round), (nan, self.next_round), (good.updates, -1)]
        if self.model.rounds:
            cases.append((good.updates, self.model.rounds[-1].t))
        updates, t = data.draw(st.sampled_from(cases))
        before = snapshot(self.path)
        with pytest.raises(ValueError):
            self.store.record_round(t, updates)
        assert snapshot(self.path) == before
        assert self.store.rounds == [r.t for r in self.model.rounds]

    @rule(mode=st.sampled_from(["r", "r+", "a"]))
    def reopen(self, mode: str) -> None:
        self.store.close()
        self.store = medustore.open(self.path, mode)
        if mode == "r":
            before = snapshot(self.path)
            with pytest.raises(ReadOnlyError):
                self.store.record_round(self.next_round, {"a": np.zeros(M, np.float32)})
            assert snapshot(self.path) == before
            self.store.close()
            self.store = medustore.open(self.path, "r+")

    @precondition(lambda self: self.model.rounds)
    @rule(data=st.data())
    def unlearn(self, data: st.DataObject) -> None:
        known = self.store.users  # may include users of failed rounds: nothing to remove
        forget = data.draw(st.lists(st.sampled_from(known), min_size=1, max_size=3,
                                    unique=True))
        last = self.model.rounds[-1].t
        window = data.draw(st.none() | st.tuples(st.integers(0, last), st.none())
                           | st.tuples(st.none(), st.integers(1, last + 2)))
        alpha = data.draw(st.sampled_from([0.0, 0.0, 0.1]))
        got = self.store.unlearn(forget, rounds=window, alpha=alpha, out="flat")
        assert rel_err(got, skewed_unlearn(self.model, forget, window, alpha)) <= RTOL
        if len(forget) == 1 and window is None and alpha == 0:
            via_records = self.store.unlearn(forget, exact_accumulator=False, out="flat")
            assert rel_err(via_records, got) <= RTOL

    @precondition(lambda self: self.model.rounds)
    @rule(data=st.data())
    def reconstruct(self, data: st.DataObject) -> None:
        t = data.draw(st.integers(0, self.next_round + 1))
        want = self.model.w0 + sum((r.aggregate() for r in self.model.rounds if r.t < t),
                                   np.zeros(M))
        assert rel_err(self.store.reconstruct(t, out="flat"), want) <= RTOL

    @invariant()
    def same_rounds_users_and_model(self) -> None:
        if not hasattr(self, "store"):
            return
        assert self.store.rounds == [r.t for r in self.model.rounds]
        assert set(self.model.users) <= set(self.store.users)
        assert rel_err(self.store.latest("flat"), replay(self.model)) <= RTOL
        for u in self.model.users:
            assert self.store.participation(u) == [r.t for r in self.model.rounds
                                                   if u in r.updates]

    def teardown(self) -> None:
        if hasattr(self, "store"):
            self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=12, stateful_step_count=10)
