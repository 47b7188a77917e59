"""`verify`: decode every chunk of an archive and check that its index agrees with it.

Checks, in order:

1. metadata: the model layout is contiguous and its size matches every array; the side
   arrays share one shape; user ids are unique;
2. index: committed rounds increase, and no row after the first uncommitted one is committed;
3. side arrays (every committed row): weights positive and finite where the user took part,
   NaN elsewhere, and at least one participant per round; ``stored`` only for participants;
   norms, error variances and byte counts finite and non-negative, zero where nothing is
   stored;
4. records: every stored record decodes (each chunk) to finite values of the right size;
   its chunks on disk add up to ``nbytes``; its decoded norm agrees with ``dnorm``
   (within float tolerance for lossless records, within the lattice noise for lossy ones);
   no record chunk exists where ``stored`` says none is;
5. aggregates, ``initial``, the last model row and the accumulators decode to finite values.

zarr never writes a chunk whose values all equal the fill value (0), so an absent chunk
reads as zeros. For records, ``nbytes`` tells a deleted chunk from a zero one. For
aggregates and accumulators an absent chunk is accepted when the model did not move on that
slice (frozen parameters) or, for an aggregate, when the round's stored records lack that
chunk too. An absent chunk of ``initial`` or of the last model is reported: it is exactly
zero only for a model initialised to zeros on a whole chunk.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm
from zarr.core.sync import sync

from medustore.replay import PREFETCH
from medustore.archive.reader import chunk_key

if TYPE_CHECKING:
    import zarr

    from medustore.store import UpdateStore, UserId

__all__ = ["Problem", "VerifyReport", "verify"]

#: Chunks decoded concurrently: one worker per core, as the replay uses.
WORKERS = PREFETCH
#: Relative tolerance on the norm of a lossless record (float32 data, float64 norms).
LOSSLESS_RTOL = 1e-5
#: Relative tolerance when coordinates were thresholded (borderline entries may move
#: between the zeroed and the kept part).
THRESHOLD_RTOL = 1e-3
#: Lossy records: decoded norm within ``LOSSY_SIGMAS * sqrt(evar) + LOSSY_RTOL * dnorm``.
LOSSY_SIGMAS, LOSSY_RTOL = 4.0, 1e-2

_SIDE_2D = ("weight", "stored", "dnorm", "znorm", "evar", "nbytes")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an archive.

    Attributes
    ----------
    kind
        ``"corrupt"`` (does not decode), ``"missing"`` (chunk absent), ``"mismatch"``
        (decodes, but disagrees with the index), ``"invalid"`` (a bad index value) or
        ``"unexpected"`` (a chunk the index says should not exist).
    array
        The zarr array concerned (``"updates"``, ``"weight"``, ...; ``"metadata"``).
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

    ``notes`` are harmless findings (leftovers of an interrupted round).
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


# ---------------------------------------------------------------------- chunk access


def _keys(arr: zarr.Array) -> dict[str, int]:
    """``{store key: size}`` of every chunk the array holds."""

    async def collect() -> list[str]:
        return [k async for k in arr.store.list_prefix(f"{arr.path}/" if arr.path else "")]

    names = [k for k in sync(collect()) if not k.endswith("zarr.json")]
    return {k: int(sync(arr.store.getsize(k))) for k in names}


def _coords(arr: zarr.Array, key: str) -> tuple[int, ...] | None:
    nums = re.findall(r"\d+", key[len(arr.path):])
    return tuple(int(n) for n in nums[-arr.ndim:]) if len(nums) >= arr.ndim else None


def _reader(arr: zarr.Array, selection: Any) -> Callable[[], np.ndarray]:
    """A deferred read of ``arr[selection]``."""
    return lambda: arr[selection]


@dataclass(frozen=True)
class _Decoded:
    values: np.ndarray | None
    error: str | None


def _decode(read: Callable[[], np.ndarray]) -> _Decoded:
    try:
        return _Decoded(np.asarray(read()), None)
    except Exception as err:  # noqa: BLE001 - any failure to decode a chunk is damage
        return _Decoded(None, f"{type(err).__name__}: {err}".strip())


# ---------------------------------------------------------------------- the checks


class _Verifier:
    def __init__(self, store: UpdateStore, progress: bool | None) -> None:
        self.store = store
        self.a = store._a
        self.n = store._nrows
        self.rounds = store.rounds
        self.users: list[UserId] = store.users
        self.m = store.layout.size
        self.c = int(self.a["updates"].chunks[-1])
        self.k = math.ceil(self.m / self.c)
        self.report = VerifyReport(store.location, rounds=self.n, users=len(self.users))
        self.progress = progress

    def problem(self, kind: str, array: str, message: str, row: int | None = None,
                col: int | None = None, chunk: int | None = None) -> None:
        t = self.rounds[row] if row is not None and row < len(self.rounds) else None
        u = self.users[col] if col is not None and col < len(self.users) else None
        self.report.problems.append(Problem(kind, array, message, t, u, chunk))

    def span(self, k: int) -> slice:
        return slice(k * self.c, min((k + 1) * self.c, self.m))

    def run(self) -> VerifyReport:
        if not self.check_metadata():
            return self.report
        self.check_committed()
        sides = self.read_sides()
        self.check_sides(sides)
        base = self.check_model()
        self.check_records(sides, base)
        self.check_aggregates(sides, base)
        self.check_accumulators(base)
        col = {u: i for i, u in enumerate(self.users)}
        self.report.problems.sort(key=lambda p: (
            p.round is not None, -1 if p.round is None else p.round,
            col.get(p.user, -1), -1 if p.chunk is None else p.chunk))
        return self.report

    # -- 1. metadata ------------------------------------------------------------------

    def check_metadata(self) -> bool:
        layout, a = self.store.layout, self.a
        offset, names = 0, set()
        for t in layout.tensors:
            if t.offset != offset:
                self.problem("invalid", "metadata", f"tensor {t.name!r} starts at {t.offset}, "
                             f"expected {offset} (layout not contiguous)")
            if t.name in names:
                self.problem("invalid", "metadata", f"tensor name {t.name!r} appears twice")
            names.add(t.name)
            offset = t.offset + t.size
        if len(set(self.users)) != len(self.users):
            self.problem("invalid", "metadata", "user ids are not unique")
        R, U = a["weight"].shape
        expect = {"updates": (R, U, self.m), "aggregate": (R, self.m), "initial": (self.m,),
                  "model": (R, self.m), "committed": (R,), "agg_evar": (R,)}
        expect.update({name: (R, U) for name in _SIDE_2D})
        if "anorm" in a:
            expect["anorm"] = (R,)
        for name, shape in expect.items():
            if name in a and tuple(a[name].shape) != shape:
                self.problem("invalid", name, f"shape {tuple(a[name].shape)}, expected {shape} "
                             f"(model of {self.m} parameters, {R} rows, {U} user columns)")
        if len(self.users) > U:
            self.problem("invalid", "metadata", f"{len(self.users)} users but {U} columns")
        return self.report.ok

    # -- 2. committed rows ------------------------------------------------------------

    def check_committed(self) -> None:
        committed = self.a["committed"][:]
        r = np.asarray(self.rounds)
        for i in np.flatnonzero(np.diff(r) <= 0):
            self.problem("invalid", "committed", f"round {r[i + 1]} follows round {r[i]}: "
                         "committed rounds must increase", row=int(i + 1))
        late = [i for i in range(self.n + 1, committed.size) if committed[i] >= 0]
        if late:
            self.report.problems.append(Problem(
                "invalid", "committed",
                f"rows {late[:10]} are committed after the uncommitted row {self.n}: their "
                f"rounds ({[int(committed[i]) for i in late[:10]]}) are invisible (the "
                f"committed entry of row {self.n} is missing or damaged)"))

    # -- 3. side arrays ---------------------------------------------------------------

    def read_sides(self) -> dict[str, np.ndarray]:
        n, nu = self.n, len(self.users)
        fills = {"weight": np.nan}
        sides: dict[str, np.ndarray] = {}
        for name in _SIDE_2D:
            arr = self.a[name]
            try:
                sides[name] = arr[:n, :nu] if n and nu else np.zeros((n, nu), arr.dtype)
                continue
            except Exception:  # noqa: BLE001 - localise the damaged chunks below
                pass
            out = np.full((n, nu), fills.get(name, 0), dtype=arr.dtype)
            step = arr.chunks[1]
            for row in range(n):
                for start in range(0, nu, step):
                    got = _decode(_reader(arr, (row, slice(start, min(start + step, nu)))))
                    if got.error:
                        self.problem("corrupt", name, f"side array chunk (columns {start}.."
                                     f"{min(start + step, nu) - 1}) does not decode: "
                                     f"{got.error}", row=row)
                    else:
                        out[row, start : start + got.values.size] = got.values
            sides[name] = out
        for name in ("agg_evar", "anorm"):
            if name not in self.a:
                continue
            got = _decode(_reader(self.a[name], slice(0, n)))
            if got.error:
                self.problem("corrupt", name, f"does not decode: {got.error}")
                sides[name] = np.zeros(n)
            else:
                sides[name] = got.values
        return sides

    def check_sides(self, s: dict[str, np.ndarray]) -> None:
        W = s["weight"]
        part = ~np.isnan(W)
        stored = s["stored"]
        for row in range(self.n):
            if not part[row].any():
                self.problem("invalid", "weight", "no participant (all weights NaN)", row=row)
        for row, col in zip(*np.nonzero(part & ~(np.isfinite(W) & (W > 0))), strict=True):
            self.problem("invalid", "weight", f"weight {W[row, col]:g} is not finite and > 0",
                         row=int(row), col=int(col))
        for row, col in zip(*np.nonzero((stored != 0) & (stored != 1)), strict=True):
            self.problem("invalid", "stored", f"value {int(stored[row, col])} is not 0 or 1",
                         row=int(row), col=int(col))
        for row, col in zip(*np.nonzero((stored == 1) & ~part), strict=True):
            self.problem("invalid", "stored", "record stored for a user who did not take part",
                         row=int(row), col=int(col))
        for name in ("dnorm", "znorm", "evar", "nbytes"):
            v = s[name].astype(np.float64)
            bad = ~(np.isfinite(v) & (v >= 0))
            if name != "dnorm":
                bad |= (stored != 1) & (v != 0)
            for row, col in zip(*np.nonzero(bad), strict=True):
                self.problem("invalid", name, f"value {s[name][row, col]:g} (expected finite, "
                             ">= 0, and 0 where no record is stored)", row=int(row), col=int(col))
        for name in ("agg_evar", "anorm"):
            if name in s:
                for row in np.flatnonzero(~(np.isfinite(s[name]) & (s[name] >= 0))):
                    self.problem("invalid", name, f"value {s[name][row]:g} (expected finite, "
                                 ">= 0)", row=int(row))

    # -- 4. records -------------------------------------------------------------------

    def decode_all(self, jobs: list[tuple[Any, Callable[[], np.ndarray]]],
                   desc: str) -> Iterable[tuple[Any, _Decoded]]:
        """Decode ``(tag, read)`` jobs on a few threads, yielding in order."""
        from medustore.cli._common import stderr_is_terminal

        show = stderr_is_terminal() if self.progress is None else self.progress
        with ThreadPoolExecutor(WORKERS) as pool, tqdm(
                total=len(jobs), desc=desc, unit="chunk", disable=not show, leave=False) as bar:
            window: list = []
            it = iter(jobs)
            for tag, read in it:
                window.append((tag, pool.submit(_decode, read)))
                if len(window) >= 4 * WORKERS:
                    tag0, fut = window.pop(0)
                    yield tag0, fut.result()
                    bar.update()
            for tag0, fut in window:
                yield tag0, fut.result()
                bar.update()

    def check_records(self, s: dict[str, np.ndarray], frozen: dict[int, bool]) -> None:
        arr = self.a["updates"]
        present = _keys(arr)
        stored, nb = s["stored"], s["nbytes"]
        dnorm, znorm, evar = s["dnorm"], s["znorm"], s["evar"]
        pol = self.store.policy
        nu = len(self.users)
        seen: set[str] = set()
        bad: set[tuple[int, int]] = set()
        jobs = []
        for row in range(self.n):
            for col in range(nu):
                keys = [chunk_key(arr, (row, col, k)) for k in range(self.k)]
                seen.update(keys)
                have = [k for k in range(self.k) if keys[k] in present]
                if stored[row, col] != 1:
                    for k in have:
                        self.problem("unexpected", "updates", "record chunk present but the "
                                     "index says the record is not stored", row, col, k)
                    continue
                self.report.records += 1
                on_disk = sum(present[keys[k]] for k in have)
                if on_disk != nb[row, col]:
                    bad.add((row, col))  # reported here; its norm would only repeat it
                    gone = [k for k in range(self.k) if k not in have]
                    # An absent chunk on a slice where the model never moved is all zeros.
                    gone = [k for k in gone if not frozen.get(k)] or gone
                    if on_disk < nb[row, col] and gone:
                        for k in gone:
                            self.problem("missing", "updates", f"record chunk missing (nbytes "
                                         f"says {int(nb[row, col]):,} bytes, "
                                         f"{on_disk:,} found)", row, col, k)
                    else:
                        self.problem("mismatch", "updates", f"record chunks hold {on_disk:,} "
                                     f"bytes, nbytes says {int(nb[row, col]):,}", row, col)
                for k in have:
                    sl = self.span(k)
                    jobs.append(((row, col, k), _reader(arr, (row, col, sl))))
        sq: dict[tuple[int, int], float] = {}
        for (row, col, k), got in self.decode_all(jobs, "records"):
            self.report.record_chunks += 1
            if not self.chunk_ok("updates", got, self.span(k), row, col, k):
                bad.add((row, col))
                continue
            sq[(row, col)] = sq.get((row, col), 0.0) + float(
                np.dot(got.values.astype(np.float64), got.values.astype(np.float64)))
        for row in range(self.n):
            for col in np.flatnonzero(stored[row] == 1):
                if (row, int(col)) in bad:
                    continue
                self.check_norm(pol, math.sqrt(sq.get((row, int(col)), 0.0)),
                                float(dnorm[row, col]), float(znorm[row, col]),
                                float(evar[row, col]), row, int(col))
        self.leftovers(arr, present, seen, "record", n_lead=2)

    def chunk_ok(self, array: str, got: _Decoded, span: slice, row: int | None = None,
                 col: int | None = None, chunk: int | None = None) -> bool:
        if got.error:
            self.problem("corrupt", array, f"chunk does not decode ({got.error})",
                         row, col, chunk)
            return False
        size = span.stop - span.start
        if got.values.size != size:
            self.problem("corrupt", array, f"chunk decodes to {got.values.size} values, "
                         f"expected {size}", row, col, chunk)
            return False
        if not np.isfinite(got.values).all():
            nbad = int((~np.isfinite(got.values)).sum())
            self.problem("corrupt", array, f"chunk decodes to {nbad} NaN or infinite "
                         "value(s)", row, col, chunk)
            return False
        return True

    def check_norm(self, pol: Any, norm: float, dnorm: float, znorm: float, evar: float,
                   row: int, col: int) -> None:
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
            self.problem("mismatch", "updates", f"{kind} record decodes to norm {got:.6g}, "
                         f"the index says {dnorm:.6g} (dnorm)", row, col)

    def leftovers(self, arr: zarr.Array, present: dict[str, int], seen: set[str], what: str,
                  n_lead: int) -> None:
        """Chunks outside the committed rows: an interrupted round (a note) or damage."""
        rows: set[int] = set()
        for key in present.keys() - seen:
            coords = _coords(arr, key)
            if coords is not None and coords[0] >= self.n:
                rows.add(coords[0])
            elif coords is not None and n_lead == 2 and coords[1] >= len(self.users):
                self.problem("unexpected", arr.basename, f"{what} chunk {key} in a column "
                             "of no user", row=coords[0])
            elif n_lead == 1 and coords is not None and coords[0] < self.n - 1:
                self.report.notes.append(
                    f"{arr.basename}: a copy of row {coords[0]} remains (a round was "
                    "interrupted right after its commit); harmless")
            else:
                self.report.problems.append(Problem("unexpected", arr.basename,
                                                    f"unrecognised chunk key {key}"))
        if rows:
            self.report.notes.append(
                f"{arr.basename}: {what} chunks in uncommitted row(s) {sorted(rows)} (left by "
                "an interrupted round; the next record_round reuses them); harmless")

    # -- 5. aggregates, model, accumulators -------------------------------------------

    def check_model(self) -> dict[int, bool]:
        """Decode ``initial`` and the last model row; ``{chunk: frozen}`` where both decode
        and the model did not move on that slice."""
        frozen: dict[int, bool] = {}
        init, model = self.a["initial"], self.a["model"]
        init_keys, model_keys = _keys(init), _keys(model)
        jobs: list = []
        for k in range(self.k):
            sl = self.span(k)
            jobs.append((("initial", k), _reader(init, sl)))
            if self.n:
                jobs.append((("model", k), _reader(model, (self.n - 1, sl))))
        values: dict[tuple[str, int], np.ndarray] = {}
        for (name, k), got in self.decode_all(jobs, "model"):
            self.report.model_chunks += 1
            arr = init if name == "initial" else model
            key = chunk_key(arr, (k,) if name == "initial" else (self.n - 1, k))
            if key not in (init_keys if name == "initial" else model_keys):
                what = "w_0" if name == "initial" else "the latest model w_T"
                self.report.problems.append(Problem(
                    "missing", name, f"chunk of {what} missing (reads as zeros)", chunk=k,
                    round=self.rounds[-1] if name == "model" else None))
                continue
            if self.chunk_ok(name, got, self.span(k), chunk=k):
                values[(name, k)] = got.values
        for k in range(self.k):
            if ("initial", k) in values and ("model", k) in values:
                frozen[k] = bool(np.array_equal(values[("initial", k)], values[("model", k)]))
        seen = {chunk_key(model, (self.n - 1, k)) for k in range(self.k)} if self.n else set()
        self.leftovers(model, model_keys, seen, "model", n_lead=1)
        return frozen

    def check_aggregates(self, s: dict[str, np.ndarray], frozen: dict[int, bool]) -> None:
        if not getattr(self.store.policy, "keep_aggregates", True):
            return
        arr = self.a["aggregate"]
        present = _keys(arr)
        upd = self.a["updates"]
        upd_keys = _keys(upd)
        stored = s["stored"]
        jobs, seen = [], set()
        for row in range(self.n):
            for k in range(self.k):
                key = chunk_key(arr, (row, k))
                seen.add(key)
                if key in present:
                    jobs.append(((row, k), _reader(arr, (row, self.span(k)))))
                    continue
                cols = np.flatnonzero(stored[row] == 1)
                zero_records = cols.size > 0 and all(
                    chunk_key(upd, (row, int(c), k)) not in upd_keys for c in cols)
                if not (frozen.get(k) or zero_records):
                    self.problem("missing", "aggregate", "aggregate chunk missing (reads as "
                                 "zeros)", row=row, chunk=k)
        for (row, k), got in self.decode_all(jobs, "aggregates"):
            self.report.aggregate_chunks += 1
            self.chunk_ok("aggregate", got, self.span(k), row=row, chunk=k)
        self.leftovers(arr, present, seen, "aggregate", n_lead=0)

    def check_accumulators(self, frozen: dict[int, bool]) -> None:
        if not self.store.has_accumulators:
            return
        acc, acc_row = self.a["acc"], self.a["acc_row"]
        got_rows = _decode(_reader(acc_row, (slice(0, len(self.users)), slice(None))))
        if got_rows.error:
            self.report.problems.append(Problem("corrupt", "acc_row", got_rows.error))
            return
        present = _keys(acc)
        jobs = []
        for col, slots in enumerate(got_rows.values):
            valid = [q for q in (0, 1) if 0 <= slots[q] < self.n]
            if not valid:
                continue
            slot = max(valid, key=lambda q: slots[q])
            for k in range(self.k):
                if chunk_key(acc, (col, slot, k)) in present:
                    jobs.append(((col, k), _reader(acc, (col, slot, self.span(k)))))
                elif not frozen.get(k):
                    self.problem("missing", "acc", "accumulator chunk missing (reads as zeros)",
                                 col=col, chunk=k)
        for (col, k), got in self.decode_all(jobs, "accumulators"):
            self.report.accumulator_chunks += 1
            self.chunk_ok("acc", got, self.span(k), col=col, chunk=k)


def verify(store: UpdateStore, *, progress: bool | None = None) -> VerifyReport:
    """Decode every chunk of ``store`` and check it against the archive's index.

    Parameters
    ----------
    store
        An open archive (read-only is enough).
    progress
        Progress bars on stderr (default: when stderr is a terminal).

    Returns
    -------
    VerifyReport
        ``report.ok`` is True when nothing is wrong; ``report.problems`` names each damaged
        or missing chunk by round, user and chunk index.
    """
    return _Verifier(store, progress).run()
