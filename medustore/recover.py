"""Recovery: unlearning that replays training without the removed users, from the archive.

The closed form of `medustore.replay` subtracts the removed users' stored differentials and
keeps everything else, including the honest users' later updates, which were computed at
models the removed users had shaped. Recovery (``unlearn(..., method="recover")``) instead
replays FedAvg from ``w_0`` without the removed users ``F`` and, in every round, estimates what
the remaining users would have sent at the NEW model ``w'_t`` from what they sent at the old
one ``w_t``, in the manner of FedRecover (Cao et al., IEEE S&P 2023)::

    g_t        = hbar_t - sum_{u in F & C_t} p_u d_t^u / (P_t - P_{F,t})   (remaining users'
                                                                          aggregate at w_t)
    g'_t       ~ g_t + J_t (w'_t - w_t)           (mean value theorem, J_t = dg/dw)
    w'_{t+1}   = w'_t + g'_t

``-J_t`` is approximated by an L-BFGS matrix ``B`` (compact form of Byrd, Nocedal and
Schnabel 1994) built from curvature pairs ``(s, y)`` with ``y ~ B s``:

* trajectory pairs, from the archive alone: ``s_j = w_{j+1} - w_j`` (the stored aggregate)
  and ``y_j = -(g_{j+1} - g_j)``, over a window of rounds around ``t``;
* exact pairs, from client rounds (``exact_round=``): ``s = w'_t - w_t`` and
  ``y = g_t - g'_t`` where ``g'_t`` is what the remaining users really sent at ``w'_t``.

What the archive must hold (ours): the aggregates ``hbar_t`` (every row) and the removed
users' records. ``g_t`` needs nothing else: whatever the policy dropped of the other users,
their weighted sum is ``P_t hbar_t - sum_F p_u h_t^u`` exactly, so the remaining users'
stored updates ``h = d + hbar`` and the dropped ones (estimated from the aggregate, sharing
what the stored ones leave of it) add up to ``g_t`` and need not be read one by one. Dropped
records of removed users count as zero differentials, as in the closed form. Lossy
aggregates do not sum to ``w_T - w_0``; the known difference is shared among the rows in
proportion to each aggregate's expected coding error (the conditional mean of independent
zero-mean errors given their sum), so the reconstructed trajectory ends at the stored
``w_T`` and recovery without curvature is exactly the closed form.

Safeguards (`RecoverOptions`): pairs must satisfy the curvature condition
``cos(s, y) >= min_cos``; each correction ``B (w'_t - w_t)`` is clipped to ``clip`` times
``||w'_t - w_t||`` (an estimate may at most undo the deviation); and when the recovered
model strays from the original trajectory more than ``diverge`` times the closed form's
largest deviation so far, recovery stops and answers the closed form. A `RecoveryWarning`
says when any of them fired. Unlike the closed form, recovery has no error bound: its
`RecoveryReport` says what it used and how far its answer is from the closed form's.

Cost: one pass over the archive's aggregates and the removed users' records (the aggregates
twice when they are lossy: the first pass sums them), plus ``O(history x m)`` per round for
the L-BFGS product; memory ``O((history + lookahead) x m)``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from medustore.index import ArchiveIndex
from medustore.layout import OutputKind

__all__ = ["Recovery", "RecoverOptions", "RecoveryReport", "RecoveryWarning", "recover"]

#: ``exact_round(round, model, users) -> {user: update}``: the remaining participants
#: ``users`` of ``round`` train from ``model`` (the recovered ``w'_t`` as numpy arrays by
#: tensor name, or a flat vector for an archive made from one) and return their updates
#: ``h = w_local - model``; ``None`` declines the round.
ExactRound = Callable[[int, dict[str, np.ndarray], list[Any]], Mapping[Any, Any] | None]


class RecoveryWarning(UserWarning):
    """A safeguard of recovery fired: a correction was clipped, curvature pairs were
    rejected wholesale, or the replay diverged and the closed form answered instead."""


@dataclass(frozen=True)
class RecoverOptions:
    """Parameters of recovery (defaults measured in docs/results.md).

    Attributes
    ----------
    history
        Trajectory curvature pairs per round: those of the ``history`` rounds before ``t``
        and, with ``lookahead``, after it (the archive holds the whole run). 0: none.
    lookahead
        Rounds after ``t`` whose trajectory pairs also count (the window is centred when
        ``lookahead = history // 2``).
    exact_history
        Exact pairs (from client rounds) kept, most recent first; they come before the
        trajectory pairs.
    min_cos
        Curvature condition: a pair is used only when ``s.y - noise >= min_cos ||s|| ||y||``
        (``noise``: the expected ``||e||^2`` of the aggregate's coding error, which ``s``
        and ``y`` share).
    diagonal, damping, cap
        Initial matrix ``B_0`` of L-BFGS: with ``diagonal`` (default), ``damping`` times a
        per-coordinate secant fit ``(sum_j s_ij y_ij - noise_i) / sum_j s_ij^2`` over the
        window's pairs, clipped to ``[0, cap]``; otherwise ``damping`` times the median
        Rayleigh quotient ``s.y / s.s``, for every coordinate. The diagonal keeps the
        removal in coordinates the remaining users barely move (fit near 0) and lets their
        curvature pull the rest back. Measured on the four runs of docs/results.md:
        ``damping`` 0.5 leaves the full archive's recovery 6-10 points below retraining,
        1.3 lets the backdoor back on lossy archives; 1.0 is the default.
    clip
        Largest ``||B (w'_t - w_t)||`` as a multiple of ``||w'_t - w_t||``.
    diverge
        Fall back to the closed form when ``||w'_t - w_t||`` exceeds ``diverge`` times the
        closed form's largest ``||w^cf_t - w_t||`` so far (or is not finite).
    fill_missing
        A removed user's record the policy dropped is estimated from its nearest stored
        record, scaled to the norm the index keeps for every participation (else: zero,
        as in the closed form). Rounds where one stays unknown give no curvature pair.
    warmup, every, final
        With ``exact_round``: client rounds at the first ``warmup`` rounds in which the
        recovered model differs from the original one (from the round after a removed
        user first took part), every ``every`` rounds after them, and the last ``final``
        rounds. All 0 (the default) with a callback: ``final=2`` (measured: final rounds
        close the gap to retraining best, docs/results.md).
    """

    history: int = 10
    lookahead: int = 5
    exact_history: int = 5
    min_cos: float = 0.1
    diagonal: bool = True
    damping: float = 1.0
    cap: float = 1.0
    clip: float = 1.0
    diverge: float = 4.0
    fill_missing: bool = True
    warmup: int = 0
    every: int = 0
    final: int = 0

    def __post_init__(self) -> None:
        for name in ("history", "lookahead", "exact_history", "warmup", "every", "final"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("min_cos", "damping", "cap", "clip", "diverge"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.min_cos > 1:
            raise ValueError(f"min_cos must be in [0, 1], got {self.min_cos!r}")
        if self.diverge <= 1:
            raise ValueError(f"diverge must be > 1, got {self.diverge!r}")


@dataclass(frozen=True)
class RecoveryReport:
    """What recovery used and what it did (``Recovery.report``).

    Attributes
    ----------
    users
        The removed users.
    rounds
        Rounds replayed (every committed row).
    rounds_estimated
        Rounds whose remaining users' update was estimated (the model differed from the
        original one and no client round was spent).
    rounds_exact
        Rounds computed by the remaining users (``exact_round``).
    rounds_unchanged
        Rounds in which the recovered model still equalled the original one (the stored
        update is the answer: nothing to estimate).
    client_rounds
        User-rounds of training spent in exact rounds.
    retrain_client_rounds
        User-rounds retraining from scratch without the removed users would spend.
    pairs_used, pairs_rejected
        Curvature pairs used / refused by the curvature condition (summed over rounds).
    clipped
        Rounds whose correction was clipped.
    diverged_at
        Round at which the divergence safeguard fired (the answer is then the closed
        form's), or None.
    records_read, records_missing, records_filled, aggregates_read
        Vectors decoded: removed users' records; participations of removed users the
        archive did not store, and how many of them were estimated from a nearest stored
        record (the others count as zero differentials); aggregates (lossy ones are read
        twice unless they fit in `CACHE_BYTES`).
    aggregate_drift
        ``||w_T - w_0 - sum_t hbar_t||``: what lossy aggregates miss, shared among them.
    l2_to_closed_form
        Distance from the answer to the closed form's answer.
    l2_moved
        ``||w'_T - w_T||``, for scale (the closed form's: ``l2_closed_form_moved``).
    l2_closed_form_moved
        ``||w^cf_T - w_T||``.
    seconds
        Wall time of the recovery (client rounds included).
    warnings
        The safeguard messages (also raised as `RecoveryWarning`).
    options
        The `RecoverOptions` used, as a dict.
    """

    users: tuple[Any, ...]
    rounds: int
    rounds_estimated: int
    rounds_exact: int
    rounds_unchanged: int
    client_rounds: int
    retrain_client_rounds: int
    pairs_used: int
    pairs_rejected: int
    clipped: int
    diverged_at: int | None
    records_read: int
    records_missing: int
    records_filled: int
    aggregates_read: int
    aggregate_drift: float
    l2_to_closed_form: float
    l2_moved: float
    l2_closed_form_moved: float
    seconds: float
    warnings: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["users"] = list(self.users)
        d["warnings"] = list(self.warnings)
        return d


@dataclass(frozen=True)
class Recovery:
    """The recovered model (in the ``out`` layout asked for) and its `RecoveryReport`."""

    model: Any
    report: RecoveryReport


# ---------------------------------------------------------------------- curvature


def lbfgs_product(pairs: list[tuple[np.ndarray, np.ndarray]], v: np.ndarray,
                  b0: np.ndarray | float) -> np.ndarray:
    """``B v`` for the L-BFGS matrix ``B`` of ``pairs`` ``(s, y)`` (``y ~ B s``, each with
    ``s.y > 0``) from the initial matrix ``diag(b0)`` (compact representation of Byrd,
    Nocedal and Schnabel 1994)."""
    if not pairs:
        return b0 * v
    S = np.stack([p[0] for p in pairs], axis=1)
    Y = np.stack([p[1] for p in pairs], axis=1)
    sy = S.T @ Y
    b0 = np.maximum(b0, 1e-9 * float(np.median(np.diag(sy) / np.einsum("ij,ij->j", S, S))))
    BS = S * (b0[:, None] if np.ndim(b0) else b0)
    L = np.tril(sy, -1)
    D = np.diag(np.diag(sy))
    M = np.block([[S.T @ BS, L], [L.T, -D]])
    rhs = np.concatenate([BS.T @ v, Y.T @ v])
    try:
        coef = np.linalg.solve(M, rhs)
    except np.linalg.LinAlgError:
        coef = np.linalg.lstsq(M, rhs, rcond=None)[0]
    k = len(pairs)
    return b0 * v - (BS @ coef[:k] + Y @ coef[k:])


def diagonal_b0(pairs: list[tuple[np.ndarray, np.ndarray]], damping: float,
                cap: float, noise: float = 0.0) -> np.ndarray | float:
    """Per-coordinate secant fit ``(sum s_i y_i - noise) / sum s_i^2`` over ``pairs``, in
    ``[0, cap]``, times ``damping``; ``noise`` is the expected bias of ``sum s_i y_i`` per
    coordinate from coding errors shared by ``s`` and ``y``."""
    if not pairs:
        return 0.0
    S = np.stack([p[0] for p in pairs], axis=1)
    Y = np.stack([p[1] for p in pairs], axis=1)
    num = np.einsum("ij,ij->i", S, Y) - noise
    den = np.einsum("ij,ij->i", S, S)
    fit = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return damping * np.clip(fit, 0.0, cap)


def _accept(s: np.ndarray, y: np.ndarray, min_cos: float, noise: float = 0.0) -> bool:
    """The curvature condition, ``s.y`` less the expected bias ``noise`` of coding errors
    shared by ``s`` and ``y``."""
    ns, ny = float(np.linalg.norm(s)), float(np.linalg.norm(y))
    if not (ns > 0 and ny > 0 and math.isfinite(ns) and math.isfinite(ny)):
        return False
    return float(s @ y) - noise >= max(min_cos, 1e-12) * ns * ny


# ---------------------------------------------------------------------- the archive's rows


@dataclass
class _Row:
    row: int
    round: int
    s: np.ndarray               # w_{t+1} - w_t (the stored aggregate, drift-corrected)
    g: np.ndarray               # remaining users' aggregate at w_t
    c: np.ndarray | None        # the closed form's correction (None: nobody removed)
    remaining: list[Any]        # remaining participants
    weights: dict[Any, float]
    noise: float = 0.0          # expected ||coding error of s||^2
    clean: bool = True          # g holds no removed user's unstored update


def _rows(index: ArchiveIndex, reader: Any, cols: set[int], window: set[int],
          drift: np.ndarray, share: np.ndarray, counts: dict[str, int],
          cache: list[np.ndarray] | None, fill: bool) -> Iterator[_Row]:
    """The rows of the run, in order, with what recovery needs of each."""
    erow = index.entry_rows()
    nearest = None
    if fill:
        stored = index.entry_record >= 0
        nearest = {c: np.flatnonzero((index.entry_user == c) & stored) for c in cols}
    for row in range(index.n_rounds):
        agg = (cache[row] if cache is not None
               else reader.aggregate(row).astype(np.float64))
        if cache is None:
            counts["aggregates"] += 1
        s = agg + share[row] * drift
        sl = index.entries(row)
        ucols = index.entry_user[sl]
        weights = index.entry_weight[sl]
        removed = np.isin(ucols, list(cols)) if row in window else np.zeros(ucols.size, bool)
        remaining = [index.users[c] for c in ucols[~removed]]
        wmap = {index.users[c]: float(w) for c, w in zip(ucols[~removed], weights[~removed],
                                                         strict=True)}
        c = None
        clean = True
        if removed.any():
            rest = float(weights[~removed].sum())
            if rest == 0.0:
                c = s.copy()  # every participant removed: the round contributes nothing
            else:
                c = np.zeros_like(s)
                for e in np.flatnonzero(removed) + sl.start:
                    rec = int(index.entry_record[e])
                    user = index.users[index.entry_user[e]]
                    scale = 1.0
                    if rec < 0:
                        counts["missing"] += 1
                        near = nearest.get(int(index.entry_user[e])) if nearest else None
                        if near is None or near.size == 0:
                            clean = False  # g_t holds this update: no curvature pair
                            continue
                        e2 = int(near[np.argmin(np.abs(erow[near] - row))])
                        rec = int(index.entry_record[e2])
                        ref = float(index.entry_dnorm[e2])
                        scale = float(index.entry_dnorm[e]) / ref if ref > 0 else 0.0
                        counts["filled"] += 1
                    d = reader.record(rec, f"record of user {user!r} in round "
                                           f"{int(index.rounds[row])}")
                    counts["records"] += 1
                    c += (scale * float(index.entry_weight[e]) / rest) * d.astype(np.float64)
        yield _Row(row, int(index.rounds[row]), s, s - c if c is not None else s, c,
                   remaining, wmap, float(index.agg_evar[row]), clean)


def _exact_rows(index: ArchiveIndex, first: int | None, opts: RecoverOptions,
                explicit: Iterable[int] | None) -> set[int]:
    """Rows at which the callback is asked for a client round."""
    if explicit is not None:
        return {index.row(t) for t in explicit}
    if first is None:
        return set()
    warmup, every, final = opts.warmup, opts.every, opts.final
    if not (warmup or every or final):
        final = 2
    n = index.n_rounds
    start = first + 1  # the first row whose model may differ
    chosen = set(range(start, min(n, start + warmup)))
    if every:
        chosen |= set(range(start + warmup, n, every))
    chosen |= set(range(max(start, n - final), n))
    return chosen


# ---------------------------------------------------------------------- recovery


def recover(source: Any, users: Any, *, rounds: Any = None,
            exact_round: ExactRound | None = None, exact_rounds: Iterable[int] | None = None,
            out: OutputKind = "numpy", progress: bool | None = None,
            options: RecoverOptions | Mapping[str, Any] | None = None,
            **overrides: Any) -> Recovery:
    """Unlearn ``users`` by replaying training without them, estimated from the archive.

    Parameters
    ----------
    source
        An open archive (`UpdateStore`), or anything with its ``index`` and ``reader``.
        The archive must keep aggregates.
    users
        One user id or several.
    rounds
        Remove the users only from a window of rounds (as in `medustore.replay.unlearn`).
    exact_round
        Optional callback ``exact_round(round, model, users) -> {user: update}`` through
        which the server has the remaining participants ``users`` of ``round`` train from
        the recovered ``model`` (numpy arrays by tensor name) and return their updates
        (any layout the archive accepts); ``None`` declines the round. Their weights are
        the archive's.
    exact_rounds
        Rounds at which to call ``exact_round`` (default: from ``warmup``, ``every`` and
        ``final`` of the options).
    out
        Layout of the model: ``"numpy"``, ``"flat"`` or ``"state_dict"`` (dict of torch tensors).
    progress
        Show a progress bar on stderr (default: when stderr is a terminal).
    options, overrides
        `RecoverOptions` (or its fields as a dict), and fields to change in it.

    Returns
    -------
    Recovery
        ``.model`` and ``.report`` (`RecoveryReport`).

    Warns
    -----
    RecoveryWarning
        When a safeguard fired (see the module docstring).
    IncompleteUnlearningWarning
        When records of the users were not stored (they count as zero differentials).
    """
    from medustore.replay import (
        IncompleteUnlearningWarning,
        _progress,
        _user_list,
        _window_rows,
    )

    t_start = time.perf_counter()
    opts = options if isinstance(options, RecoverOptions) else RecoverOptions(
        **dict(options or {}))
    if overrides:
        opts = replace(opts, **overrides)
    index: ArchiveIndex = source.index
    reader = source.reader
    if not index.policy.keep_aggregates:
        raise ValueError(f"recovery replays the run from its aggregates; this archive's policy "
                         f"({index.policy.name}) does not keep them (use the closed form)")
    cols = {index.column(u) for u in _user_list(users)}
    if not cols:
        raise ValueError("name at least one user to remove")
    removed_users = tuple(index.users[c] for c in sorted(cols))
    window = set(_window_rows(index, rounds))
    in_f = np.isin(index.entry_user, list(cols))
    f_rows = sorted({int(r) for r in index.entry_rows()[in_f]} & window)
    first = f_rows[0] if f_rows else None
    exact_at = _exact_rows(index, first, opts, exact_rounds) if exact_round else set()
    if exact_rounds is not None and exact_round is None:
        raise ValueError("exact_rounds needs the exact_round callback")

    m = index.layout.size
    w0 = reader.initial().astype(np.float64)
    wT = reader.model().astype(np.float64)
    counts = {"aggregates": 0, "records": 0, "missing": 0, "filled": 0}
    # Pass 1 (only when aggregates are lossy): the drift they leave against w_T. Small runs
    # keep the decoded aggregates for pass 2 (at most CACHE bytes).
    evar = np.asarray(index.agg_evar, dtype=np.float64)
    lossy = bool((evar > 0).any())
    cache: list[np.ndarray] | None = None
    total = np.zeros(m)
    if lossy:
        keep = index.n_rounds * m * 8 <= CACHE_BYTES
        cache = [] if keep else None
        for row in range(index.n_rounds):
            a = reader.aggregate(row).astype(np.float64)
            counts["aggregates"] += 1
            total += a
            if cache is not None:
                cache.append(a)
        drift = wT - w0 - total
        share = evar / evar.sum()
    else:
        drift = np.zeros(m)
        share = np.zeros(index.n_rounds)
    drift_norm = float(np.linalg.norm(drift))

    w = w0.copy()       # original trajectory w_t
    wn = w0.copy()      # recovered w'_t
    wcf = w0.copy()     # closed form's trajectory
    exact_pairs: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=max(opts.exact_history, 1))
    buf: deque[_Row] = deque()   # rows t - history .. t + lookahead + 1
    stream = _rows(index, reader, cols, window, drift, share, counts, cache, opts.fill_missing)
    n = index.n_rounds
    est = exact_n = unchanged = client = clipped = used = rejected = 0
    retrain_cr = sum(len(_remaining(index, r, cols if r in window else set()))
                     for r in range(n))
    diverged_at: int | None = None
    worst_cf = 0.0
    notes: list[str] = []
    bar = _progress(progress, n, "recovering")
    bar.unit = "round"
    with bar:
        for k in range(n):
            while len(buf) == 0 or buf[-1].row < min(n - 1, k + opts.lookahead + 1):
                buf.append(next(stream))
            while buf[0].row < k - opts.history:
                buf.popleft()
            cur = next(r for r in buf if r.row == k)
            dw = wn - w
            ndw = float(np.linalg.norm(dw))
            if diverged_at is not None:
                g_new = cur.g
            elif k in exact_at and cur.remaining:
                model = index.layout.unflatten(wn.copy(), "numpy")
                got = exact_round(cur.round, model, list(cur.remaining))
                if got is None:
                    g_new = None
                else:
                    g_new = _aggregate(index, got, cur, cur.round)
                    client += len(got)
                    exact_n += 1
                    if ndw > 0:
                        y = cur.g - g_new
                        if _accept(dw, y, opts.min_cos):
                            exact_pairs.appendleft((dw.copy(), y))
                        else:
                            rejected += 1
                if g_new is None:
                    g_new, c, u, r = _estimate(cur, buf, k, dw, ndw, exact_pairs, opts)
                    est += ndw > 0
                    unchanged += ndw == 0
                    clipped += c
                    used += u
                    rejected += r
            elif ndw == 0:
                g_new = cur.g
                unchanged += 1
            else:
                g_new, c, u, r = _estimate(cur, buf, k, dw, ndw, exact_pairs, opts)
                est += 1
                clipped += c
                used += u
                rejected += r
            wn += g_new
            w += cur.s
            wcf += cur.g
            if diverged_at is None:
                worst_cf = max(worst_cf, float(np.linalg.norm(wcf - w)))
                dev = float(np.linalg.norm(wn - w))
                if not math.isfinite(dev) or dev > opts.diverge * max(worst_cf, 1e-12):
                    diverged_at = cur.round
            bar.update()
    if counts["missing"]:
        warnings.warn(f"{counts['missing']} participation(s) of the users to remove were not "
                      f"stored by the archive's policy ({index.policy.name}); recovery "
                      f"estimated {counts['filled']} from the users' nearest stored records "
                      "and counts the rest as zero differentials",
                      IncompleteUnlearningWarning, stacklevel=2)
    answer = wn
    if diverged_at is not None:
        answer = wcf
        notes.append(f"recovery diverged at round {diverged_at} (the recovered model moved "
                     f"more than {opts.diverge:g} times the closed form's largest deviation "
                     "from the original run); the answer is the closed form's")
    if clipped:
        notes.append(f"the estimated correction was clipped in {clipped} of {est} estimated "
                     f"round(s) (clip={opts.clip:g} x ||w'_t - w_t||)")
    if est and used == 0 and (opts.history or exact_pairs):
        notes.append(f"no curvature pair passed the curvature condition ({rejected} rejected): "
                     "the estimated rounds used the stored updates unchanged (the closed "
                     "form)")
    for note in notes:
        warnings.warn(note, RecoveryWarning, stacklevel=2)
    limit = min(float(np.finfo(np.dtype(t.dtype)).max) for t in index.layout.tensors
                if np.dtype(t.dtype).kind == "f") if out != "flat" else np.inf
    if not (np.isfinite(answer).all() and float(np.max(np.abs(answer))) <= limit):
        raise ValueError("the recovered model overflows the model's precision")
    report = RecoveryReport(
        users=removed_users, rounds=n, rounds_estimated=est, rounds_exact=exact_n,
        rounds_unchanged=unchanged, client_rounds=client, retrain_client_rounds=retrain_cr,
        pairs_used=used, pairs_rejected=rejected, clipped=clipped, diverged_at=diverged_at,
        records_read=counts["records"], records_missing=counts["missing"],
        records_filled=counts["filled"],
        aggregates_read=counts["aggregates"], aggregate_drift=drift_norm,
        l2_to_closed_form=float(np.linalg.norm(answer - wcf)),
        l2_moved=float(np.linalg.norm(answer - wT)),
        l2_closed_form_moved=float(np.linalg.norm(wcf - wT)),
        seconds=time.perf_counter() - t_start, warnings=tuple(notes), options=asdict(opts))
    return Recovery(index.layout.unflatten(answer, out), report)


#: Decoded aggregates kept between the two passes over a lossy archive (bytes).
CACHE_BYTES = 256 * 2**20


def _remaining(index: ArchiveIndex, row: int, cols: set[int]) -> list[int]:
    sl = index.entries(row)
    return [int(c) for c in index.entry_user[sl] if int(c) not in cols]


def _aggregate(index: ArchiveIndex, got: Mapping[Any, Any], cur: _Row, t: int) -> np.ndarray:
    """The weighted mean of the updates a client round returned."""
    if not isinstance(got, Mapping) or not got:
        raise ValueError(f"exact_round must return a non-empty {{user: update}} mapping or "
                         f"None, got {type(got).__name__} for round {t}")
    total = 0.0
    acc = np.zeros(index.layout.size)
    for u, h in got.items():
        if u not in cur.weights:
            raise ValueError(f"exact_round returned an update of user {u!r} in round {t}, "
                             f"which is not a remaining participant of that round")
        p = cur.weights[u]
        acc += p * index.layout.flatten(h, f"exact update of user {u!r} in round {t}",
                                        dtype=np.float64)
        total += p
    return acc / total


def _estimate(cur: _Row, buf: deque[_Row], k: int, dw: np.ndarray, ndw: float,
              exact_pairs: deque, opts: RecoverOptions) -> tuple[np.ndarray, int, int, int]:
    """``g'_t = g_t - B dw``: the estimate, and (clipped, pairs used, pairs rejected)."""
    pairs: list[tuple[np.ndarray, np.ndarray]] = list(exact_pairs)[: opts.exact_history]
    rejected = 0
    every: list[tuple[np.ndarray, np.ndarray]] = list(pairs)
    noise = 0.0
    if opts.history:
        rows = list(buf)
        for a, b in zip(rows, rows[1:], strict=False):
            if b.row != a.row + 1 or not (k - opts.history <= a.row < k + opts.lookahead):
                continue
            if not (a.clean and b.clean):  # a removed user's update would lend its curvature
                continue
            s, y = a.s, a.g - b.g
            every.append((s, y))
            noise += a.noise / s.size
            if _accept(s, y, opts.min_cos, a.noise):
                pairs.append((s, y))
            else:
                rejected += 1
    if not pairs and not (opts.diagonal and every):
        return cur.g, 0, 0, rejected
    if opts.diagonal:
        b0 = diagonal_b0(every, opts.damping, opts.cap, noise)
    else:
        S = np.stack([p[0] for p in pairs], axis=1)
        Y = np.stack([p[1] for p in pairs], axis=1)
        b0 = opts.damping * float(np.median(np.einsum("ij,ij->j", S, Y)
                                            / np.einsum("ij,ij->j", S, S)))
    corr = lbfgs_product(pairs, dw, b0)
    nc = float(np.linalg.norm(corr))
    clipped = 0
    if not math.isfinite(nc):
        corr, clipped = np.zeros_like(corr), 1
    elif nc > opts.clip * ndw:
        corr = corr * (opts.clip * ndw / nc)
        clipped = 1
    return cur.g - corr, clipped, len(pairs), rejected
