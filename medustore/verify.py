"""`verify`: decode every chunk an archive's answers depend on and check it against the index.

Works only through the read contract (``store.index``, an `ArchiveIndex`, and
``store.reader``, an `ArchiveReader`) of the version the store holds. Opening the store
checks the per-round tables; verify first loads and checks the whole index (complete
tables, consistent participations, every round's rows against its link and the digest
chained over every round): a damaged index is reported (by the ``verify`` command too,
when `medustore.open` already refused it) as damage.

Checks, in order:

1. presence: every chunk of every array an answer can read (each stored record, each kept
   aggregate, ``w_0``, ``w_T``, the accumulator of every user when the archive keeps them)
   is listed in the store, and its object can be read: a missing chunk is reported by
   array, round, user and chunk, never read as the fill value;
2. records: each chunk decodes to finite values of the right size, the chunks of a record
   add up to its ``nbytes``, and its decoded norm agrees with ``dnorm`` (within float
   tolerance for lossless records, within the lattice noise ``evar`` for lossy ones, after
   the thresholded part ``znorm``);
3. aggregates, ``w_0``, ``w_T`` and accumulators decode to finite values of the right size
   (any values: a model initialised to zeros is not damage);
   The user -> participations runs (`medustore.archive.postings`) must hold exactly the
   index's participations;
4. leftovers: chunks beyond the archive's counts (never read; e.g. left in a plain export)
   and objects outside the declared table are notes; an object under an array that is not
   one of its chunks is a problem;
5. garbage: objects that no kept version refers to (left by interrupted writes, or by
   versions expired but not yet collected) are a note with their count and bytes; a kept
   version that refers to a missing object is a problem.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm
from zarr.core.sync import sync

from medustore.archive.postings import ARRAY, check_runs
from medustore.errors import DamagedArchiveError
from medustore.replay import PREFETCH

if TYPE_CHECKING:
    import zarr

    from medustore.archive.reader import ArchiveReader
    from medustore.index import ArchiveIndex
    from medustore.store import UpdateStore

__all__ = ["Problem", "VerifyReport", "refused_report", "verify"]

#: Chunks decoded concurrently: one worker per core, as the replay uses.
WORKERS = PREFETCH
#: Relative tolerance on the norm of a lossless record (float32 data, float64 norms).
LOSSLESS_RTOL = 1e-5
#: Relative tolerance when coordinates were thresholded (borderline entries may move
#: between the zeroed and the kept part).
THRESHOLD_RTOL = 1e-3
#: Lossy records: decoded norm within ``LOSSY_SIGMAS * sqrt(evar) + LOSSY_RTOL * dnorm``.
LOSSY_SIGMAS, LOSSY_RTOL = 4.0, 1e-2

#: Store probes (exists + size) awaited together: one event-loop round trip per batch.
_PROBE_BATCH = 4096
#: Object counts of Icechunk's garbage-collection summary.
_GC_COUNTS = ("chunks_deleted", "manifests_deleted", "snapshots_deleted",
              "attributes_deleted", "transaction_logs_deleted")
#: Report counters of each data array.
_COUNTER = {"records": "record_chunks", "aggregate": "aggregate_chunks",
            "initial": "model_chunks", "model": "model_chunks", "acc": "accumulator_chunks"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an archive.

    Attributes
    ----------
    kind
        ``"corrupt"`` (does not decode), ``"missing"`` (chunk or object absent),
        ``"mismatch"`` (decodes, but disagrees with the index), ``"invalid"`` (the archive
        was refused: a bad index or layout) or ``"unexpected"`` (an object that belongs
        nowhere).
    array
        The array concerned (``"records"``, ``"aggregate"``, ``"initial"``, ``"model"``,
        ``"acc"``, an index table), or ``"archive"`` / ``"repository"`` / ``"store"``.
    message
        What is wrong, in words.
    round, user, chunk
        Where, when it applies: round number, user id, chunk index along the model.
    """

    kind: str
    array: str
    message: str
    round: int | None = None
    user: Any = None
    chunk: int | None = None

    def where(self) -> str:
        """``round 3, user 7, chunk 0``, or the array name alone."""
        parts = [] if self.round is None else [f"round {self.round}"]
        if self.user is not None:
            parts.append(f"user {self.user!r}" if isinstance(self.user, str)
                         else f"user {self.user}")
        if self.chunk is not None:
            parts.append(f"chunk {self.chunk}")
        return ", ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        return f"{where + ': ' if where else ''}{self.array}: {self.kind}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "array": self.array, "round": self.round,
                "user": self.user, "chunk": self.chunk, "message": self.message}


