"""Index versions share growth buffers: appending a round costs O(its rows), old versions
never change, and appending to a version that is not the newest copies instead of writing
into the newer one's buffers."""

from __future__ import annotations

import numpy as np

from medustore.index import ArchiveIndex, Settings
from medustore.layout import ModelLayout
from medustore.policy import PRESETS


def _settings() -> Settings:
    layout = ModelLayout.from_template(np.zeros(8, np.float32))
    return Settings(2, layout, PRESETS["full"], False, 8, "f4")


def _round(t: int, cols: list[int], users_after: int) -> tuple:
    """Index rows of round ``t`` whose participants are user columns ``cols``."""
    n = len(cols)
    rounds_row = np.array([[t, n, users_after]], dtype=np.int64)
    facts = np.array([[1.0, 0.0]])
    entries = np.stack([np.array(cols), -np.ones(n, np.int64), np.zeros(n, np.int64)],
                       axis=1).astype(np.int64)
    efacts = np.tile(np.array([[1.0, 0.5, 0.0, 0.0]]), (n, 1))
    return rounds_row, facts, entries, efacts


def _empty() -> ArchiveIndex:
    s = _settings()
    return ArchiveIndex.from_tables(s, (), np.zeros((0, 3), np.int64), np.zeros((0, 2)),
                                    np.zeros((0, 3), np.int64), np.zeros((0, 4)), "00")


def test_appending_many_rounds_reallocates_logarithmically() -> None:
    index = _empty()
    buffers = set()
    snapshots = []
    for t in range(2000):
        users = [2 * t, 2 * t + 1]
        index = index.appended(*_round(t, users, 2 * t + 2), [2 * t, 2 * t + 1], f"{t:02x}")
        buffers.add(id(index._shared.tables[2]))
        if t % 400 == 0:
            snapshots.append((index, index.entry_user.copy(), index.n_rounds,
                              len(index.users)))
    assert index.n_rounds == 2000 and index.n_entries == 4000 and len(index.users) == 4000
    assert len(buffers) <= 12  # doubling: log2(4000 / 16) + a few
    for old, users, n_rounds, n_users in snapshots:  # old versions never change
        np.testing.assert_array_equal(old.entry_user, users)
        assert old.n_rounds == n_rounds and len(old.users) == n_users
        assert old.find(3999) is None  # a user added later is unknown to an old version
        assert old.row(0) == 0
    assert index.find(3999) == 3999
    assert index.participation(3998) == [1999]


def test_appending_to_an_old_version_copies() -> None:
    base = _empty().appended(*_round(0, [0, 1], 2), [0, 1], "a")
    newer = base.appended(*_round(1, [1, 2], 3), [2], "b")
    branch = base.appended(*_round(5, [0, 2], 3), [7], "c")  # user 7 takes column 2
    assert newer.users == (0, 1, 2) and list(newer.rounds) == [0, 1]
    assert branch.users == (0, 1, 7) and list(branch.rounds) == [0, 5]
    np.testing.assert_array_equal(newer.entry_user, [0, 1, 1, 2])
    np.testing.assert_array_equal(branch.entry_user, [0, 1, 0, 2])
    assert newer.find(7) is None and branch.find(7) == 2 and newer.find(2) == 2
    assert branch.find(2) is None
