"""Bad input is refused before anything is written.

Each refused round must raise with a message naming the offending value (or user), leave
the archive's files byte-identical (every path and the SHA-256 of its content), leave the
open store's index as it was, and the next valid round must record normally, under the
lossless ``full`` preset and a lossy lattice policy alike. Unlearning refuses a skew that
overflows instead of answering with an infinite model (or an infinite budget).
"""

from __future__ import annotations

import math
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _fl import memory_url, tree_digest

import medustore
from medustore import ArchiveIndex, MeduPolicy
from medustore import replay as replay_mod

M = 8
F32_MAX = float(np.finfo(np.float32).max)

POLICIES = {
    "full": "full",
    "lossy": MeduPolicy(lattice="Z", bits=4.0, aggregate_bits=6.0, seed=5, name="lossy"),
}


def vec(value: float, dtype: Any = np.float32) -> np.ndarray:
    return np.full(M, value, dtype=dtype)


def small(seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).normal(size=M)).astype(np.float32)


@dataclass
class Case:
    """A round that must be refused, and the archive it is tried on."""

    updates: Any
    error: type[Exception]
    pattern: str
    weights: dict | None = None
    round: Any = None  # None: the round after the last one
    model: str = "f4"  # a key of MODELS
    policies: tuple[str, ...] = tuple(POLICIES)  # round numbers are refused before values


MODELS = {"f4": np.zeros(M, np.float32), "f8": np.zeros(M), "3e38": np.full(M, 3e38, np.float32)}
FULL = ("full",)