@dataclass
class VerifyReport:
    """What `verify` checked and found; ``ok`` is True when nothing is wrong.

    ``notes`` are harmless findings (leftover chunks, uncollected garbage).
    """

    location: str
    rounds: int = 0
    users: int = 0
    records: int = 0
    record_chunks: int = 0
    aggregate_chunks: int = 0
    model_chunks: int = 0
    accumulator_chunks: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def chunks(self) -> int:
        """Data chunks decoded."""
        return (self.record_chunks + self.aggregate_chunks + self.model_chunks
                + self.accumulator_chunks)

    def to_json(self) -> dict[str, Any]:
        return {"archive": self.location, "ok": self.ok, "rounds": self.rounds,
                "users": self.users, "records": self.records,
                "chunks": {"records": self.record_chunks, "aggregates": self.aggregate_chunks,
                           "model": self.model_chunks, "accumulators": self.accumulator_chunks},
                "problems": [p.to_json() for p in self.problems], "notes": list(self.notes)}


def refused_report(location: str, error: BaseException | str) -> VerifyReport:
    """The report of an archive that could not be opened because it is damaged.

    Parameters
    ----------
    location
        The archive, as the user named it.
    error
        The `DamagedArchiveError` (or storage error) that opening raised, or its message.

    Returns
    -------
    VerifyReport
        Not ok, with one problem carrying the message.
    """
    message = _error_text(error) if isinstance(error, BaseException) else str(error)
    if _absent(message) or " is missing" in message:
        kind = "missing"
    elif "does not read" in message:
        kind = "corrupt"
    else:
        kind = "invalid"  # a refused index, digest or layout
    return VerifyReport(location, problems=[Problem(kind, "archive", message)])


# ---------------------------------------------------------------------- storage helpers


def _error_text(err: BaseException) -> str:
    """A failure in one line (Icechunk's errors span several, with a backtrace)."""
    text = " ".join(str(err).split())
    text = text.split(" context:")[0].rstrip(" |")  # Icechunk appends a call stack: no help
    text = text[2:] if text.startswith("x ") else text
    return f"{type(err).__name__}: {text}"[:300] if text else type(err).__name__


def _absent(text: str) -> bool:
    """Whether a storage error says the object is not there (Icechunk 1.1 raises a plain
    IcechunkError whose text says "not found"; local stores raise FileNotFoundError)."""
    low = text.lower()
    return "not found" in low or "no such file" in low or "filenotfounderror" in low


@dataclass(frozen=True)
class _Probe:
    """What the store says of one key: its size, or that it is absent, or an error."""

    size: int | None
    error: str | None = None


async def _probe_one(store: Any, key: str) -> _Probe:
    try:
        if not await store.exists(key):
            return _Probe(None)
        return _Probe(int(await store.getsize(key)))
    except Exception as err:  # noqa: BLE001 - a key the store cannot answer for is damage
        return _Probe(None, _error_text(err))


def _probe(store: Any, keys: list[str]) -> dict[str, _Probe]:
    """Probe ``keys`` concurrently, in batches that bound the coroutines alive."""
    out: dict[str, _Probe] = {}
    for i in range(0, len(keys), _PROBE_BATCH):
        batch = keys[i:i + _PROBE_BATCH]

        async def run(batch: list[str] = batch) -> list[_Probe]:
            return list(await asyncio.gather(*(_probe_one(store, k) for k in batch)))

        out.update(zip(batch, sync(run()), strict=True))
    return out


