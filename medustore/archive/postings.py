"""The user -> participations index: sorted runs of ``(user key, entry)``, merged LSM-style.

"Where did user u take part?" must be answered without reading other users' rows, and a
round must not rewrite what earlier rounds wrote. Each participation (entry) is posted
under its user's *key*, a 64-bit hash of the user id's JSON text, in immutable sorted
*runs*; like a binary counter, an archive of ``R`` rounds holds one run per set bit ``k``
of ``R``, array ``postings/L{k}``, covering ``2**k`` consecutive rounds. Round ``R`` writes
the run of its lowest set bit, merging the runs of the lower bits (and its own entries)
into it: a participation is rewritten O(log R) times in all, a round writes O(its entries)
amortised, and a lookup reads one or two chunks of each of O(log R) runs.

A run is an ``(n, 2)`` int64 array ``[key, entry]`` sorted by key then entry, chunked by
`RUN_ROWS` rows; its attributes hold the rows (rounds) it covers and *fences*, the first
key of each chunk, so a lookup reads only the chunks that can hold its key. Everything a
lookup reads is checked: the run's extent against the index, each chunk's first key
against its fence, keys sorted, entries within the run's rounds. Hash collisions are
resolved by the caller (it compares the stored user id of every entry found).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence

import numpy as np
import zarr
from zarr.core.sync import sync

from medustore.archive.table import LOSSLESS
from medustore.errors import DamagedArchiveError

__all__ = ["GROUP", "RUN_ROWS", "Runs", "build_run", "check_runs", "levels", "lookup",
           "run_rows", "user_key", "user_keys", "write_run", "write_runs"]

GROUP = "postings"
#: Rows of a run chunk (64 KiB of postings).
RUN_ROWS = 4096


def user_key(text: str) -> int:
    """The 64-bit key (a signed int64) of a user id's JSON text."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def user_keys(texts: Sequence[str]) -> np.ndarray:
    return np.fromiter((user_key(t) for t in texts), dtype=np.int64, count=len(texts))


def levels(n_rounds: int) -> list[int]:
    """Levels ``k`` of the runs an archive of ``n_rounds`` rounds holds (set bits)."""
    return [k for k in range(n_rounds.bit_length()) if n_rounds >> k & 1]


