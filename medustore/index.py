"""`ArchiveIndex`: the read contract, a frozen snapshot of what an archive holds.

Replay, verify, inspect and the integrations read rounds, users and participations from an
`ArchiveIndex` and data through `medustore.archive.reader.ArchiveReader`; neither changes
once made, so an open reader answers from one committed version whatever writers do.

The index is checked when it is loaded: its tables must be complete (no fill value where a
value belongs), consistent (rounds increase, each entry names a known user, stored records
are numbered in order) and must hash to the digest the writer chained over every round, so
a damaged or edited user table, layout or policy is refused rather than used.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medustore.archive.table import INT_FILL, spec
from medustore.errors import DamagedArchiveError, UnknownUserError
from medustore.layout import ModelLayout
from medustore.policy import MeduPolicy

__all__ = ["ArchiveIndex", "Settings", "UserId", "parse_round", "parse_user"]

UserId = int | str

_ROUNDS, _FACTS = spec("rounds"), spec("round_facts")
_ENTRIES, _EFACTS = spec("entries"), spec("entry_facts")


def parse_user(u: Any) -> UserId:
    """A user id: an int or a str (numpy integers become int)."""
    if isinstance(u, bool) or not isinstance(u, numbers.Integral | str):
        raise TypeError(f"user ids must be int or str, got {u!r} ({type(u).__name__})")
    return int(u) if isinstance(u, numbers.Integral) else u


def parse_round(t: Any) -> int:
    """A round number: an int in [0, 2**63)."""
    if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < 2**63:
        raise ValueError(f"round must be an int in [0, 2**63), got {t!r}")
    return int(t)


def user_text(u: UserId) -> str:
    """The JSON text a user id is stored as (``7`` or ``"mallory"``)."""
    return json.dumps(u)


def _user_from_text(text: str, i: int) -> UserId:
    try:
        u = json.loads(text)
        return parse_user(u)
    except (ValueError, TypeError):
        raise DamagedArchiveError(
            f"users: entry {i} ({text!r}) is not a stored user id (damaged user table)"
        ) from None


@dataclass(frozen=True)
class Settings:
    """What an archive fixed when it was created (the ``medustore`` attribute)."""

    format: int
    layout: ModelLayout
    policy: MeduPolicy
    accumulators: bool
    chunk: int
    model_dtype: str

    @property
    def keep_aggregates(self) -> bool:
        return self.policy.keep_aggregates

    def flags(self) -> dict[str, bool]:
        """The settings `ArraySpec.when` refers to."""
        return {"accumulators": self.accumulators, "keep_aggregates": self.keep_aggregates}

    def to_json(self) -> dict:
        return {"format": self.format, "layout": self.layout.to_json(),
                "policy": self.policy.to_json(), "accumulators": self.accumulators,
                "chunk": self.chunk, "model_dtype": self.model_dtype}

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> Settings:
        try:
            return cls(int(meta["format"]), ModelLayout.from_json(meta["layout"]),
                       MeduPolicy.from_json(meta["policy"]), bool(meta["accumulators"]),
                       int(meta["chunk"]), str(meta["model_dtype"]))
        except (KeyError, TypeError, ValueError) as err:
            raise DamagedArchiveError(f"archive settings are damaged: {err}") from None

    def digest0(self) -> bytes:
        """Start of the digest chain: the settings, canonically."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(text.encode(), digest_size=32).digest()


def chain(previous: bytes, rounds_row: np.ndarray, facts_row: np.ndarray,
          entries: np.ndarray, entry_facts: np.ndarray, new_users: Sequence[str]) -> bytes:
    """One link of the digest chain: a round's index rows and the users it added."""
    h = hashlib.blake2b(previous, digest_size=32)
    for part in (rounds_row, facts_row, entries, entry_facts):
        h.update(np.ascontiguousarray(part, dtype=part.dtype.newbyteorder("<")).tobytes())
    h.update("\n".join(new_users).encode())
    return h.digest()


def _frozen(a: np.ndarray) -> np.ndarray:
    a = a.view()
    a.setflags(write=False)
    return a


