"""Record a Flower run: `MedustoreFedAvg` is Flower's FedAvg that archives every round.

Works with the strategy API of ``flwr.server.strategy`` (``configure_fit`` /
``aggregate_fit``). Each client's update is its returned parameters minus the global
parameters it was sent; its aggregation weight is ``num_examples``, exactly as FedAvg
weighs it, so the archive's aggregate is the strategy's. A client is identified by the
fit metric ``user_key`` when it reports one (a stable id across rounds, which is what
unlearning needs), else by its Flower node id.

    store = medustore.open("run.zarr", "w", model=flower_template(initial_ndarrays))
    strategy = MedustoreFedAvg(store, initial_parameters=ndarrays_to_parameters(initial_ndarrays))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    from flwr.common import parameters_to_ndarrays
    from flwr.server.strategy import FedAvg
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "medustore.integrations.flower needs Flower: pip install 'medustore[flower]'"
    ) from err

from medustore.store import UpdateStore

__all__ = ["MedustoreFedAvg", "flower_template"]


def flower_template(ndarrays: Sequence[np.ndarray], names: Sequence[str] | None = None
                    ) -> dict[str, np.ndarray]:
    """A model template from Flower's list of parameter arrays (named ``p0, p1, ...``)."""
    names = list(names) if names is not None else [f"p{i}" for i in range(len(ndarrays))]
    if len(names) != len(ndarrays):
        raise ValueError(f"{len(names)} names for {len(ndarrays)} parameter arrays")
    return {name: np.asarray(a) for name, a in zip(names, ndarrays, strict=True)}


class MedustoreFedAvg(FedAvg):
    """Flower's FedAvg, recording each aggregated round into ``store``.

    Parameters
    ----------
    store
        An archive opened for writing, created with `flower_template` of the initial
        parameters (or the same names given here as ``names``).
    user_key
        Fit metric holding the client's stable user id (int or str).
    names
        Tensor names of the parameter list, as in the archive's layout.
    **kwargs
        Passed to ``FedAvg``.
    """

    def __init__(self, store: UpdateStore, *, user_key: str = "user_id",
                 names: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store = store
        self.user_key = user_key
        self.names = names
        self._sent: dict[int, list[np.ndarray]] = {}

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        self._sent = {server_round: parameters_to_ndarrays(parameters)}
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> Any:
        aggregated = super().aggregate_fit(server_round, results, failures)
        if aggregated[0] is None or server_round not in self._sent:
            return aggregated  # FedAvg refused the round: nothing was applied, nothing kept
        sent = self._sent.pop(server_round)
        before = flower_template(sent, self.names)
        updates, weights = {}, {}
        for proxy, fit_res in results:
            user = fit_res.metrics.get(self.user_key, proxy.cid)
            local = parameters_to_ndarrays(fit_res.parameters)
            updates[user] = flower_template(
                [np.asarray(a, dtype=np.float64) - b for a, b in zip(local, sent, strict=True)],
                self.names)
            weights[user] = fit_res.num_examples
        self.store.record_round(server_round, updates, weights=weights, global_before=before)
        return aggregated