def _list(store: Any, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    return sync(collect())


def _chunk_coords(arr: zarr.Array, suffix: str) -> tuple[int, ...] | None:
    """Chunk coordinates of the key ``suffix`` (relative to the array), or None if it is
    not a chunk key of ``arr`` (checked by encoding the coordinates back: zarr 3.1's own
    decoder fails on its default keys)."""
    nums = tuple(int(n) for n in re.findall(r"\d+", suffix))
    if len(nums) != arr.ndim:
        return None
    try:
        return nums if arr.metadata.encode_chunk_key(nums) == suffix else None
    except Exception:  # noqa: BLE001 - any key the encoder cannot produce is not a chunk
        return None


# ---------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class _Decoded:
    values: np.ndarray | None
    error: str | None


def _decode(read: Callable[[], np.ndarray]) -> _Decoded:
    try:
        return _Decoded(np.asarray(read()), None)
    except Exception as err:  # noqa: BLE001 - any failure to decode a chunk is damage
        return _Decoded(None, _error_text(err))


def _reader(arr: zarr.Array, selection: tuple) -> Callable[[], np.ndarray]:
    """A deferred read of ``arr[selection]``."""
    return lambda: arr[selection]


def _decode_all(jobs: list[tuple[Any, Callable[[], np.ndarray]]],
                progress: bool | None) -> Iterator[tuple[Any, _Decoded]]:
    """Decode ``(tag, read)`` jobs on a few threads, yielding in order; at most a few
    chunks per worker are held at once, so memory stays bounded whatever the archive."""
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(jobs), desc="verifying", unit="chunk", disable=not show, leave=False)
    with ThreadPoolExecutor(WORKERS) as pool, bar:
        window: list[tuple[Any, Future]] = []
        for tag, read in jobs:
            window.append((tag, pool.submit(_decode, read)))
            if len(window) >= 4 * WORKERS:
                tag0, fut = window.pop(0)
                yield tag0, fut.result()
                bar.update()
        for tag0, fut in window:
            yield tag0, fut.result()
            bar.update()


# ---------------------------------------------------------------------- what is checked


@dataclass(frozen=True)
class _Target:
    """A model-sized row an answer can read: a record, an aggregate, w_0, w_T or an
    accumulator. ``entry`` is the participation of a record (None otherwise)."""

    array: str
    lead: tuple[int, ...]
    round: int | None = None
    user: Any = None
    entry: int | None = None


def _targets(index: ArchiveIndex, reader: ArchiveReader) -> list[_Target]:
    """Every row whose chunks must exist, from the index's counts."""
    rows = index.entry_rows()
    last = index.last_round
    out = [_Target("initial", ()), _Target("model", (), round=last)]
    for rec, e in enumerate(np.flatnonzero(index.entry_record >= 0)):
        # check_tables made records 0, 1, 2, ... in entry order: record ``rec`` is entry e.
        out.append(_Target("records", (rec,), int(index.rounds[rows[e]]),
                           index.users[int(index.entry_user[e])], int(e)))
    if "aggregate" in reader.arrays:
        out += [_Target("aggregate", (row,), int(t)) for row, t in enumerate(index.rounds)]
    if "acc" in reader.arrays:
        out += [_Target("acc", (col,), user=u) for col, u in enumerate(index.users)]
    return out


