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


def test_fedavg_continues_a_run_from_first_round(digits: tuple[Dataset, Dataset]) -> None:
    users = _small_users(digits)
    whole = fedavg(make_model(seed=2), users, SMALL, progress=False)
    head = fedavg(make_model(seed=2), users, dataclasses.replace(SMALL, rounds=2),
                  progress=False)
    start = make_model(seed=2)
    start.load_state_dict(head)
    seen = []
    tail = fedavg(start, users, dataclasses.replace(SMALL, rounds=1), progress=False,
                  first_round=2, on_round=lambda t, updates, weights: seen.append(t))
    assert seen == [2]
    assert _equal(whole, tail)
    with pytest.raises(ValueError, match="first_round"):
        fedavg(start, users, SMALL, progress=False, first_round=-1)


def test_recover_continues_the_schedule_without_the_excluded(
        digits: tuple[Dataset, Dataset]) -> None:
    from medustore.demo.run import DemoConfig, recover

    users = _small_users(digits)
    config = DemoConfig(users=4, rounds=2, local_epochs=1, seed=11, recovery_rounds=1)
    fed = config.fed()
    retrain = fedavg(make_model(seed=2), users, fed, exclude=[0], progress=False)
    longer = fedavg(make_model(seed=2), users, dataclasses.replace(fed, rounds=3),
                    exclude=[0], progress=False)
    model = make_model(seed=5)  # architecture only
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Recovering the retrained model is retraining for rounds + recovery_rounds rounds.
    assert _equal(recover(model, retrain, users, config, exclude=[0]), longer)
    assert _equal(model.state_dict(), before)
    none = recover(model, retrain, users, dataclasses.replace(config, recovery_rounds=0), [0])
    assert _equal(none, retrain) and none["1.weight"] is not retrain["1.weight"]


def test_gap_note_explains_the_closed_form_gap() -> None:
    from medustore.demo.run import gap_note

    def summary(full: float, retrain: float, k: int = 0) -> dict:
        models = {"unlearned_full": {"clean_accuracy": full, "backdoor_success": 0.0},
                  "retrain": {"clean_accuracy": retrain, "backdoor_success": 0.0}}
        if k:
            models["unlearned_full_recovered"] = {"clean_accuracy": 0.949}
            models["retrain_recovered"] = {"clean_accuracy": 0.958}
        return {"config": {"recovery_rounds": k}, "models": models}

    assert gap_note(summary(0.95, 0.955)) is None  # within 1 point
    note = gap_note(summary(0.813, 0.956))
    assert note is not None and "14.3 points below retraining" in note
    assert "not from compression" in note and note.count(". ") == 0
    with_k = gap_note(summary(0.813, 0.956, k=2))
    assert "2 recovery rounds" in with_k and "94.9%" in with_k and "95.8%" in with_k
    assert "above retraining" in gap_note(summary(0.97, 0.95))


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
#: With recovery rounds (the default 2): each model after them.
RECOVERED_KEYS = {f"{k}_recovered" for k in MODEL_KEYS}


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
            "note", "seconds", "out"} <= summary.keys()
    assert summary["config"]["policy"] == "medu" and summary["malicious_users"] == [0]
    assert summary["config"]["recovery_rounds"] == 2
    assert summary["models"].keys() == MODEL_KEYS | RECOVERED_KEYS
    assert summary["note"] is None or "points" in summary["note"]
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
    # Same data, byte for byte; only Icechunk's own metadata differs between runs (random
    # snapshot ids and commit times, which its compression codes in a few bytes more or less).
    assert abs(again["storage"]["full_bytes"] - first["storage"]["full_bytes"]) <= 64
    assert again["out"] is None


def test_demo_recovery_rows_continue_the_schedule(demo_json: tuple[dict, Path]) -> None:
    models = demo_json[0]["models"]
    # The malicious user stays out of the recovery rounds: no model regains the backdoor
    # it lost, and the retrained one stays clean.
    assert models["retrain_recovered"]["backdoor_success"] < 0.1
    assert (models["unlearned_full_recovered"]["backdoor_success"]
            < models["poisoned"]["backdoor_success"])


def test_demo_without_recovery_rounds_keeps_the_original_keys() -> None:
    code, stdout, _ = _demo(*SMALL_DEMO, "--json", "--policy", "full", "--recovery-rounds", "0")
    assert code == 0, stdout
    summary = json.loads(stdout)
    assert summary["models"].keys() == MODEL_KEYS
    assert summary["config"]["recovery_rounds"] == 0


def test_demo_prints_a_table() -> None:
    code, stdout, _ = _demo(*SMALL_DEMO, "--policy", "full", "--recovery-rounds", "1")
    assert code == 0, stdout
    for label in ("poisoned (w_T)", "retrain from scratch", "unlearned from full",
                  "retrain + 1 recovery round", "unlearned from full + 1 recovery round",
                  "poisoned + 1 recovery round (no unlearning)",
                  "peers (float32 lists)", "measured"):
        assert label in stdout


