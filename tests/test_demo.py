"""The federated demo: data split, backdoor trigger, FedAvg determinism, and `medustore demo`
end to end on a small run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from medustore.demo.data import (  # noqa: E402
    TRIGGER,
    Dataset,
    add_trigger,
    assign_users,
    load_digits_dataset,
    poison,
    split_users,
)
from medustore.demo.federated import FedConfig, fedavg, participants  # noqa: E402
from medustore.demo.model import backdoor_success, make_model  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the demo uses: more only adds overhead on these tiny models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits_dataset(seed=0)


def _covers_once(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))


def test_digits_shapes_and_range(digits: tuple[Dataset, Dataset]) -> None:
    train, test = digits
    assert len(train) + len(test) == 1797
    assert train.x.shape == (len(train), 8, 8) and train.x.dtype == np.float32
    assert train.y.dtype == np.int64 and set(np.unique(test.y)) == set(range(10))
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_split_covers_every_sample_once(digits: tuple[Dataset, Dataset], split: str) -> None:
    y = digits[0].y
    parts = split_users(y, 20, split, alpha=0.5, seed=3)
    assert len(parts) == 20
    _covers_once(parts, len(y))
    assert min(len(p) for p in parts) >= 10


def test_iid_split_is_balanced(digits: tuple[Dataset, Dataset]) -> None:
    sizes = [len(p) for p in split_users(digits[0].y, 20, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_split_is_seeded_and_skewed(digits: tuple[Dataset, Dataset]) -> None:
    y = digits[0].y
    a = split_users(y, 10, "dirichlet", alpha=0.3, seed=5)
    b = split_users(y, 10, "dirichlet", alpha=0.3, seed=5)
    c = split_users(y, 10, "dirichlet", alpha=0.3, seed=6)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa, pb)
    assert any(not np.array_equal(pa, pc) for pa, pc in zip(a, c, strict=True))
    # Label skew: some user's most frequent class is far above the 10% of an even split.
    top_share = max(np.bincount(y[p], minlength=10).max() / len(p) for p in a)
    assert top_share > 0.3


def test_split_rejects_bad_arguments(digits: tuple[Dataset, Dataset]) -> None:
    y = digits[0].y
    with pytest.raises(ValueError, match="split"):
        split_users(y, 4, "shards")
    with pytest.raises(ValueError, match="alpha"):
        split_users(y, 4, "dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="n_users"):
        split_users(y, 0)


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_malicious_users_get_their_share(digits: tuple[Dataset, Dataset], split: str) -> None:
    y = digits[0].y
    parts = assign_users(y, 20, n_malicious=2, malicious_share=0.1, split=split, seed=1)
    assert len(parts) == 20
    _covers_once(parts, len(y))
    assert len(parts[0]) + len(parts[1]) == round(0.1 * len(y))
    assert abs(len(parts[0]) - len(parts[1])) <= 1


def test_trigger_is_a_bright_corner_patch(digits: tuple[Dataset, Dataset]) -> None:
    x = digits[1].x[:5]
    before = x.copy()
    out = add_trigger(x)
    np.testing.assert_array_equal(x, before)  # input untouched
    assert np.all(out[(..., *TRIGGER)] == 1.0)
    mask = np.zeros((8, 8), dtype=bool)
    mask[TRIGGER] = True
    np.testing.assert_array_equal(out[:, ~mask], x[:, ~mask])


def test_poison_relabels_the_chosen_fraction(digits: tuple[Dataset, Dataset]) -> None:
    clean = digits[0].subset(np.arange(100))
    bad = poison(clean, 0.3, target=7, seed=0)
    triggered = np.all(bad.x[(slice(None), *TRIGGER)] == 1.0, axis=(1, 2))
    assert triggered.sum() == 30 and np.all(bad.y[triggered] == 7)
    np.testing.assert_array_equal(bad.x[~triggered], clean.x[~triggered])
    np.testing.assert_array_equal(bad.y[~triggered], clean.y[~triggered])
    again = poison(clean, 0.3, target=7, seed=0)
    np.testing.assert_array_equal(again.x, bad.x)


def _small_users(digits: tuple[Dataset, Dataset], n: int = 4) -> dict[int, Dataset]:
    train = digits[0]
    parts = split_users(train.y, n, "iid", seed=0)
    users = {u: train.subset(p[:40]) for u, p in enumerate(parts)}
    users[0] = poison(users[0], 0.5, target=0, seed=0)
    return users


SMALL = FedConfig(rounds=3, local_epochs=1, batch_size=16, lr=0.1, seed=11)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fedavg_is_deterministic(digits: tuple[Dataset, Dataset]) -> None:
    users = _small_users(digits)
    model = make_model(seed=2)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    a = fedavg(model, users, SMALL, progress=False)
    b = fedavg(make_model(seed=2), users, SMALL, progress=False)
    assert _equal(a, b)
    assert _equal(model.state_dict(), w0)  # the template is left as it was
    c = fedavg(model, users, dataclasses.replace(SMALL, seed=12), progress=False)
    assert not _equal(a, c)


def test_fedavg_applies_the_weighted_mean_of_the_updates(
        digits: tuple[Dataset, Dataset]) -> None:
    users = _small_users(digits)
    model = make_model(seed=2)
    w = {k: v.double() for k, v in model.state_dict().items()}
    seen = []

    def on_round(t: int, updates: dict, weights: dict) -> None:
        seen.append(t)
        assert weights == {u: float(len(users[u])) for u in updates}
        P = sum(weights.values())
        for k in w:
            w[k] += sum(weights[u] * updates[u][k].double() for u in updates) / P

    final = fedavg(model, users, SMALL, on_round=on_round, progress=False)
    assert seen == [0, 1, 2]
    for k in w:
        torch.testing.assert_close(final[k].double(), w[k], rtol=0, atol=1e-6)


def test_excluded_users_leave_the_others_streams_alone(
        digits: tuple[Dataset, Dataset]) -> None:
    users = _small_users(digits)
    first: dict[str, dict] = {}

    def grab(name: str):
        def on_round(t: int, updates: dict, weights: dict) -> None:
            if t == 0:
                first[name] = updates
        return on_round

    fedavg(make_model(seed=2), users, SMALL, on_round=grab("all"), progress=False)
    fedavg(make_model(seed=2), users, SMALL, on_round=grab("without 0"), exclude=[0],
           progress=False)
    assert set(first["without 0"]) == {1, 2, 3}
    # Round 0 starts from the same w_0: every remaining user computes the same update.
    for u in (1, 2, 3):
        assert _equal(first["all"][u], first["without 0"][u])
    with pytest.raises(KeyError):
        fedavg(make_model(seed=2), users, SMALL, exclude=[99], progress=False)


def test_partial_participation_is_seeded() -> None:
    config = FedConfig(participation=0.25, seed=4)
    drawn = [participants(20, t, config) for t in range(5)]
    assert all(len(c) == 5 and c == sorted(set(c)) for c in drawn)
    assert drawn == [participants(20, t, config) for t in range(5)]
    assert len({tuple(c) for c in drawn}) > 1
    assert participants(20, 0, FedConfig()) == list(range(20))


def test_backdoor_success_ignores_the_target_class(digits: tuple[Dataset, Dataset]) -> None:
    test = digits[1]

    class Always(torch.nn.Module):
        def __init__(self, cls: int) -> None:
            super().__init__()
            self.cls = cls

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(
                torch.full((len(x),), self.cls), 10).float()

    assert backdoor_success(Always(3), test, target=3) == 1.0
    assert backdoor_success(Always(4), test, target=3) == 0.0


# ---------------------------------------------------------------------- end to end

#: A run small enough for a test in which the backdoor still takes hold.
SMALL_DEMO = ["--users", "4", "--rounds", "3", "--malicious-share", "0.3",
              "--local-epochs", "3", "--seed", "1"]
MODEL_KEYS = {"poisoned", "retrain", "unlearned_full", "unlearned_compressed"}


def _demo(*args: str) -> tuple[int, str, str]:
    from click.testing import CliRunner

    from medustore.cli import main

    result = CliRunner().invoke(main, ["demo", *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("demo") / "archives"
    code, stdout, _ = _demo(*SMALL_DEMO, "--json", "--out", str(out))
    assert code == 0, stdout
    return json.loads(stdout), out


def test_demo_json_summary(demo_json: tuple[dict, Path]) -> None:
    summary, out = demo_json
    assert {"config", "parameters", "malicious_users", "models", "storage", "error",
            "seconds", "out"} <= summary.keys()
    assert summary["config"]["policy"] == "medu" and summary["malicious_users"] == [0]
    assert summary["models"].keys() == MODEL_KEYS
    for metrics in summary["models"].values():
        assert metrics.keys() == {"clean_accuracy", "backdoor_success"}
    storage = summary["storage"]
    assert storage["records"] == 3 * 4
    assert storage["peers_float32_bytes"] == 3 * 4 * summary["parameters"] * 4
    assert storage["compressed_bytes"] < storage["full_bytes"]
    assert storage["compression_ratio"] > 1.0
    predicted = summary["error"]["predicted"]
    assert {"deterministic", "rms", "bound_3sigma"} <= predicted.keys()
    assert summary["error"]["measured_l2"] >= 0.0
    assert summary["out"] == str(out)


def test_demo_unlearning_removes_the_backdoor(demo_json: tuple[dict, Path]) -> None:
    models = demo_json[0]["models"]
    assert models["poisoned"]["backdoor_success"] > 0.5
    assert models["retrain"]["backdoor_success"] < 0.1
    assert models["unlearned_full"]["backdoor_success"] < models["poisoned"]["backdoor_success"]


def test_demo_keeps_the_archives_with_out(demo_json: tuple[dict, Path]) -> None:
    import medustore

    summary, out = demo_json
    for name in ("full.zarr", "compressed.zarr"):
        with medustore.open(out / name, "r") as store:
            assert store.rounds == [0, 1, 2]
            assert store.users == [0, 1, 2, 3]


def test_demo_is_reproducible(demo_json: tuple[dict, Path]) -> None:
    code, stdout, _ = _demo(*SMALL_DEMO, "--json", "--policy", "full")
    assert code == 0, stdout
    again = json.loads(stdout)
    first = demo_json[0]
    for key in ("poisoned", "retrain", "unlearned_full"):
        assert again["models"][key] == first["models"][key]
    assert again["storage"]["full_bytes"] == first["storage"]["full_bytes"]
    assert again["out"] is None


def test_demo_prints_a_table() -> None:
    code, stdout, _ = _demo(*SMALL_DEMO, "--policy", "full")
    assert code == 0, stdout
    for label in ("poisoned (w_T)", "retrain from scratch", "unlearned from full",
                  "peers (float32 lists)", "measured"):
        assert label in stdout


def test_demo_command_defaults_are_the_config_defaults() -> None:
    from medustore.cli.demo import demo_command
    from medustore.demo.run import DemoConfig

    fields = {f.name: f.default for f in dataclasses.fields(DemoConfig)}
    options = {p.name: p.default for p in demo_command.params if p.name in fields}
    assert options == fields


def test_demo_rejects_bad_options() -> None:
    code, stdout, stderr = _demo("--users", "3", "--malicious", "3")
    assert code == 2 and "malicious" in stderr and stdout == ""