class _Verifier:
    def __init__(self, store: UpdateStore, progress: bool | None) -> None:
        self.store = store
        self.progress = progress
        self.index = store.index
        self.report = VerifyReport(store.location, rounds=self.index.n_rounds,
                                   users=len(self.index.users), records=self.index.n_records)

    # -- reporting ----------------------------------------------------------------------

    def problem(self, kind: str, target: _Target | str, message: str,
                chunk: int | None = None) -> None:
        if isinstance(target, str):
            self.report.problems.append(Problem(kind, target, message, chunk=chunk))
        else:
            self.report.problems.append(Problem(kind, target.array, message, target.round,
                                                target.user, chunk))

    def sorted_problems(self) -> list[Problem]:
        col = {u: i for i, u in enumerate(self.index.users)}
        return sorted(self.report.problems, key=lambda p: (
            p.round is not None, -1 if p.round is None else p.round,
            col.get(p.user, -1) if p.user is not None else -1,
            -1 if p.chunk is None else p.chunk))

    # -- the run --------------------------------------------------------------------------

    def run(self) -> VerifyReport:
        try:
            reader = self.store.reader
            # A reader's index is loaded piecewise: load (and check) all of it, links too.
            self.index.entry_user  # noqa: B018
        except DamagedArchiveError as err:  # an array missing, or of the wrong shape
            self.problem("invalid", "archive", _error_text(err))
            return self.report
        self.reader = reader
        self.check_user_runs()
        self.m, self.c = self.index.layout.size, self.index.settings.chunk
        targets = _targets(self.index, reader)
        self.check_chunks(targets)
        self.check_leftovers()
        self.check_garbage()
        self.report.problems = self.sorted_problems()
        return self.report

    def check_user_runs(self) -> None:
        """The user -> participations runs hold exactly the index's participations."""
        if not self.index.settings.sparse:
            return
        keys = self.index.user_keys()[self.index.entry_user]
        for kind, message in check_runs(self.reader.group, self.index.n_rounds,
                                        self.index.start, keys, self.store.location):
            self.problem(kind, ARRAY, message)

    def span(self, k: int) -> slice:
        return slice(k * self.c, min((k + 1) * self.c, self.m))

    # -- 1-3. chunks ----------------------------------------------------------------------

    def check_chunks(self, targets: list[_Target]) -> None:
        """Probe and decode every chunk of ``targets``; check the norms of sound records."""
        keys = [self.reader.keys(t.array, t.lead) for t in targets]
        probes = _probe(self.reader.arrays["model"].store, [k for ks in keys for k in ks])
        jobs: list[tuple[tuple[int, int], Callable[[], np.ndarray]]] = []
        sound = set(range(len(targets)))
        for i, (t, ks) in enumerate(zip(targets, keys, strict=True)):
            if not self.check_present(t, ks, probes):
                sound.discard(i)
            arr = self.reader.arrays[t.array]
            for k, key in enumerate(ks):
                if probes[key].size is not None:
                    jobs.append(((i, k), _reader(arr, (*t.lead, self.span(k)))))
        sq = np.zeros(len(targets))
        for (i, k), got in _decode_all(jobs, self.progress):
            t = targets[i]
            counter = _COUNTER[t.array]
            setattr(self.report, counter, getattr(self.report, counter) + 1)
            if not self.chunk_ok(t, got, k):
                sound.discard(i)
            elif t.array == "records":
                v = got.values.astype(np.float64).ravel()
                sq[i] += float(np.dot(v, v))
        for i in sorted(sound):
            if targets[i].entry is not None:
                self.check_norm(targets[i], math.sqrt(sq[i]))

    def check_present(self, t: _Target, keys: list[str], probes: dict[str, _Probe]) -> bool:
        """Every chunk of ``t`` is listed; a record's chunks add up to its ``nbytes``."""
        ok = True
        for k, key in enumerate(keys):
            p = probes[key]
            if p.error is not None:
                kind = "missing" if _absent(p.error) else "corrupt"
                self.problem(kind, t, f"chunk {key} cannot be looked up: {p.error}", k)
                ok = False
            elif p.size is None:
                self.problem("missing", t, f"chunk {key} is missing (never read as zeros)", k)
                ok = False
        if ok and t.entry is not None:
            on_disk = sum(probes[key].size for key in keys)
            nbytes = int(self.index.entry_nbytes[t.entry])
            if on_disk != nbytes:
                self.problem("mismatch", t, f"record chunks hold {on_disk:,} bytes, the index "
                             f"says {nbytes:,} (nbytes)")
                ok = False
        return ok

    def chunk_ok(self, t: _Target, got: _Decoded, k: int) -> bool:
        """The chunk decoded to finite values of the right size."""
        if got.error:
            kind = "missing" if _absent(got.error) else "corrupt"
            what = "chunk object is missing from storage" if kind == "missing" else \
                "chunk does not decode"
            self.problem(kind, t, f"{what} ({got.error})", k)
            return False
        size = self.span(k).stop - self.span(k).start
        if got.values.size != size:
            self.problem("corrupt", t, f"chunk decodes to {got.values.size} values, expected "
                         f"{size}", k)
            return False
        if not np.isfinite(got.values).all():
            nbad = int((~np.isfinite(got.values)).sum())
            self.problem("corrupt", t, f"chunk decodes to {nbad} NaN or infinite value(s)", k)
            return False
        return True

    def check_norm(self, t: _Target, norm: float) -> None:
        """The decoded norm of a record agrees with ``dnorm``, ``znorm`` and ``evar``."""
        e, pol = t.entry, self.index.policy
        dnorm = float(self.index.entry_dnorm[e])
        znorm = float(self.index.entry_znorm[e])
        evar = float(self.index.entry_evar[e])
        if pol.lattice is None:
            got = math.hypot(norm, znorm)
            rtol = LOSSLESS_RTOL if pol.coord_threshold is None else THRESHOLD_RTOL
            ok = math.isclose(got, dnorm, rel_tol=rtol, abs_tol=1e-30)
            kind = "lossless"
        else:
            kept = math.sqrt(max(dnorm * dnorm - znorm * znorm, 0.0))
            ok = abs(norm - kept) <= LOSSY_SIGMAS * math.sqrt(evar) + LOSSY_RTOL * dnorm
            got, kind = norm, "lossy"
        if not ok:
            self.problem("mismatch", t, f"{kind} record decodes to norm {got:.6g}, the index "
                         f"says {dnorm:.6g} (dnorm)")

    # -- 4. leftovers -------------------------------------------------------------------

    def check_leftovers(self) -> None:
        """Objects the index does not account for: beyond the counts (notes), outside the
        declared table (notes), or under an array but not one of its chunks (problems)."""
        arrays = self.reader.arrays
        any_arr = arrays["model"]
        root = any_arr.path.rpartition("/")[0]
        prefix = f"{root}/" if root else ""
        try:
            keys = _list(any_arr.store, prefix)
        except Exception as err:  # noqa: BLE001 - a store that cannot list is damaged
            text = _error_text(err)
            self.problem("missing" if _absent(text) else "corrupt", "store",
                         f"the archive's objects cannot be listed: {text}")
            return
        by_top: dict[str, list[str]] = {}
        for key in keys:
            if key.endswith("/"):
                continue  # a folder entry of a zip written by `zip -r`: not an object
            top, _, rest = key[len(prefix):].partition("/")
            if rest:
                by_top.setdefault(top, []).append(rest)
            elif top != "zarr.json":
                by_top.setdefault(top, []).append("")
        declared = arrays.keys() | ({ARRAY} if self.index.settings.sparse else set())
        foreign = sorted(t for t in by_top if t not in declared)
        if foreign:
            self.report.notes.append(
                f"objects outside the archive's declared arrays: {', '.join(foreign)} "
                "(never read); harmless")
        for name in sorted(by_top.keys() & arrays.keys()):
            self.check_array_keys(name, arrays[name], by_top[name])

    def check_array_keys(self, name: str, arr: zarr.Array, suffixes: list[str]) -> None:
        beyond = []
        for suffix in suffixes:
            if suffix == "zarr.json":
                continue
            coords = _chunk_coords(arr, suffix)
            if coords is None:
                self.problem("unexpected", name, f"object {name}/{suffix} is not a chunk of "
                             "the array")
            elif any(c >= n for c, n in zip(coords, arr.cdata_shape, strict=True)):
                beyond.append(suffix)
        if beyond:
            self.report.notes.append(
                f"{name}: {len(beyond)} chunk(s) beyond the archive's counts (first: "
                f"{name}/{sorted(beyond)[0]}), left over and never read; harmless")

    # -- 5. garbage ---------------------------------------------------------------------

    def check_garbage(self) -> None:
        """Icechunk's dry-run garbage collection: what no kept version refers to."""
        try:
            summary = self.store.garbage()
        except Exception as err:  # noqa: BLE001 - the scan reads every kept version
            text = _error_text(err)
            if _absent(text):
                self.problem("missing", "repository", "an object a kept version refers to is "
                             f"missing: {text}")
            else:
                self.report.notes.append(f"could not look for garbage: {text}")
            return
        if summary is None:  # a plain Zarr snapshot: no versions, no garbage
            return
        count = sum(int(getattr(summary, name, 0) or 0) for name in _GC_COUNTS)
        size = int(getattr(summary, "bytes_deleted", 0) or 0)
        if count:
            self.report.notes.append(
                f"garbage: {count} object(s), {size:,} bytes that no kept version refers to "
                "(left by interrupted writes or expired versions); compacting deletes them; "
                "harmless")


def verify(store: UpdateStore, progress: bool | None = None) -> VerifyReport:
    """Decode every chunk of ``store`` and check it against the archive's index.

    Parameters
    ----------
    store
        An open archive (read-only is enough); the version it holds is checked.
    progress
        A progress bar on stderr (default: when stderr is a terminal).

    Returns
    -------
    VerifyReport
        ``report.ok`` is True when nothing is wrong; ``report.problems`` names each damaged
        or missing chunk by array, round, user and chunk index; ``report.notes`` lists
        harmless findings (leftover chunks, garbage of interrupted writes).
    """
    return _Verifier(store, progress).run()
