"""`ArchiveReader`: the data half of the read contract, over one committed version.

Every read checks that each chunk it needs exists before reading it and turns any failure
to read or decode into `DamagedArchiveError` naming the array, the round and the user: a
missing chunk never reads as the fill value.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

import numpy as np
import zarr
from zarr.core.sync import sync

from medustore.archive.postings import Runs
from medustore.archive.table import TABLE, check_array, spec
from medustore.errors import (
    DamagedArchiveError,
    NotAnArchiveError,
    UnsupportedFormatError,
    first_line,
)
from medustore.index import ArchiveIndex, Settings, load_index

__all__ = ["ATTR", "FORMAT_VERSION", "ArchiveReader", "chunk_key", "read_index", "read_settings"]

ATTR = "medustore"
FORMAT_VERSION = 2


def chunk_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """Store key of the chunk of ``arr`` at chunk coordinates ``coords``."""
    key = arr.metadata.encode_chunk_key(coords)
    return f"{arr.path}/{key}" if arr.path else key


def read_settings(group: zarr.Group, where: str) -> tuple[Settings, dict]:
    """The archive's settings and its ``medustore`` attribute; refuses other formats."""
    meta = group.attrs.get(ATTR)
    if not isinstance(meta, dict):
        raise NotAnArchiveError(f"{where} is a zarr group but not a medustore archive")
    version = meta.get("format")
    if version == 1:
        raise UnsupportedFormatError(
            f"{where} is a medustore format-1 archive (plain Zarr, written by medustore 0.1); "
            f"this medustore reads format {FORMAT_VERSION}. Convert it with `medustore "
            f"upgrade {where} NEW_ARCHIVE`, or read it with `pip install 'medustore==0.1.*'`")
    if not isinstance(version, int) or version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where}: archive format {version!r} is not one this medustore reads "
            f"({FORMAT_VERSION}); upgrade medustore")
    return Settings.from_json(meta), meta


