"""The user -> participations index: sorted runs of ``(user key, entry)``, merged LSM-style.

"Where did user u take part?" must be answered without reading other users' rows, and a
round must not rewrite what earlier rounds wrote. Each participation (entry) is posted
under its user's *key*, a 64-bit hash of the user id's JSON text, in sorted *runs*; like
a binary counter, an archive of ``R`` rounds holds one run per set bit ``k`` of ``R``,
covering ``2**k`` consecutive rounds. Round ``R`` writes the run of its lowest set bit,
merged from the runs of the lower bits and its own entries: a participation is rewritten
O(log R) times in all, a round writes O(its entries) amortised, and a lookup reads about
one chunk of each of O(log R) runs.

The runs are packed in one ``(n, 2)`` int64 array ``postings``, ``[key, entry]`` rows,
highest level first: a round rewrites only the tail from its new run on (the runs of the
higher bits before it stay as written). The array's attribute ``runs`` lists each run as
``[level, first row, stop row, offset, fences]``, the fences being the first key of every
`RUN_ROWS` rows of the run, so a lookup reads only the rows that can hold its key.
Everything a lookup reads is checked: the runs' extents against the index, each block's
first key against its fence, keys sorted, entries within the run's rounds. Hash
collisions are resolved by the caller (it compares the stored user id of every entry).
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr

from medustore.archive.table import LOSSLESS
from medustore.errors import DamagedArchiveError

__all__ = ["ARRAY", "RUN_ROWS", "Runs", "build_run", "check_runs", "create", "levels",
           "run_rows", "user_key", "user_keys", "write_run", "write_runs"]

ARRAY = "postings"
#: Rows between fences, and rows of a chunk (64 KiB of postings).
RUN_ROWS = 4096
_FILL = int(np.iinfo(np.int64).min)


def user_key(text: str) -> int:
    """The 64-bit key (a signed int64) of a user id's JSON text."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def user_keys(texts: Sequence[str]) -> np.ndarray:
    return np.fromiter((user_key(t) for t in texts), dtype=np.int64, count=len(texts))


def levels(n_rounds: int) -> list[int]:
    """Levels ``k`` of the runs an archive of ``n_rounds`` rounds holds, highest first."""
    return [k for k in reversed(range(n_rounds.bit_length())) if n_rounds >> k & 1]


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


def create(group: zarr.Group) -> None:
    """The empty ``postings`` array of a new archive."""
    group.create_array(ARRAY, shape=(0, 2), chunks=(RUN_ROWS, 2), dtype="i8",
                       fill_value=_FILL, compressors=LOSSLESS,
                       config={"write_empty_chunks": True}, attributes={"runs": []})


def _entry(k: int, rows: tuple[int, int], offset: int, run: np.ndarray) -> list[Any]:
    return [k, rows[0], rows[1], offset, run[::RUN_ROWS, 0].tolist()]


def write_run(group: zarr.Group, n_rounds: int, run: np.ndarray) -> None:
    """Write the run that round ``n_rounds - 1`` completes, replacing the runs it merged.

    ``run`` covers the rows of `run_rows(n_rounds, k)`, ``k`` the lowest set bit of
    ``n_rounds`` (see `build_run`); the runs of higher levels stay as written.
    """
    k = (n_rounds & -n_rounds).bit_length() - 1
    arr = group[ARRAY].with_config({"write_empty_chunks": True})
    runs = arr.attrs["runs"]
    kept = [r for r in runs if r[0] > k]
    merged = [r for r in runs if r[0] < k]  # the tail: replaced by the new run
    offset = merged[0][3] if merged else arr.shape[0]
    arr.resize((offset + run.shape[0], 2))
    if run.size:
        arr[offset:] = run
    arr.attrs["runs"] = [*kept, _entry(k, run_rows(n_rounds, k), offset, run)]


def write_runs(group: zarr.Group, n_rounds: int, start: np.ndarray,
               entry_keys: np.ndarray) -> None:
    """Write every run of an archive of ``n_rounds`` rounds at once (``entry_keys``: the
    user key of every entry, ``start``: the entry offsets per row)."""
    arr = group[ARRAY].with_config({"write_empty_chunks": True})
    runs, parts, offset = [], [], 0
    for k in levels(n_rounds):
        lo, hi = run_rows(n_rounds, k)
        e0, e1 = int(start[lo]), int(start[hi])
        run = build_run(entry_keys[e0:e1], e0)
        runs.append(_entry(k, (lo, hi), offset, run))
        parts.append(run)
        offset += run.shape[0]
    arr.resize((offset, 2))
    if offset:
        arr[...] = np.concatenate(parts)
    arr.attrs["runs"] = runs


