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

from medustore.layout import OutputKind

if TYPE_CHECKING:
    from medustore.store import UpdateStore

__all__ = ["ErrorBudget", "IncompleteUnlearningWarning", "error_budget", "parse_window",
           "reconstruct", "unlearn"]

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
class _Plan:
    rows: list[int]                    # window rows, in order (alpha applies per row)
    terms: list[list[tuple[str, int, int, float]]]  # per row: (kind, row, col, coef)
    budget: ErrorBudget


def _user_list(users: Any) -> list[Any]:
    """One user id or an iterable of them, as a list."""
    if isinstance(users, str | numbers.Integral) or not isinstance(users, Iterable):
        return [users]
    return list(users)


def _plan(store: UpdateStore, users: Any, rounds: Any, alpha: float) -> _Plan:
    cols = sorted({store._column(u) for u in _user_list(users)})
    if not cols:
        raise ValueError("name at least one user to remove")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    start, stop = parse_window(rounds)
    all_rounds = np.array(store.rounds, dtype=np.int64)
    in_window = np.ones(all_rounds.size, dtype=bool)
    if start is not None:
        in_window &= all_rounds >= start
    if stop is not None:
        in_window &= all_rounds < stop
    rows = [int(r) for r in np.flatnonzero(in_window)]
    W, S = store.side("weight"), store.side("stored")
    dnorm, znorm, evar = store.side("dnorm"), store.side("znorm"), store.side("evar")
    agg_evar, anorm = store.side("agg_evar"), store.side("anorm")
    have_agg = store.policy.keep_aggregates
    users_list, rounds_list = store.users, store.rounds
    det = var = 0.0
    used = n_missing = n_rounds = 0
    missing: list[tuple[int, Any]] = []
    terms: list[list[tuple[str, int, int, float]]] = []
    for k, row in enumerate(rows):
        f = (1.0 + alpha) ** (len(rows) - 1 - k)
        part = ~np.isnan(W[row])
        in_f = [c for c in cols if part[c]]
        row_terms: list[tuple[str, int, int, float]] = []
        if in_f:
            n_rounds += 1
            P = float(W[row][part].sum())
            PF = float(sum(W[row, c] for c in in_f))
            if part.sum() == len(in_f):  # every participant removed: subtract hbar_t
                if have_agg:
                    row_terms.append(("aggregate", row, -1, 1.0))
                    var += f * f * float(agg_evar[row])
                    used += len(in_f)
                else:
                    det += f * float(anorm[row])
                    n_missing += len(in_f)
                    missing.extend((rounds_list[row], users_list[c]) for c in in_f)
            else:
                for c in in_f:
                    coef = float(W[row, c]) / (P - PF)
                    if S[row, c]:
                        row_terms.append(("record", row, c, coef))
                        det += f * coef * float(znorm[row, c])
                        var += (f * coef) ** 2 * float(evar[row, c])
                        used += 1
                    else:
                        det += f * coef * float(dnorm[row, c])
                        n_missing += 1
                        missing.append((rounds_list[row], users_list[c]))
        terms.append(row_terms)
    budget = ErrorBudget(det, math.sqrt(var), used, n_missing, n_rounds, tuple(missing))
    return _Plan(rows, terms, budget)


def error_budget(store: UpdateStore, users: Any, *, rounds: Any = None,
                 alpha: float = 0.0, exact_accumulator: bool | None = None) -> ErrorBudget:
    """The error budget of `unlearn` with the same arguments, from the side arrays alone
    (no decoding). Zero when the exact per-user accumulator answers."""
    budget = _plan(store, users, rounds, alpha).budget
    if exact_accumulator is False or _accumulator_user(store, users, rounds, alpha) is None:
        return budget
    return ErrorBudget(0.0, 0.0, budget.records_used + budget.records_missing, 0,
                       budget.rounds, method="accumulator")


def _accumulator_user(store: UpdateStore, users: Any, rounds: Any, alpha: float) -> Any:
    """The one user whose exact accumulator answers this request, or None."""
    cols = {store._column(u) for u in _user_list(users)}
    if store.has_accumulators and len(cols) == 1 and rounds is None and alpha == 0.0:
        return store.users[cols.pop()]
    return None


def _progress(progress: bool | None, total: int, desc: str) -> tqdm:
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    return tqdm(total=total, desc=desc, unit="rec", disable=disable, leave=False)


