"""`UpdateStore`: a chunked zarr archive of every round's updates, indexed by round and user.

Layout (format 1; ``R`` rows = recorded rounds, ``U`` user columns, ``m`` parameters)::

    run.zarr/            group; attrs["medustore"]: format, model layout, policy, users
      updates   (R, U, m) f4   differentials d_t^u, one chunk per (row, user, model slice)
      aggregate (R, m)    f4   hbar_t per row
      weight    (R, U)    f8   p_u, NaN where u did not take part
      stored    (R, U)    u1   1 where the record of u is stored
      dnorm     (R, U)    f8   ||d_t^u|| of every participant, stored or not
      znorm     (R, U)    f8   norm of the coordinates zeroed by thresholding
      evar      (R, U)    f8   expected squared error norm of the record's lattice coding
      nbytes    (R, U)    i8   encoded bytes of the record
      agg_evar  (R,)      f8   expected squared error norm of the coded aggregate
      anorm     (R,)      f8   ||hbar_t||
      committed (R,)      i8   round number of the row; -1 until the row is committed
      initial   (m,)      f4   w_0, lossless (f8 for float64 models)
      model     (R, m)    f4   w_{t+1}, lossless; only the last committed row is kept
      acc, acc_row             exact per-user accumulators (optional, double-buffered)

A round is written in this order: side arrays, records, aggregate, model, and last the
``committed`` entry of its row; then the previous row's model is
deleted. A round interrupted at any point is therefore invisible after reopening, and the
next `record_round` reuses its row.
Every lossy chunk is written whole, exactly once per attempt.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import zarr
import zarr.codecs
from zarr.core.sync import sync

from medustore.errors import NotAnArchiveError, ReadOnlyError, UnknownUserError
from medustore.layout import ModelLayout, OutputKind
from medustore.policy import MeduPolicy, parse_policy

__all__ = ["FORMAT_VERSION", "UpdateStore", "open_store"]

FORMAT_VERSION = 1
_ATTR = "medustore"
_GROW = 16  # rows / user columns added per resize: resizes rewrite array metadata
# Side arrays: 64 rows x 256 users per chunk. A round rewrites the chunk holding its row;
# zarr stores write a chunk as one object (temp file + rename locally, one PUT on object
# stores), so a rewrite is atomic and a crash leaves the committed rows as they were.
_SIDE_ROWS, _SIDE_USERS = 64, 256
# Lossless arrays carry zstd's content checksum: a damaged chunk fails to decode instead of
# decoding to different numbers (the lossy codecs have their own CRC).
_LOSSLESS = (zarr.codecs.ZstdCodec(level=1, checksum=True),)

Mode = Literal["r", "r+", "a", "w", "w-"]
UserId = int | str


def _user_id(u: Any) -> UserId:
    if isinstance(u, bool) or not isinstance(u, (numbers.Integral, str)):
        raise TypeError(f"user ids must be int or str, got {u!r} ({type(u).__name__})")
    return int(u) if isinstance(u, numbers.Integral) else u


def _round_number(t: Any) -> int:
    if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
        raise ValueError(f"round must be an int >= 0, got {t!r}")
    return int(t)


def _resolve_location(location: Any, mode: Mode) -> Any:
    """A zarr StoreLike for a path, URL or store object."""
    if isinstance(location, Path):
        return str(location)
    if isinstance(location, str) and location.startswith("file://"):
        # zarr's local store (atomic writes, creates folders) rather than fsspec's.
        return location[len("file://"):]
    if isinstance(location, str) and location.startswith("zip://"):
        if mode != "r":
            raise ValueError(
                "zip archives are read-only (zip entries cannot be rewritten in place); "
                "write to a directory and zip the finished archive"
            )
        return zarr.storage.ZipStore(location[len("zip://"):], mode="r")
    return location


def open_store(
    location: Any,
    mode: Mode = "r",
    *,
    model: Any = None,
    policy: str | MeduPolicy | dict | None = None,
    accumulators: bool = False,
) -> UpdateStore:
    """Open or create a medustore archive.

    Parameters
    ----------
    location
        A directory path, a zarr store object, or a URL zarr understands (``file://``,
        ``memory://``, ``s3://...`` through fsspec, ``zip://path.zip`` read-only).
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
    """
    if mode not in ("r", "r+", "a", "w", "w-"):
        raise ValueError(f"mode must be one of 'r', 'r+', 'a', 'w', 'w-', got {mode!r}")
    store_like = _resolve_location(location, mode)
    if mode in ("r", "r+"):
        try:
            group = zarr.open_group(store_like, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
            raise NotAnArchiveError(f"no medustore archive at {location!s}") from err
        except zarr.errors.ContainsArrayError as err:
            raise NotAnArchiveError(
                f"{location!s} is a zarr array, not a medustore archive") from err
        return UpdateStore(group, read_only=mode == "r")
    if mode == "a":
        try:
            group = zarr.open_group(store_like, mode="r+")
            if _ATTR in group.attrs:
                return UpdateStore(group, read_only=False)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            pass
    if model is None:
        raise ValueError(
            "creating an archive needs the model template: medustore.open(path, 'w', "
            "model=state_dict_or_module_or_array)"
        )
    layout = ModelLayout.from_template(model)
    initial = layout.flatten(model, "model template", dtype=np.float64)
    pol = parse_policy(policy)
    try:
        # Only "w" replaces: "a" must not wipe a foreign group or files found at the path.
        group = zarr.open_group(store_like, mode="w" if mode == "w" else "w-")
    except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
        if mode == "a":
            raise FileExistsError(f"{location!s} holds data that is not a medustore archive; "
                                  "replace it with mode 'w'") from None
        raise FileExistsError(
            f"{location!s} already holds data; open it with mode 'r+' or 'a', or replace "
            "it with mode 'w'"
        ) from None
    return UpdateStore._create(group, layout, pol, initial, accumulators)


class UpdateStore:
    """A medustore archive: record rounds, read records, unlearn users.

    Use `medustore.open` to get one; it is a context manager.
    """

    # ------------------------------------------------------------------ creation

    @classmethod
    def _create(cls, group: zarr.Group, layout: ModelLayout, policy: MeduPolicy,
                initial: np.ndarray, accumulators: bool) -> UpdateStore:
        m = layout.size
        c = min(policy.chunk_size, m)
        side = {"chunks": (_SIDE_ROWS, _SIDE_USERS), "compressors": _LOSSLESS}
        group.create_array("updates", shape=(0, 0, m), chunks=(1, 1, c), dtype="f4",
                           fill_value=0.0, **_codec_args(policy.record_serializer()))
        group.create_array("aggregate", shape=(0, m), chunks=(1, c), dtype="f4",
                           fill_value=0.0, **_codec_args(policy.aggregate_serializer()))
        group.create_array("weight", shape=(0, 0), dtype="f8", fill_value=np.nan, **side)
        group.create_array("stored", shape=(0, 0), dtype="u1", fill_value=0, **side)
        for name in ("dnorm", "znorm", "evar"):
            group.create_array(name, shape=(0, 0), dtype="f8", fill_value=0.0, **side)
        group.create_array("nbytes", shape=(0, 0), dtype="i8", fill_value=0, **side)
        for name in ("agg_evar", "anorm"):
            group.create_array(name, shape=(0,), chunks=(_SIDE_ROWS,), dtype="f8",
                               fill_value=0.0, compressors=_LOSSLESS)
        group.create_array("committed", shape=(0,), chunks=(_SIDE_ROWS,), dtype="i8",
                           fill_value=-1, compressors=_LOSSLESS)
        # The model is kept in its own precision: float32 models gain nothing from f8.
        model_dtype = "f8" if any(t.dtype == "<f8" for t in layout.tensors) else "f4"
        group.create_array("initial", shape=(m,), chunks=(c,), dtype=model_dtype,
                           fill_value=0.0, compressors=_LOSSLESS)
        group.create_array("model", shape=(0, m), chunks=(1, c), dtype=model_dtype,
                           fill_value=0.0, compressors=_LOSSLESS)
        group["initial"][:] = initial
        if accumulators:
            group.create_array("acc", shape=(0, 2, m), chunks=(1, 1, c), dtype="f8",
                               fill_value=0.0, compressors=_LOSSLESS)
            group.create_array("acc_row", shape=(0, 2), chunks=(1, 2), dtype="i8",
                               fill_value=-1, compressors=_LOSSLESS)
        group.attrs[_ATTR] = {
            "format": FORMAT_VERSION,
            "layout": layout.to_json(),
            "policy": policy.to_json(),
            "users": [],
            "accumulators": bool(accumulators),
        }
        return cls(group, read_only=False)

    def __init__(self, group: zarr.Group, *, read_only: bool) -> None:
        meta = group.attrs.get(_ATTR)
        if not isinstance(meta, dict):
            raise NotAnArchiveError(
                f"{group.store_path} is a zarr group but not a medustore archive")
        version = meta.get("format")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise NotAnArchiveError(
                f"archive format {version!r} is newer than this medustore reads "
                f"({FORMAT_VERSION}); upgrade medustore"
            )
        self._group = group
        self.read_only = read_only
        self.layout = ModelLayout.from_json(meta["layout"])
        self.policy = MeduPolicy.from_json(meta["policy"])
        self.has_accumulators = bool(meta.get("accumulators", False))
        self._users: list[UserId] = [_user_id(u) for u in meta["users"]]
        self._col = {u: i for i, u in enumerate(self._users)}
        self._a = {name: group[name] for name in (
            "updates", "aggregate", "weight", "stored", "dnorm", "znorm", "evar", "nbytes",
            "agg_evar", "anorm", "committed", "initial", "model")}
        if self.has_accumulators:
            self._a["acc"], self._a["acc_row"] = group["acc"], group["acc_row"]
        self._load_index()

    def _load_index(self) -> None:
        committed = self._a["committed"][:]
        # Rows commit in order, so the committed rows are a prefix; anything after the
        # first gap belongs to an interrupted round.
        n = 0
        while n < committed.size and committed[n] >= 0:
            n += 1
        self._nrows = n
        self._round_of_row = committed[:n].astype(np.int64)
        self._row_of_round = {int(t): i for i, t in enumerate(self._round_of_row)}

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> UpdateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the underlying zarr store."""
        store = self._group.store
        if hasattr(store, "close"):
            store.close()

    def __repr__(self) -> str:
        return (f"<UpdateStore {self._group.store_path} rounds={len(self.rounds)} "
                f"users={len(self._users)} params={self.layout.size} policy={self.policy.name}>")

    # ------------------------------------------------------------------ index

    @property
    def rounds(self) -> list[int]:
        """Committed round numbers, increasing."""
        return [int(t) for t in self._round_of_row]

    @property
    def users(self) -> list[UserId]:
        """Every user id the archive has seen, in order of first appearance."""
        return list(self._users)

    @property
    def location(self) -> str:
        return str(self._group.store_path)

    def _column(self, user: Any) -> int:
        u = _user_id(user)
        if u not in self._col:
            more = " ..." if len(self._users) > 10 else ""
            known = ", ".join(map(repr, self._users[:10])) + more
            raise UnknownUserError(f"user {u!r} is not in this archive (users: {known or 'none'})")
        return self._col[u]

    def _row(self, round: int) -> int:
        t = _round_number(round)
        if t not in self._row_of_round:
            raise ValueError(f"round {t} is not in this archive (it holds {self._rounds_text()})")
        return self._row_of_round[t]

    def _rounds_text(self) -> str:
        r = self.rounds
        if not r:
            return "no rounds"
        return f"{len(r)} rounds, {r[0]}..{r[-1]}"

    def side(self, name: str) -> np.ndarray:
        """A committed side array (``weight``, ``stored``, ``dnorm``, ``znorm``, ``evar``,
        ``nbytes``: shape (rounds, users); ``agg_evar``: shape (rounds,))."""
        arr = self._a[name]
        if arr.ndim == 1:
            return arr[: self._nrows]
        n_users = len(self._users)
        return arr[: self._nrows, :n_users] if self._nrows and n_users else np.zeros(
            (self._nrows, n_users), dtype=arr.dtype)

    def participation(self, user: Any) -> list[int]:
        """Rounds in which ``user`` took part (stored or not)."""
        col = self._column(user)
        if not self._nrows:
            return []
        w = self._a["weight"][: self._nrows, col]
        return [int(t) for t in self._round_of_row[~np.isnan(w)]]

    # ------------------------------------------------------------------ reads

    def record(self, round: int, user: Any, out: OutputKind = "flat") -> Any:
        """The stored (decoded) differential ``d_t^u``, or None if it was not stored."""
        row, col = self._row(round), self._column(user)
        if not self._a["stored"][row, col]:
            return None
        return self.layout.unflatten(self._a["updates"][row, col, :], out)

    def aggregate(self, round: int, out: OutputKind = "flat") -> Any:
        """The (decoded) aggregate update ``hbar_t`` of a round."""
        return self.layout.unflatten(self._a["aggregate"][self._row(round), :], out)

    def initial(self, out: OutputKind = "numpy") -> Any:
        """``w_0``, the model before the first round."""
        return self.layout.unflatten(self._a["initial"][:], out)

    def latest(self, out: OutputKind = "numpy") -> Any:
        """``w_T``, the model after the last committed round (exact)."""
        return self.layout.unflatten(self._latest_vec(), out)

    def _latest_vec(self) -> np.ndarray:
        if not self._nrows:
            return self._a["initial"][:]
        return self._a["model"][self._nrows - 1, :]

    def nbytes_stored(self) -> int:
        """Bytes the archive occupies in its store (every key: data and metadata)."""
        store = self._group.store
        prefix = self._group.path
        return int(sync(store.getsize_prefix(prefix)))

    def nbytes_by_round(self) -> dict[int, int]:
        """Encoded bytes of each committed round's records (aggregate excluded)."""
        per = self.side("nbytes").sum(axis=1) if self._users else np.zeros(self._nrows)
        return {int(t): int(b) for t, b in zip(self._round_of_row, per, strict=True)}

    def nbytes_by_user(self) -> dict[UserId, int]:
        """Encoded bytes of each user's stored records."""
        per = self.side("nbytes").sum(axis=0) if self._nrows else np.zeros(len(self._users))
        return {u: int(b) for u, b in zip(self._users, per, strict=True)}

    # ------------------------------------------------------------------ writes

    def record_round(
        self,
        round: int,
        updates: Mapping[Any, Any] | Iterable[tuple[Any, Any]],
        *,
        weights: Mapping[Any, float] | None = None,
        global_before: Any = None,
    ) -> RoundSummary:
        """Record one round of updates ``h_t^u = w_local - w_global``.

        The store computes the aggregate ``hbar_t = sum p_u h_u / sum p_u`` and the
        differentials ``d_t^u = h_t^u - hbar_t``, applies the policy, writes, and commits
        the round last. Any bad input raises before anything is written.

        Parameters
        ----------
        round
            Round number, above every committed one (rounds may be skipped).
        updates
            ``{user: update}`` or ``(user, update)`` pairs; updates in the model's layout.
        weights
            Aggregation weights ``p_u`` (finite, > 0); default 1 for every user.
        global_before
            The global model ``w_t`` the users started from; defaults to the store's own
            ``w_t``. Give it when the server's model is not ``w_0 + sum hbar``.
        """
        if self.read_only:
            raise ReadOnlyError("this archive is open read-only; open it with mode 'r+' or 'a'")
        t = _round_number(round)
        if self._nrows and t <= self._round_of_row[-1]:
            raise ValueError(
                f"round {t} is not above the last committed round {int(self._round_of_row[-1])}; "
                "rounds must be recorded in increasing order"
            )
        users, vecs = self._parse_updates(updates)
        p = self._parse_weights(users, weights)
        w_before = (self._latest_vec() if global_before is None else
                    self.layout.flatten(global_before, "global_before", dtype=np.float64))
        return self._write_round(t, users, vecs, p, w_before)

    def _parse_updates(self, updates: Any) -> tuple[list[UserId], list[np.ndarray]]:
        pairs = updates.items() if isinstance(updates, Mapping) else updates
        users: list[UserId] = []
        vecs: list[np.ndarray] = []
        seen: set[UserId] = set()
        for item in pairs:
            try:
                user, update = item
            except (TypeError, ValueError):
                raise TypeError("updates must be a mapping or (user, update) pairs") from None
            u = _user_id(user)
            if u in seen:
                raise ValueError(f"user {u!r} appears twice in this round")
            seen.add(u)
            users.append(u)
            vecs.append(self.layout.flatten(update, f"update of user {u!r}"))
        if not users:
            raise ValueError("a round needs at least one user's update")
        return users, vecs

    @staticmethod
    def _parse_weights(users: list[UserId], weights: Mapping[Any, float] | None) -> np.ndarray:
        if weights is None:
            return np.ones(len(users))
        given = {_user_id(u): w for u, w in weights.items()}
        missing = [u for u in users if u not in given]
        extra = [u for u in given if u not in set(users)]
        if missing or extra:
            raise ValueError(f"weights do not match the round's users (missing {missing}, "
                             f"extra {extra})")
        p = np.empty(len(users))
        for i, u in enumerate(users):
            w = given[u]
            if isinstance(w, bool) or not isinstance(w, numbers.Real) or not (
                    math.isfinite(w) and w > 0):
                raise ValueError(f"weight of user {u!r} must be finite and > 0, got {w!r}")
            p[i] = float(w)
        return p

    def _write_round(self, t: int, users: list[UserId], vecs: list[np.ndarray],
                     p: np.ndarray, w_before: np.ndarray) -> RoundSummary:
        pol, m = self.policy, self.layout.size
        P = float(p.sum())
        hbar = np.zeros(m, dtype=np.float64)
        for pu, h in zip(p, vecs, strict=True):
            hbar += (pu / P) * h.astype(np.float64)  # a float32 product would round first
        dvecs = [(h - hbar).astype(np.float32) for h in vecs]
        dnorm = np.array([np.linalg.norm(d.astype(np.float64)) for d in dvecs])
        keep = pol.select(users, p, dnorm, float(np.linalg.norm(hbar)))

        row = self._nrows
        new_users = [u for u in users if u not in self._col]
        self._grow(row + 1, len(self._users) + len(new_users))
        if new_users:  # user table first: a crash leaves only unused columns behind
            meta = dict(self._group.attrs[_ATTR])
            meta["users"] = [*self._users, *new_users]
            self._group.attrs[_ATTR] = meta  # on disk before in memory: a failed write
            self._users.extend(new_users)  # must not leave columns the archive lacks
            self._col.update({u: len(self._col) + i for i, u in enumerate(new_users)})
        cols = np.array([self._col[u] for u in users])
        order = np.argsort(cols)
        cols, keep, dnorm, p = cols[order], keep[order], dnorm[order], p[order]
        dvecs = [dvecs[i] for i in order]
        users = [users[i] for i in order]

        n_users = len(self._users)
        evar = np.zeros(n_users)
        znorm = np.zeros(n_users)
        for i in np.flatnonzero(keep):
            ev, zn, _ = pol.expected_error(dvecs[i])
            evar[cols[i]], znorm[cols[i]] = ev, zn
        weight_row = np.full(n_users, np.nan)
        weight_row[cols] = p
        stored_row = np.zeros(n_users, dtype=np.uint8)
        stored_row[cols[keep]] = 1
        dnorm_row = np.zeros(n_users)
        dnorm_row[cols] = dnorm

        # Side arrays first: after a crash, `stored` names every record chunk to clean up.
        self._clear_stale_row(row, stored_row)
        a = self._a
        a["stored"][row, :n_users] = stored_row
        a["weight"][row, :n_users] = weight_row
        a["dnorm"][row, :n_users] = dnorm_row
        a["znorm"][row, :n_users] = znorm
        a["evar"][row, :n_users] = evar
        kept = np.flatnonzero(keep)
        for i in kept:
            # A basic selection per record: zarr (3.1) takes an integer-array (orthogonal)
            # selection for a partial write of each chunk, read, merged and copied (7x the
            # CPU of zstd-coding 10 records of 1M values).
            a["updates"][row, int(cols[i]), :] = dvecs[i]
        nbytes_row = np.zeros(n_users, dtype=np.int64)
        for i in kept:
            nbytes_row[cols[i]] = self._chunk_bytes("updates", (row, int(cols[i])))
        a["nbytes"][row, :n_users] = nbytes_row
        if pol.keep_aggregates:
            hbar32 = hbar.astype(np.float32)
            a["aggregate"][row, :] = hbar32
            a["agg_evar"][row] = pol.expected_aggregate_error(hbar32)
        a["anorm"][row] = float(np.linalg.norm(hbar))
        if self.has_accumulators:
            self._update_accumulators(row, cols, p, dvecs, hbar, P)
        if row == 0:
            a["initial"][:] = w_before
        a["model"][row, :] = w_before + hbar
        a["committed"][row] = t  # the commit point
        self._nrows = row + 1  # committed: memory follows, whatever the cleanup below does
        self._round_of_row = np.append(self._round_of_row, t)
        self._row_of_round[t] = row
        if row:
            a["model"][row - 1, :] = 0.0  # all-fill chunks are deleted: one model copy
        return RoundSummary(t, len(users), int(keep.sum()), int(nbytes_row.sum()))

    def _grow(self, rows: int, users: int) -> None:
        a = self._a
        shape = a["weight"].shape
        R = max(shape[0], math.ceil(rows / _GROW) * _GROW) if rows > shape[0] else shape[0]
        U = max(shape[1], math.ceil(users / _GROW) * _GROW) if users > shape[1] else shape[1]
        m = self.layout.size
        targets = {name: (R, U) for name in ("weight", "stored", "dnorm", "znorm", "evar",
                                             "nbytes")}  # "weight" first: it sets R, U
        targets.update(updates=(R, U, m), aggregate=(R, m), agg_evar=(R,), anorm=(R,),
                       committed=(R,), model=(R, m))
        if self.has_accumulators:
            targets.update(acc=(U, 2, m), acc_row=(U, 2))
        # Each array on its own: an interrupted grow leaves the arrays in different shapes.
        for name, target in targets.items():
            if a[name].shape != target:
                a[name].resize(tuple(max(x, y) for x, y in zip(a[name].shape, target,
                                                                strict=True)))

    def _clear_stale_row(self, row: int, stored_row: np.ndarray) -> None:
        """Delete record chunks an interrupted attempt left in ``row``, and forget the
        accumulator slots it filled (they would pass for this row's once it commits)."""
        stale = self._a["stored"][row, : stored_row.size]
        for col in np.flatnonzero((stale == 1) & (stored_row == 0)):
            self._a["updates"][row, int(col), :] = 0.0  # all-fill chunks are deleted
        if self.has_accumulators:
            marks = self._a["acc_row"][: stored_row.size, :]
            for col in np.flatnonzero((marks == row).any(axis=1)):
                self._a["acc_row"][int(col), :] = np.where(marks[col] == row, -1, marks[col])

    def _chunk_bytes(self, name: str, prefix: tuple[int, ...]) -> int:
        arr = self._a[name]
        n_chunks = math.ceil(arr.shape[-1] / arr.chunks[-1])
        total = 0
        for k in range(n_chunks):
            try:
                total += int(sync(arr.store.getsize(chunk_key(arr, (*prefix, k)))))
            except FileNotFoundError:
                pass
        return total

    def _update_accumulators(self, row: int, cols: np.ndarray, p: np.ndarray,
                             dvecs: list[np.ndarray], hbar: np.ndarray, P: float) -> None:
        """A^u += p_u d_u / (P - p_u) for every participant, into its stale slot."""
        acc, acc_row = self._a["acc"], self._a["acc_row"]
        for i, col in enumerate(cols):
            col = int(col)
            rows = acc_row[col, :]
            valid = [s for s in (0, 1) if 0 <= rows[s] < row]
            current = max(valid, key=lambda s: rows[s]) if valid else None
            base = acc[col, current, :] if current is not None else np.zeros(hbar.size)
            rest = P - p[i]
            term = hbar if rest <= 0 else (p[i] / rest) * dvecs[i].astype(np.float64)
            target = 1 - current if current is not None else 0
            acc[col, target, :] = base + term
            acc_row[col, target] = row

    def accumulator(self, user: Any) -> np.ndarray | None:
        """The exact accumulator ``A^u`` (float64, flat), or None if not kept."""
        if not self.has_accumulators:
            return None
        col = self._column(user)
        rows = self._a["acc_row"][col, :]
        valid = [s for s in (0, 1) if 0 <= rows[s] < self._nrows]
        if not valid:
            return np.zeros(self.layout.size)
        return self._a["acc"][col, max(valid, key=lambda s: rows[s]), :]

    # ------------------------------------------------------------------ replay

    def unlearn(self, users: Any, *, rounds: Any = None, alpha: float = 0.0,
                out: OutputKind = "numpy", progress: bool | None = None,
                exact_accumulator: bool | None = None) -> Any:
        """The model with the contribution of ``users`` removed; see `medustore.replay`."""
        from medustore.replay import unlearn

        return unlearn(self, users, rounds=rounds, alpha=alpha, out=out, progress=progress,
                       exact_accumulator=exact_accumulator)

    def reconstruct(self, round: int, out: OutputKind = "numpy") -> Any:
        """The global model at the start of ``round``; see `medustore.replay`."""
        from medustore.replay import reconstruct

        return reconstruct(self, round, out=out)

    def error_budget(self, users: Any, *, rounds: Any = None, alpha: float = 0.0,
                     exact_accumulator: bool | None = None) -> Any:
        """How far `unlearn` may be from the exact replay; see `medustore.replay`."""
        from medustore.replay import error_budget

        return error_budget(self, users, rounds=rounds, alpha=alpha,
                            exact_accumulator=exact_accumulator)

    def iter_rows(self) -> Iterator[tuple[int, int]]:
        """``(row, round)`` of every committed row."""
        for row, t in enumerate(self._round_of_row):
            yield row, int(t)


class RoundSummary(NamedTuple):
    """What `UpdateStore.record_round` wrote."""

    round: int
    participants: int
    stored: int
    nbytes: int


def chunk_key(arr: zarr.Array, coords: tuple[int, ...]) -> str:
    """Store key of the chunk of ``arr`` at chunk coordinates ``coords``."""
    key = arr.metadata.encode_chunk_key(coords)
    return f"{arr.path}/{key}" if arr.path else key


def _codec_args(serializer: dict | None) -> dict:
    if serializer is None:
        return {"compressors": _LOSSLESS}
    return {"serializer": serializer, "compressors": None}