def _cases() -> dict[str, Case]:
    return {
        # Round numbers: the message names the value.
        "round-2**63": Case({"a": small(1)}, ValueError, re.escape(str(2**63)), round=2**63,
                            policies=FULL),
        "round-2**64": Case({"a": small(1)}, ValueError, re.escape(str(2**64)), round=2**64,
                            policies=FULL),
        "round-negative": Case({"a": small(1)}, ValueError, r"got -1\b", round=-1,
                               policies=FULL),
        "round-bool": Case({"a": small(1)}, ValueError, r"got True", round=True, policies=FULL),
        "round-numpy-bool": Case({"a": small(1)}, ValueError, r"got (np\.)?True",
                                 round=np.True_, policies=FULL),
        "round-not-above-last": Case({"a": small(1)}, ValueError, r"round 1 is not above",
                                     round=1, policies=FULL),
        # Weights whose sum leaves the float range, or whose share underflows to 0.
        "weights-sum-overflows": Case({"a": small(1), "b": small(2)}, ValueError,
                                      r"sum past the float range \(inf\)",
                                      weights={"a": 1e308, "b": 1e308}),
        "weight-share-underflows": Case({"a": small(1), "b": small(2)}, ValueError,
                                        r"share\s+underflows", weights={"a": 1e300, "b": 1e-300}),
        # Differentials d = h - hbar that do not fit float32: +3e38 against -3e38 weighted
        # 1:3 puts hbar at -1.5e38 and d_a at 4.5e38.
        "differential-overflows": Case({"a": vec(3e38), "b": vec(-3e38)}, ValueError,
                                       r"differential of user 'a'.*overflows float32",
                                       weights={"a": 1.0, "b": 3.0}),
        # The next model w_t + hbar_t does not fit the model's float32.
        "next-model-overflows": Case({"a": vec(3e38)}, ValueError,
                                     r"next global model.*overflows float32",
                                     model="3e38"),
        # Records and aggregates are float32 whatever the model's precision: a float64
        # model's update of 1e39 (its aggregate too) cannot be stored.
        "update-overflows-float32-f64-model": Case({"big": vec(1e39, np.float64)}, ValueError,
                                                   r"update of user 'big'", model="f8"),
        # Non-finite updates name the user.
        "nan-update": Case({"a": small(1), "eve": np.where(np.arange(M) == 3, np.nan,
                                                           small(2)).astype(np.float32)},
                           ValueError, r"user 'eve'.*NaN or infinite"),
        "inf-update": Case({"a": small(1), 9: vec(np.inf)}, ValueError,
                           r"user 9.*NaN or infinite"),
        "-inf-update": Case([("a", small(1)), ("b", vec(-np.inf))], ValueError,
                            r"user 'b'.*NaN or infinite"),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def templates() -> dict:
    """Closed template archives, by (policy, model, accumulators)."""
    return {}


@pytest.fixture
def make_archive(templates: dict, tmp_path_factory: pytest.TempPathFactory,
                 tmp_path: Path) -> Callable[..., Path]:
    """``make_archive(policy, model="f4", accumulators=False)``: a private copy of a closed
    two-round archive (rounds 0 and 1) of that policy and model (see MODELS)."""

    def make(policy: str, model: str = "f4", accumulators: bool = False) -> Path:
        key = (policy, model, accumulators)
        if key not in templates:
            path = tmp_path_factory.mktemp("template") / "run.zarr"
            with medustore.open(path, "w", model=MODELS[model], policy=POLICIES[policy],
                                accumulators=accumulators,
                                retention=medustore.Retention(every=0)) as store:
                store.record_round(0, {"a": small(10), "b": small(11), 7: small(12)},
                                   weights={"a": 1.0, "b": 2.0, 7: 3.0})
                store.record_round(1, {"a": small(13), "c": small(14)})
            templates[key] = path
        return Path(shutil.copytree(templates[key], tmp_path / "run.zarr"))

    return make


def check_refused(path: Path, call: Callable[[medustore.UpdateStore], Any],
                  error: type[Exception] | tuple, pattern: str) -> None:
    """``call(store)`` raises without writing; then a valid round records."""
    with medustore.open(path, "r+") as store:
        files = tree_digest(path)
        rounds, users, digest = store.rounds, store.users, store.index.digest
        latest = store.latest("flat").astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow notes
            with pytest.raises(error, match=pattern):
                call(store)
        assert tree_digest(path) == files
        assert (store.rounds, store.users, store.index.digest) == (rounds, users, digest)
        np.testing.assert_array_equal(store.latest("flat").astype(np.float64), latest)
        # The next valid round records normally and moves the model by its FedAvg.
        good = {"a": small(20), "new": small(21)}
        t = rounds[-1] + 1
        summary = store.record_round(t, good, weights={"a": 1.0, "new": 3.0})
        assert summary.round == t and summary.participants == 2
        want = latest + (1.0 * good["a"].astype(np.float64) + 3.0 * good["new"]) / 4.0
        np.testing.assert_allclose(store.latest("flat"), want, rtol=1e-6, atol=1e-6)
    with medustore.open(path, "r") as store:
        assert store.rounds == [*rounds, t]
        assert store.users == [*users, "new"]


@pytest.mark.parametrize(("name", "policy"), [(name, policy) for name, case in CASES.items()
                                              for policy in case.policies])
def test_bad_round_is_refused_before_writing(make_archive: Callable[..., Path], name: str,
                                             policy: str) -> None:
    case = CASES[name]
    path = make_archive(policy, case.model)
    t = 2 if case.round is None else case.round
    check_refused(path, lambda s: s.record_round(t, case.updates, weights=case.weights),
                  case.error, case.pattern)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_global_before_overflowing_the_next_model(make_archive: Callable[..., Path],
                                                  policy: str) -> None:
    path = make_archive(policy)
    check_refused(path, lambda s: s.record_round(2, {"a": vec(3e38)},
                                                 global_before=vec(3e38)),
                  ValueError, r"next global model.*overflows float32")


def test_torch_module_as_updates_is_a_type_error(make_archive: Callable[..., Path]) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 4)
    path = make_archive("full")
    check_refused(path, lambda s: s.record_round(2, net), TypeError, r"torch module")


def test_torch_module_as_one_users_update_is_a_type_error(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 4)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    path = tmp_path / "run.zarr"
    with medustore.open(path, "w", model=sd, policy="full") as store:
        files = tree_digest(path)
        with pytest.raises(TypeError, match=r"user 'a'.*module"):
            store.record_round(0, {"a": net})
        assert tree_digest(path) == files and store.rounds == []


def test_weight_underflow_message_names_the_user() -> None:
    with medustore.open(memory_url("underflow"), "w", model=np.zeros(M, np.float32),
                        policy="full") as store:
        with pytest.raises(ValueError, match=r"'b'.*1e-300"):
            store.record_round(0, {"a": small(1), "b": small(2)},
                               weights={"a": 1e300, "b": 1e-300})


