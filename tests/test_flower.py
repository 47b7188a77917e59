"""Flower drives medustore's strategy wrappers; the archive must match what Flower did.

- The Message-API wrapper (`MedustoreStrategy`) runs the example app of examples/flower in
  Flower's simulation engine (real ClientApps on Ray), twice into the same archive: the
  second run continues the rounds. Unlearning a partition id, through the API and the CLI,
  equals an independent FedAvg replay of the recorded updates.
- The legacy wrapper (`MedustoreFedAvg`) is driven by Flower's legacy ``Server.fit`` with
  in-process clients (fast, no Ray).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read by flwr at import: no network
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning

flwr = pytest.importorskip("flwr")

from flwr.app import ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.server import Server  # noqa: E402

import medustore  # noqa: E402
from medustore.integrations.flower import (  # noqa: E402
    MedustoreFedAvg,
    MedustoreStrategy,
    flower_template,
    user_id_from,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower"


def _replay_without(store, user):
    """Independent FedAvg replay without ``user`` from the archive's exact records: start
    from w_0 and add, each round, the weighted mean of the other users' updates."""
    w = store.initial(out="flat").astype(np.float64)
    for row, t in enumerate(store.rounds):
        p = store.side("weight")[row]
        h = {u: store.record(t, u).astype(np.float64) + store.aggregate(t)
             for i, u in enumerate(store.users) if not np.isnan(p[i]) and u != user}
        total = sum(p[store.users.index(u)] for u in h)
        w = w + sum(p[store.users.index(u)] * h[u] for u in h) / total
    return w


def _flat(arrays, store):
    """An ArrayRecord (or a list of arrays) as the archive's flat vector."""
    if isinstance(arrays, list):
        return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])
    return store.layout.flatten(flower_template(arrays), dtype=np.float64)


# ------------------------------------------------------------------ user ids


def test_user_ids_are_stable_and_typed_like_the_cli():
    metrics = RecordDict({"metrics": MetricRecord({"num-examples": 5, "partition-id": 3})})
    assert user_id_from(metrics, 987654321) == 3
    as_float = RecordDict({"metrics": MetricRecord({"num-examples": 5, "partition-id": 2.0})})
    assert user_id_from(as_float, 987654321) == 2 and isinstance(
        user_id_from(as_float, 1), int)
    in_config = RecordDict({"metrics": MetricRecord({"num-examples": 5}),
                            "medustore": ConfigRecord({"partition-id": "7"})})
    assert user_id_from(in_config, 1) == 7  # "7" is the int 7, as `--user 7` reads it
    named = RecordDict({"metrics": MetricRecord({"num-examples": 5}),
                        "medustore": ConfigRecord({"user_id": "mallory"})})
    assert user_id_from(named, 1) == "mallory"
    anonymous = RecordDict({"metrics": MetricRecord({"num-examples": 5})})
    assert user_id_from(anonymous, 1234567890123) == 1234567890123  # the node id, an int
    assert user_id_from({}, "node-3") == "node-3"                    # a legacy cid
    assert user_id_from({}, "42") == 42
    assert user_id_from({"client": 5}, 1, keys=("client",)) == 5
    with pytest.raises(ValueError, match="not an integer"):
        user_id_from({"partition-id": 1.5}, 1)
    with pytest.raises(TypeError):
        user_id_from({"partition-id": True}, 1)


# ------------------------------------------------------------------ Message API, simulation


def _ray_children():
    psutil = pytest.importorskip("psutil")
    return [p for p in psutil.Process().children(recursive=True)
            if "ray" in " ".join(_cmdline(p)).lower()]


def _cmdline(proc):
    try:
        return proc.cmdline()
    except Exception:  # noqa: BLE001 - the process may be gone already
        return []


