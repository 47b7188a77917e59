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
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np

from medustore.archive.postings import user_key, user_keys
from medustore.archive.table import INT_FILL, spec
from medustore.errors import DamagedArchiveError, UnknownUserError
from medustore.layout import ModelLayout
from medustore.policy import MeduPolicy

__all__ = ["ArchiveIndex", "IndexSource", "RoundRows", "Settings", "UserId", "parse_round",
           "parse_user"]

UserId = int | str

#: Entries between two rounds a reader still reads in one span (one index chunk's worth).
_SPAN_GAP = 4096

#: Index layout written by this version (see `Settings.index`).
INDEX_VERSION = 2

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
    #: 2: per-round digest links and the user -> participations runs (readers load only
    #: what they need); 1: neither (the first format-2 archives: readers load the index).
    index: int = INDEX_VERSION

    @property
    def keep_aggregates(self) -> bool:
        return self.policy.keep_aggregates

    @property
    def sparse(self) -> bool:
        """Whether the archive has links and user runs (loads its index piecewise)."""
        return self.index >= 2

    def flags(self) -> dict[str, bool]:
        """The settings `ArraySpec.when` refers to."""
        return {"accumulators": self.accumulators, "keep_aggregates": self.keep_aggregates,
                "sparse": self.sparse}

    def to_json(self) -> dict:
        out = {"format": self.format, "layout": self.layout.to_json(),
               "policy": self.policy.to_json(), "accumulators": self.accumulators,
               "chunk": self.chunk, "model_dtype": self.model_dtype}
        if self.index != 1:  # absent in the archives written before it existed
            out["index"] = self.index
        return out

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> Settings:
        try:
            settings = cls(int(meta["format"]), ModelLayout.from_json(meta["layout"]),
                           MeduPolicy.from_json(meta["policy"]), bool(meta["accumulators"]),
                           int(meta["chunk"]), str(meta["model_dtype"]),
                           int(meta.get("index", 1)))
        except (KeyError, TypeError, ValueError) as err:
            raise DamagedArchiveError(f"archive settings are damaged: {err}") from None
        if settings.index not in (1, INDEX_VERSION):
            raise DamagedArchiveError(f"archive index version {settings.index} is not one "
                                      f"this medustore reads (1, {INDEX_VERSION})")
        return settings

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


class RoundRows(NamedTuple):
    """The entries (participations) of one row, and the users that row added.

    ``first`` is the entry number of the first; the arrays are per entry, as in
    `ArchiveIndex` (``user`` a column, ``record`` -1 where not stored).
    """

    first: int
    user: np.ndarray
    record: np.ndarray
    nbytes: np.ndarray
    weight: np.ndarray
    dnorm: np.ndarray
    znorm: np.ndarray
    evar: np.ndarray
    new_users: tuple[UserId, ...]


class _Full(NamedTuple):
    users: Sequence[UserId]
    entry_user: np.ndarray
    entry_record: np.ndarray
    entry_nbytes: np.ndarray
    entry_weight: np.ndarray
    entry_dnorm: np.ndarray
    entry_znorm: np.ndarray
    entry_evar: np.ndarray


def _full_of(users: Sequence[UserId], entries: np.ndarray, efacts: np.ndarray) -> _Full:
    e, f = _ENTRIES.field, _EFACTS.field
    return _Full(users, *(_frozen(entries[:, e(n)]) for n in ("user", "record", "nbytes")),
                 *(_frozen(efacts[:, f(n)]) for n in ("weight", "dnorm", "znorm", "evar")))


def _rows_of(full: _Full, first: int, stop: int, new_users: tuple[UserId, ...]) -> RoundRows:
    sl = slice(first, stop)
    return RoundRows(first, *(a[sl] for a in full[1:]), new_users)


