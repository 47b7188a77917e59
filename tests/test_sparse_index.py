"""A reader loads the index piecewise: opening reads the per-round tables (and round 0's
rows, which tie the settings to the digest chain), planning a user's removal reads that
user's postings and the rounds it took part in, nothing about the other users; the user
runs follow the rounds' binary counter and survive hash collisions."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import medustore
from medustore import index as index_module
from medustore.archive import postings
from medustore.errors import UnknownUserError

ROUNDS, POPULATION, PER_ROUND, M = 37, 300, 12, 16


def _record(path: Path, seed: int = 0) -> dict:
    """An archive of ROUNDS rounds drawn from POPULATION users; the writer's answers."""
    rng = np.random.default_rng(seed)
    with medustore.open(path, "w", model=np.zeros(M, np.float32), policy="medu",
                        accumulators=True) as store:
        for t in range(ROUNDS):
            users = rng.choice(POPULATION, size=PER_ROUND, replace=False)
            store.record_round(t, {int(u) if u % 3 else f"u{u}":
                                   rng.standard_normal(M).astype(np.float32) for u in users},
                               weights={int(u) if u % 3 else f"u{u}": 1.0 + u % 5
                                        for u in users})
        assert store.index.loaded  # a writer holds the whole index
        users = list(store.users)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", medustore.IncompleteUnlearningWarning)
            answers = {u: (store.error_budget(u), store.index.participation(u),
                           store.unlearn(u, out="flat", exact_accumulator=False))
                       for u in users[::29]}
    return {"users": users, "answers": answers}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("sparse") / "a"
    return path, _record(path)


def test_runs_follow_the_binary_counter(archive: tuple[Path, dict]) -> None:
    path, _ = archive
    assert postings.levels(ROUNDS) == [5, 2, 0]  # 37 = 32 + 4 + 1
    assert [postings.run_rows(ROUNDS, k) for k in (5, 2, 0)] == [(0, 32), (32, 36), (36, 37)]
    with medustore.open(path) as store:
        idx = store.index
        keys = idx.user_keys()[idx.entry_user]
        assert postings.check_runs(store.reader.group, ROUNDS, idx.start, keys, "x") == []
        arr = store.reader.group[postings.ARRAY]
        # packed highest level first; merged runs replaced, nothing left behind
        assert arr.shape == (ROUNDS * PER_ROUND, 2)
        assert [r[:4] for r in arr.attrs["runs"]] == [
            [5, 0, 32, 0], [2, 32, 36, 32 * PER_ROUND], [0, 36, 37, 36 * PER_ROUND]]


def test_a_reader_plans_from_the_users_rounds_only(archive: tuple[Path, dict]) -> None:
    path, rec = archive
    for user, (budget, rounds, unlearned) in rec["answers"].items():
        with medustore.open(path) as store:
            idx = store.index
            assert not idx.loaded and set(idx._lazy.rows) == {0}  # round 0 checked at open
            assert store.error_budget(user) == budget
            assert idx.participation(user) == rounds
            assert set(idx._lazy.rows) == {0} | {idx.row(t) for t in rounds}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", medustore.IncompleteUnlearningWarning)
                np.testing.assert_array_equal(
                    store.unlearn(user, out="flat", exact_accumulator=False), unlearned)
            assert not idx.loaded
    with medustore.open(path) as store:
        assert store.index.find(POPULATION + 1) is None and store.index.find("u1") is None
        with pytest.raises(UnknownUserError, match="not in this archive"):
            store.error_budget("nobody")
        assert not store.index.loaded
        assert list(store.users) == rec["users"] and store.index.loaded  # a full load


def test_user_ids_read_on_demand_match_the_full_table(archive: tuple[Path, dict]) -> None:
    path, rec = archive
    with medustore.open(path) as store:
        n = len(rec["users"])
        assert len(store.index.users) == n and not store.index.loaded
        for col in (0, n // 2, n - 1):
            assert store.index.user_id(col) == rec["users"][col]
            assert store.index.find(rec["users"][col]) == col
        assert store.index.users[:3] == tuple(rec["users"][:3])
        assert not store.index.loaded


def test_colliding_keys_resolve_by_the_stored_id(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Every user posted under one key: lookups read every posting and keep those whose
    # stored id is the user's.
    def one_key(text: str) -> int:
        return 7

    def keys(texts: list[str]) -> np.ndarray:
        return np.full(len(texts), 7, np.int64)

    for module in (postings, index_module):
        monkeypatch.setattr(module, "user_key", one_key)
        monkeypatch.setattr(module, "user_keys", keys)
    rng = np.random.default_rng(3)
    with medustore.open(tmp_path / "a", "w", model=np.zeros(4, np.float32),
                        policy="full") as store:
        for t in range(5):
            store.record_round(t, {u: rng.standard_normal(4).astype(np.float32)
                                   for u in rng.choice(8, size=4, replace=False).tolist()})
        want = {u: store.index.participation(u) for u in store.users}
    with medustore.open(tmp_path / "a") as store:
        assert {u: store.index.participation(u) for u in want} == want
        assert store.index.find(99) is None
