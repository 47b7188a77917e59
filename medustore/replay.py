"""Replay: unlearning, reconstruction and the error budget, streamed from the store.

Unlearning a set ``F`` of users replays FedAvg without them in closed form (medu.md)::

    w'_T = w_T - sum_t c_t,    c_t = sum_{u in F & C_t} p_u d_t^u / (P_t - P_{F,t})

and, in a round where every participant is in ``F``, ``c_t = hbar_t``. With the skew factor
``alpha`` of Fast-FedUL the running correction is multiplied by ``1 + alpha`` each round.
Only the records of the users in ``F`` are read (and an aggregate where a round loses every
participant); they are decoded by a bounded pool of workers and accumulated in float64.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from medustore.index import ArchiveIndex, parse_round
from medustore.layout import OutputKind, check_output_kind

if TYPE_CHECKING:
    from medustore.archive.reader import ArchiveReader

__all__ = ["ErrorBudget", "IncompleteUnlearningWarning", "Plan", "Term", "error_budget",
           "parse_window", "plan", "reconstruct", "run", "unlearn"]

#: Records decoded ahead of the accumulator: bounds memory to a few model-sized buffers.
#: One decoding worker per core, at least 2 so reading overlaps accumulating; more only
#: contend (2 cores: 4 workers measured 0.43 s against 0.31 s for 2, docs/benchmarks.md).
PREFETCH = max(2, min(4, os.cpu_count() or 2))


class IncompleteUnlearningWarning(UserWarning):
    """Some records of the users to remove were not stored (the policy dropped them)."""


@dataclass(frozen=True)
class ErrorBudget:
    """How far an unlearning answer may be from the exact replay over full records.

    Attributes
    ----------
    deterministic
        L2 bound on the error from records the policy did not store and coordinates it
        zeroed (sum of ``coef * ||d||`` and ``coef * ||zeroed||``).
    rms
        Expected L2 norm (root of the expected squared norm) of the zero-mean error from
        lattice coding, known from the lattice, its step and the coded entries.
    records_used, records_missing
        Participations of the removed users whose record is stored / was not stored.
    rounds
        Rounds in which at least one removed user took part.
    missing
        ``(round, user)`` of every participation whose record was not stored.
    method
        ``"replay"`` (the closed form over stored records) or ``"accumulator"`` (the exact
        per-user accumulator, which needs no record).
    """

    deterministic: float
    rms: float
    records_used: int
    records_missing: int
    rounds: int
    missing: tuple[tuple[int, Any], ...] = field(default=(), repr=False)
    method: str = "replay"

    def bound(self, k: float = 3.0) -> float:
        """``deterministic + k * rms``: a high-probability bound on the L2 error."""
        return self.deterministic + k * self.rms

    @property
    def exact(self) -> bool:
        """True when unlearning from this archive reproduces the exact replay."""
        return self.deterministic == 0.0 and self.rms == 0.0

    def to_json(self) -> dict:
        return {"deterministic": self.deterministic, "rms": self.rms,
                "bound_3sigma": self.bound(3.0), "records_used": self.records_used,
                "records_missing": self.records_missing, "rounds": self.rounds,
                "exact": self.exact, "method": self.method}


def parse_window(rounds: Any) -> tuple[int | None, int | None]:
    """``(start, stop)`` half-open round window from None, a pair, a slice, a range or
    the text ``"A:B"`` (either end may be empty)."""
    if rounds is None:
        return None, None
    if isinstance(rounds, str):
        if rounds.count(":") != 1:
            raise ValueError(f"round window must look like 'A:B', 'A:' or ':B', got {rounds!r}")
        a, b = (s.strip() for s in rounds.split(":"))
        try:
            start, stop = (int(a) if a else None), (int(b) if b else None)
        except ValueError:
            raise ValueError(f"round window bounds must be integers, got {rounds!r}") from None
    elif isinstance(rounds, slice | range):
        if rounds.step not in (None, 1):
            raise ValueError("round window must be contiguous (step 1)")
        start, stop = rounds.start, rounds.stop
    elif isinstance(rounds, tuple) and len(rounds) == 2:
        start, stop = rounds
    else:
        raise TypeError(f"rounds must be None, (start, stop), a slice, a range or 'A:B', "
                        f"got {rounds!r}")
    if start is not None and stop is not None and stop <= start:
        raise ValueError(f"empty round window {start}:{stop}")
    return start, stop


@dataclass(frozen=True)
class Term:
    """One decoded vector the replay subtracts: ``coef`` times a record or an aggregate."""

    kind: str       # "record" or "aggregate"
    row: int        # the round's row
    record: int     # the record number (-1 for an aggregate)
    coef: float
    what: str       # "record of user 'mallory' in round 3", for messages


@dataclass(frozen=True)
class Plan:
    """What `unlearn` will do, decided from the index alone (nothing is decoded).

    Attributes
    ----------
    method
        ``"accumulator"`` (the exact per-user accumulator answers) or ``"replay"`` (the
        closed form over stored records).
    users
        The users to remove.
    rows
        Rows of the rounds in the window, in order (the alpha skew applies per row).
    terms
        Per window row, the vectors to subtract (empty where no removed user took part).
    budget
        The error budget of the answer.
    alpha
        The skew factor.
    """

    method: str
    users: tuple[Any, ...]
    rows: tuple[int, ...]
    terms: tuple[tuple[Term, ...], ...]
    budget: ErrorBudget
    alpha: float = 0.0

    @property
    def n_terms(self) -> int:
        return sum(len(t) for t in self.terms)


def _user_list(users: Any) -> list[Any]:
    """One user id or an iterable of them, as a list."""
    if isinstance(users, str | numbers.Integral) or not isinstance(users, Iterable):
        return [users]
    return list(users)


def _window_rows(index: ArchiveIndex, rounds: Any) -> list[int]:
    start, stop = parse_window(rounds)
    in_window = np.ones(index.n_rounds, dtype=bool)
    if start is not None:
        in_window &= index.rounds >= start
    if stop is not None:
        in_window &= index.rounds < stop
    return [int(r) for r in np.flatnonzero(in_window)]


def _skews(n: int, alpha: float) -> list[float]:
    """``(1 + alpha) ** (n - 1 - k)`` for each of ``n`` window rows, or a ValueError."""
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    try:
        top = math.pow(1.0 + alpha, max(n - 1, 0))
    except OverflowError:
        top = math.inf
    if not math.isfinite(top):
        raise ValueError(f"alpha={alpha!r} skews the correction by (1 + alpha)^{n - 1} over "
                         f"{n} rounds, which overflows; use a smaller alpha or a round window")
    return [(1.0 + alpha) ** (n - 1 - k) for k in range(n)]


def plan(source: Any, users: Any, *, rounds: Any = None, alpha: float = 0.0,
         exact_accumulator: bool | None = None) -> Plan:
    """The `Plan` of unlearning ``users`` from ``source`` (a store, or anything with an
    ``index``), with the same arguments as `unlearn`."""
    index: ArchiveIndex = source.index
    cols = sorted({index.column(u) for u in _user_list(users)})
    if not cols:
        raise ValueError("name at least one user to remove")
    removed = tuple(index.user_id(c) for c in cols)
    rows = _window_rows(index, rounds)
    skews = _skews(len(rows), alpha)
    can_acc = (index.settings.accumulators and len(cols) == 1 and rounds is None
               and alpha == 0.0)
    if exact_accumulator and not can_acc:
        raise ValueError("the exact accumulator answers single-user removal over all rounds "
                         "with alpha 0, from an archive created with accumulators=True")
    # Only the rows the removed users took part in are read (a user's postings).
    mine_rows = {int(r) for c in cols for r in index.rows_of(index.user_entries(c))}
    have_agg = index.policy.keep_aggregates
    det = var = 0.0
    used = n_missing = n_rounds = 0
    missing: list[tuple[int, Any]] = []
    terms: list[tuple[Term, ...]] = [()] * len(rows)
    first = rows[0] if rows else 0  # the window's rows are consecutive
    for row in sorted(r for r in mine_rows if first <= r < first + len(rows)):
        k = row - first
        f = skews[k]
        row_terms: list[Term] = []
        t = int(index.rounds[row])
        rr = index.round_rows(row)
        in_f = np.isin(rr.user, cols)
        mine = np.flatnonzero(in_f)
        n_rounds += 1
        rest = float(rr.weight[~in_f].sum())
        if rest == 0.0:  # every participant removed: subtract hbar_t
            if have_agg:
                row_terms.append(Term("aggregate", row, -1, 1.0, f"aggregate of round {t}"))
                var += f * f * float(index.agg_evar[row])
                used += mine.size
            else:
                det += f * float(index.anorm[row])
                n_missing += mine.size
                missing.extend((t, index.user_id(int(rr.user[i]))) for i in mine)
        else:
            for i in mine:
                coef = float(rr.weight[i]) / rest
                user = index.user_id(int(rr.user[i]))
                rec = int(rr.record[i])
                if rec >= 0:
                    row_terms.append(Term("record", row, rec, coef,
                                          f"record of user {user!r} in round {t}"))
                    det += f * coef * float(rr.znorm[i])
                    var += (f * coef) * (f * coef) * float(rr.evar[i])
                    used += 1
                else:
                    det += f * coef * float(rr.dnorm[i])
                    n_missing += 1
                    missing.append((t, user))
        terms[k] = tuple(row_terms)
    if not (math.isfinite(det) and math.isfinite(var)):
        raise ValueError(f"the error budget overflows (alpha={alpha!r} over {len(rows)} rounds, "
                         "or weights of extreme ratios); use a smaller alpha or a round window")
    budget = ErrorBudget(det, math.sqrt(var), used, n_missing, n_rounds, tuple(missing))
    method = "replay"
    if can_acc and exact_accumulator is not False:
        method = "accumulator"
        budget = ErrorBudget(0.0, 0.0, used + n_missing, 0, n_rounds, method="accumulator")
    return Plan(method, removed, tuple(rows), tuple(terms), budget, alpha)


def error_budget(source: Any, users: Any, *, rounds: Any = None, alpha: float = 0.0,
                 exact_accumulator: bool | None = None) -> ErrorBudget:
    """The error budget of `unlearn` with the same arguments, from the index alone (no
    decoding). Zero when the exact per-user accumulator answers."""
    return plan(source, users, rounds=rounds, alpha=alpha,
                exact_accumulator=exact_accumulator).budget


def _progress(progress: bool | None, total: int, desc: str) -> tqdm:
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    return tqdm(total=total, desc=desc, unit="rec", disable=disable, leave=False)


def unlearn(source: Any, users: Any, *, rounds: Any = None, alpha: float = 0.0,
            out: OutputKind = "numpy", progress: bool | None = None,
            exact_accumulator: bool | None = None, client: Any = None,
            method: str = "replay", exact_round: Any = None, **recover_options: Any) -> Any:
    """The model with the contribution of ``users`` removed.

    Parameters
    ----------
    source
        An open archive (`UpdateStore`), or anything with its ``index`` and ``reader``.
    users
        One user id or several.
    rounds
        Restrict removal to a window of rounds (``(start, stop)``, slice, range or
        ``"A:B"``, half-open): a user who turned malicious at round ``t0`` is ``"t0:"``.
    alpha
        Fast-FedUL skew factor (0 = the plain closed form).
    out
        ``"numpy"`` (dict of arrays), ``"flat"`` or ``"state_dict"`` (dict of torch tensors).
    progress
        Show a progress bar on stderr (default: when stderr is a terminal).
    exact_accumulator
        Use the store's exact per-user accumulator (single user, no window, alpha 0).
        Default: whenever it applies.
    client
        A ``dask.distributed.Client``: split the replay by model slice across its workers,
        which open the archive themselves (`medustore.distributed`); the same answer.
    method
        ``"replay"`` (default): the closed form above. ``"recover"``: replay training from
        ``w_0`` without the users, estimating the remaining users' updates at the new model
        from the archive (`medustore.recover`; no error bound; ``alpha`` 0, no ``client``).
        It returns the model only; `medustore.recover.recover` returns it with its report.
    exact_round, recover_options
        With ``method="recover"``: the client-round callback and `RecoverOptions` fields
        (``history``, ``damping``, ``final``, ...), see `medustore.recover.recover`.

    Warns
    -----
    IncompleteUnlearningWarning
        When records of the users were not stored; the answer then differs from the exact
        replay by at most `error_budget(...).deterministic` (plus the lattice noise).
    RecoveryWarning
        With ``method="recover"``, when a safeguard of the estimation fired.
    """
    check_output_kind(out)  # before the replay runs, not after
    if method == "recover":
        if alpha != 0.0 or exact_accumulator or client is not None:
            raise ValueError("method 'recover' takes no alpha, exact_accumulator or client")
        from medustore.recover import recover

        return recover(source, users, rounds=rounds, exact_round=exact_round, out=out,
                       progress=progress, **recover_options).model
    if method != "replay":
        raise ValueError(f"method must be 'replay' or 'recover', got {method!r}")
    if exact_round is not None or recover_options:
        raise ValueError("exact_round and recovery options apply to method='recover' only")
    if client is not None:
        from medustore import distributed

        return distributed.unlearn(source, users, client=client, rounds=rounds, alpha=alpha,
                                   out=out, progress=progress,
                                   exact_accumulator=exact_accumulator)
    return run(source, plan(source, users, rounds=rounds, alpha=alpha,
                            exact_accumulator=exact_accumulator), out=out, progress=progress)


def run(source: Any, p: Plan, *, out: OutputKind = "numpy",
        progress: bool | None = None) -> Any:
    """Carry out a `Plan` made by `plan` on the same source."""
    reader = source.reader
    latest = reader.model().astype(np.float64)
    if p.method == "accumulator":
        result = latest - reader.accumulator(source.index.column(p.users[0]))
    else:
        # Only the replay misses dropped records: the exact accumulator does not need them.
        warn_incomplete(p, source.index.policy.name, stacklevel=4)
        result = latest - _correction(reader, p, progress)
    return deliver(source.index.layout, result, p, out)


def warn_incomplete(p: Plan, policy_name: str, stacklevel: int) -> None:
    """`IncompleteUnlearningWarning` when the plan misses records the policy dropped."""
    if p.budget.records_missing:
        warnings.warn(
            f"{p.budget.records_missing} participation(s) of the users to remove were not "
            f"stored by the archive's policy ({policy_name}); the result may differ from the "
            f"exact unlearning by up to {p.budget.deterministic:.4g} (L2) plus lattice noise "
            f"of RMS {p.budget.rms:.4g}", IncompleteUnlearningWarning, stacklevel=stacklevel)


def deliver(layout: Any, result: np.ndarray, p: Plan, out: OutputKind) -> Any:
    """The unlearned flat float64 vector in the asked form, or a ValueError when it
    overflows the model's precision (an alpha skew or weights of extreme ratios)."""
    peak = float(np.max(np.abs(result))) if result.size else 0.0
    limit = min(float(np.finfo(np.dtype(t.dtype)).max) for t in layout.tensors
                if np.dtype(t.dtype).kind == "f") if out != "flat" else np.inf
    if not (np.isfinite(result).all() and peak <= limit):
        raise ValueError(f"the unlearned model overflows the model's precision (alpha="
                         f"{p.alpha!r}, or weights of extreme ratios); use a smaller alpha or a "
                         "round window")
    return layout.unflatten(result, out)