class IndexSource(Protocol):
    """Reads of the index tables a lazily loaded `ArchiveIndex` makes (unchecked: the
    index checks what they return)."""

    where: str

    def rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """``entries[lo:hi]`` and ``entry_facts[lo:hi]``."""

    def user_texts(self, lo: int, hi: int) -> list[str]:
        """``users[lo:hi]``, the stored JSON texts."""

    def tables(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The whole user, entry and entry-fact tables."""

    def lookup(self, key: int) -> np.ndarray:
        """Entries posted under user key ``key`` (`medustore.archive.postings`)."""


class _Users(Sequence):
    """The first ``n`` ids of a list that later versions of the index may extend."""

    __slots__ = ("_ids", "_n")

    def __init__(self, ids: list[UserId], n: int) -> None:
        self._ids, self._n = ids, n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):  # within the first n (no copy of the whole list)
            return tuple(self._ids[slice(*i.indices(self._n))])
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return self._ids[i % self._n]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(tuple(self))


class _LazyUsers(Sequence):
    """The user ids of a lazily loaded index: an id is read (and checked) on demand;
    iterating over all of them loads the whole index."""

    __slots__ = ("_index",)

    def __init__(self, index: ArchiveIndex) -> None:
        self._index = index

    def __len__(self) -> int:
        return self._index.n_users

    def __getitem__(self, i: Any) -> Any:
        n = len(self)
        if isinstance(i, slice):
            return tuple(self._index.user_id(j) for j in range(*i.indices(n)))
        if not -n <= i < n:
            raise IndexError(i)
        return self._index.user_id(i % n)

    def __iter__(self) -> Any:
        return iter(self._index._full().users)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"<{len(self)} users>"


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
        self._keys = np.zeros(0, np.int64)

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

    def keys(self) -> np.ndarray:
        """User keys (`medustore.archive.postings.user_key`) of every column, computed
        once per user."""
        have, n = self._keys.size, len(self.ids)
        if have < n:
            new = user_keys([user_text(u) for u in self.ids[have:n]])
            self._keys = np.concatenate([self._keys, new])
        return self._keys[:n]


class _Lazy:
    """What a lazily loaded index reads on demand, checked against the round links, and
    caches (thread-safe: replay reads from several threads)."""

    def __init__(self, source: IndexSource, rounds: np.ndarray, facts: np.ndarray,
                 links: np.ndarray) -> None:
        self.source, self.rounds, self.facts, self.links = source, rounds, facts, links
        self.lock = threading.RLock()
        self.rows: dict[int, RoundRows] = {}
        self.cols: dict[UserId, int | None] = {}
        self.entries_of: dict[int, np.ndarray] = {}
        self.full: _Full | None = None

    def link(self, row: int, settings: Settings) -> bytes:
        return (settings.digest0() if row < 0 else
                np.ascontiguousarray(self.links[row], dtype="<i8").tobytes())


@dataclass(frozen=True, eq=False)
class ArchiveIndex:
    """Rounds, users and participations of one committed version of an archive.

    A reader's index holds the per-round tables (rounds, their facts and digest links)
    and reads a round's participations, a user's id or a user's participations when first
    asked (each checked against its round's link); the per-entry arrays below load and
    check the whole index on first use. A writer's index holds everything.

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
    rounds: np.ndarray
    start: np.ndarray
    anorm: np.ndarray
    agg_evar: np.ndarray
    digest: str
    users_after: np.ndarray = field(repr=False, default=None)  # users known after each row
    snapshot: str | None = None
    n_records: int = 0
    n_users: int = 0
    _shared: _Growing | None = field(repr=False, default=None)
    _eager: _Full | None = field(repr=False, default=None)
    _lazy: _Lazy | None = field(repr=False, default=None)
    _memo: dict = field(repr=False, default_factory=dict)  # derived tables, built once

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
        return int(self.start[-1])

    @property
    def last_round(self) -> int | None:
        return int(self.rounds[-1]) if self.rounds.size else None

    @property
    def loaded(self) -> bool:
        """Whether every table is in memory (a writer's index, or after a full load)."""
        return self._eager is not None or self._lazy.full is not None

    def counts(self) -> dict[str, int]:
        """Sizes of the growing dimensions (see `medustore.archive.table`)."""
        return {"round": self.n_rounds, "entry": self.n_entries, "record": self.n_records,
                "user": self.n_users}

    # ------------------------------------------------------------------ whole tables

    def _full(self) -> _Full:
        if self._eager is not None:
            return self._eager
        lazy = self._lazy
        with lazy.lock:
            if lazy.full is None:
                texts, entries, efacts = lazy.source.tables()
                lazy.full = _check_full(self, texts, entries, efacts)
            return lazy.full

    @property
    def users(self) -> Sequence[UserId]:
        if self._eager is not None:
            return self._eager.users
        return _LazyUsers(self)

    entry_user = property(lambda self: self._full().entry_user)
    entry_record = property(lambda self: self._full().entry_record)
    entry_nbytes = property(lambda self: self._full().entry_nbytes)
    entry_weight = property(lambda self: self._full().entry_weight)
    entry_dnorm = property(lambda self: self._full().entry_dnorm)
    entry_znorm = property(lambda self: self._full().entry_znorm)
    entry_evar = property(lambda self: self._full().entry_evar)

    # ------------------------------------------------------------------ lookups

    def find(self, user: Any) -> int | None:
        """Column of ``user``, or None if the archive has never seen it."""
        u = parse_user(user)
        if self._shared is not None:
            col = self._shared.col.get(u)
            return col if col is not None and col < self.n_users else None
        lazy = self._lazy
        with lazy.lock:
            if lazy.full is not None:  # loaded: one map of every user
                cols = self._memo.get("cols")
                if cols is None:
                    cols = self._memo["cols"] = {v: c for c, v in enumerate(lazy.full.users)}
                return cols.get(u)
            if u not in lazy.cols:
                lazy.cols[u] = self._find_lazy(u)
            return lazy.cols[u]

    def _find_lazy(self, u: UserId) -> int | None:
        text = user_text(u)
        found = self._lazy.source.lookup(user_key(text))
        rows = self.rows_of(found).tolist()
        self.read_rounds(rows)
        cols = {}
        for e, row in zip(found.tolist(), rows, strict=True):
            rr = self.round_rows(row)
            cols.setdefault(int(rr.user[e - rr.first]), []).append(e)
        for col, entries in sorted(cols.items()):  # more than one: a key collision
            if self.user_id(col) == u:
                self._lazy.entries_of[col] = np.array(entries, dtype=np.int64)
                return col
        return None

    def column(self, user: Any) -> int:
        """Column of ``user``; `UnknownUserError` naming a few known ids otherwise."""
        u = parse_user(user)
        col = self.find(u)
        if col is None:
            alt = str(u) if isinstance(u, int) else (int(u) if u.lstrip("-").isdigit() else None)
            hint = (f" (the archive has {alt!r}: user ids are typed, {type(alt).__name__} "
                    f"here)" if alt is not None and self.find(alt) is not None else "")
            n = self.n_users
            shown = ", ".join(map(repr, self.users[:10])) + (" ..." if n > 10 else "")
            raise UnknownUserError(f"user {u!r} is not in this archive{hint} (users: "
                                   f"{shown or 'none'})")
        return col

    def user_id(self, col: int) -> UserId:
        """The id of user column ``col``."""
        if not 0 <= col < self.n_users:
            raise IndexError(col)
        if self._eager is not None:
            return self._eager.users[col]
        if self._lazy.full is not None:
            return self._lazy.full.users[col]
        row = int(np.searchsorted(self.users_after, col, side="right"))  # col's first row
        before = int(self.users_after[row - 1]) if row else 0
        return self.round_rows(row).new_users[col - before]

    def row(self, round: Any) -> int:
        """Row of a committed round; ValueError naming the rounds held otherwise."""
        t = parse_round(round)
        row = int(np.searchsorted(self.rounds, t))
        if row >= self.n_rounds or int(self.rounds[row]) != t:
            raise ValueError(f"round {t} is not in this archive (it holds {self.rounds_text()})")
        return row

    def rows_of(self, entries: np.ndarray) -> np.ndarray:
        """The row each of ``entries`` belongs to."""
        return np.searchsorted(self.start, entries, side="right") - 1

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

    def round_rows(self, row: int) -> RoundRows:
        """The entries of row ``row`` (read and checked against its link if not loaded)."""
        sl = self.entries(row)
        lo = int(self.users_after[row - 1]) if row else 0
        if self._eager is not None:
            return _rows_of(self._eager, sl.start, sl.stop,
                            tuple(self._eager.users[lo:int(self.users_after[row])]))
        lazy = self._lazy
        with lazy.lock:
            if lazy.full is not None:
                return _rows_of(lazy.full, sl.start, sl.stop,
                                tuple(lazy.full.users[lo:int(self.users_after[row])]))
            if row not in lazy.rows:
                self.read_rounds([row])
            return lazy.rows[row]

    def read_rounds(self, rows: Sequence[int]) -> None:
        """Read (and check) the rows of several rounds at once, ahead of `round_rows`:
        rounds close together are read as one span of each index table."""
        lazy = self._lazy
        if lazy is None:
            return
        with lazy.lock:
            if lazy.full is not None:
                return
            todo = sorted({int(r) for r in rows} - lazy.rows.keys())
            spans: list[list[int]] = []
            for row in todo:  # join a row to the span before it when the gap is small
                if spans and self.start[row] - self.start[spans[-1][-1] + 1] <= _SPAN_GAP:
                    spans[-1].append(row)
                else:
                    spans.append([row])
            for span in spans:
                first, last = span[0], span[-1]
                e0, e1 = int(self.start[first]), int(self.start[last + 1])
                u0 = int(self.users_after[first - 1]) if first else 0
                u1 = int(self.users_after[last])
                entries, efacts = lazy.source.rows(e0, e1)
                texts = lazy.source.user_texts(u0, u1)
                for row in span:
                    sl = self.entries(row)
                    lo = int(self.users_after[row - 1]) if row else 0
                    part = slice(sl.start - e0, sl.stop - e0)
                    lazy.rows[row] = self._check_round(
                        row, sl, lo, entries[part], efacts[part],
                        texts[lo - u0:int(self.users_after[row]) - u0])

    def _check_round(self, row: int, sl: slice, lo: int, entries: np.ndarray,
                     efacts: np.ndarray, texts: list[str]) -> RoundRows:
        lazy, where = self._lazy, self._lazy.source.where
        d = chain(lazy.link(row - 1, self.settings), lazy.rounds[row], lazy.facts[row],
                  entries, efacts, texts)
        t = int(self.rounds[row])
        if d != lazy.link(row, self.settings):
            what = ("the settings (layout, policy) or round {t}'s rows do not hash to the "
                    "first link of the digest chain" if row == 0 else
                    "round {t}: its participations or new users do not hash to the round's "
                    "link").format(t=t)
            raise DamagedArchiveError(f"{where}: damaged index: {what} (changed outside "
                                      "medustore)")
        user = entries[:, _ENTRIES.field("user")]
        if entries.shape[0] != sl.stop - sl.start or (user < 0).any() or \
                (user >= int(self.users_after[row])).any():
            raise DamagedArchiveError(f"{where}: damaged index: round {t}: entries out of range")
        ids = tuple(_user_from_text(s, lo + i) for i, s in enumerate(texts))
        return _rows_of(_full_of((), entries, efacts), 0, sl.stop - sl.start, ids
                        )._replace(first=sl.start)

    def user_entries(self, col: int) -> np.ndarray:
        """The entries (participations) of user column ``col``, increasing."""
        if self.loaded:
            by_user = self._memo.get("by_user")
            if by_user is None:  # entries grouped by user: one sort for every lookup
                user = self._full().entry_user
                order = np.argsort(user, kind="stable")
                bounds = np.searchsorted(user[order], np.arange(self.n_users + 1))
                by_user = self._memo["by_user"] = (order, bounds)
            order, bounds = by_user
            return order[bounds[col]:bounds[col + 1]]
        lazy = self._lazy
        with lazy.lock:
            if col not in lazy.entries_of:
                u = self.user_id(col)
                if self.find(u) != col:
                    raise DamagedArchiveError(f"{lazy.source.where}: damaged index: user "
                                              f"{u!r} is missing from the user index")
            return lazy.entries_of[col]

    def entry(self, row: int, col: int) -> int | None:
        """Entry of user column ``col`` in row ``row``, or None if it did not take part."""
        rr = self.round_rows(row)
        hit = np.flatnonzero(rr.user == col)
        return int(rr.first + hit[0]) if hit.size else None

    def participation(self, user: Any) -> list[int]:
        """Rounds in which ``user`` took part (stored or not)."""
        rows = self.rows_of(self.user_entries(self.column(user)))
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
        out = np.full((self.n_rounds, self.n_users), fill, dtype=dtype)
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
        r = _ROUNDS.field
        full = _full_of(_Users(shared.ids, len(shared.ids)), entries[:E], efacts[:E])
        return cls(
            settings=settings, rounds=_frozen(rounds[:R, r("round")]),
            start=_frozen(shared.start[:R + 1]),
            anorm=_frozen(facts[:R, _FACTS.field("anorm")]),
            agg_evar=_frozen(facts[:R, _FACTS.field("agg_evar")]), digest=digest,
            users_after=_frozen(rounds[:R, r("users")]), snapshot=snapshot,
            n_records=int((full.entry_record >= 0).sum()), n_users=len(shared.ids),
            _shared=shared, _eager=full)

    @classmethod
    def lazy(cls, settings: Settings, rounds: np.ndarray, facts: np.ndarray,
             links: np.ndarray, counts: Mapping[str, int], digest: str,
             snapshot: str | None, source: IndexSource) -> ArchiveIndex:
        """An index that reads participations and users from ``source`` when asked
        (``rounds``, ``facts``, ``links``: the per-round tables, checked here)."""
        bad = check_round_tables(settings, rounds, facts, links, counts, digest)
        if bad:
            raise DamagedArchiveError(f"{source.where}: damaged index: " + "; ".join(bad))
        r = _ROUNDS.field
        index = cls(
            settings=settings, rounds=_frozen(rounds[:, r("round")]),
            start=_frozen(np.concatenate([[0], np.cumsum(rounds[:, r("entries")])])),
            anorm=_frozen(facts[:, _FACTS.field("anorm")]),
            agg_evar=_frozen(facts[:, _FACTS.field("agg_evar")]), digest=digest,
            users_after=_frozen(rounds[:, r("users")]), snapshot=snapshot,
            n_records=int(counts["record"]), n_users=int(counts["user"]),
            _lazy=_Lazy(source, rounds, facts, links))
        if index.n_rounds:  # the first link ties the settings to the chain: check it now
            index.round_rows(0)
        return index

    def appended(self, rounds_row: np.ndarray, facts_row: np.ndarray, entries: np.ndarray,
                 entry_facts: np.ndarray, new_users: Sequence[UserId],
                 digest: str) -> ArchiveIndex:
        """This index with one more round (the writer's, after its commit)."""
        shared = self._shared
        if shared is None or shared.n != [self.n_rounds, self.n_entries] or \
                len(shared.ids) != self.n_users:
            # Not the newest version: copy rather than write into a newer one's buffers.
            old = self.tables()
            shared = _Growing(*old, list(self.users))
        shared.append(rounds_row, facts_row, entries, entry_facts, new_users)
        return self._view(self.settings, shared, digest, None)

    def user_keys(self) -> np.ndarray:
        """The postings key of every user column (a writer's index)."""
        if self._shared is None:
            return user_keys([user_text(u) for u in self.users])
        return self._shared.keys()

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
                 digest: str, links: np.ndarray | None = None) -> list[str]:
    """Every inconsistency of the index tables, in words (empty: the index is sound);
    ``links``: the per-round digests of an archive that keeps them, checked too."""
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
        if links is not None and d != np.ascontiguousarray(links[i], "<i8").tobytes():
            bad.append(f"links: round {int(t[i])}'s rows do not hash to its link: the index "
                       "was changed outside medustore")
            return bad
    if d.hex() != digest:
        bad.append("digest: the index (users, rounds, participations, layout or policy) does "
                   "not hash to the digest its writer recorded: it was changed outside "
                   "medustore")
    return bad


def check_round_tables(settings: Settings, rounds: np.ndarray, facts: np.ndarray,
                       links: np.ndarray, counts: Mapping[str, int], digest: str) -> list[str]:
    """What is wrong with the per-round tables against the archive's counts and digest
    (what a lazily loaded index can check without reading participations)."""
    R = rounds.shape[0]
    if facts.shape[0] != R or links.shape != (R, 4):
        return ["rounds, round_facts and links do not have one row per round"]
    if (rounds == INT_FILL).any() or (links == INT_FILL).any() or np.isnan(facts).any():
        return ["rounds, round_facts or links have rows that were never written (missing "
                "data)"]
    t, n, after = (rounds[:, _ROUNDS.field(f)] for f in ("round", "entries", "users"))
    bad = []
    if (t < 0).any() or (np.diff(t) <= 0).any():
        bad.append("rounds: round numbers are not increasing and >= 0")
    if (n < 1).any() or int(n.sum()) != counts["entry"]:
        bad.append(f"rounds: entry counts do not add up to the {counts['entry']} entries")
    if (after < 0).any() or (np.diff(after) < 0).any() or \
            (int(after[-1]) if R else 0) != counts["user"]:
        bad.append(f"rounds: user counts do not grow to the archive's {counts['user']} users")
    if not 0 <= counts["record"] <= counts["entry"]:
        bad.append("counts: more records than entries")
    if not (np.isfinite(facts) & (facts >= 0)).all():
        bad.append("round_facts: aggregate norms or error variances not finite and >= 0")
    last = np.ascontiguousarray(links[-1], "<i8").tobytes().hex() if R else \
        settings.digest0().hex()
    if last != digest:
        bad.append("links: the last round's link is not the archive's digest: the index was "
                   "changed outside medustore")
    return bad


def _check_full(index: ArchiveIndex, texts: Sequence[str], entries: np.ndarray,
                efacts: np.ndarray) -> _Full:
    """The whole user and entry tables of a lazily loaded index, checked as a writer's."""
    lazy = index._lazy
    bad = check_tables(index.settings, texts, lazy.rounds, lazy.facts, entries, efacts,
                       index.digest, lazy.links)
    if bad:
        raise DamagedArchiveError(f"{lazy.source.where}: damaged index: " + "; ".join(bad))
    users = [_user_from_text(s, i) for i, s in enumerate(texts)]
    return _full_of(_Users(users, len(users)), entries, efacts)


def load_index(settings: Settings, users_text: Sequence[str], rounds: np.ndarray,
               facts: np.ndarray, entries: np.ndarray, entry_facts: np.ndarray, digest: str,
               snapshot: str | None, where: str, links: np.ndarray | None = None
               ) -> ArchiveIndex:
    """A checked `ArchiveIndex` with every table loaded; `DamagedArchiveError` listing what
    is wrong otherwise."""
    bad = check_tables(settings, users_text, rounds, facts, entries, entry_facts, digest,
                       links)
    if bad:
        raise DamagedArchiveError(f"{where}: damaged index: " + "; ".join(bad))
    users = [_user_from_text(s, i) for i, s in enumerate(users_text)]
    return ArchiveIndex.from_tables(settings, users, rounds, facts, entries, entry_facts,
                                    digest, snapshot)
