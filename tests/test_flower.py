"""Flower's own server loop drives `MedustoreFedAvg`; the archive must match what it did."""

from __future__ import annotations

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")

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
from medustore.integrations.flower import MedustoreFedAvg, flower_template  # noqa: E402


class LinearRegressionClient(ClientProxy):
    """An in-process client: a few gradient steps of least squares on its own data."""

    def __init__(self, cid: str, user: int, seed: int) -> None:
        super().__init__(cid)
        rng = np.random.default_rng(seed)
        self.user = user
        self.x = rng.normal(size=(20 + 5 * user, 3))
        self.y = self.x @ np.array([1.0, -2.0, 0.5]) + rng.normal(scale=0.1, size=len(self.x))

    def fit(self, ins, timeout, group_id):  # noqa: ANN001 - Flower's signature
        w, b = parameters_to_ndarrays(ins.parameters)
        for _ in range(3):
            r = self.x @ w + b - self.y
            w = w - 0.1 * self.x.T @ r / len(r)
            b = b - 0.1 * r.mean(keepdims=True)
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters([w, b]), len(self.y),
                      {"user_id": self.user})

    def get_properties(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):  # pragma: no cover - unused
        raise NotImplementedError


def _replay_without(store, user, rounds):
    """Independent FedAvg replay without ``user`` from the archive's exact records."""
    w = store.initial(out="flat").astype(np.float64)
    for t in rounds:
        p = store.side("weight")[store.rounds.index(t)]
        cols = [i for i, u in enumerate(store.users) if not np.isnan(p[i])]
        h = {store.users[i]: store.record(t, store.users[i]) + store.aggregate(t) for i in cols}
        keep = [u for u in h if u != user]
        total = sum(p[store.users.index(u)] for u in keep)
        w = w + sum(p[store.users.index(u)] * h[u] for u in keep) / total
    return w


def test_flower_server_loop_is_recorded(tmp_path):
    init = [np.zeros(3), np.zeros(1)]
    store = medustore.open(tmp_path / "flower.zarr", "w", model=flower_template(init),
                           policy="full")
    strategy = MedustoreFedAvg(store, initial_parameters=ndarrays_to_parameters(init),
                               min_fit_clients=4, min_available_clients=4, fraction_fit=1.0,
                               fraction_evaluate=0.0)
    manager = SimpleClientManager()
    clients = [LinearRegressionClient(f"node-{i}", user=i, seed=i) for i in range(4)]
    for c in clients:
        manager.register(c)
    server = Server(client_manager=manager, strategy=strategy)
    server.fit(num_rounds=3, timeout=None)

    final = np.concatenate([a.ravel() for a in parameters_to_ndarrays(server.parameters)])
    assert store.rounds == [1, 2, 3]
    assert sorted(store.users) == [0, 1, 2, 3]  # the clients' own ids, not node ids
    np.testing.assert_allclose(store.latest(out="flat"), final, rtol=1e-6, atol=1e-7)
    unlearned = store.unlearn(2, out="flat")
    np.testing.assert_allclose(unlearned, _replay_without(store, 2, [1, 2, 3]),
                               rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(unlearned - final) > 1e-3  # removing a user changes the model
