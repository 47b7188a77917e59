"""Local models recorded as models: the store subtracts the global model it holds."""

from __future__ import annotations

import numpy as np
import pytest

import medustore

torch = pytest.importorskip("torch", reason="recording torch models needs PyTorch")


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def test_models_equal_their_updates() -> None:
    w0 = {k: v.detach().clone() for k, v in _net(0).state_dict().items()}
    locals_ = {u: _net(10 + i) for i, u in enumerate(("a", "b", 3))}
    weights = {"a": 1.0, "b": 2.0, 3: 3.0}
    with medustore.open("memory://models-a", "w", model=w0, policy="full") as by_model, \
            medustore.open("memory://models-b", "w", model=w0, policy="full") as by_update:
        by_model.record_round(0, models=locals_, weights=weights)
        updates = {u: {k: v.detach() - w0[k] for k, v in m.state_dict().items()}
                   for u, m in locals_.items()}
        by_update.record_round(0, updates, weights=weights)
        np.testing.assert_allclose(by_model.latest("flat"), by_update.latest("flat"),
                                   rtol=0, atol=1e-7)
        for u in locals_:
            np.testing.assert_allclose(by_model.record(0, u), by_update.record(0, u),
                                       rtol=0, atol=1e-7)
        # The second round's models are taken against the store's own w_1.
        w1 = by_model.latest("state_dict")
        nxt = {"a": _net(20)}
        by_model.record_round(1, models=nxt)
        np.testing.assert_allclose(by_model.latest("flat"),
                                   by_model.layout.flatten(nxt["a"], dtype=np.float64),
                                   rtol=0, atol=1e-6)
        assert set(w1) == set(w0)


def test_a_module_given_as_an_update_names_models() -> None:
    w0 = _net(0).state_dict()
    with medustore.open("memory://models-c", "w", model=w0, policy="full") as store:
        with pytest.raises(TypeError, match=r"models=\{user: model\}"):
            store.record_round(0, {"a": _net(1)})
        with pytest.raises(TypeError, match="not both or neither"):
            store.record_round(0)
        with pytest.raises(TypeError, match="not both or neither"):
            store.record_round(0, {"a": w0}, models={"a": _net(1)})
        assert store.rounds == []
