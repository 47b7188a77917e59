"""`UpdateStore`: an archive of every round's updates, indexed by round and user.

Format 2 archives are Icechunk repositories holding one Zarr v3 group laid out as
`medustore.archive.table` declares. One round is one commit: its records, aggregate, index
rows, user table rows, accumulators and the new model become visible together or not at
all. A reader works on the version it opened, whatever writers commit afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import zarr

from medustore import replay
from medustore.archive.reader import FORMAT_VERSION, ArchiveReader, read_index
from medustore.archive.repository import Repository, Retention
from medustore.archive.storage import parse_location
from medustore.errors import NotAnArchiveError, ReadOnlyError
from medustore.index import ArchiveIndex, Settings, UserId, parse_round
from medustore.layout import ModelLayout, OutputKind
from medustore.pipeline import Pipeline
from medustore.policy import MeduPolicy, parse_policy
from medustore.writer import (
    Ahead,
    RoundSummary,
    create_arrays,
    local_updates,
    plan_round,
    write_round,
)

__all__ = ["FORMAT_VERSION", "RoundSummary", "UpdateStore", "UserId", "open_store"]

Mode = Literal["r", "r+", "a", "w", "w-"]


def open_store(
    location: Any,
    mode: Mode = "r",
    *,
    model: Any = None,
    policy: str | MeduPolicy | dict | None = None,
    accumulators: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    as_of_round: int | None = None,
    retention: Retention | None = None,
    pipeline: int = 0,
) -> UpdateStore:
    """Open or create a medustore archive.

    Parameters
    ----------
    location
        A directory path or ``file://`` URL, ``memory://NAME`` (this process only),
        ``s3://bucket/prefix``, or a plain Zarr snapshot written by ``medustore export``
        (a directory, a ``.zip`` path or ``zip://`` URL; read-only).
    mode
        ``"r"`` read only; ``"r+"`` read/write, must exist; ``"a"`` read/write, created if
        missing; ``"w"`` create, replacing what is there; ``"w-"`` create, fail if it exists.
    model
        Template of the model (numpy dict, flat vector, torch ``state_dict`` or
        ``nn.Module``); needed to create an archive. Its values become ``w_0``.
    policy
        Preset name (``"full"``, ``"lattice"``, ``"medu"``), a `MeduPolicy` or its JSON
        form; used when creating (default ``"medu"``).
    accumulators
        When creating: also keep exact per-user accumulators (single-user unlearning in
        O(m) whatever the number of rounds, at O(U m) float64 storage).
    storage_options
        For ``s3://``: ``region``, ``endpoint_url``, ``allow_http``, ``access_key_id``,
        ``secret_access_key``, ``session_token``, ``anonymous``, ``from_env``,
        ``force_path_style``, ``requester_pays``.
    as_of_round
        Read-only: open the archive as it was right after this round was committed
        (the version must still be kept: see `Retention` and `UpdateStore.tag`).
    retention
        Which old versions a writer keeps (default `Retention()`: the latest, and versions
        replaced in the last minute for readers that hold them).
    pipeline
        Writers: commit rounds in the background, at most this many waiting
        (`medustore.pipeline`): `UpdateStore.record_round` returns once the round is
        validated and planned (the next model is known), coding and the commit overlap the
        next round's training. `UpdateStore.flush` waits for them; reads and `close` do too.
        0 (default): every round is committed before `record_round` returns.
    """
    if mode not in ("r", "r+", "a", "w", "w-"):
        raise ValueError(f"mode must be one of 'r', 'r+', 'a', 'w', 'w-', got {mode!r}")
    if as_of_round is not None and mode != "r":
        raise ValueError("as_of_round opens a past version read-only: use mode 'r'")
    retention = retention or Retention()
    creating = mode in ("w", "w-")
    loc = parse_location(location, storage_options=storage_options, create=creating)
    if not creating:
        repo = Repository.open(loc, write=mode != "r")
        if repo is not None:
            try:
                if mode != "r" and not repo.versioned:
                    _ = UpdateStore(repo, read_only=True)  # a format-1 archive says so here
                    raise ReadOnlyError(f"{loc.text} is a plain Zarr snapshot (an export): "
                                        "read-only; open it with mode 'r'")
                store = UpdateStore(repo, read_only=mode == "r", as_of_round=as_of_round,
                                    retention=retention, pipeline=pipeline)
                store.storage_options = dict(storage_options) if storage_options else None
                return store
            except BaseException:
                repo.close()
                raise
        if mode in ("r", "r+"):
            raise NotAnArchiveError(f"no medustore archive at {loc.text}")
    if model is None:
        raise ValueError(
            "creating an archive needs the model template: medustore.open(path, 'w', "
            "model=state_dict_or_module_or_array)")
    layout = ModelLayout.from_template(model)
    initial = layout.flatten(model, "model template", dtype=np.float64)
    pol = parse_policy(policy)
    if mode == "a":
        loc = parse_location(location, storage_options=storage_options, create=True)
    repo = Repository.create(loc, replace=mode == "w")
    try:
        # The model is kept in its own precision: float32 models gain nothing from f8.
        model_dtype = "f8" if any(t.dtype == "<f8" for t in layout.tensors) else "f4"
        settings = Settings(FORMAT_VERSION, layout, pol, bool(accumulators),
                            min(pol.chunk_size, layout.size), model_dtype)
        session = repo.initial_transaction()
        group = zarr.open_group(session.store, mode="w")
        create_arrays(group, settings, {"record": pol.record_serializer(),
                                        "aggregate": pol.aggregate_serializer()}, initial)
        session.commit("create archive", metadata={"medustore": {"round": None}})
        store = UpdateStore(repo, read_only=False, retention=retention, pipeline=pipeline)
        store.storage_options = dict(storage_options) if storage_options else None
        return store
    except BaseException:
        repo.close()
        raise


class UpdateStore:
    """A medustore archive: record rounds, read records, unlearn users.

    Use `medustore.open` to get one; it is a context manager. ``store.index`` (an
    `ArchiveIndex`) and ``store.reader`` (an `ArchiveReader`) are the read contract.
    """

    def __init__(self, repo: Repository, *, read_only: bool, as_of_round: int | None = None,
                 retention: Retention | None = None, pipeline: int = 0) -> None:
        self._repo = repo
        self.read_only = read_only
        if pipeline and read_only:
            raise ValueError("pipeline=N queues rounds for a writer: open with mode 'r+', "
                             "'a' or 'w'")
        self._pipeline = Pipeline(pipeline) if pipeline else None
        self._ahead: Ahead | None = None  # planning state past the committed index
        self.retention = retention or Retention()
        #: The options the archive was opened with (distributed replay passes them on).
        self.storage_options: dict | None = None
        self._since_compact = 0  # rounds committed since this writer last compacted
        self._open_version(as_of_round)

    def _open_version(self, as_of_round: int | None = None) -> None:
        group, sid = self._repo.snapshot(None if as_of_round is None else
                                         parse_round(as_of_round))
        # A reader loads what it is asked for; a writer needs every user and entry.
        self._committed = read_index(group, sid, self.location, lazy=self.read_only)
        self._reader: ArchiveReader | None = ArchiveReader(group, self._committed,
                                                           self.location)
        self._latest: np.ndarray | None = None  # w_T as the writer last wrote it

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> UpdateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Commit the queued rounds (pipelined stores), compact (writers, unless
        ``Retention(every=0)``) and release the archive; a round that failed in the
        background raises here, after the archive is released."""
        if self._repo is None:
            return
        try:
            if self._pipeline is not None:
                pipe, self._pipeline = self._pipeline, None
                pipe.close()
            if not self.read_only and self.retention.every and self._repo.versioned:
                self._repo.compact(self.retention)
        finally:
            self._repo.close()
            self._repo = None

    def __repr__(self) -> str:
        idx = self._index
        return (f"<UpdateStore {self.location} rounds={idx.n_rounds} users={len(idx.users)} "
                f"params={idx.layout.size} policy={idx.policy.name}>")

    # ------------------------------------------------------------------ the read contract

    @property
    def _index(self) -> ArchiveIndex:
        # The committed index; with rounds queued in the background (pipeline=N), it waits
        # for them first, so that every read sees every round recorded.
        if self._pipeline is not None:
            self._pipeline.flush()
        return self._committed

    @property
    def index(self) -> ArchiveIndex:
        """The frozen index of the version this store holds."""
        return self._index

    @property
    def reader(self) -> ArchiveReader:
        """Checked reads of the version this store holds."""
        _ = self._index  # waits for queued rounds
        return self._committed_reader()

    def _committed_reader(self) -> ArchiveReader:
        if self._reader is None:
            group, _ = self._repo.snapshot(snapshot_id=self._committed.snapshot)
            self._reader = ArchiveReader(group, self._committed, self.location)
        return self._reader

    # Settings never change: no need to wait for queued rounds.
    @property
    def layout(self) -> ModelLayout:
        return self._committed.layout

    @property
    def policy(self) -> MeduPolicy:
        return self._committed.policy

    @property
    def has_accumulators(self) -> bool:
        return self._committed.settings.accumulators

    @property
    def rounds(self) -> list[int]:
        """Committed round numbers, increasing."""
        return [int(t) for t in self._index.rounds]

    @property
    def users(self) -> list[UserId]:
        """Every user id the archive has seen, in order of first appearance."""
        return list(self._index.users)

    @property
    def location(self) -> str:
        return self._repo.location.text

    @property
    def snapshot_id(self) -> str | None:
        """Id of the version this store reads (None for plain Zarr snapshots)."""
        return self._index.snapshot

    def participation(self, user: Any) -> list[int]:
        """Rounds in which ``user`` took part (stored or not)."""
        return self._index.participation(user)

    def side(self, name: str) -> np.ndarray:
        """A per-participation fact as a dense (rounds, users) table: ``weight`` (NaN where
        the user did not take part), ``stored``, ``dnorm``, ``znorm``, ``evar``, ``nbytes``;
        or a per-round one: ``anorm``, ``agg_evar``."""
        if name in ("anorm", "agg_evar"):
            return np.array(getattr(self._index, name))
        return self._index.dense(name)

    # ------------------------------------------------------------------ reads

    def record(self, round: int, user: Any, out: OutputKind = "flat") -> Any:
        """The stored (decoded) differential ``d_t^u``, or None if it was not stored (or the
        user did not take part)."""
        row, col = self._index.row(round), self._index.column(user)
        vec = self.reader.record_of(row, col)
        return None if vec is None else self.layout.unflatten(vec, out)

    def aggregate(self, round: int, out: OutputKind = "flat") -> Any:
        """The (decoded) aggregate update ``hbar_t`` of a round."""
        return self.layout.unflatten(self.reader.aggregate(self._index.row(round)), out)

    def initial(self, out: OutputKind = "numpy") -> Any:
        """``w_0``, the model before the first round."""
        return self.layout.unflatten(self.reader.initial(), out)

    def latest(self, out: OutputKind = "numpy") -> Any:
        """``w_T``, the model after the last committed round (exact)."""
        return self.layout.unflatten(self.reader.model(), out)

    def accumulator(self, user: Any) -> np.ndarray | None:
        """The exact accumulator ``A^u`` (float64, flat), or None if not kept."""
        if not self.has_accumulators:
            return None
        return self.reader.accumulator(self._index.column(user))

    def nbytes_stored(self) -> int:
        """Bytes the archive occupies: on disk for a local archive (every kept version and
        the repository's metadata); elsewhere, the bytes of this version's objects."""
        on_disk = self._repo.nbytes()
        return self.reader.nbytes_stored() if on_disk is None else on_disk

    def nbytes_by_round(self) -> dict[int, int]:
        """Encoded bytes of each committed round's records (aggregate excluded)."""
        idx = self._index
        per = np.add.reduceat(idx.entry_nbytes, idx.start[:-1]) if idx.n_rounds else []
        return {int(t): int(b) for t, b in zip(idx.rounds, per, strict=True)}

    def nbytes_by_user(self) -> dict[UserId, int]:
        """Encoded bytes of each user's stored records."""
        idx = self._index
        per = np.bincount(idx.entry_user, weights=idx.entry_nbytes, minlength=len(idx.users))
        return {u: int(b) for u, b in zip(idx.users, per, strict=True)}

    def iter_rows(self) -> Iterator[tuple[int, int]]:
        """``(row, round)`` of every committed row."""
        for row, t in enumerate(self._index.rounds):
            yield row, int(t)

    # ------------------------------------------------------------------ writes

    def record_round(
        self,
        round: int,
        updates: Mapping[Any, Any] | Iterable[tuple[Any, Any]] | None = None,
        *,
        models: Mapping[Any, Any] | None = None,
        weights: Mapping[Any, float] | None = None,
        global_before: Any = None,
    ) -> RoundSummary:
        """Record one round of updates ``h_t^u = w_local - w_global`` as one commit.

        The store computes the aggregate ``hbar_t = sum p_u h_u / sum p_u`` and the
        differentials ``d_t^u = h_t^u - hbar_t``, applies the policy and commits the round
        whole. Any bad input raises before anything is written.

        Parameters
        ----------
        round
            Round number, above every committed one (rounds may be skipped).
        updates
            ``{user: update}`` or ``(user, update)`` pairs; updates in the model's layout.
        models
            Instead of ``updates``: ``{user: local model}`` (modules, state_dicts or arrays
            after local training); the store subtracts the global model ``w_t`` itself.
        weights
            Aggregation weights ``p_u`` (finite, > 0); default 1 for every user.
        global_before
            The global model ``w_t`` the users started from; defaults to the store's own
            ``w_t``. Give it when the server's model is not ``w_0 + sum hbar``.

        Raises
        ------
        ConcurrentWriteError
            Another writer committed since this store read the archive (nothing written).
        """
        if self.read_only:
            raise ReadOnlyError("this archive is open read-only; open it with mode 'r+' or 'a'")
        pipe = self._pipeline
        if pipe is not None:
            pipe.check()
        if self._latest is None:
            self._latest = self._committed_reader().model()
        w_before = (self._latest.astype(np.float64) if global_before is None else
                    self.layout.flatten(global_before, "global_before", dtype=np.float64))
        if (updates is None) == (models is None):
            raise TypeError("record_round takes either updates= (w_local - w_global) or "
                            "models= (the local models), not both or neither")
        if models is not None:
            updates = local_updates(self.layout, models, w_before)
        if pipe is None:
            plan = plan_round(self._committed, round, updates, weights, w_before)
            nbytes = self._commit(plan)
            return RoundSummary(plan.round, len(plan.users), int(plan.keep.sum()), nbytes)
        if self._ahead is None:
            self._ahead = Ahead(self._committed)
        plan = plan_round(self._ahead, round, updates, weights, w_before)
        self._ahead.planned(plan)
        self._latest = plan.model
        pipe.submit(lambda: self._commit(plan), f"round {plan.round}")
        return RoundSummary(plan.round, len(plan.users), int(plan.keep.sum()), None)

    def _commit(self, plan: Any) -> int:
        """Write and commit a planned round (in the caller's thread, or the pipeline's)."""
        with self._repo.transaction(parent=self._committed.snapshot, round=plan.round,
                                    message=f"round {plan.round}") as (group, done):
            # Accumulator rows are read from the committed version only when the archive
            # keeps them: reopening that version costs 15-30 ms per round otherwise.
            index, nbytes = write_round(group, self._committed, plan,
                                        lambda col: self._committed_reader().accumulator(col))
        self._committed = _with_snapshot(index, done[0])
        self._reader = None  # opened again when a read needs it
        if self._pipeline is None:  # (pipelined: w_T moved on when the round was planned)
            self._latest = plan.model  # only once committed: a failed round changes nothing
        self._since_compact += 1
        if self.retention.due(self._since_compact, index.n_rounds):
            self._repo.compact(self.retention, sweep=False)
            self._since_compact = 0
        return nbytes

    def flush(self) -> None:
        """Wait until every recorded round is committed (pipelined stores; a no-op
        otherwise); raises the error of a round that failed in the background."""
        if self._pipeline is not None:
            self._pipeline.flush()
            self._ahead = None  # planning starts again from the committed index

    # ------------------------------------------------------------------ versions

    def versions(self) -> list[int]:
        """Rounds whose version the archive still keeps (`medustore.open(as_of_round=)`)."""
        if not self._repo.versioned:
            return []
        return sorted({t for t, _ in self._repo.versions()})

    def tag(self, round: int) -> None:
        """Keep the version right after ``round`` for good (exempt from retention)."""
        self._repo.tag(parse_round(round))

    def compact(self, *, grace: float | None = None) -> Any:
        """Expire the versions retention does not keep and delete what only they used.

        ``grace=0`` also expires versions replaced moments ago: use it only when no reader
        holds an older version (a finished run, before measuring its size).
        """
        if self.read_only:
            raise ReadOnlyError("compacting needs the archive open for writing")
        return self._repo.compact(self.retention, grace)

    def garbage(self) -> Any:
        """What a compaction would delete now (Icechunk's summary of a dry run: objects of
        interrupted writes and expired versions), or None for a plain Zarr snapshot."""
        return self._repo.garbage() if self._repo.versioned else None

    # ------------------------------------------------------------------ replay

    def unlearn(self, users: Any, *, rounds: Any = None, alpha: float = 0.0,
                out: OutputKind = "numpy", progress: bool | None = None,
                exact_accumulator: bool | None = None, client: Any = None,
                **kwargs: Any) -> Any:
        """The model with the contribution of ``users`` removed; see `medustore.replay`
        (``client``: a ``dask.distributed.Client`` to split the replay across workers)."""
        return replay.unlearn(self, users, rounds=rounds, alpha=alpha, out=out,
                              progress=progress, exact_accumulator=exact_accumulator,
                              client=client, **kwargs)

    def reconstruct(self, round: int, out: OutputKind = "numpy", *, client: Any = None) -> Any:
        """The global model at the start of ``round``; see `medustore.replay`."""
        return replay.reconstruct(self, round, out=out, client=client)

    def error_budget(self, users: Any, *, rounds: Any = None, alpha: float = 0.0,
                     exact_accumulator: bool | None = None) -> Any:
        """How far `unlearn` may be from the exact replay; see `medustore.replay`."""
        return replay.error_budget(self, users, rounds=rounds, alpha=alpha,
                                   exact_accumulator=exact_accumulator)


def _with_snapshot(index: ArchiveIndex, sid: str) -> ArchiveIndex:
    return replace(index, snapshot=sid)

