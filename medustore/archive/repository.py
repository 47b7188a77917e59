"""Transactions: one round is one Icechunk commit; readers keep the snapshot they opened.

`Repository` wraps an Icechunk repository (or a plain, read-only Zarr snapshot) with what
medustore needs of it:

- `snapshot` opens a read-only group at the latest commit or as of a round;
- `transaction` opens a writable group whose commit fails with `ConcurrentWriteError` when
  anything was committed since the writer last read the archive;
- local archives take a lock file for the writer's whole life (Icechunk's local storage is
  not safe for simultaneous commits), so a second writer is refused when it opens;
- `compact` expires old versions and garbage-collects what only they used.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock
import icechunk
import zarr

from medustore.archive.reader import read_settings
from medustore.archive.storage import Location
from medustore.errors import (
    ConcurrentWriteError,
    DamagedArchiveError,
    NotAnArchiveError,
    VersionNotKeptError,
    first_line,
)

__all__ = ["BRANCH", "Repository", "Retention", "lock_path"]

BRANCH = "main"
_TAG = "round-{}"
# Splitting manifests along the growing dimension keeps a commit's manifest writes to the
# last split instead of every chunk reference of the array (O(R) per commit otherwise).
_SPLIT_ROWS = 1024


@dataclass(frozen=True)
class Retention:
    """Which versions of an archive are kept.

    Parameters
    ----------
    keep_versions
        Most recent round versions kept for ``as_of_round`` (1: the latest only). Versions of
        tagged rounds (`UpdateStore.tag`) are kept whatever this says.
    grace
        Seconds a replaced version is kept, so that readers that opened it can finish.
        A reader holding a version longer than that may see it expire (it then raises; it
        never reads another version's data).
    every
        Compact (expire + garbage-collect) at most every ``every`` rounds, and when the
        writer closes; 0 never compacts automatically. A compaction took 2-12 ms in
        bench_store (40 rounds, 1M parameters), while each kept version holds a model copy:
        the default allows one at every commit.
    spacing
        ... and at least ``spacing`` times the rounds committed apart. Garbage collection
        walks every chunk of the archive, so compacting after every round would make a
        round's cost grow with the archive (0.1 s a round after 200 rounds of 1,000
        participants); spacing them in proportion keeps its share of a round's cost
        constant, and holds at most ``spacing`` x rounds superseded versions (e.g. model
        copies) until the next one. 0: every ``every`` rounds.
    """

    keep_versions: int = 1
    grace: float = 60.0
    every: int = 1
    spacing: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.keep_versions, bool) or not isinstance(self.keep_versions, int) or \
                self.keep_versions < 1:
            raise ValueError(f"Retention: keep_versions must be an int >= 1, got "
                             f"{self.keep_versions!r}")
        if not self.grace >= 0:
            raise ValueError(f"Retention: grace must be >= 0 seconds, got {self.grace!r}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 0:
            raise ValueError(f"Retention: every must be an int >= 0, got {self.every!r}")
        if not 0 <= self.spacing <= 1:
            raise ValueError(f"Retention: spacing must be in [0, 1], got {self.spacing!r}")

    def due(self, since: int, rounds: int) -> bool:
        """Whether to compact after a commit, ``since`` rounds after the last compaction
        of an archive of ``rounds`` rounds."""
        return bool(self.every) and since >= max(self.every, self.spacing * rounds)


def _config() -> icechunk.RepositoryConfig:
    config = icechunk.RepositoryConfig.default()
    grow = icechunk.ManifestSplitCondition.AnyArray()
    config.manifest = icechunk.ManifestConfig(splitting=icechunk.ManifestSplittingConfig.from_dict(
        {grow: {icechunk.ManifestSplitDimCondition.Axis(0): _SPLIT_ROWS}}))
    return config


def lock_path(path: Path) -> Path:
    """The writer's lock file of a local archive: hidden, beside the archive's directory
    (Icechunk creates repositories only in empty directories)."""
    return path.parent / f".{path.name}.lock"


def _remove_staging(root: Path, before: dt.datetime) -> None:
    """Delete half-written objects (``NAME#N``) of writers killed mid-write: Icechunk's file
    storage renames them into place when complete, and its listings (hence its garbage
    collection) skip them. Compaction runs under the writer's lock: none is in flight."""
    limit = before.timestamp()
    for p in root.rglob("*#*"):
        if p.is_file() and re.fullmatch(r".+#\d+", p.name) and p.stat().st_mtime < limit:
            p.unlink(missing_ok=True)


#: Counters of Icechunk's garbage-collection summary (any non-zero: there is garbage).
_GC_FIELDS = ("chunks_deleted", "manifests_deleted", "snapshots_deleted",
              "attributes_deleted", "transaction_logs_deleted", "bytes_deleted")


def _remove_repo_backups(root: Path, before: dt.datetime) -> None:
    """Delete Icechunk 2's backups of its repository-info object (``overwritten/repo.*``,
    one per commit, each as large as the whole ops log): no read, commit or expiry uses
    them, and they would grow a compacted archive by O(history) bytes per round."""
    limit = before.timestamp()
    folder = root / "overwritten"
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_file() and p.name.startswith("repo.") and p.stat().st_mtime < limit:
                p.unlink(missing_ok=True)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Repository:
    """An archive's versioned storage (see the module docstring)."""

    def __init__(self, location: Location, repo: icechunk.Repository | None,
                 lock: filelock.BaseFileLock | None = None) -> None:
        self.location = location
        self._repo = repo
        self._lock = lock

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, location: Location, *, write: bool) -> Repository | None:
        """The repository at ``location``, or None when there is none."""
        if not location.is_repository:
            return cls(location, None)
        if location.kind == "local" and not location.path.exists():
            return None  # asking Icechunk would create the directory
        try:
            if location.storage is None or not icechunk.Repository.exists(location.storage):
                return None
        except icechunk.IcechunkError as err:
            raise NotAnArchiveError(f"{location.text}: the storage does not answer: "
                                    f"{first_line(err)}") from None
        lock = cls._acquire(location) if write else None
        try:
            return cls(location, icechunk.Repository.open(location.storage), lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    @classmethod
    def create(cls, location: Location, *, replace: bool) -> Repository:
        """A new, empty repository (``replace``: wipe a local directory's contents first)."""
        lock = None
        if location.kind == "local":
            location.path.mkdir(parents=True, exist_ok=True)
            lock = cls._acquire(location)
            leftovers = list(location.path.iterdir())
            if leftovers and not replace:
                lock.release()
                raise FileExistsError(
                    f"{location.text} already holds data; open it with mode 'r+' or 'a', or "
                    "replace it with mode 'w'")
            for p in leftovers:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif location.kind == "s3" and icechunk.Repository.exists(location.storage):
            raise FileExistsError(
                f"{location.text} already holds an archive; replacing one on object storage "
                "is not supported: delete the prefix first or choose another one")
        try:
            repo = icechunk.Repository.create(location.storage, config=_config())
            repo.save_config()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return cls(location, repo, lock)

    @staticmethod
    def _acquire(location: Location) -> filelock.BaseFileLock | None:
        if location.kind != "local":
            return None  # object storage: the commit itself refuses a stale writer
        path = lock_path(location.path)
        lock = filelock.FileLock(path, timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise ConcurrentWriteError(
                f"{location.text} is open for writing by another writer (lock file {path}); "
                "close it first, or open this one read-only with mode 'r'") from None
        return lock

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        store = self.location.store
        if store is not None and getattr(store, "_is_open", True):  # an unopened ZipStore
            store.close()                                           # cannot close

    # ------------------------------------------------------------------ reading

    @property
    def versioned(self) -> bool:
        return self._repo is not None

    def snapshot(self, as_of_round: int | None = None,
                 snapshot_id: str | None = None) -> tuple[zarr.Group, str | None]:
        """A read-only root group at the latest version (or as of a round, or at a snapshot
        id) and the id of its version."""
        if self._repo is None:
            group = zarr.open_group(self.location.store, path=self.location.group_path,
                                    mode="r")
            if as_of_round is not None:
                read_settings(group, self.location.text)  # a format-1 archive says so first
                raise VersionNotKeptError(
                    f"{self.location.text} is a plain Zarr snapshot: it keeps no other "
                    "versions (export the round you need with `medustore export "
                    "--as-of-round`)")
            return group, None
        if snapshot_id is None and as_of_round is not None:
            snapshot_id = self.snapshot_of(as_of_round)
        if snapshot_id is None:
            session = self._repo.readonly_session(branch=BRANCH)
        else:
            session = self._repo.readonly_session(snapshot_id=snapshot_id)
        return zarr.open_group(session.store, mode="r"), session.snapshot_id

    def versions(self) -> list[tuple[int, str]]:
        """``(round, snapshot id)`` of every kept round version, newest first: the branch's
        history and the tagged rounds. (Icechunk 1 keeps an expired tagged snapshot under
        its tag only, Icechunk 2 also in the branch's history: both read the same here.)"""
        kept: dict[str, int] = {}
        for info in self._repo.ancestry(branch=BRANCH):
            meta = (info.metadata or {}).get("medustore")
            if isinstance(meta, dict) and isinstance(meta.get("round"), int):
                kept.setdefault(info.id, meta["round"])
        for name in self._repo.list_tags():
            tagged = re.fullmatch(r"round-(\d+)", name)
            if tagged:
                kept.setdefault(self._repo.lookup_tag(name), int(tagged.group(1)))
        return sorted(((t, sid) for sid, t in kept.items()), key=lambda v: v[0], reverse=True)

    def snapshot_of(self, round: int) -> str:
        """The snapshot id of the version committed by ``round``."""
        try:
            return self._repo.lookup_tag(_TAG.format(round))
        except icechunk.IcechunkError:
            pass
        kept = self.versions()
        for t, sid in kept:
            if t == round:
                return sid
        rounds = sorted(t for t, _ in kept)
        raise VersionNotKeptError(
            f"{self.location.text} keeps no version as of round {round} (kept: "
            f"{', '.join(map(str, rounds)) or 'none'}; tagged: "
            f"{', '.join(sorted(self._repo.list_tags())) or 'none'}); keep more with "
            "Retention(keep_versions=N) or tag rounds with store.tag(round)")

    # ------------------------------------------------------------------ writing

    @contextmanager
    def transaction(self, *, parent: str | None, round: int,
                    message: str) -> Iterator[tuple[zarr.Group, list[str]]]:
        """A writable root group; committed on a clean exit, discarded on an exception.

        ``parent`` is the snapshot this writer last saw (None: the first transaction of a
        new repository); the id of the new snapshot is appended to the yielded list.
        """
        session = self._repo.writable_session(BRANCH)
        if parent is not None and session.snapshot_id != parent:
            raise ConcurrentWriteError(
                f"{self.location.text}: another writer committed since this one opened the "
                "archive; reopen it to continue from the new state")
        done: list[str] = []
        group = zarr.open_group(session.store, mode="r+")
        yield group, done
        try:
            sid = session.commit(message, metadata={"medustore": {"round": round}})
        except icechunk.ConflictError:
            raise ConcurrentWriteError(
                f"{self.location.text}: another writer committed round data first; this "
                f"writer's round {round} was not written. Reopen the archive to continue "
                "from the new state") from None
        done.append(sid)

    def initial_transaction(self) -> Any:
        """Writable session of a new repository, to lay the archive out."""
        return self._repo.writable_session(BRANCH)

    def tag(self, round: int) -> None:
        """Keep the version committed by ``round`` whatever the retention says."""
        sid = self.snapshot_of(round)
        name = _TAG.format(round)
        if name not in self._repo.list_tags():
            self._repo.create_tag(name, sid)

    def compact(self, retention: Retention, grace: float | None = None, *,
                sweep: bool = True) -> Any:
        """Expire versions that retention does not keep and delete what only they used.

        A version replaced less than ``grace`` seconds ago is kept (readers may hold it).
        ``sweep`` also deletes the half-written files of killed writers (local archives): a
        walk of the whole directory, done when a writer closes or compacts explicitly, not
        after every round.
        Returns Icechunk's garbage-collection summary, or None when nothing could expire.
        """
        grace = retention.grace if grace is None else grace
        snaps = list(self._repo.ancestry(branch=BRANCH))
        if len(snaps) < 2:
            return None
        limit = _now() - dt.timedelta(seconds=grace)
        keep = min(retention.keep_versions, len(snaps)) - 1
        while keep + 1 < len(snaps) and snaps[keep].written_at > limit:
            keep += 1  # snapshot keep+1 was replaced by snaps[keep] within the grace
        cutoff = snaps[keep].written_at
        # Icechunk 2 records every expiry and collection in its ops log (a write, even when
        # nothing changes): run each only when it has work, so that opening a writer, or a
        # refused round, leaves the archive byte-identical as on Icechunk 1.
        try:
            tagged = {self._repo.lookup_tag(name) for name in self._repo.list_tags()}
            if any(s.id not in tagged for s in snaps[keep + 1:-1]):  # snaps[-1]: the root
                self._repo.expire_snapshots(cutoff)
            summary = self._repo.garbage_collect(cutoff, dry_run=True)
            if any(getattr(summary, field, 0) for field in _GC_FIELDS):
                summary = self._repo.garbage_collect(cutoff)
        except icechunk.IcechunkError as err:
            raise DamagedArchiveError(f"{self.location.text}: compaction failed: {err}") from err
        if self.location.kind == "local":
            if sweep:
                _remove_staging(self.location.path, cutoff)
            _remove_repo_backups(self.location.path, cutoff)
        return summary

    def nbytes(self) -> int | None:
        """Bytes on disk of a local archive (every object of every kept version, the
        repository's own metadata included); None elsewhere."""
        path = self.location.path
        if path is None or not path.exists():
            return None
        if path.is_file():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    def garbage(self) -> Any:
        """What a compaction would delete now (a dry run)."""
        return self._repo.garbage_collect(_now(), dry_run=True)