@pytest.fixture(scope="module")
def flower_runs(tmp_path_factory):
    """Two simulation runs of the example app into one archive: 2 rounds, then 1 more."""
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    if importlib.util.find_spec("ray") is None:
        pytest.fail("Flower's simulation engine needs ray: pip install 'medustore[flower]'",
                    pytrace=False)
    archive = tmp_path_factory.mktemp("flower") / "run.zarr"
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLE))
        # Flower's Ray backend rewrites PYTHONPATH for its workers: restore it afterwards.
        mp.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        spec = importlib.util.spec_from_file_location("medustore_flower_run",
                                                      EXAMPLE / "run.py")
        runner = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runner)
        simulate = runner.simulate

        # Four ClientApps of one CPU each; Ray gets one CPU, so one actor runs them in turn
        # (starting actors is what a simulation spends its time on). Seeded: the clients'
        # updates do not depend on the order they run in.
        settings = {"clients": 4, "num_cpus": 1, "seed": 0, "max_examples": 60,
                    "accumulators": True, "policy": "full", "lr": 0.3}
        first, second = [], []
        simulate(archive, rounds=2, on_result=first.append, **settings)
        with medustore.open(archive) as store:
            after_first = {"rounds": store.rounds, "users": store.users,
                           "latest": store.latest(out="flat").astype(np.float64)}
        simulate(archive, rounds=1, on_result=second.append, **settings)
        for mod in [m for m in sys.modules if m.startswith("medustore_flower_example")]:
            del sys.modules[mod]
    leftovers = _ray_children()
    if leftovers:
        psutil = pytest.importorskip("psutil")
        _, alive = psutil.wait_procs(leftovers, timeout=30)
        assert not alive, f"Ray processes left behind: {[_cmdline(p) for p in alive]}"
    assert len(first) == len(second) == 1
    return {"archive": archive, "first": first[0], "second": second[0],
            "after_first": after_first}