def test_format_summary_prints_the_gap_note() -> None:
    from medustore.cli.demo import format_summary

    metrics = {"clean_accuracy": 0.9, "backdoor_success": 0.0}
    summary = {
        "config": {"policy": "medu", "users": 20, "malicious": 1, "target": 0,
                   "split": "iid", "rounds": 30, "participation": 1.0, "seed": 0},
        "parameters": 4810,
        "models": {k: metrics for k in MODEL_KEYS},
        "storage": {"peers_float32_bytes": 1000, "full_bytes": 900, "compressed_bytes": 10,
                    "compression_ratio": 100.0, "records": 600,
                    "records_stored": {"full": 600, "compressed": 30}, "policy": "medu: ..."},
        "error": {"predicted": {"deterministic": 0.0, "rms": 0.1, "bound_3sigma": 0.3},
                  "measured_l2": 0.1, "full_vs_retrain_l2": 1.0, "poisoned_vs_retrain_l2": 2.0},
        "note": "Unlearning from the full archive is 14.2 points below retraining.",
        "seconds": 1.0, "out": None,
    }
    text = format_summary(summary)
    assert "14.2 points below retraining" in text
    assert "recovery" not in text  # a summary without recovery rounds (or an older one)
    del summary["note"]
    assert "points below" not in format_summary(summary)


def test_demo_command_defaults_are_the_config_defaults() -> None:
    from medustore.cli.demo import demo_command
    from medustore.demo.run import DemoConfig

    fields = {f.name: f.default for f in dataclasses.fields(DemoConfig)}
    options = {p.name: p.default for p in demo_command.params if p.name in fields}
    assert options == fields


def test_demo_rejects_bad_options() -> None:
    code, stdout, stderr = _demo("--users", "3", "--malicious", "3")
    assert code == 2 and "malicious" in stderr and stdout == ""
    code, stdout, stderr = _demo("--recovery-rounds", "-1")
    assert code == 2 and "recovery-rounds" in stderr and stdout == ""


def test_demo_config_rejects_bad_recovery_rounds() -> None:
    from medustore.demo.run import DemoConfig

    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="recovery_rounds"):
            DemoConfig(recovery_rounds=bad)


# ---------------------------------------------------------------------- --method, --out

def test_demo_recover_reports_recovered_models(tmp_path: Path) -> None:
    code, stdout, _ = _demo(*SMALL_DEMO, "--json", "--policy", "full", "--recovery-rounds",
                            "0", "--method", "recover", "--client-rounds", "1")
    assert code == 0, stdout
    summary = json.loads(stdout)
    assert summary["method"] == "recover" and summary["config"]["client_rounds"] == 1
    assert summary["models"].keys() == MODEL_KEYS
    rec = summary["recovery"]["full"]
    # 3 rounds of 3 remaining users; the last one trained for real.
    assert rec["client_rounds"] == 3 and rec["retrain_client_rounds"] == 9
    assert rec["rounds_exact"] == 1 and rec["l2_to_closed_form"] > 0
    assert summary["closed_form"].keys() == {"unlearned_full", "unlearned_compressed"}
    models = summary["models"]
    assert models["unlearned_full"]["backdoor_success"] < models["poisoned"]["backdoor_success"]
    # Same seed, closed form: the same retrained and poisoned models, other unlearned ones.
    code, stdout, _ = _demo(*SMALL_DEMO, "--json", "--policy", "full", "--recovery-rounds", "0")
    replay = json.loads(stdout)
    assert replay["method"] == "replay" and "recovery" not in replay
    assert replay["models"]["retrain"] == models["retrain"]
    assert replay["models"]["unlearned_full"] == summary["closed_form"]["unlearned_full"]


def test_demo_recover_prints_its_table() -> None:
    code, stdout, _ = _demo(*SMALL_DEMO, "--policy", "full", "--recovery-rounds", "0",
                            "--method", "recover")
    assert code == 0, stdout
    for label in ("recovered from full", "Recovery (no error bound", "client rounds of 9",
                  "L2 to the closed form"):
        assert label in stdout
    assert "predicted" not in stdout  # the closed form's bound is not recovery's


def test_demo_out_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "archives"
    args = [*SMALL_DEMO, "--json", "--policy", "full", "--recovery-rounds", "0", "--rounds", "1",
            "--out", str(out)]
    code, stdout, _ = _demo(*args)
    assert code == 0, stdout
    before = (out / "full.zarr").stat().st_mtime_ns
    code, stdout, stderr = _demo(*args)
    assert code == 2 and stdout == ""
    assert "already exist" in stderr and "--force" in stderr
    assert (out / "full.zarr").stat().st_mtime_ns == before
    code, stdout, _ = _demo(*args, "--force")
    assert code == 0, stdout
    from medustore.demo.run import DemoConfig, run_demo

    with pytest.raises(FileExistsError, match="force"):
        run_demo(DemoConfig(users=4, rounds=1, recovery_rounds=0), out=out)


def test_demo_config_rejects_bad_methods() -> None:
    from medustore.demo.run import DemoConfig

    with pytest.raises(ValueError, match="method"):
        DemoConfig(method="retrain")
    with pytest.raises(ValueError, match="client_rounds"):
        DemoConfig(client_rounds=1)  # the closed form asks no client
    with pytest.raises(ValueError, match="client_rounds"):
        DemoConfig(method="recover", rounds=2, client_rounds=3)
    code, _, stderr = _demo("--method", "retrain")
    assert code == 2 and "method" in stderr