class Runs:
    """Lookups in the runs of one committed version (``start``: the index's entry
    offsets per row, ``n_rounds`` rows)."""

    def __init__(self, group: zarr.Group, n_rounds: int, start: np.ndarray, where: str) -> None:
        self._group, self._start, self._where = group, start, where
        self._n_rounds = n_rounds
        self._runs: list[tuple[int, int, int, list[int], int, int]] | None = None
        self._arr: zarr.Array | None = None

    def _open(self) -> list[tuple[int, int, int, list[int], int, int]]:
        """``(level, offset, length, fences, first entry, stop entry)`` of every run."""
        if self._runs is not None:
            return self._runs
        what = f"{self._where}: user index"
        try:
            arr = self._group[ARRAY]
            stored = arr.attrs["runs"]
        except Exception:
            raise DamagedArchiveError(f"{what} ({ARRAY}) is missing or unreadable") from None
        expected = [(k, *run_rows(self._n_rounds, k)) for k in levels(self._n_rounds)]
        runs, offset = [], 0
        ok = (isinstance(arr, zarr.Array) and np.dtype(arr.dtype) == np.int64
              and tuple(arr.chunks) == (RUN_ROWS, 2) and isinstance(stored, list)
              and len(stored) == len(expected))
        for entry, (k, lo, hi) in zip(stored if ok else [], expected, strict=False):
            e0, e1 = int(self._start[lo]), int(self._start[hi])
            n = e1 - e0
            fences = entry[4] if isinstance(entry, list) and len(entry) == 5 else None
            if (list(entry[:4]) != [k, lo, hi, offset] or not isinstance(fences, list)
                    or len(fences) != math.ceil(n / RUN_ROWS)
                    or any(not isinstance(f, int) for f in fences)
                    or fences != sorted(fences)):
                ok = False
                break
            runs.append((k, offset, n, fences, e0, e1))
            offset += n
        if not ok or tuple(arr.shape) != (offset, 2):
            raise DamagedArchiveError(f"{what} ({ARRAY}) does not hold the runs of the "
                                      f"{self._n_rounds} rounds the index says (damaged)")
        self._arr, self._runs = arr, runs
        return runs

    def lookup(self, key: int) -> np.ndarray:
        """Entries posted under ``key``, increasing."""
        found = []
        for k, offset, n, fences, e0, e1 in self._open():
            if not fences:
                continue
            b0 = max(bisect.bisect_left(fences, key) - 1, 0)
            b1 = max(bisect.bisect_right(fences, key) - 1, 0)
            for b in range(b0, b1 + 1):
                lo = offset + b * RUN_ROWS
                rows = self._rows(lo, min(lo + RUN_ROWS, offset + n), fences[b], k)
                hit = rows[rows[:, 0] == key, 1]
                if ((hit < e0) | (hit >= e1)).any():
                    raise DamagedArchiveError(f"{self._where}: user index run L{k} posts "
                                              "entries outside its rounds (damaged)")
                found.append(hit)
        return np.sort(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def _rows(self, lo: int, hi: int, fence: int, k: int) -> np.ndarray:
        from medustore.archive.reader import read_rows

        rows = read_rows(self._arr, lo, hi, self._where, what=f"the user index ({ARRAY})")
        if rows.shape[0] == 0 or rows[0, 0] != fence or (rows[1:, 0] < rows[:-1, 0]).any():
            raise DamagedArchiveError(f"{self._where}: user index run L{k} does not match "
                                      "its fence or is not sorted (damaged)")
        return rows


def check_runs(group: zarr.Group, n_rounds: int, start: np.ndarray, entry_keys: np.ndarray,
               where: str) -> list[tuple[str, str]]:
    """What is wrong with the stored runs against the index (``entry_keys``: the user key
    of every entry), as ``(kind, message)`` with kind ``invalid`` (wrong extent or
    content) or ``corrupt`` (a chunk that does not read); empty when every run holds
    exactly the postings it should."""
    runs = Runs(group, n_rounds, start, where)
    try:
        opened = runs._open()
    except DamagedArchiveError as err:
        return [("invalid", str(err).removeprefix(f"{where}: "))]
    try:
        got = np.asarray(runs._arr[...], dtype=np.int64).reshape(-1, 2)
    except Exception as err:
        return [("corrupt", f"the user index ({ARRAY}) does not read ({type(err).__name__})")]
    bad = []
    for k, offset, n, fences, e0, e1 in opened:
        expected = build_run(entry_keys[e0:e1], e0)
        if not np.array_equal(got[offset:offset + n], expected) or \
                fences != expected[::RUN_ROWS, 0].tolist():
            bad.append(("invalid", f"user index run L{k} does not hold the participations of "
                                   f"rows {run_rows(n_rounds, k)} (damaged or edited)"))
    return bad