def _correction(reader: ArchiveReader, p: Plan, progress: bool | None) -> np.ndarray:
    def read(term: Term) -> np.ndarray:
        if term.kind == "record":
            return reader.record(term.record, term.what)
        return reader.aggregate(term.row)

    correction = np.zeros(reader.index.layout.size, dtype=np.float64)
    flat = [(k, term) for k, row_terms in enumerate(p.terms) for term in row_terms]
    pending: deque[tuple[int, float, Future]] = deque()
    done_rows = 0  # rows whose terms are all in `correction` (for the alpha skew)
    bar = _progress(progress, len(flat), "unlearning")
    with ThreadPoolExecutor(max_workers=PREFETCH) as pool, bar:
        it = iter(flat)

        def fill() -> None:
            while len(pending) < PREFETCH:
                nxt = next(it, None)
                if nxt is None:
                    return
                k, term = nxt
                pending.append((k, term.coef, pool.submit(read, term)))

        fill()
        while pending:
            k, coef, fut = pending.popleft()
            while done_rows < k:  # rows before k are complete: skew them
                if p.alpha:
                    correction *= 1.0 + p.alpha
                done_rows += 1
            correction += coef * fut.result()
            bar.update()
            fill()
    while done_rows < len(p.rows) - 1:
        if p.alpha:
            correction *= 1.0 + p.alpha
        done_rows += 1
    return correction


def reconstruct(source: Any, round: int, out: OutputKind = "numpy", *,
                client: Any = None) -> Any:
    """The global model at the start of ``round``: ``w_0`` plus the aggregates before it.

    Sums from whichever end (``w_0`` forwards or ``w_T`` backwards) needs fewer aggregates;
    lossy aggregates make the answer approximate, within their coding error. With a
    ``dask.distributed.Client`` as ``client``, the sums run by model slice on its workers
    (`medustore.distributed`), with the same answer.
    """
    if client is not None:
        from medustore import distributed

        return distributed.reconstruct(source, round, out, client=client)
    index, reader = source.index, source.reader
    t = parse_round(round)
    if not index.policy.keep_aggregates:
        raise ValueError(f"this archive's policy ({index.policy.name}) does not keep "
                         "aggregates, so past models cannot be reconstructed")
    before = int(np.searchsorted(index.rounds, t, side="left"))  # rows with round < t
    if before <= index.n_rounds - before:
        w = reader.initial().astype(np.float64)
        for row in range(before):
            w += reader.aggregate(row)
    else:
        w = reader.model().astype(np.float64)
        for row in range(before, index.n_rounds):
            w -= reader.aggregate(row)
    return index.layout.unflatten(w, out)