def unlearn(store: UpdateStore, users: Any, *, rounds: Any = None, alpha: float = 0.0,
            out: OutputKind = "numpy", progress: bool | None = None,
            exact_accumulator: bool | None = None) -> Any:
    """The model with the contribution of ``users`` removed.

    Parameters
    ----------
    users
        One user id or several.
    rounds
        Restrict removal to a window of rounds (``(start, stop)``, slice, range or
        ``"A:B"``, half-open): a user who turned malicious at round ``t0`` is ``"t0:"``.
    alpha
        Fast-FedUL skew factor (0 = the plain closed form).
    out
        ``"numpy"`` (dict of arrays), ``"flat"``, ``"torch"`` or ``"state_dict"``.
    progress
        Show a progress bar on stderr (default: when stderr is a terminal).
    exact_accumulator
        Use the store's exact per-user accumulator (single user, no window, alpha 0).
        Default: whenever it applies.

    Warns
    -----
    IncompleteUnlearningWarning
        When records of the users were not stored; the answer then differs from the exact
        replay by at most `error_budget(...).deterministic` (plus the lattice noise).
    """
    plan = _plan(store, users, rounds, alpha)
    acc_user = _accumulator_user(store, users, rounds, alpha)
    can_acc = acc_user is not None
    if exact_accumulator and not can_acc:
        raise ValueError("the exact accumulator answers single-user removal over all rounds "
                         "with alpha 0, from an archive created with accumulators=True")
    latest = store._latest_vec().astype(np.float64)
    if can_acc and exact_accumulator is not False:
        return store.layout.unflatten(latest - store.accumulator(acc_user), out)
    # Only the replay misses dropped records: the exact accumulator does not need them.
    if plan.budget.records_missing:
        warnings.warn(
            f"{plan.budget.records_missing} participation(s) of the users to remove were not "
            f"stored by the archive's policy ({store.policy.name}); the result may differ from "
            f"the exact unlearning by up to {plan.budget.deterministic:.4g} (L2) plus lattice "
            f"noise of RMS {plan.budget.rms:.4g}",
            IncompleteUnlearningWarning, stacklevel=3)
    correction = _correction(store, plan, alpha, progress)
    return store.layout.unflatten(latest - correction, out)


def _correction(store: UpdateStore, plan: _Plan, alpha: float, progress: bool | None) -> np.ndarray:
    updates, aggregate = store._a["updates"], store._a["aggregate"]

    def read(kind: str, row: int, col: int) -> np.ndarray:
        return updates[row, col, :] if kind == "record" else aggregate[row, :]

    m = store.layout.size
    correction = np.zeros(m, dtype=np.float64)
    flat = [(k, term) for k, row_terms in enumerate(plan.terms) for term in row_terms]
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
                k, (kind, row, col, coef) = nxt
                pending.append((k, coef, pool.submit(read, kind, row, col)))

        fill()
        while pending:
            k, coef, fut = pending.popleft()
            while done_rows < k:  # rows before k are complete: skew them
                if alpha:
                    correction *= 1.0 + alpha
                done_rows += 1
            correction += coef * fut.result()
            bar.update()
            fill()
    while done_rows < len(plan.rows) - 1:
        if alpha:
            correction *= 1.0 + alpha
        done_rows += 1
    return correction


def reconstruct(store: UpdateStore, round: int, out: OutputKind = "numpy") -> Any:
    """The global model at the start of ``round``: ``w_0`` plus the aggregates before it.

    Sums from whichever end (``w_0`` forwards or ``w_T`` backwards) needs fewer aggregates;
    lossy aggregates make the answer approximate, within their coding error.
    """
    from medustore.store import _round_number

    t = _round_number(round)
    rounds = np.array(store.rounds, dtype=np.int64)
    if not store.policy.keep_aggregates:
        raise ValueError(f"this archive's policy ({store.policy.name}) does not keep "
                         "aggregates, so past models cannot be reconstructed")
    before = int(np.searchsorted(rounds, t, side="left"))  # rows with round < t
    agg = store._a["aggregate"]
    if before <= rounds.size - before:
        w = store._a["initial"][:].astype(np.float64)
        for row in range(before):
            w += agg[row, :]
    else:
        w = store._latest_vec().astype(np.float64)
        for row in range(before, rounds.size):
            w -= agg[row, :]
    return store.layout.unflatten(w, out)
