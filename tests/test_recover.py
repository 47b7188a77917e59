"""Recovery (``unlearn(..., method="recover")``): replaying training without the removed
users, the remaining users' updates estimated from the archive.

A federated linear regression (quadratic losses, so the update is an affine function of the
model and the Hessian is constant) is recorded into archives; every property is checked
against an independent replay of the same training without the removed user.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import medustore
from medustore.recover import RecoverOptions, RecoveryWarning, lbfgs_product, recover
from medustore.replay import unlearn

DIM, USERS, ROUNDS, LR, STEPS = 12, 5, 25, 0.05, 3


def _problem(seed: int = 0, bad_shift: float = 3.0):
    """Per-user least squares ``0.5 ||X_u w - y_u||^2 / n``; user 0 is off the others."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=DIM)
    data = {}
    for u in range(USERS):
        n = 30 + 5 * u
        x = rng.normal(size=(n, DIM)) * np.linspace(0.3, 1.5, DIM)
        y = x @ (w_true + (bad_shift * rng.normal(size=DIM) if u == 0 else 0.0))
        data[u] = (x, y + 0.01 * rng.normal(size=n))
    return data


def _local(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``STEPS`` full-batch gradient steps from ``w``; the update ``w_local - w``."""
    v = w.copy()
    for _ in range(STEPS):
        v -= LR * x.T @ (x @ v - y) / len(y)
    return v - w


def _train(data, w0, exclude=(), on_round=None) -> np.ndarray:
    w = w0.copy()
    for t in range(ROUNDS):
        ups = {u: _local(w, *data[u]) for u in data if u not in exclude}
        p = {u: float(len(data[u][1])) for u in ups}
        w = w + sum(p[u] * ups[u] for u in ups) / sum(p.values())
        if on_round:
            on_round(t, ups, p)
    return w


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The problem, w_0, w_T, the retrained model, and archives of the run."""
    data = _problem()
    w0 = np.zeros(DIM, dtype=np.float64)
    root = tmp_path_factory.mktemp("recover")
    # Seeded dither: the same bytes, hence the same answers, on every run.
    lossy = medustore.PRESETS["lattice"].evolve(seed=0)
    sparse = medustore.MeduPolicy(keep_top=1, lattice="Z", bits=4.0, aggregate_bits=8.0,
                                  seed=0)
    stores = {name: medustore.open(root / f"{name}.zarr", "w", model=w0, policy=pol)
              for name, pol in (("full", "full"), ("lattice", lossy), ("sparse", sparse))}

    def record(t, ups, p):
        for s in stores.values():
            s.record_round(t, ups, weights=p)

    wT = _train(data, w0, on_round=record)
    for s in stores.values():
        s.close()
    retrain = _train(data, w0, exclude=(0,))
    return data, w0, wT, retrain, root


def _exact(data):
    def train(t, model, users):
        w = np.asarray(model, dtype=np.float64)  # a flat template: a flat vector
        return {u: _local(w, *data[u]) for u in users}
    return train


def test_lbfgs_is_the_bfgs_recursion_and_meets_the_secant_condition() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    h = a @ a.T + np.eye(6)
    pairs = [(s, h @ s) for s in rng.normal(size=(4, 6))]
    b0 = rng.uniform(0.5, 2.0, size=6)
    b = np.diag(b0)
    for s, y in pairs:  # the explicit BFGS updates, pair by pair
        bs = b @ s
        b = b - np.outer(bs, bs) / (s @ bs) + np.outer(y, y) / (y @ s)
    v = rng.normal(size=6)
    np.testing.assert_allclose(lbfgs_product(pairs, v, b0), b @ v, rtol=1e-8)
    s, y = pairs[-1]
    np.testing.assert_allclose(lbfgs_product(pairs, s, b0), y, rtol=1e-8)
    np.testing.assert_allclose(lbfgs_product([], v, b0), b0 * v)


def test_nothing_removed_and_exact_rounds_reproduce_w_T(run) -> None:
    data, w0, wT, _, root = run
    with medustore.open(root / "full.zarr") as store:
        # Removing user 0 from an empty window changes nothing: every round is unchanged.
        r = recover(store, [0], rounds=(ROUNDS, None), out="flat")
        np.testing.assert_allclose(r.model, wT, atol=1e-5)
        assert r.report.rounds_unchanged == ROUNDS and r.report.rounds_estimated == 0
        # Every round trained for real by the remaining users is retraining itself.
        all_rounds = recover(store, [0], exact_round=_exact(data),
                             exact_rounds=range(ROUNDS), out="flat")
    retrain = _train(data, w0, exclude=(0,))
    np.testing.assert_allclose(all_rounds.model, retrain, atol=1e-5)
    rep = all_rounds.report
    assert rep.rounds_exact == ROUNDS and rep.client_rounds == ROUNDS * (USERS - 1)
    assert rep.retrain_client_rounds == ROUNDS * (USERS - 1)


def test_recovery_approaches_retraining_on_a_quadratic(run) -> None:
    _, _, wT, retrain, root = run
    with medustore.open(root / "full.zarr") as store, warnings.catch_warnings():
        warnings.simplefilter("error", RecoveryWarning)
        closed = store.unlearn([0], out="flat")
        r = recover(store, [0], out="flat")
        via_unlearn = unlearn(store, [0], method="recover", out="flat")
    np.testing.assert_array_equal(via_unlearn, r.model)
    gap_cf = np.linalg.norm(closed - retrain)
    gap = np.linalg.norm(r.model - retrain)
    # The closed form keeps the honest updates computed at the poisoned models; with a
    # constant Hessian the curvature pairs of the stored trajectory correct them.
    assert gap < 0.25 * gap_cf
    rep = r.report
    assert rep.rounds_estimated == ROUNDS - 1 and rep.client_rounds == 0
    assert rep.pairs_used > 0 and rep.diverged_at is None
    np.testing.assert_allclose(rep.l2_to_closed_form, np.linalg.norm(r.model - closed),
                               rtol=1e-6)
    np.testing.assert_allclose(rep.l2_closed_form_moved, np.linalg.norm(closed - wT),
                               rtol=1e-5)


def test_without_curvature_recovery_is_the_closed_form(run) -> None:
    _, _, _, _, root = run
    for name in ("full", "lattice"):
        with medustore.open(root / f"{name}.zarr") as store:
            closed = store.unlearn([0], out="flat")
            r = recover(store, [0], out="flat", history=0, diagonal=False)
        # Lossy aggregates are corrected to end at the stored w_T, so this holds for both.
        np.testing.assert_allclose(r.model, closed, atol=1e-4)
        assert r.report.l2_to_closed_form < 1e-4


def test_client_rounds_close_the_gap(run) -> None:
    data, _, _, retrain, root = run
    with medustore.open(root / "full.zarr") as store:
        zero = recover(store, [0], out="flat")
        final = recover(store, [0], out="flat", exact_round=_exact(data), final=3)
    assert final.report.rounds_exact == 3 and final.report.client_rounds == 3 * (USERS - 1)
    assert (np.linalg.norm(final.model - retrain)
            < np.linalg.norm(zero.model - retrain))


def test_lossy_archives_recover(run) -> None:
    data, _, _, retrain, root = run
    with medustore.open(root / "full.zarr") as store:
        closed = store.unlearn([0], out="flat")
        ref = recover(store, [0], out="flat").model
    with medustore.open(root / "lattice.zarr") as store, warnings.catch_warnings():
        warnings.simplefilter("ignore", RecoveryWarning)  # noisy pairs: clipped rounds
        r = recover(store, [0], out="flat")
    assert r.report.aggregate_drift > 0  # lossy aggregates: the drift was shared out
    # Coding noise perturbs the curvature pairs (1.4 from retraining here, 0.47 from full;
    # 1.1 to 2.9 over dither seeds 0-4), yet recovery stays far nearer retraining than
    # the closed form (6.1).
    assert np.linalg.norm(r.model - retrain) < 0.5 * np.linalg.norm(closed - retrain)
    assert np.linalg.norm(ref - retrain) < 0.1 * np.linalg.norm(closed - retrain)
    # top-1 keeps user 0 (the outlier) every round: nothing is missing.
    with medustore.open(root / "sparse.zarr") as store:
        assert store.index.n_records == ROUNDS
        with pytest.warns(RecoveryWarning, match="clipped"):  # 4-bit records: noisy pairs
            r = recover(store, [0], out="flat")
        assert r.report.records_missing == 0
        assert np.linalg.norm(r.model - retrain) < 0.5 * np.linalg.norm(closed - retrain)
        assert r.report.records_read == ROUNDS and r.report.aggregates_read == ROUNDS
        # A benign user was never stored: estimated from nothing, with the store's warning.
        with pytest.warns(medustore.IncompleteUnlearningWarning):
            r = recover(store, [3], out="flat")
        assert r.report.records_missing == ROUNDS and r.report.records_filled == 0


def test_safeguards_fire_and_warn(run) -> None:
    _, _, _, _, root = run
    with medustore.open(root / "full.zarr") as store:
        closed = store.unlearn([0], out="flat")
        # An absurd initial curvature makes the estimate overshoot: clipped, and warned.
        with pytest.warns(RecoveryWarning, match="clipped"):
            r = recover(store, [0], out="flat", diagonal=False, damping=50.0, clip=0.5)
        assert r.report.clipped > 0 and r.report.warnings
        # Unclipped, it diverges: the answer falls back to the closed form.
        with pytest.warns(RecoveryWarning, match="diverged"):
            r = recover(store, [0], out="flat", diagonal=False, damping=50.0, clip=1e9,
                        diverge=1.5)
    assert r.report.diverged_at is not None
    np.testing.assert_allclose(r.model, closed, atol=1e-4)


def test_options_and_arguments_are_checked(run) -> None:
    _, _, _, _, root = run
    for bad in ({"history": -1}, {"damping": float("nan")}, {"diverge": 1.0},
                {"min_cos": 2.0}, {"final": 1.5}):
        with pytest.raises(ValueError):
            RecoverOptions(**bad)
    with medustore.open(root / "full.zarr") as store:
        with pytest.raises(ValueError, match="alpha"):
            unlearn(store, [0], method="recover", alpha=0.1)
        with pytest.raises(ValueError, match="method"):
            unlearn(store, [0], method="retrain")
        with pytest.raises(ValueError, match="recover"):
            unlearn(store, [0], history=3)
        with pytest.raises(ValueError, match="exact_round"):
            recover(store, [0], exact_rounds=[3])
        with pytest.raises(ValueError, match="not a remaining participant"):
            recover(store, [0], exact_round=lambda t, m, users: {0: m}, final=1)
        with pytest.raises(medustore.UnknownUserError):
            recover(store, ["nobody"])
    no_agg = medustore.MeduPolicy(keep_aggregates=False)
    with medustore.open(root / "noagg.zarr", "w", model=np.zeros(3), policy=no_agg) as s:
        s.record_round(0, {0: np.ones(3), 1: np.zeros(3)})
        with pytest.raises(ValueError, match="aggregates"):
            recover(s, [0])


def test_declined_client_round_is_estimated(run) -> None:
    data, _, _, _, root = run
    with medustore.open(root / "full.zarr") as store:
        zero = recover(store, [0], out="flat")
        declined = recover(store, [0], out="flat", exact_round=lambda t, m, u: None, final=2)
    assert declined.report.client_rounds == 0 and declined.report.rounds_exact == 0
    np.testing.assert_allclose(declined.model, zero.model, atol=1e-9)
