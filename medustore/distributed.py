"""Dask-distributed replay: `unlearn` and `reconstruct` split by model slice across workers.

The replay is elementwise along the model: coordinate ``i`` of the answer depends only on
coordinate ``i`` of ``w_T`` (or ``w_0``), of the records and of the aggregates. So the
model's chunks (``settings.chunk`` values each, the archive's own chunking along the param
dimension) are cut into contiguous slices, and each slice is one task:

- the client makes the `Plan` from the index, as the local replay does, and sends each
  task a small picklable `SliceJob`: the archive's location text, storage options, the
  snapshot id of the caller's version, the chunk range and the plan's terms;
- a worker opens the archive itself at that snapshot (readers are cached per worker
  process), reads only its chunk range of ``w_T``/``w_0``, of each record or aggregate
  (existence of every chunk checked first: a missing one raises `DamagedArchiveError`
  naming the record, never reads as zeros) and accumulates in float64 in the order and
  with the operations of `medustore.replay`, so every coordinate is bit for bit the local
  one;
- the client writes each returned slice into the answer, with a bounded number of tasks in
  flight so that finished slices do not pile up in workers' memory.

No worker ever holds a whole model: a task holds about 28 bytes per value of its slice
(see `DEFAULT_SLICE_VALUES`). The client holds the answer (8 bytes per parameter).

``memory://`` archives live in one process and are refused; local paths must be visible
to the workers at the same path (a shared file system); ``s3://`` archives need the
``storage_options`` the workers should use (the store does not keep them: pass them here).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medustore import replay
from medustore.archive.reader import ArchiveReader, read_index
from medustore.archive.repository import Repository
from medustore.archive.storage import parse_location
from medustore.errors import DamagedArchiveError, NotAnArchiveError
from medustore.index import parse_round
from medustore.layout import OutputKind
from medustore.replay import Plan, Term, _progress, plan

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["DEFAULT_SLICE_VALUES", "ArchiveRef", "SliceJob", "archive_ref", "reconstruct",
           "run", "slices", "unlearn"]

#: Model values per task by default (whole chunks, at least one): about 28 bytes of worker
#: memory per value (float64 answer and correction, a float32 read and its scaled copy).
DEFAULT_SLICE_VALUES = 2**20

#: Opened readers kept per worker process.
_CACHE_SIZE = 4


@dataclass(frozen=True)
class ArchiveRef:
    """What a worker needs to open the caller's version of an archive: small, picklable.

    Attributes
    ----------
    location
        What the worker opens: an absolute path, ``zip://`` path or ``s3://bucket/prefix``.
    where
        The location as the caller's store names it (messages say it, as local reads do).
    storage_options
        For ``s3://``: as `medustore.open` takes them.
    snapshot
        Id of the caller's version (None for a plain Zarr export, which has one version).
    digest
        The index digest of that version: a worker that reads another index refuses.
    """

    location: str
    where: str
    storage_options: tuple[tuple[str, Any], ...] | None
    snapshot: str | None
    digest: str


@dataclass(frozen=True)
class SliceJob:
    """One task: the chunks ``[start, stop)`` of the model dimension.

    ``op`` is ``"replay"`` (``w_T - correction`` over ``terms``), ``"accumulator"``
    (``w_T - A^u`` of user column ``col``) or ``"reconstruct"`` (``w_0`` plus the
    aggregates of rows ``[0, before)`` when ``forward``, else ``w_T`` minus those of
    ``[before, n_rounds)``).
    """

    archive: ArchiveRef
    start: int
    stop: int
    op: str
    terms: tuple[tuple[int, Term], ...] = ()
    n_rows: int = 0
    alpha: float = 0.0
    col: int = -1
    before: int = 0
    forward: bool = True


# ------------------------------------------------------------------------ the client side


def _require_client(client: Any) -> None:
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - the extra is not installed
        raise ImportError("distributed replay needs dask.distributed: "
                          "pip install 'medustore[dask]'") from None
    if not isinstance(client, Client):
        raise TypeError(f"client must be a dask.distributed.Client, got "
                        f"{type(client).__name__}")


def archive_ref(source: Any, storage_options: Mapping[str, Any] | None = None) -> ArchiveRef:
    """The `ArchiveRef` of the version ``source`` (a store) holds, or a ValueError when
    worker processes cannot open it (``memory://``, an archive opened from a storage or
    store object rather than a path or URL)."""
    index = source.index
    repo_loc = getattr(getattr(source, "_repo", None), "location", None)
    text = getattr(source, "location", None) or source.reader.where
    if not isinstance(text, str):
        raise ValueError("distributed replay needs an archive opened by its path or URL")
    if text.startswith("memory://") or getattr(repo_loc, "kind", None) == "memory":
        raise ValueError(
            f"{text}: a memory:// archive lives in this process only, so dask workers "
            "cannot read it; write it to a directory on a shared file system or to s3:// "
            "to replay it on a cluster, or replay it here without client=")
    if storage_options is None:
        storage_options = getattr(source, "storage_options", None)
    if text.startswith("s3://"):
        location = text
    else:
        if storage_options:
            raise ValueError(f"storage_options apply to s3:// locations, not {text!r}")
        if repo_loc is not None and repo_loc.path is None:
            raise ValueError(
                f"{text}: this archive was opened from a storage or store object; dask "
                "workers open archives by path or s3:// URL: open it by one to replay it "
                "on a cluster")
        scheme = "zip://" if text.startswith("zip://") else ""
        path = text[len(scheme):]
        if path.startswith("file://"):
            path = path[len("file://"):]
        # Workers may run elsewhere: send the absolute path (a shared file system's).
        location = scheme + str(Path(path).expanduser().resolve())
    options = None if not storage_options else tuple(sorted(dict(storage_options).items()))
    return ArchiveRef(location, text, options, index.snapshot, index.digest)


def slices(n_values: int, chunk: int, n_tasks: int,
           max_values: int = DEFAULT_SLICE_VALUES) -> list[tuple[int, int]]:
    """Chunk ranges ``[start, stop)`` covering a model of ``n_values`` in chunks of
    ``chunk``: at least ``n_tasks`` of them where there are enough chunks, and at most
    ``max_values`` values each (but at least one chunk)."""
    n_chunks = math.ceil(n_values / chunk)
    per = max(1, min(math.ceil(n_chunks / max(1, n_tasks)), max_values // chunk))
    return [(c, min(c + per, n_chunks)) for c in range(0, n_chunks, per)]


def _n_workers(client: Client) -> int:
    return max(1, len(client.scheduler_info().get("workers", {})))


def _gather(client: Client, jobs: list[SliceJob], size: int, chunk: int,
            progress: bool | None, desc: str, in_flight: int | None) -> np.ndarray:
    """Run ``jobs`` on the cluster, a bounded number at a time, into one float64 vector."""
    from distributed import as_completed

    out = np.empty(size, dtype=np.float64)
    limit = in_flight or 2 * _n_workers(client)
    todo: Iterator[SliceJob] = iter(jobs)
    running = as_completed()
    pending: set = set()

    def submit() -> None:
        job = next(todo, None)
        if job is not None:
            fut = client.submit(_run_slice, job, pure=False)
            pending.add(fut)
            running.add(fut)

    for _ in range(limit):
        submit()
    bar = _progress(progress, len(jobs), desc)
    bar.unit = "slice"
    try:
        with bar:
            for fut in running:
                pending.discard(fut)
                start, values = fut.result()  # re-raises a worker's error, same type
                fut.release()
                out[start * chunk:start * chunk + values.size] = values
                del values
                bar.update()
                submit()
    except BaseException:
        for fut in pending:
            fut.cancel()
        raise
    return out


def unlearn(source: Any, users: Any, *, client: Client, rounds: Any = None,
            alpha: float = 0.0, out: OutputKind = "numpy", progress: bool | None = None,
            exact_accumulator: bool | None = None,
            storage_options: Mapping[str, Any] | None = None,
            slice_values: int = DEFAULT_SLICE_VALUES) -> Any:
    """`medustore.replay.unlearn` on a dask cluster: the same answer, bit for bit.

    ``storage_options`` are what the workers open an ``s3://`` archive with (default: the
    source's ``storage_options`` attribute when it has one); ``slice_values`` caps the model
    values per task (whole chunks, at least one).
    """
    p = plan(source, users, rounds=rounds, alpha=alpha, exact_accumulator=exact_accumulator)
    return run(source, p, client=client, out=out, progress=progress,
               storage_options=storage_options, slice_values=slice_values)


def run(source: Any, p: Plan, *, client: Client, out: OutputKind = "numpy",
        progress: bool | None = None, storage_options: Mapping[str, Any] | None = None,
        slice_values: int = DEFAULT_SLICE_VALUES) -> Any:
    """Carry out a `Plan` made by `medustore.replay.plan` on the same source, on a cluster."""
    _require_client(client)
    ref = archive_ref(source, storage_options)
    index = source.index
    layout, chunk = index.layout, index.settings.chunk
    if p.method == "accumulator":
        common: dict[str, Any] = {"op": "accumulator", "col": index.column(p.users[0])}
    else:
        replay.warn_incomplete(p, index.policy.name, stacklevel=5)
        flat = tuple((k, term) for k, row_terms in enumerate(p.terms) for term in row_terms)
        common = {"op": "replay", "terms": flat, "n_rows": len(p.rows), "alpha": p.alpha}
    jobs = [SliceJob(ref, a, b, **common)
            for a, b in slices(layout.size, chunk, 2 * _n_workers(client), slice_values)]
    result = _gather(client, jobs, layout.size, chunk, progress, "unlearning", None)
    return replay.deliver(layout, result, p, out)


def reconstruct(source: Any, round: int, out: OutputKind = "numpy", *, client: Client,
                progress: bool | None = None, storage_options: Mapping[str, Any] | None = None,
                slice_values: int = DEFAULT_SLICE_VALUES) -> Any:
    """`medustore.replay.reconstruct` on a dask cluster: the same answer, bit for bit."""
    _require_client(client)
    index = source.index
    t = parse_round(round)
    if not index.policy.keep_aggregates:
        raise ValueError(f"this archive's policy ({index.policy.name}) does not keep "
                         "aggregates, so past models cannot be reconstructed")
    ref = archive_ref(source, storage_options)
    before = int(np.searchsorted(index.rounds, t, side="left"))  # rows with round < t
    forward = before <= index.n_rounds - before
    layout, chunk = index.layout, index.settings.chunk
    jobs = [SliceJob(ref, a, b, "reconstruct", before=before, forward=forward)
            for a, b in slices(layout.size, chunk, 2 * _n_workers(client), slice_values)]
    w = _gather(client, jobs, layout.size, chunk, progress, "reconstructing", None)
    return layout.unflatten(w, out)


# ------------------------------------------------------------------------ the worker side


_READERS: OrderedDict[ArchiveRef, tuple[Repository, ArchiveReader]] = OrderedDict()
_READERS_LOCK = threading.Lock()


def _open(ref: ArchiveRef) -> ArchiveReader:
    """This worker's reader of ``ref``'s version (opened once per process, then cached)."""
    with _READERS_LOCK:
        hit = _READERS.get(ref)
        if hit is not None:
            _READERS.move_to_end(ref)
            return hit[1]
        options = dict(ref.storage_options) if ref.storage_options else None
        loc = parse_location(ref.location, storage_options=options)
        repo = Repository.open(loc, write=False)
        if repo is None:
            raise NotAnArchiveError(
                f"{ref.where}: a dask worker finds no medustore archive at {ref.location} "
                "(workers must see local archives at the same path, or use s3://)")
        try:
            if repo.versioned:
                group, sid = repo.snapshot(snapshot_id=ref.snapshot)
            else:
                group, sid = repo.snapshot()
            index = read_index(group, sid, ref.where)
            if index.digest != ref.digest or sid != ref.snapshot:
                raise DamagedArchiveError(
                    f"{ref.where}: a dask worker read another version of the archive "
                    f"(snapshot {sid}, digest {index.digest[:12]}) than the caller's "
                    f"(snapshot {ref.snapshot}, digest {ref.digest[:12]})")
            reader = ArchiveReader(group, index, ref.where)
        except BaseException:
            repo.close()
            raise
        _READERS[ref] = (repo, reader)
        while len(_READERS) > _CACHE_SIZE:
            _, (old, _) = _READERS.popitem(last=False)
            old.close()
        return reader


def _run_slice(job: SliceJob) -> tuple[int, np.ndarray]:
    """One task: ``(first chunk, float64 values of the answer over the job's chunks)``.

    Each step is the local replay's own operation on the slice (elementwise, hence the
    same bits): see `medustore.replay.run`, `_correction` and `reconstruct`.
    """
    reader = _open(job.archive)
    a, b = job.start, job.stop
    rounds = reader.index.rounds

    def model() -> np.ndarray:
        return reader.read("model", (), "latest model w_T", (a, b)).astype(np.float64)

    def aggregate(row: int) -> np.ndarray:
        return reader.read("aggregate", (row,), f"aggregate of round {int(rounds[row])}",
                           (a, b))

    if job.op == "replay":
        latest = model()
        correction = np.zeros(latest.size, dtype=np.float64)
        done_rows = 0  # rows whose terms are all in `correction` (for the alpha skew)
        for k, term in job.terms:
            while done_rows < k:
                if job.alpha:
                    correction *= 1.0 + job.alpha
                done_rows += 1
            if term.kind == "record":
                vec = reader.read("records", (term.record,), term.what, (a, b))
            else:
                vec = aggregate(term.row)
            correction += term.coef * vec
            del vec
        while done_rows < job.n_rows - 1:
            if job.alpha:
                correction *= 1.0 + job.alpha
            done_rows += 1
        return a, latest - correction
    if job.op == "accumulator":
        user = reader.index.users[job.col]
        return a, model() - reader.read("acc", (job.col,), f"accumulator of user {user!r}",
                                        (a, b))
    if job.op == "reconstruct":
        n = reader.index.n_rounds
        if job.forward:
            w = reader.read("initial", (), "initial model w_0", (a, b)).astype(np.float64)
            for row in range(job.before):
                w += aggregate(row)
        else:
            w = model()
            for row in range(job.before, n):
                w -= aggregate(row)
        return a, w
    raise ValueError(f"unknown slice operation {job.op!r}")