@pytest.mark.parametrize("policy", list(POLICIES))
def test_extreme_but_representable_updates_are_kept_finite(tmp_path: Path,
                                                           policy: str) -> None:
    # +3e38 and -3e38 at equal weights: hbar = 0 and d = +-3e38 fit float32, so the round
    # is taken, and every answer read back stays finite.
    path = tmp_path / "run.zarr"
    with medustore.open(path, "w", model=np.zeros(M, np.float32), policy=POLICIES[policy],
                        accumulators=True) as store:
        store.record_round(0, {"a": vec(3e38), "b": vec(-3e38)})
        for u in ("a", "b"):
            rec = store.record(0, u)
            assert np.isfinite(rec).all() and np.all(np.abs(rec) <= F32_MAX)
            assert np.all(np.sign(rec) == (1 if u == "a" else -1))
            for exact in (True, False):
                got = store.unlearn(u, out="flat", exact_accumulator=exact)
                assert np.isfinite(got).all()
        if policy == "full":
            np.testing.assert_array_equal(store.record(0, "a"), vec(3e38))
            np.testing.assert_array_equal(store.unlearn("a", out="flat"), vec(-3e38))
        np.testing.assert_array_equal(store.latest("flat"), np.zeros(M, np.float32))


# ---------------------------------------------------------------------------- accumulators


@pytest.mark.parametrize("policy", list(POLICIES))
def test_accumulator_term_overflow_is_refused(make_archive: Callable[..., Path],
                                              policy: str) -> None:
    # p_big / (sum of the others' weights) = 1e320 does not fit a float64.
    path = make_archive(policy, accumulators=True)
    check_refused(path, lambda s: s.record_round(2, {"big": small(30), "tiny": small(31)},
                                                 weights={"big": 1e200, "tiny": 1e-120}),
                  ValueError, r"(weight of user 'big' is inf times the rest|accumulator term of "
                  r"user 'big' overflows)")