class ArchiveReader:
    """Checked reads of one version's arrays (see the module docstring)."""

    def __init__(self, group: zarr.Group, index: ArchiveIndex, where: str) -> None:
        self.index = index
        self.where = where
        flags = index.settings.flags()
        self.arrays: dict[str, zarr.Array] = {}
        for s in TABLE:
            if s.exists(flags):
                self.arrays[s.name] = _open_array(group, s.name, where)
        self.group = group
        self._store = group.store
        for name, arr in self.arrays.items():
            problem = check_array(spec(name), arr, index.settings.model_dtype)
            if problem:
                raise DamagedArchiveError(f"{where}: {problem}")
        self._check_shapes()

    def _check_shapes(self) -> None:
        counts, m = self.index.counts(), self.index.layout.size
        for name, arr in self.arrays.items():
            expected = spec(name).shape(counts, m)
            if tuple(arr.shape) != expected:
                raise DamagedArchiveError(
                    f"{self.where}: array {name} has shape {tuple(arr.shape)}, the index says "
                    f"{expected}")

    # ------------------------------------------------------------------ primitives

    def n_chunks(self) -> int:
        """Chunks along the model (param) dimension."""
        return math.ceil(self.index.layout.size / self.index.settings.chunk)

    def keys(self, name: str, lead: tuple[int, ...],
             chunks: tuple[int, int] | None = None) -> list[str]:
        """Store keys of the model-dimension chunks of ``name`` at leading index ``lead``
        (``chunks``: a range ``[start, stop)`` of them; default all)."""
        arr = self.arrays[name]
        start, stop = chunks or (0, self.n_chunks())
        return [chunk_key(arr, (*lead, k)) for k in range(start, stop)]

    def read(self, name: str, lead: tuple[int, ...], what: str,
             chunks: tuple[int, int] | None = None) -> np.ndarray:
        """Values of ``name`` at leading index ``lead`` over its model-dimension chunks
        ``chunks`` (default all), after checking that each of those chunks exists; any
        failure to read or decode is `DamagedArchiveError` naming ``what``."""
        arr = self.arrays[name]
        start, stop = chunks or (0, self.n_chunks())
        c = self.index.settings.chunk
        try:
            for key in self.keys(name, lead, (start, stop)):
                if not sync(self._store.exists(key)):
                    raise DamagedArchiveError(f"{self.where}: {what}: chunk {key} of array "
                                              f"{name} is missing")
            return arr[(*lead, slice(start * c, stop * c))]
        except DamagedArchiveError:
            raise
        except Exception as err:  # any failure to read or decode stored bytes is damage
            raise DamagedArchiveError(f"{self.where}: {what}: array {name} does not read: "
                                      f"{_brief(err)}") from err

    # ------------------------------------------------------------------ data

    def record(self, record: int, what: str | None = None) -> np.ndarray:
        """Stored record number ``record`` (a float32 flat vector)."""
        return self.read("records", (record,), what or f"record {record}")

    def record_of(self, row: int, col: int) -> np.ndarray | None:
        """The record of user column ``col`` in row ``row``, or None if not stored."""
        e = self.index.entry(row, col)
        if e is None:
            return None
        rr = self.index.round_rows(row)
        rec = int(rr.record[e - rr.first])
        return None if rec < 0 else self.record(rec, self.describe(row, col))

    def aggregate(self, row: int) -> np.ndarray:
        """The (decoded) aggregate of row ``row``."""
        if "aggregate" not in self.arrays:
            raise ValueError(f"this archive's policy ({self.index.policy.name}) does not keep "
                             "aggregates")
        return self.read("aggregate", (row,), f"aggregate of round {int(self.index.rounds[row])}")

    def initial(self) -> np.ndarray:
        """``w_0``."""
        return self.read("initial", (), "initial model w_0")

    def model(self) -> np.ndarray:
        """``w_T``, the model after the last committed round (``w_0`` before any)."""
        return self.read("model", (), "latest model w_T")

    def accumulator(self, col: int) -> np.ndarray:
        """The exact accumulator ``A^u`` of user column ``col`` (float64)."""
        if "acc" not in self.arrays:
            raise ValueError("this archive keeps no accumulators")
        return self.read("acc", (col,), f"accumulator of user {self.index.user_id(col)!r}")

    def describe(self, row: int, col: int) -> str:
        return (f"record of user {self.index.user_id(col)!r} in round "
                f"{int(self.index.rounds[row])}")

    def nbytes_stored(self) -> int:
        """Bytes of every object of this version (data, index and metadata)."""
        return int(sync(self._store.getsize_prefix("")))


def _open_array(group: zarr.Group, name: str, where: str) -> zarr.Array:
    try:
        arr = group[name]
    except KeyError:
        raise DamagedArchiveError(f"{where}: array {name} is missing") from None
    except Exception as err:  # unreadable metadata: unknown codec, bad JSON, ...
        raise DamagedArchiveError(f"{where}: array {name} does not open: {_brief(err)}") from err
    if not isinstance(arr, zarr.Array):
        raise DamagedArchiveError(f"{where}: {name} is a group, expected an array")
    return arr


def _open_table(group: zarr.Group, name: str, n_rows: int, where: str) -> zarr.Array:
    """Index array ``name``, checked against its declaration and the archive's counts."""
    arr = _open_array(group, name, where)
    problem = check_array(spec(name), arr, "f4")
    if problem:
        raise DamagedArchiveError(f"{where}: {problem}")
    if arr.shape[0] != n_rows:
        raise DamagedArchiveError(f"{where}: index array {name} has {arr.shape[0]} rows, the "
                                  f"archive's counts say {n_rows}")
    return arr


def _read_table(group: zarr.Group, name: str, n_rows: int, where: str) -> np.ndarray:
    return read_rows(_open_table(group, name, n_rows, where), 0, n_rows, where)


def _brief(err: BaseException) -> str:
    """``Type: first line`` of an error."""
    return f"{type(err).__name__}: {first_line(err)}"


