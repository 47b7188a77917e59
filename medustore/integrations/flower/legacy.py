"""`MedustoreFedAvg`: the legacy ``flwr.server.strategy.FedAvg``, recording every round.

For apps on Flower's compat layer (``configure_fit`` / ``aggregate_fit``, a ``ServerApp``
built with ``server_fn`` and ``ServerAppComponents``, or ``Server.fit``). New apps should use
`MedustoreStrategy` around a ``flwr.serverapp.strategy`` strategy.

    store = medustore.open("run.zarr", "a", model=net.state_dict())
    strategy = MedustoreFedAvg(store, initial_parameters=ndarrays_to_parameters(
        [v.numpy() for v in net.state_dict().values()]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.common import parameters_to_ndarrays
from flwr.server.strategy import FedAvg

from medustore.integrations.flower._common import (
    DEFAULT_USER_KEYS,
    flower_template,
    record_clients,
    round_offset_of,
    tensor_names,
    user_id_from,
)
from medustore.store import RoundSummary, UpdateStore

__all__ = ["MedustoreFedAvg"]


class MedustoreFedAvg(FedAvg):
    """Flower's legacy FedAvg, recording each aggregated round into ``store``.

    Each client's update is its returned parameters minus the global parameters it was
    sent; its weight is ``num_examples``, exactly as FedAvg weighs it, so the archive's
    aggregate is the strategy's.

    Parameters
    ----------
    store
        An archive open for writing.
    user_keys
        Fit metrics holding the client's stable id, first found wins (default
        ``("partition-id", "user_id")``); without one, the client's node id as an int.
    names
        Tensor names of Flower's parameter list, in order. Default: the archive's tensor
        names in layout order (create the archive with ``model=net.state_dict()`` and the
        list as ``state_dict().values()``), so names are needed on neither side.
    round_offset
        Server round ``r`` is recorded as ``round_offset + r``; default the archive's last
        committed round, so a second run into the archive continues its rounds.
    user_key
        Former name of ``user_keys`` (one key).
    **kwargs
        Passed to ``FedAvg``.
    """

    def __init__(self, store: UpdateStore, *,
                 user_keys: str | Sequence[str] = DEFAULT_USER_KEYS,
                 names: Sequence[str] | None = None, round_offset: int | None = None,
                 user_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if store.read_only:
            raise ValueError("the archive is open read-only: open it with mode 'a' or 'r+'")
        if user_key is not None:
            user_keys = (user_key,)
        self.store = store
        self.user_keys = (user_keys,) if isinstance(user_keys, str) else tuple(user_keys)
        self.names = list(names) if names is not None else tensor_names(store)
        self.round_offset = round_offset_of(store, round_offset)
        self.recorded: dict[int, RoundSummary] = {}
        self._sent: dict[int, list[np.ndarray]] = {}

    def __repr__(self) -> str:
        return f"MedustoreFedAvg(store={self.store.location!r}, {super().__repr__()})"

    def archive_round(self, server_round: int) -> int:
        """The archive round Flower's ``server_round`` is recorded as."""
        return self.round_offset + int(server_round)

    def _named(self, ndarrays: list[np.ndarray]) -> dict[str, np.ndarray]:
        if len(ndarrays) != len(self.names):
            raise ValueError(
                f"Flower sent {len(ndarrays)} parameter arrays, the archive's model has "
                f"{len(self.names)} tensors {self.names}: create the archive from the same "
                "model, or pass names=")
        return flower_template(ndarrays, self.names)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        self._sent = {server_round: parameters_to_ndarrays(parameters)}
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> Any:
        aggregated = super().aggregate_fit(server_round, results, failures)
        sent = self._sent.pop(server_round, None)
        if aggregated[0] is None or sent is None:
            return aggregated  # FedAvg refused the round: nothing was applied, nothing kept
        clients = []
        for proxy, fit_res in results:
            node = getattr(proxy, "node_id", proxy.cid)
            user = user_id_from(fit_res.metrics or {}, node, self.user_keys)
            clients.append((user, self._named(parameters_to_ndarrays(fit_res.parameters)),
                            fit_res.num_examples))
        summary = record_clients(self.store, self.archive_round(server_round), clients,
                                 self._named(sent))
        if summary is not None:
            self.recorded[server_round] = summary
        return aggregated