def test_simulation_is_recorded(flower_runs):
    first = flower_runs["after_first"]
    assert first["rounds"] == [1, 2]
    assert sorted(first["users"]) == [0, 1, 2, 3]  # partition ids, as ints
    with medustore.open(flower_runs["archive"]) as store:
        assert [t.name for t in store.layout.tensors] == [
            "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]  # the state_dict's names
        final_first = _flat(flower_runs["first"].arrays, store)
    np.testing.assert_allclose(first["latest"], final_first, rtol=1e-5, atol=1e-6)


def test_second_run_continues_the_rounds(flower_runs):
    with medustore.open(flower_runs["archive"]) as store:
        assert store.rounds == [1, 2, 3]
        assert sorted(store.users) == [0, 1, 2, 3]
        # The second run started from the model the first one ended with ...
        np.testing.assert_allclose(store.reconstruct(3, out="flat"),
                                   flower_runs["after_first"]["latest"], rtol=1e-5, atol=1e-6)
        # ... and the archive ends where Flower did.
        np.testing.assert_allclose(store.latest(out="flat"),
                                   _flat(flower_runs["second"].arrays, store),
                                   rtol=1e-5, atol=1e-6)


def test_unlearning_a_partition_matches_a_replay(flower_runs, tmp_path):
    with medustore.open(flower_runs["archive"]) as store:
        expected = _replay_without(store, 2)
        exact = store.unlearn(2, out="flat")  # the exact per-user accumulator
        replayed = store.unlearn(2, out="flat", exact_accumulator=False)
        latest = store.latest(out="flat").astype(np.float64)
    np.testing.assert_allclose(exact, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(replayed, expected, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(exact - latest) > 1e-3  # removing a client changes the model

    # The CLI names the same user the same way: `--user 2` is the int 2.
    from click.testing import CliRunner
    from safetensors.numpy import load_file

    from medustore.cli import main

    out = tmp_path / "without-2.safetensors"
    res = CliRunner().invoke(main, ["unlearn", str(flower_runs["archive"]), "--user", "2",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    weights = load_file(out)
    with medustore.open(flower_runs["archive"]) as store:
        np.testing.assert_allclose(store.layout.flatten(weights, dtype=np.float64), exact,
                                   rtol=1e-6, atol=1e-6)


def test_wrapper_follows_flowers_wrapper_pattern(tmp_path):
    from flwr.serverapp.strategy import FedAvg, FedProx

    init = {"w": np.zeros(3, np.float32)}
    with medustore.open(tmp_path / "a.zarr", "w", model=init, policy="full") as store:
        store.record_round(4, {0: {"w": np.ones(3)}})
        wrapped = MedustoreStrategy(FedProx(weighted_by_key="n"), store)
        assert wrapped.round_offset == 4 and wrapped.archive_round(1) == 5
        assert wrapped.weighted_by_key == "n"  # the wrapped strategy's weighting
        assert MedustoreStrategy(FedAvg(), store, round_offset=0).archive_round(1) == 1
        with pytest.raises(TypeError, match="MedustoreFedAvg"):
            MedustoreStrategy(MedustoreFedAvg(store), store)
    with medustore.open(tmp_path / "a.zarr") as ro, pytest.raises(ValueError, match="read-only"):
        MedustoreStrategy(FedAvg(), ro)


# ------------------------------------------------------------------ legacy strategy API


class LinearRegressionClient(ClientProxy):
    """An in-process client: a few gradient steps of least squares on its own data."""

    def __init__(self, cid: str, user: int | None, seed: int) -> None:
        super().__init__(cid)
        rng = np.random.default_rng(seed)
        self.user = user
        self.x = rng.normal(size=(20 + 5 * seed, 3))
        self.y = self.x @ np.array([1.0, -2.0, 0.5]) + rng.normal(scale=0.1, size=len(self.x))

    def fit(self, ins, timeout, group_id):  # noqa: ANN001 - Flower's signature
        w, b = parameters_to_ndarrays(ins.parameters)
        for _ in range(3):
            r = self.x @ w + b - self.y
            w = w - 0.1 * self.x.T @ r / len(r)
            b = b - 0.1 * r.mean(keepdims=True)
        metrics = {} if self.user is None else {"partition-id": self.user}
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters([w, b]), len(self.y),
                      metrics)

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError


def _legacy_run(store, clients, parameters, rounds):
    strategy = MedustoreFedAvg(store, initial_parameters=parameters, min_fit_clients=4,
                               min_available_clients=4, fraction_fit=1.0,
                               fraction_evaluate=0.0)
    manager = SimpleClientManager()
    for c in clients:
        manager.register(c)
    server = Server(client_manager=manager, strategy=strategy)
    server.fit(num_rounds=rounds, timeout=None)
    return parameters_to_ndarrays(server.parameters)


def test_legacy_server_loop_is_recorded_and_resumes(tmp_path):
    # Named tensors on the archive side only: the wrapper takes the names from the archive.
    init = {"weight": np.zeros(3), "bias": np.zeros(1)}
    store = medustore.open(tmp_path / "flower.zarr", "w", model=init, policy="full")
    clients = [LinearRegressionClient(f"node-{i}", user=i, seed=i) for i in range(3)]
    clients.append(LinearRegressionClient("77", user=None, seed=3))  # no id: its node id
    final = _legacy_run(store, clients, ndarrays_to_parameters(list(init.values())), 3)

    assert store.rounds == [1, 2, 3]
    assert sorted(store.users) == [0, 1, 2, 77]  # partition ids, else the node id as an int
    np.testing.assert_allclose(store.latest(out="flat"), _flat(final, store),
                               rtol=1e-6, atol=1e-7)

    # A second run into the archive continues its rounds from where it stopped.
    store.close()
    resumed = medustore.open(tmp_path / "flower.zarr", "a")
    start = ndarrays_to_parameters(list(resumed.latest(out="numpy").values()))
    final = _legacy_run(resumed, clients, start, 2)
    assert resumed.rounds == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(resumed.latest(out="flat"), _flat(final, resumed),
                               rtol=1e-6, atol=1e-7)
    unlearned = resumed.unlearn(2, out="flat")
    np.testing.assert_allclose(unlearned, _replay_without(resumed, 2), rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(unlearned - _flat(final, resumed)) > 1e-3