def read_index(group: zarr.Group, snapshot: str | None, where: str, *,
               lazy: bool = True) -> ArchiveIndex:
    """The checked index of the version ``group`` belongs to.

    ``lazy``: for an archive with round links and user runs (`Settings.sparse`), read only
    the per-round tables now, and a round's participations or a user's when asked (a
    reader); otherwise load and check every table (a writer).
    """
    settings, meta = read_settings(group, where)
    counts = meta.get("counts")
    digest = meta.get("digest")
    if not isinstance(counts, Mapping) or not isinstance(digest, str):
        raise DamagedArchiveError(f"{where}: archive counts or digest missing from metadata")
    try:
        n = {k: int(counts[k]) for k in ("round", "entry", "user", "record")}
    except (KeyError, TypeError, ValueError):
        raise DamagedArchiveError(f"{where}: archive counts are damaged: {counts!r}") from None
    rounds = _read_table(group, "rounds", n["round"], where)
    facts = _read_table(group, "round_facts", n["round"], where)
    links = _read_table(group, "links", n["round"], where) if settings.sparse else None
    if lazy and settings.sparse:
        return ArchiveIndex.lazy(settings, rounds, facts, links, n, digest, snapshot,
                                 _TableSource(group, n, rounds, where))
    users = [str(u) for u in _read_table(group, "users", n["user"], where)]
    return load_index(
        settings, users, rounds, facts, _read_table(group, "entries", n["entry"], where),
        _read_table(group, "entry_facts", n["entry"], where), digest, snapshot, where, links)


class _TableSource:
    """The index tables of one version, read piecewise (`medustore.index.IndexSource`)."""

    def __init__(self, group: zarr.Group, counts: Mapping[str, int], rounds: np.ndarray,
                 where: str) -> None:
        self.group, self.where, self._counts = group, where, counts
        start = np.concatenate([[0], np.cumsum(rounds[:, 1])]).astype(np.int64)
        self._runs = Runs(group, counts["round"], start, where)
        self._arrays: dict[str, zarr.Array] = {}
        self._lock = threading.Lock()

    def _array(self, name: str) -> zarr.Array:
        with self._lock:
            if name not in self._arrays:
                self._arrays[name] = _open_table(self.group, name,
                                                 self._counts[spec(name).dims[0]], self.where)
            return self._arrays[name]

    def rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return (read_rows(self._array("entries"), lo, hi, self.where),
                read_rows(self._array("entry_facts"), lo, hi, self.where))

    def user_texts(self, lo: int, hi: int) -> list[str]:
        if lo == hi:
            return []
        return [str(u) for u in read_rows(self._array("users"), lo, hi, self.where)]

    def tables(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        n = self._counts
        return ([str(u) for u in _read_table(self.group, "users", n["user"], self.where)],
                _read_table(self.group, "entries", n["entry"], self.where),
                _read_table(self.group, "entry_facts", n["entry"], self.where))

    def lookup(self, key: int) -> np.ndarray:
        return self._runs.lookup(key)


def read_rows(arr: zarr.Array, lo: int, hi: int, where: str, what: str | None = None
              ) -> np.ndarray:
    """Rows ``[lo, hi)`` of an index array, after checking that their chunks exist; any
    failure is `DamagedArchiveError` naming ``what`` (default: the array)."""
    what = what or f"index array {arr.path.rpartition('/')[2]}"
    rows = arr.chunks[0]
    try:
        for k in range(lo // rows, -(-hi // rows)):
            key = chunk_key(arr, (k,) if arr.ndim == 1 else (k, 0))
            if not sync(arr.store.exists(key)):
                raise DamagedArchiveError(f"{where}: chunk {key} of {what} is missing")
        data = arr[lo:hi]
    except DamagedArchiveError:
        raise
    except Exception as err:
        raise DamagedArchiveError(f"{where}: {what} does not read: {_brief(err)}") from err
    if np.dtype(arr.dtype).kind in "TUO":  # the user table's JSON texts
        return np.asarray(data, dtype=object)
    return np.asarray(data, dtype=arr.dtype).reshape(hi - lo, *arr.shape[1:])