def run_rows(n_rounds: int, k: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` covered by run ``k`` of an archive of ``n_rounds`` rounds."""
    lo = (n_rounds >> (k + 1)) << (k + 1)
    return lo, lo + (1 << k)


def build_run(keys: np.ndarray, first_entry: int) -> np.ndarray:
    """The run of entries ``first_entry, first_entry + 1, ...`` whose user keys are
    ``keys``: ``(n, 2)`` int64, sorted by key then entry."""
    entries = np.arange(first_entry, first_entry + keys.size, dtype=np.int64)
    order = np.lexsort((entries, keys))
    return np.stack([keys[order], entries[order]], axis=1)


def write_run(group: zarr.Group, n_rounds: int, run: np.ndarray) -> None:
    """Write the run that round ``n_rounds - 1`` completes and empty the runs it merged.

    ``run`` covers the rows of `run_rows(n_rounds, k)`, ``k`` the lowest set bit of
    ``n_rounds`` (see `build_run`).
    """
    k = (n_rounds & -n_rounds).bit_length() - 1
    runs = group[GROUP]
    _store(runs, k, run, run_rows(n_rounds, k))
    for j in range(k):  # merged into run k: emptied (their chunks are dropped)
        if f"L{j}" in runs:
            _store(runs, j, np.zeros((0, 2), np.int64), (0, 0))


def write_runs(group: zarr.Group, n_rounds: int, start: np.ndarray,
               entry_keys: np.ndarray) -> None:
    """Write every run of an archive of ``n_rounds`` rounds at once (``entry_keys``: the
    user key of every entry, ``start``: the entry offsets per row)."""
    runs = group[GROUP]
    for k in levels(n_rounds):
        lo, hi = run_rows(n_rounds, k)
        e0, e1 = int(start[lo]), int(start[hi])
        _store(runs, k, build_run(entry_keys[e0:e1], e0), (lo, hi))


def _store(runs: zarr.Group, k: int, run: np.ndarray, rows: tuple[int, int]) -> None:
    if f"L{k}" in runs:
        arr = runs[f"L{k}"].with_config({"write_empty_chunks": True})
        arr.resize(run.shape)
    else:
        arr = runs.create_array(f"L{k}", shape=run.shape, chunks=(RUN_ROWS, 2), dtype="i8",
                                fill_value=np.iinfo(np.int64).min, compressors=LOSSLESS,
                                config={"write_empty_chunks": True})
    if run.size:
        arr[...] = run
    arr.attrs.update({"rows": list(rows), "fences": run[::RUN_ROWS, 0].tolist()})


class Runs:
    """Lookups in the runs of one committed version (``start``: the index's entry
    offsets per row, ``n_rounds`` rows)."""

    def __init__(self, group: zarr.Group, n_rounds: int, start: np.ndarray, where: str) -> None:
        self._group, self._start, self._where = group, start, where
        self._runs: list[tuple[zarr.Array, list[int], int, int]] | None = None
        self._n_rounds = n_rounds

    def _open(self) -> list[tuple[zarr.Array, list[int], int, int]]:
        if self._runs is not None:
            return self._runs
        runs = []
        for k in levels(self._n_rounds):
            lo, hi = run_rows(self._n_rounds, k)
            e0, e1 = int(self._start[lo]), int(self._start[hi])
            what = f"{self._where}: user index run L{k}"
            try:
                arr = self._group[f"{GROUP}/L{k}"]
                rows, fences = arr.attrs["rows"], arr.attrs["fences"]
            except Exception:
                raise DamagedArchiveError(f"{what} is missing or unreadable") from None
            n = e1 - e0
            if (not isinstance(arr, zarr.Array) or tuple(arr.shape) != (n, 2)
                    or np.dtype(arr.dtype) != np.int64 or list(rows) != [lo, hi]
                    or not isinstance(fences, list) or len(fences) != math.ceil(n / RUN_ROWS)
                    or any(not isinstance(f, int) for f in fences)
                    or fences != sorted(fences) or tuple(arr.chunks) != (RUN_ROWS, 2)):
                raise DamagedArchiveError(f"{what} does not cover rows {lo}..{hi} "
                                          f"({n} entries) as the index says (damaged)")
            runs.append((arr, fences, e0, e1))
        self._runs = runs
        return runs

    def lookup(self, key: int) -> np.ndarray:
        """Entries posted under ``key``, increasing."""
        found = []
        for arr, fences, e0, e1 in self._open():
            if not fences:
                continue
            c0 = max(bisect.bisect_left(fences, key) - 1, 0)
            c1 = max(bisect.bisect_right(fences, key) - 1, 0)
            for c in range(c0, c1 + 1):
                rows = self._chunk(arr, c, fences[c])
                hit = rows[rows[:, 0] == key, 1]
                if ((hit < e0) | (hit >= e1)).any():
                    raise DamagedArchiveError(f"{self._where}: user index run {arr.path} "
                                              "posts entries outside its rounds (damaged)")
                found.append(hit)
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def _chunk(self, arr: zarr.Array, c: int, fence: int) -> np.ndarray:
        from medustore.archive.reader import chunk_key

        key = chunk_key(arr, (c, 0))
        try:
            if not sync(self._group.store.exists(key)):
                raise DamagedArchiveError(f"{self._where}: chunk {key} of the user index is "
                                          "missing")
            rows = np.asarray(arr[c * RUN_ROWS:(c + 1) * RUN_ROWS], dtype=np.int64)
        except DamagedArchiveError:
            raise
        except Exception as err:
            raise DamagedArchiveError(f"{self._where}: chunk {key} of the user index does "
                                      f"not read ({type(err).__name__})") from err
        if rows.shape[0] == 0 or rows[0, 0] != fence or (rows[1:, 0] < rows[:-1, 0]).any():
            raise DamagedArchiveError(f"{self._where}: chunk {key} of the user index does not "
                                      "match its fence or is not sorted (damaged)")
        return rows


def lookup(group: zarr.Group, n_rounds: int, start: np.ndarray, key: int,
           where: str) -> np.ndarray:
    """Entries posted under ``key`` in the runs of ``group`` (one-off `Runs`)."""
    return Runs(group, n_rounds, start, where).lookup(key)


def check_runs(group: zarr.Group, n_rounds: int, start: np.ndarray, entry_keys: np.ndarray,
               where: str) -> list[tuple[str, str]]:
    """What is wrong with the stored runs against the index (``entry_keys``: the user key
    of every entry), as ``(kind, message)`` with kind ``invalid`` (wrong extent or
    content) or ``corrupt`` (a chunk that does not read); empty when every run holds
    exactly the postings it should."""
    bad = []
    try:
        runs = Runs(group, n_rounds, start, where)._open()
    except DamagedArchiveError as err:
        return [("invalid", str(err).removeprefix(f"{where}: "))]
    for k, (arr, fences, e0, e1) in zip(levels(n_rounds), runs, strict=True):
        expected = build_run(entry_keys[e0:e1], e0)
        try:
            got = np.asarray(arr[...], dtype=np.int64).reshape(-1, 2)
        except Exception as err:
            bad.append(("corrupt", f"user index run L{k} does not read "
                                   f"({type(err).__name__})"))
            continue
        if not np.array_equal(got, expected) or fences != expected[::RUN_ROWS, 0].tolist():
            bad.append(("invalid", f"user index run L{k} does not hold the participations of "
                                   f"rows {run_rows(n_rounds, k)} (damaged or edited)"))
    return bad
