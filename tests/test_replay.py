"""Unlearning, reconstruction and the error budget against an independent FedAvg replay.

With the ``full`` preset the store must reproduce, up to float32 storage of the updates,
the model obtained by replaying FedAvg from ``w_0`` without the removed users. With lossy
policies the distance to that answer must respect the store's own error budget.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from _fl import (
    History,
    make_history,
    make_round,
    memory_url,
    record,
    rel_err,
    replay,
    seeded_dither,
    skewed_unlearn,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import medustore
from medustore import IncompleteUnlearningWarning, MeduPolicy, UnknownUserError
from medustore.replay import parse_window

# Updates are stored as float32 and the model is kept in its own precision, so the store
# matches a float64 replay to ~1e-7 of the model norm; 1e-6 leaves room for a few rounds.
RTOL = 1e-6
M = 97  # odd and not a multiple of any lattice dimension


def open_mem(w0: np.ndarray, policy: object = "full", **kw: object) -> medustore.UpdateStore:
    """A new in-memory archive (Icechunk's in-memory storage, one per call)."""
    return medustore.open(memory_url("replay"), "w", model=w0, policy=policy, **kw)


# ---------------------------------------------------------------------------- strategies


@dataclass
class Case:
    history: History
    forget: list
    window: tuple[int | None, int | None] | None
    window_arg: object  # the form handed to unlearn: None, a tuple or an "A:B" string
    alpha: float


USER_POOL: list = [0, 1, 2, "ana", "bob", 7]


@st.composite
def cases(draw: st.DrawFn, windows: bool = True, alphas: bool = True) -> Case:
    n_users = draw(st.integers(2, 5))
    pool = USER_POOL[:n_users]
    n_rounds = draw(st.integers(1, 5))
    gaps = draw(st.lists(st.integers(1, 3), min_size=n_rounds, max_size=n_rounds))
    ts = list(np.cumsum(gaps) - gaps[0])
    parts = [draw(st.lists(st.sampled_from(pool), min_size=1, max_size=n_users, unique=True))
             for _ in range(n_rounds)]
    seen = sorted({u for p in parts for u in p}, key=str)
    forget = draw(st.lists(st.sampled_from(seen), min_size=1, max_size=len(seen), unique=True))
    if draw(st.booleans()):  # a round whose participants are all removed
        k = draw(st.integers(0, n_rounds - 1))
        parts[k] = draw(st.lists(st.sampled_from(forget), min_size=1, unique=True))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    history = History(rng.normal(size=M))
    for t, us in zip(ts, parts, strict=True):
        weights = draw(st.lists(st.floats(0.25, 4.0), min_size=len(us), max_size=len(us)))
        history.rounds.append(make_round(seed, int(t), us, M, weights=weights))
    forget = [u for u in forget if u in history.users]
    window = window_arg = None
    if windows and draw(st.booleans()):
        last = int(ts[-1])
        a = draw(st.none() | st.integers(0, last + 1))
        b = draw(st.none() | st.integers((a or 0) + 1, last + 2))
        window = (a, b)
        form = draw(st.sampled_from(["tuple", "text", "slice"]))
        if form == "tuple":
            window_arg = (a, b)
        elif form == "slice":
            window_arg = slice(a, b)
        else:
            window_arg = f"{'' if a is None else a}:{'' if b is None else b}"
    alpha = draw(st.sampled_from([0.0, 0.0, 0.05, 0.1]) | st.floats(0.0, 0.5)) if alphas else 0.0
    return Case(history, forget, window, window_arg, alpha)


# ---------------------------------------------------------------------------- full preset


@settings(max_examples=30)
@given(cases())
def test_full_unlearn_equals_independent_replay(case: Case) -> None:
    store = open_mem(case.history.w0, accumulators=True)
    record(store, case.history)
    h, forget, window = case.history, case.forget, case.window_arg
    got = store.unlearn(forget, rounds=window, out="flat")
    assert got.dtype == np.float64
    assert rel_err(got, replay(h, forget, case.window)) <= RTOL
    assert store.error_budget(forget, rounds=window).exact
    # Fast-FedUL's skew against our own statement of its rule.
    skewed = store.unlearn(forget, rounds=window, alpha=case.alpha, out="flat")
    assert rel_err(skewed, skewed_unlearn(h, forget, case.window, case.alpha)) <= RTOL
    # Single users through the exact accumulator, and through the records.
    for u in h.users:
        want = replay(h, [u])
        via_acc = store.unlearn(u, out="flat")
        assert rel_err(via_acc, want) <= RTOL
        assert rel_err(store.unlearn([u], out="flat", exact_accumulator=False), via_acc) <= RTOL


def test_skew_is_applied_once_per_round_of_the_window() -> None:
    # A user present in round 1 only; the window has 4 rounds, so its correction is scaled
    # by (1 + alpha)^2 (rounds 2 and 3 follow it), which the rule predicts exactly.
    h = make_history(3, M, [["a", "b"], ["a", "x"], ["a", "b"], ["b"]])
    store = open_mem(h.w0)
    record(store, h)
    alpha = 0.5
    c1 = h.rounds[1].aggregate() - h.rounds[1].aggregate(["a"])
    want = replay(h) - (1 + alpha) ** 2 * c1
    got = store.unlearn("x", alpha=alpha, out="flat")
    assert rel_err(got, want) <= RTOL
    assert rel_err(got, replay(h, ["x"])) > 1e-3  # the skew changed the answer


def test_round_where_every_participant_is_removed() -> None:
    h = make_history(5, M, [["a", "b"], ["a"], ["a", "b", "c"], ["b", "a"]])
    store = open_mem(h.w0)
    record(store, h)
    for forget in (["a"], ["a", "b"], ["b", "a", "c"]):
        want = replay(h, forget)
        assert rel_err(store.unlearn(forget, out="flat"), want) <= RTOL
    # Removing everyone everywhere gives w_0 back.
    assert rel_err(store.unlearn(["a", "b", "c"], out="flat"), h.w0) <= RTOL


def test_window_forms_agree() -> None:
    h = make_history(11, M, [["a", "b", "c"]] * 6)
    store = open_mem(h.w0)
    record(store, h)
    want = replay(h, ["b"], (2, 5))
    for form in [(2, 5), "2:5", " 2 : 5 ", slice(2, 5), range(2, 5)]:
        assert rel_err(store.unlearn("b", rounds=form, out="flat"), want) <= RTOL
    assert rel_err(store.unlearn("b", rounds="3:", out="flat"), replay(h, ["b"], (3, None))) <= RTOL
    assert rel_err(store.unlearn("b", rounds=":3", out="flat"), replay(h, ["b"], (None, 3))) <= RTOL
    # A window holding no round of the user changes nothing.
    assert np.array_equal(store.unlearn("b", rounds="100:", out="flat"), store.latest("flat"))


@pytest.mark.parametrize("bad", ["5:2", "3:3", "2", "a:b", "1:2:3", (4, 1)])
def test_bad_windows_raise_value_error(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_window(bad)


@pytest.mark.parametrize("bad", [[1, 2], 3, range(0, 6, 2)])
def test_window_of_wrong_type(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        parse_window(bad)


def test_unlearn_argument_errors() -> None:
    h = make_history(1, M, [["a", "b"]])
    store = open_mem(h.w0)
    record(store, h)
    with pytest.raises(UnknownUserError, match="'zed'"):
        store.unlearn("zed")
    with pytest.raises(ValueError):
        store.unlearn([])
    for alpha in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="alpha"):
            store.unlearn("a", alpha=alpha)
    with pytest.raises(ValueError, match="out"):
        store.unlearn("a", out="pandas")


def test_user_ids_int_and_str_are_distinct() -> None:
    h = make_history(2, M, [[1, "1", 2], [1, "1"]])
    store = open_mem(h.w0)
    record(store, h)
    assert store.users == [1, "1", 2]
    assert rel_err(store.unlearn(1, out="flat"), replay(h, [1])) <= RTOL
    assert rel_err(store.unlearn("1", out="flat"), replay(h, ["1"])) <= RTOL
    assert rel_err(store.unlearn(np.int64(1), out="flat"), replay(h, [1])) <= RTOL


# ---------------------------------------------------------------------------- accumulators


def test_accumulator_is_used_and_refused_where_it_does_not_apply() -> None:
    h = make_history(4, M, [["a", "b", "c"], ["a", "b"]])
    store = open_mem(h.w0, accumulators=True)
    record(store, h)
    acc = store.accumulator("a")
    assert acc is not None and acc.shape == (M,)
    # The answer is exactly w_T - A^u: the accumulator path was taken.
    assert np.array_equal(store.unlearn("a", out="flat"), store.latest("flat") - acc)
    for kwargs in ({"rounds": "0:1"}, {"alpha": 0.1}):
        with pytest.raises(ValueError, match="accumulator"):
            store.unlearn("a", exact_accumulator=True, **kwargs)
    with pytest.raises(ValueError, match="accumulator"):
        store.unlearn(["a", "b"], exact_accumulator=True)
    plain = open_mem(h.w0)
    record(plain, h)
    assert plain.accumulator("a") is None
    with pytest.raises(ValueError, match="accumulator"):
        plain.unlearn("a", exact_accumulator=True)


# ---------------------------------------------------------------------------- reconstruct


def test_reconstruct_is_w0_plus_aggregates_before() -> None:
    h = make_history(8, M, [["a", "b"], ["b", "c"], ["a"], ["a", "b", "c"], ["c"]],
                     rounds=[0, 2, 3, 7, 8])
    store = open_mem(h.w0)
    record(store, h)
    for t in range(11):
        want = h.w0 + sum((r.aggregate() for r in h.rounds if r.t < t), np.zeros(M))
        assert rel_err(store.reconstruct(t, out="flat"), want) <= RTOL, t
    assert np.array_equal(store.reconstruct(0, out="flat"), store.initial("flat"))
    assert np.array_equal(store.reconstruct(9, out="flat"), store.latest("flat"))
    assert np.array_equal(store.reconstruct(10**6, out="flat"), store.latest("flat"))
    with pytest.raises(ValueError):
        store.reconstruct(-1)


def test_reconstruct_with_lossy_aggregates_stays_within_their_error() -> None:
    h = make_history(9, 600, [["a", "b", "c"]] * 6)
    with seeded_dither(9):
        store = open_mem(h.w0, MeduPolicy(lattice="A2", bits=4, aggregate_bits=5,
                                          chunk_size=256))
        record(store, h)
    agg_rms = math.sqrt(float(store.side("agg_evar").sum()))
    assert agg_rms > 0
    for t in range(7):
        want = h.w0 + sum((r.aggregate() for r in h.rounds if r.t < t), np.zeros(600))
        err = float(np.linalg.norm(store.reconstruct(t, out="flat") - want))
        # At most every aggregate's error is summed; 4 sigma of a sum of ~600 independent
        # bounded terms is far in its tail (the float32 model adds ~1e-7 relative).
        assert err <= 4 * agg_rms + 1e-5 * np.linalg.norm(want), t


def test_reconstruct_needs_aggregates() -> None:
    h = make_history(1, M, [["a", "b"], ["a"]])
    store = open_mem(h.w0, MeduPolicy(keep_aggregates=False))
    record(store, h)
    with pytest.raises(ValueError, match="aggregate"):
        store.reconstruct(1)
    # Unlearning still works except where a round loses everyone: then it is budgeted.
    assert rel_err(store.unlearn("b", out="flat"), replay(h, ["b"])) <= RTOL
    with pytest.warns(IncompleteUnlearningWarning):
        got = store.unlearn("a", out="flat")
    budget = store.error_budget("a")
    assert budget.records_missing == 1 and budget.missing == ((1, "a"),)
    err = float(np.linalg.norm(got - replay(h, ["a"])))
    assert err <= budget.deterministic * (1 + 1e-6) + 1e-9
    assert err >= 0.5 * budget.deterministic  # the missing term is the whole aggregate


# ---------------------------------------------------------------------------- lossy budgets


USERS = ["a", "b", "c", "d", "e", "f", "g"]


@functools.cache
def _dataset(seed: int, m: int = 600) -> tuple[History, dict[str, np.ndarray]]:
    """A history and the ``full`` store's answer for removing each user alone."""
    rng = np.random.default_rng(seed)
    parts = [[str(u) for u in rng.choice(USERS, size=int(rng.integers(3, 8)), replace=False)]
             for _ in range(3)]
    h = make_history(seed, m, parts)
    full = open_mem(h.w0, "full")
    record(full, h)
    return h, {u: full.unlearn(u, out="flat") for u in h.users}


def _lossy_trials(policy: MeduPolicy, seeds: range) -> list[tuple[float, float, float, int]]:
    """``(||lossy - full||, deterministic, rms, records_missing)`` of single-user removal.

    Each user's records are coded with their own dither, so the errors of removing
    different users (and of different stores) are independent samples.
    """
    out = []
    for seed in seeds:
        h, answers = _dataset(seed)
        with seeded_dither(seed):
            lossy = open_mem(h.w0, policy)
            record(lossy, h)
        for u in h.users:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", IncompleteUnlearningWarning)
                got = lossy.unlearn(u, out="flat")
            b = lossy.error_budget(u)
            out.append((float(np.linalg.norm(got - answers[u])), b.deterministic, b.rms,
                        b.records_missing))
    return out


# chunk_size < m = 600 leaves a partial last chunk, which zarr pads to the full length.
UNBIASED = [
    pytest.param(medustore.PRESETS["lattice"], id="lattice-preset"),
    pytest.param(MeduPolicy(lattice="A2", bits=3.0, chunk_size=512), id="A2-3bit-chunked"),
    pytest.param(MeduPolicy(lattice="Z", bits=5.0, chunk_size=128), id="Z-5bit-chunked"),
]


@pytest.mark.parametrize("policy", UNBIASED)
def test_lattice_error_matches_budget_rms(policy: MeduPolicy) -> None:
    trials = _lossy_trials(policy, range(100, 105))
    assert len(trials) >= 20
    assert all(det == 0.0 and missing == 0 for _, det, _, missing in trials)
    ratio = np.array([(err / rms) ** 2 for err, _, rms, _ in trials])
    # E||e||^2 = rms^2 for a subtractive-dithered quantiser, so the mean ratio is 1; the
    # tolerance is 4 standard errors of the sample mean (plus 1% for float32 rounding).
    tol = 4 * ratio.std(ddof=1) / math.sqrt(ratio.size) + 0.01
    assert abs(ratio.mean() - 1.0) <= tol, (ratio.mean(), tol)
    # ||e||^2 sums hundreds of independent bounded terms, so it concentrates near rms^2:
    # Markov alone bounds P(||e|| > 2 rms) by 1/4, concentration makes it vanish.
    errs = np.sqrt(ratio)
    assert np.mean(errs > 2.0) <= 0.02
    assert errs.max() <= 3.0


LOSSY = [
    pytest.param(medustore.PRESETS["medu"], id="medu-preset"),
    pytest.param(MeduPolicy(keep_top=2, kappa=0.5, lattice="A2", bits=3.0, chunk_size=512),
                 id="keep-top-kappa-A2"),
    pytest.param(MeduPolicy(coord_threshold=1.0, lattice="E8", bits=3.0, chunk_size=512),
                 id="coord-E8"),
    pytest.param(MeduPolicy(keep_top=1, always_keep=("c",), coord_threshold=0.3,
                            lattice="D4", bits=4.0, chunk_size=256), id="always-keep-D4"),
]


@pytest.mark.parametrize("policy", LOSSY)
def test_lossy_error_within_budget(policy: MeduPolicy) -> None:
    trials = _lossy_trials(policy, range(200, 204))
    # error <= deterministic + ||random||, and ||random|| <= k rms with high probability:
    # k = 3 is a bound Markov already holds to 1/9 and concentration makes near-certain.
    # A user whose every record was dropped has err == det up to float rounding: 1e-6.
    for err, det, rms, _ in trials:
        assert err <= (det + 3.0 * rms) * (1 + 1e-6), (err, det, rms)
    exceed = np.mean([err > (det + 2.0 * rms) * (1 + 1e-6) for err, det, rms, _ in trials])
    assert exceed <= 0.05
    # The policy really lost something in these settings (else the test says nothing).
    assert any(det > 0 for _, det, _, _ in trials)
    if policy.keep_top or policy.keep_fraction:
        assert any(missing > 0 for *_, missing in trials)


def test_dropped_record_error_equals_its_deterministic_budget() -> None:
    # Lossless records, keep only the top user: removing a user dropped in exactly one
    # round misses exactly coef * d there, so the error equals the budget (no slack).
    h = make_history(21, M, [["a", "b", "c"], ["a", "b", "c"]])
    store = open_mem(h.w0, MeduPolicy(keep_top=1))
    record(store, h)
    full = open_mem(h.w0, "full")
    record(full, h)
    stored = store.side("stored")
    users = store.users
    for u in users:
        n_missing = int((stored[:, users.index(u)] == 0).sum())
        budget = store.error_budget(u)
        assert budget.records_missing == n_missing
        assert budget.rms == 0.0
        if n_missing == 0:
            with warnings.catch_warnings():
                warnings.simplefilter("error", IncompleteUnlearningWarning)
                got = store.unlearn(u, out="flat")
            assert rel_err(got, full.unlearn(u, out="flat")) <= RTOL
            continue
        with pytest.warns(IncompleteUnlearningWarning, match=str(n_missing)):
            got = store.unlearn(u, out="flat")
        err = float(np.linalg.norm(got - full.unlearn(u, out="flat")))
        assert err <= budget.deterministic * (1 + 1e-5)
        if n_missing == 1:
            assert err == pytest.approx(budget.deterministic, rel=1e-4)
        assert all(uu == u for _, uu in budget.missing)


def test_coordinate_threshold_error_equals_zeroed_norm() -> None:
    h = make_history(22, M, [["a", "b", "c"]])
    store = open_mem(h.w0, MeduPolicy(coord_threshold=0.8))
    record(store, h)
    full = open_mem(h.w0, "full")
    record(full, h)
    for u in ["a", "b", "c"]:
        b = store.error_budget(u)
        assert b.records_missing == 0 and b.rms == 0.0 and b.deterministic > 0
        with warnings.catch_warnings():
            warnings.simplefilter("error", IncompleteUnlearningWarning)
            got = store.unlearn(u, out="flat")
        err = float(np.linalg.norm(got - full.unlearn(u, out="flat")))
        assert err == pytest.approx(b.deterministic, rel=1e-4)


def test_budget_counts_and_warning() -> None:
    h = make_history(23, M, [["a", "b", "c", "d"], ["a", "b"], ["c"]])
    store = open_mem(h.w0, MeduPolicy(keep_top=1, always_keep=("b",)))
    record(store, h)
    stored = store.side("stored")
    col = {u: i for i, u in enumerate(store.users)}
    for row, r in enumerate(h.rounds):  # stage 1 from the raw updates: top score + "b"
        hbar = r.aggregate()
        score = {u: r.weights[u] * np.linalg.norm(r.updates[u] - hbar) for u in r.updates}
        want = {max(score, key=score.get)} | ({"b"} & set(r.updates))
        assert {u for u in r.updates if stored[row, col[u]]} == want, r.t
    forget = ["a", "c", "d"]
    b = store.error_budget(forget)
    assert b.rounds == 3
    assert b.records_used + b.records_missing == 5
    # Round 2 lost its only participant: the aggregate answers, no record is missing there.
    dropped = [(r.t, u) for row, r in enumerate(h.rounds[:2]) for u in r.updates
               if u in forget and not stored[row, col[u]]]
    assert sorted(b.missing) == sorted(dropped)
    assert b.records_missing == len(dropped) > 0
    with pytest.warns(IncompleteUnlearningWarning):
        store.unlearn(forget)
    j = b.to_json()
    assert j["bound_3sigma"] == pytest.approx(b.bound(3.0))
    assert j["exact"] is False and j["records_missing"] == len(dropped)


def test_error_budget_follows_the_accumulator(tmp_path) -> None:
    # A policy that drops most records: the replay's budget is not exact, while the
    # accumulator answers exactly and its budget says so.
    rng = np.random.default_rng(31)
    policy = medustore.MeduPolicy(keep_top=1, name="top1")
    with medustore.open(tmp_path / "acc.zarr", "w", model=np.zeros(32, np.float32),
                        policy=policy, accumulators=True) as store:
        for t in range(4):
            store.record_round(t, {u: rng.normal(size=32).astype(np.float32) * (1 + u)
                                   for u in range(4)})
        replay_budget = store.error_budget(0, exact_accumulator=False)
        acc_budget = store.error_budget(0)
        assert replay_budget.records_missing == 4 and not replay_budget.exact
        assert acc_budget.exact and acc_budget.method == "accumulator"
        assert acc_budget.records_used == 4