class _Users(Sequence):
    """The first ``n`` ids of a list that later versions of the index may extend."""

    __slots__ = ("_ids", "_n")

    def __init__(self, ids: list[UserId], n: int) -> None:
        self._ids, self._n = ids, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return tuple(self._ids[: self._n][i])
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._ids[i % self._n]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(tuple(self))


class _Growing:
    """Buffers of the index tables that successive versions share: the writer appends a
    round in amortised O(its rows) instead of copying every table each round. A version
    only ever reads its own prefix; only the newest version may append."""

    def __init__(self, rounds: np.ndarray, facts: np.ndarray, entries: np.ndarray,
                 efacts: np.ndarray, users: Sequence[UserId]) -> None:
        self.tables = [np.array(t) for t in (rounds, facts, entries, efacts)]
        self.start = np.concatenate([[0], np.cumsum(rounds[:, 1])]).astype(np.int64)
        self.n = [rounds.shape[0], entries.shape[0]]
        self.ids = list(users)
        self.col = {u: i for i, u in enumerate(self.ids)}
        self.row = {int(t): i for i, t in enumerate(rounds[:, 0])}

    def append(self, rounds_row: np.ndarray, facts_row: np.ndarray, entries: np.ndarray,
               efacts: np.ndarray, new_users: Sequence[UserId]) -> None:
        R, E = self.n
        for k, (rows, n) in enumerate(((rounds_row, R), (facts_row, R), (entries, E),
                                       (efacts, E))):
            buf = self.tables[k]
            if n + rows.shape[0] > buf.shape[0]:  # grow by doubling
                bigger = np.empty((max(2 * buf.shape[0], n + rows.shape[0], 16),
                                   buf.shape[1]), dtype=buf.dtype)
                bigger[:n] = buf[:n]
                self.tables[k] = buf = bigger
            buf[n:n + rows.shape[0]] = rows
        if R + 2 > self.start.size:
            self.start = np.concatenate([self.start[:R + 1], np.empty(max(R + 2, 16),
                                                                       np.int64)])
        self.start[R + 1] = self.start[R] + entries.shape[0]
        self.n = [R + 1, E + entries.shape[0]]
        for u in new_users:
            self.col[u] = len(self.ids)
            self.ids.append(u)
        self.row[int(rounds_row[0, 0])] = R