@pytest.mark.parametrize("weights", [
    pytest.param((1e3, 1.0), id="1e3"),
    pytest.param((1e6, 1.0), id="1e6"),
])
def test_accumulator_with_a_dominant_weight_matches_replay(weights: tuple) -> None:
    # Removing the dominant user leaves the others' aggregate: an accepted round must be
    # unlearned exactly (the independent FedAvg replay: w_before + h_tiny).
    with medustore.open(memory_url("dominant"), "w", model=np.zeros(M, np.float32),
                        policy="full", accumulators=True) as store:
        ups = _dwarfing_round_at(store, 0, *weights)
        got = store.unlearn("big", out="flat")
        assert store.error_budget("big").exact
        np.testing.assert_allclose(got, ups["tiny"], rtol=1e-4, atol=1e-6)
        via_records = store.unlearn("big", out="flat", exact_accumulator=False)
        np.testing.assert_allclose(via_records, ups["tiny"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weights", [(1e8, 1.0), (1e17, 1.0)])
def test_a_weight_dwarfing_the_rest_is_refused(make_archive: Callable[..., Path],
                                               weights: tuple) -> None:
    # Unlearning "big" would scale rounding in its differential by p_big / p_tiny.
    path = make_archive("full", accumulators=True)
    check_refused(path, lambda s: s.record_round(2, {"big": small(30), "tiny": small(31)},
                                                 weights=dict(zip(("big", "tiny"), weights,
                                                                  strict=True))),
                  ValueError, r"weight of user 'big' is .* times the rest")


def _dwarfing_round_at(store: medustore.UpdateStore, t: int, big: float, tiny: float) -> dict:
    ups = {"big": small(30), "tiny": small(31)}
    store.record_round(t, ups, weights={"big": big, "tiny": tiny})
    return ups


# ---------------------------------------------------------------------------- unlearning


@pytest.fixture(scope="module")
def run40() -> str:
    """An in-memory archive of 40 rounds of users "a" and "b" (a lossy policy: budgets
    have an rms)."""
    url = memory_url("alpha")
    rng = np.random.default_rng(3)
    with medustore.open(url, "w", model=np.zeros(M, np.float32), policy=POLICIES["lossy"],
                        retention=medustore.Retention(every=0)) as store:
        for t in range(40):
            store.record_round(t, {u: (0.1 * rng.normal(size=M)).astype(np.float32)
                                   for u in ("a", "b")})
    return url


class _TiledReader:
    """Reads of `Tiled`: record k is the base round's record k mod (records per round)."""

    def __init__(self, base: Any, index: ArchiveIndex, per_round: int) -> None:
        self.base, self.index, self.per_round = base, index, per_round
        self.reads = 0

    def model(self) -> np.ndarray:
        return self.base.model()

    def initial(self) -> np.ndarray:
        return self.base.initial()

    def record(self, record: int, what: str | None = None) -> np.ndarray:
        self.reads += 1
        return self.base.record(record % self.per_round, what)

    def aggregate(self, row: int) -> np.ndarray:
        self.reads += 1
        return self.base.aggregate(0)


class Tiled:
    """The public read contract (``index``, ``reader``) of an archive holding ``n`` copies
    of the one round of ``store``, renumbered 0..n-1 (built with `ArchiveIndex.from_tables`,
    so long histories cost nothing to record)."""

    def __init__(self, store: medustore.UpdateStore, n: int) -> None:
        base = store.index
        assert base.n_rounds == 1
        rounds, facts, entries, efacts = base.tables()
        rounds = np.tile(rounds, (n, 1))
        rounds[:, 0] = np.arange(n)
        entries = np.tile(entries, (n, 1))
        per_round = base.n_records
        stored = entries[:, 1] >= 0
        entries[stored, 1] += np.repeat(np.arange(n) * per_round, base.n_entries)[stored]
        self.index = ArchiveIndex.from_tables(base.settings, base.users, rounds,
                                              np.tile(facts, (n, 1)), entries,
                                              np.tile(efacts, (n, 1)), base.digest)
        self.reader = _TiledReader(store.reader, self.index, per_round)


@pytest.fixture(scope="module")
def one_round() -> str:
    url = memory_url("one")
    with medustore.open(url, "w", model=np.zeros(M, np.float32), policy=POLICIES["lossy"],
                        retention=medustore.Retention(every=0)) as store:
        store.record_round(0, {"a": small(40), "b": small(41)})
    return url


def test_tiled_source_answers_like_the_closed_form(one_round: str) -> None:
    # The tiled source itself is sound: removing "a" from n copies of a round subtracts
    # n times that round's correction (alpha 0), and the skew multiplies as the rule says.
    with medustore.open(one_round) as store:
        one = store.latest("flat").astype(np.float64) - store.unlearn("a", out="flat")
        src = Tiled(store, 5)
        got = replay_mod.unlearn(src, "a", out="flat")
        np.testing.assert_allclose(store.latest("flat") - got, 5 * one, rtol=1e-12)
        skewed = replay_mod.unlearn(src, "a", alpha=0.5, out="flat")
        factor = sum(1.5 ** k for k in range(5))
        np.testing.assert_allclose(store.latest("flat") - skewed, factor * one, rtol=1e-12)
        budget = replay_mod.error_budget(src, "a")
        assert budget.rms == pytest.approx(math.sqrt(5) * store.error_budget("a").rms)


@pytest.mark.parametrize("alpha", [-0.1, -1.0, math.nan, math.inf, -math.inf])
def test_alpha_must_be_finite_and_not_negative(run40: str, alpha: float) -> None:
    with medustore.open(run40) as store:
        for call in (store.unlearn, store.error_budget):
            with pytest.raises(ValueError, match=r"alpha.*" + re.escape(repr(alpha))):
                call("a", alpha=alpha)


def test_alpha_30_over_220_rounds_is_refused_from_the_index(one_round: str) -> None:
    # (1 + 30)^219 leaves the float range: refused while planning, before any read.
    with medustore.open(one_round) as store:
        src = Tiled(store, 220)
        for call in (replay_mod.unlearn, replay_mod.error_budget):
            with pytest.raises(ValueError, match=r"alpha=30"):
                call(src, "a", alpha=30)
        assert src.reader.reads == 0


@pytest.mark.parametrize("call", ["unlearn", "error_budget"])
def test_alpha_30_over_110_rounds_is_refused(one_round: str, call: str) -> None:
    with medustore.open(one_round) as store:
        with pytest.raises(ValueError, match=r"alpha"):
            getattr(replay_mod, call)(Tiled(store, 110), "a", alpha=30)


@pytest.mark.parametrize("out", [
    "numpy",
    "flat",  # float64: 31^39 * |d| is representable
])
def test_alpha_30_over_40_rounds_never_gives_an_infinite_model(run40: str, out: str) -> None:
    with medustore.open(run40) as store:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                got = store.unlearn("a", alpha=30, out=out)
        except ValueError as err:
            assert "alpha" in str(err)
            return
        assert np.isfinite(got).all()
        assert math.isfinite(store.error_budget("a", alpha=30).bound())


def test_alpha_30_over_few_rounds_is_answered(run40: str) -> None:
    # The same skew over a short window is representable: a finite answer, changed by the
    # skew, with a finite budget.
    with medustore.open(run40) as store:
        got = store.unlearn("a", alpha=30, rounds=(0, 5), out="flat")
        plain = store.unlearn("a", rounds=(0, 5), out="flat")
        assert np.isfinite(got).all() and not np.array_equal(got, plain)
        budget = store.error_budget("a", alpha=30, rounds=(0, 5))
        assert math.isfinite(budget.bound()) and budget.rms > 0