@dataclass(frozen=True, eq=False)
class ArchiveIndex:
    """Rounds, users and participations of one committed version of an archive.

    Attributes
    ----------
    settings
        Format, model layout, policy and options fixed at creation.
    users
        Every user id, in order of first appearance (their column numbers).
    rounds
        Committed round numbers, increasing (row ``i`` is round ``rounds[i]``).
    start
        ``start[i]:start[i+1]`` are the entries (participations) of row ``i``.
    anorm, agg_evar
        Per row: ``||hbar_t||`` and the expected squared error of the coded aggregate.
    entry_user, entry_record, entry_nbytes
        Per entry: user column, record number (-1: not stored), encoded bytes of the record.
    entry_weight, entry_dnorm, entry_znorm, entry_evar
        Per entry: ``p_u``, ``||d_t^u||``, norm zeroed by thresholding, expected squared
        error of the record's lattice coding.
    digest
        Hex digest chained over the settings and every round's index rows.
    snapshot
        Id of the version this index was read from (None for plain snapshots).
    """

    settings: Settings
    users: Sequence[UserId]
    rounds: np.ndarray
    start: np.ndarray
    anorm: np.ndarray
    agg_evar: np.ndarray
    entry_user: np.ndarray
    entry_record: np.ndarray
    entry_nbytes: np.ndarray
    entry_weight: np.ndarray
    entry_dnorm: np.ndarray
    entry_znorm: np.ndarray
    entry_evar: np.ndarray
    digest: str
    users_after: np.ndarray = field(repr=False, default=None)  # users known after each row
    snapshot: str | None = None
    n_records: int = 0
    _shared: _Growing = field(repr=False, default=None)

    # ------------------------------------------------------------------ basic facts

    @property
    def layout(self) -> ModelLayout:
        return self.settings.layout

    @property
    def policy(self) -> MeduPolicy:
        return self.settings.policy

    @property
    def n_rounds(self) -> int:
        return int(self.rounds.size)

    @property
    def n_entries(self) -> int:
        return int(self.entry_user.size)

    @property
    def last_round(self) -> int | None:
        return int(self.rounds[-1]) if self.rounds.size else None

    def counts(self) -> dict[str, int]:
        """Sizes of the growing dimensions (see `medustore.archive.table`)."""
        return {"round": self.n_rounds, "entry": self.n_entries, "record": self.n_records,
                "user": len(self.users)}

    # ------------------------------------------------------------------ lookups

    def find(self, user: Any) -> int | None:
        """Column of ``user``, or None if the archive has never seen it."""
        col = self._shared.col.get(parse_user(user))
        return col if col is not None and col < len(self.users) else None

    def column(self, user: Any) -> int:
        """Column of ``user``; `UnknownUserError` naming a few known ids otherwise."""
        u = parse_user(user)
        col = self.find(u)
        if col is None:
            alt = str(u) if isinstance(u, int) else (int(u) if u.lstrip("-").isdigit() else None)
            hint = (f" (the archive has {alt!r}: user ids are typed, {type(alt).__name__} "
                    f"here)" if alt is not None and self.find(alt) is not None else "")
            shown = ", ".join(map(repr, self.users[:10])) + (" ..." if len(self.users) > 10
                                                                 else "")
            raise UnknownUserError(f"user {u!r} is not in this archive{hint} (users: "
                                   f"{shown or 'none'})")
        return col

    def row(self, round: Any) -> int:
        """Row of a committed round; ValueError naming the rounds held otherwise."""
        t = parse_round(round)
        row = self._shared.row.get(t)
        if row is None or row >= self.n_rounds:
            raise ValueError(f"round {t} is not in this archive (it holds {self.rounds_text()})")
        return row

    def rounds_text(self) -> str:
        if not self.rounds.size:
            return "no rounds"
        return f"{self.rounds.size} rounds, {int(self.rounds[0])}..{int(self.rounds[-1])}"

    def entries(self, row: int) -> slice:
        """The entries (participations) of row ``row``."""
        return slice(int(self.start[row]), int(self.start[row + 1]))

    def entry_rows(self) -> np.ndarray:
        """The row of every entry."""
        return np.repeat(np.arange(self.n_rounds), np.diff(self.start))

    def entry(self, row: int, col: int) -> int | None:
        """Entry of user column ``col`` in row ``row``, or None if it did not take part."""
        sl = self.entries(row)
        hit = np.flatnonzero(self.entry_user[sl] == col)
        return int(sl.start + hit[0]) if hit.size else None

    def participation(self, user: Any) -> list[int]:
        """Rounds in which ``user`` took part (stored or not)."""
        col = self.column(user)
        rows = self.entry_rows()[self.entry_user == col]
        return [int(self.rounds[r]) for r in rows]

    def dense(self, name: str) -> np.ndarray:
        """A per-entry fact as a dense (rounds, users) table (NaN / 0 where absent).

        ``name``: ``weight``, ``stored``, ``dnorm``, ``znorm``, ``evar``, ``nbytes``.
        Meant for small archives (inspection, tests): it costs rounds x users.
        """
        values = {"weight": self.entry_weight, "dnorm": self.entry_dnorm,
                  "znorm": self.entry_znorm, "evar": self.entry_evar,
                  "nbytes": self.entry_nbytes, "stored": (self.entry_record >= 0)}[name]
        fill = np.nan if name == "weight" else 0
        dtype = np.uint8 if name == "stored" else values.dtype
        out = np.full((self.n_rounds, len(self.users)), fill, dtype=dtype)
        out[self.entry_rows(), self.entry_user] = values
        return out

    # ------------------------------------------------------------------ building

    @classmethod
    def from_tables(cls, settings: Settings, users: Sequence[UserId], rounds: np.ndarray,
                    facts: np.ndarray, entries: np.ndarray, entry_facts: np.ndarray,
                    digest: str, snapshot: str | None = None) -> ArchiveIndex:
        shared = _Growing(rounds, facts, entries, entry_facts, users)
        return cls._view(settings, shared, digest, snapshot)

    @classmethod
    def _view(cls, settings: Settings, shared: _Growing, digest: str,
              snapshot: str | None) -> ArchiveIndex:
        (R, E), (rounds, facts, entries, efacts) = shared.n, shared.tables
        r, e, f = _ROUNDS.field, _ENTRIES.field, _EFACTS.field
        record = entries[:E, e("record")]
        return cls(
            settings=settings, users=_Users(shared.ids, len(shared.ids)),
            rounds=_frozen(rounds[:R, r("round")]), start=_frozen(shared.start[:R + 1]),
            anorm=_frozen(facts[:R, _FACTS.field("anorm")]),
            agg_evar=_frozen(facts[:R, _FACTS.field("agg_evar")]),
            entry_user=_frozen(entries[:E, e("user")]), entry_record=_frozen(record),
            entry_nbytes=_frozen(entries[:E, e("nbytes")]),
            entry_weight=_frozen(efacts[:E, f("weight")]),
            entry_dnorm=_frozen(efacts[:E, f("dnorm")]),
            entry_znorm=_frozen(efacts[:E, f("znorm")]),
            entry_evar=_frozen(efacts[:E, f("evar")]), digest=digest,
            users_after=_frozen(rounds[:R, r("users")]), snapshot=snapshot,
            n_records=int((record >= 0).sum()), _shared=shared)

    def appended(self, rounds_row: np.ndarray, facts_row: np.ndarray, entries: np.ndarray,
                 entry_facts: np.ndarray, new_users: Sequence[UserId],
                 digest: str) -> ArchiveIndex:
        """This index with one more round (the writer's, after its commit)."""
        shared = self._shared
        if shared.n != [self.n_rounds, self.n_entries] or len(shared.ids) != len(self.users):
            # Not the newest version: copy rather than write into a newer one's buffers.
            old = self.tables()
            shared = _Growing(*old, list(self.users))
        shared.append(rounds_row, facts_row, entries, entry_facts, new_users)
        return self._view(self.settings, shared, digest, None)

    def tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The four index tables (rounds, round_facts, entries, entry_facts) as stored."""
        rounds = np.stack([self.rounds, np.diff(self.start), self.users_after], axis=1)
        facts = np.stack([self.anorm, self.agg_evar], axis=1)
        entries = np.stack([self.entry_user, self.entry_record, self.entry_nbytes], axis=1)
        efacts = np.stack([self.entry_weight, self.entry_dnorm, self.entry_znorm,
                           self.entry_evar], axis=1)
        return (rounds.reshape(-1, 3).astype(np.int64), facts.reshape(-1, 2),
                entries.reshape(-1, 3).astype(np.int64), efacts.reshape(-1, 4))


# ---------------------------------------------------------------------- checks


def check_tables(settings: Settings, users: Sequence[str], rounds: np.ndarray,
                 facts: np.ndarray, entries: np.ndarray, entry_facts: np.ndarray,
                 digest: str) -> list[str]:
    """Every inconsistency of the index tables, in words (empty: the index is sound)."""
    bad: list[str] = []

    def rows_of(mask: np.ndarray) -> str:
        idx = np.flatnonzero(mask)
        return f"{', '.join(map(str, idx[:8]))}{' ...' if idx.size > 8 else ''}"

    for name, table in (("rounds", rounds), ("entries", entries)):
        missing = (table == INT_FILL).any(axis=1)
        if missing.any():
            bad.append(f"{name}: rows {rows_of(missing)} were never written (missing data)")
    for name, table in (("round_facts", facts), ("entry_facts", entry_facts)):
        nan = np.isnan(table).any(axis=1)
        if nan.any():
            bad.append(f"{name}: rows {rows_of(nan)} were never written (missing data)")
    empty = [i for i, u in enumerate(users) if u == ""]
    if empty:
        bad.append(f"users: entries {empty[:8]} were never written (missing data)")
    if bad:
        return bad
    R, E, U = rounds.shape[0], entries.shape[0], len(users)
    t = rounds[:, _ROUNDS.field("round")]
    n = rounds[:, _ROUNDS.field("entries")]
    after = rounds[:, _ROUNDS.field("users")]
    if (t < 0).any() or (np.diff(t) <= 0).any():
        bad.append("rounds: round numbers are not increasing and >= 0")
    if (n < 1).any() or int(n.sum()) != E:
        bad.append(f"rounds: entry counts ({int(n.sum())} in all) do not match the {E} entries")
        return bad
    if (np.diff(after) < 0).any() or (R and int(after[-1]) != U) or (after < 0).any():
        bad.append(f"rounds: user counts do not grow to the {U} users of the user table")
        return bad
    user = entries[:, _ENTRIES.field("user")]
    record = entries[:, _ENTRIES.field("record")]
    nbytes = entries[:, _ENTRIES.field("nbytes")]
    w, dn, zn, ev = (entry_facts[:, i] for i in range(4))
    entry_rows = np.repeat(np.arange(R), n)
    if ((user < 0) | (user >= np.repeat(after, n))).any():
        bad.append("entries: user column out of range")
        return bad
    first = np.full(U, R, dtype=np.int64)
    np.minimum.at(first, user, entry_rows)
    if not np.array_equal(first, np.repeat(np.arange(R), np.diff(np.concatenate([[0], after])))):
        bad.append("users: the user table does not list users in order of first appearance")
    stored = record >= 0
    if (record < -1).any() or not np.array_equal(record[stored], np.arange(stored.sum())):
        bad.append("entries: stored records are not numbered 0, 1, 2, ... in order")
    if not (np.isfinite(w) & (w > 0)).all():
        bad.append(f"entry_facts: weights at entries {rows_of(~(np.isfinite(w) & (w > 0)))} "
                   "are not finite and > 0")
    for name, v in (("dnorm", dn), ("znorm", zn), ("evar", ev)):
        if not (np.isfinite(v) & (v >= 0)).all():
            bad.append(f"entry_facts: {name} not finite and >= 0")
    if (nbytes < 0).any() or ((~stored) & ((nbytes != 0) | (zn != 0) | (ev != 0))).any():
        bad.append("entries: byte counts or error facts of records that were not stored")
    pairs = entry_rows.astype(np.int64) * max(U, 1) + user
    if np.unique(pairs).size != E:
        bad.append("entries: a user appears twice in one round")
    if not (np.isfinite(facts) & (facts >= 0)).all():
        bad.append("round_facts: aggregate norms or error variances not finite and >= 0")
    if len(set(users)) != U:
        bad.append("users: ids are not unique")
    if bad:
        return bad
    d = settings.digest0()
    start = np.concatenate([[0], np.cumsum(n)])
    prev_u = 0
    for i in range(R):
        sl = slice(int(start[i]), int(start[i + 1]))
        d = chain(d, rounds[i], facts[i], entries[sl], entry_facts[sl],
                  users[prev_u:int(after[i])])
        prev_u = int(after[i])
    if d.hex() != digest:
        bad.append("digest: the index (users, rounds, participations, layout or policy) does "
                   "not hash to the digest its writer recorded: it was changed outside "
                   "medustore")
    return bad


def load_index(settings: Settings, users_text: Sequence[str], rounds: np.ndarray,
               facts: np.ndarray, entries: np.ndarray, entry_facts: np.ndarray, digest: str,
               snapshot: str | None, where: str) -> ArchiveIndex:
    """A checked `ArchiveIndex`; `DamagedArchiveError` listing what is wrong otherwise."""
    bad = check_tables(settings, users_text, rounds, facts, entries, entry_facts, digest)
    if bad:
        raise DamagedArchiveError(f"{where}: damaged index: " + "; ".join(bad))
    users = [_user_from_text(s, i) for i, s in enumerate(users_text)]
    return ArchiveIndex.from_tables(settings, users, rounds, facts, entries, entry_facts,
                                    digest, snapshot)

