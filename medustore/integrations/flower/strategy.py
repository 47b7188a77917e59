"""`MedustoreStrategy`: any Message-API strategy of Flower, recording each round it aggregates.

    from flwr.serverapp.strategy import FedAvg

    store = medustore.open("run.zarr", "a", model=flower_template(initial_arrays))
    strategy = MedustoreStrategy(FedAvg(fraction_evaluate=0.0), store)
    strategy.start(grid=grid, initial_arrays=arrays_from_store(store), num_rounds=3)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from medustore.integrations.flower._common import (
    DEFAULT_USER_KEYS,
    check_names,
    flower_template,
    metric_value,
    record_clients,
    round_offset_of,
    user_id_from,
    without_key,
)
from medustore.store import RoundSummary, UpdateStore

__all__ = ["MedustoreStrategy"]


def _find(strategy: Any, name: str, default: Any) -> Any:
    """``name`` of ``strategy``, or of the strategy it wraps (Flower's wrappers keep theirs
    in ``.strategy``), or ``default``."""
    seen = set()
    while strategy is not None and id(strategy) not in seen:
        seen.add(id(strategy))
        if hasattr(strategy, name):
            return getattr(strategy, name)
        strategy = getattr(strategy, "strategy", None)
    return default


class MedustoreStrategy(Strategy):
    """Strategy wrapper recording every aggregated training round into a medustore archive.

    Follows the pattern of Flower's own wrappers (``DifferentialPrivacyServerSideFixedClipping``):
    ``configure_train`` keeps the global arrays it sends and delegates; ``aggregate_train``
    delegates, and when the wrapped strategy returned new arrays, records the round:
    for each reply without error, the update ``local - global`` (float64) of its
    ``ArrayRecord``, weighted by its ``weighted_by_key`` metric (``num-examples``), under the
    client's stable id (`user_id_from`). Evaluation is delegated untouched.

    The archive's aggregate is then the weighted mean FedAvg computes. With a strategy that
    aggregates otherwise (FedAdam, Krum, DP noise, ...) the archive still holds what each
    client sent and the global model it started from (``global_before``), and unlearning
    replays the FedAvg rule over them.

    Parameters
    ----------
    strategy
        The Message-API strategy to wrap (``flwr.serverapp.strategy.FedAvg``, ...).
    store
        An archive open for writing (mode ``"w"``, ``"a"`` or ``"r+"``) whose model has
        the tensors of the ``ArrayRecord`` sent to clients, same names (create it with
        ``model=flower_template(initial_arrays)`` or ``model=net.state_dict()``).
    user_keys
        Keys of the client's stable id in its train reply (its ``MetricRecord`` first, then
        any ``ConfigRecord``); default ``("partition-id", "user_id")``. Without one, the
        client's node id (int). These keys are dropped from the aggregated train metrics.
    round_offset
        Flower's server round ``r`` is recorded as archive round ``round_offset + r``.
        Default: the archive's last committed round (0 for a new archive), so a second run
        into the same archive continues its rounds.
    weighted_by_key
        Metric giving each client's weight; default: the wrapped strategy's own
        ``weighted_by_key`` (``"num-examples"``).

    Attributes
    ----------
    recorded
        ``{server_round: RoundSummary}`` of the rounds this wrapper committed.
    """

    def __init__(self, strategy: Strategy, store: UpdateStore, *,
                 user_keys: str | Sequence[str] = DEFAULT_USER_KEYS,
                 round_offset: int | None = None,
                 weighted_by_key: str | None = None) -> None:
        super().__init__()
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"MedustoreStrategy wraps a Message-API strategy (flwr.serverapp.strategy), "
                f"got {type(strategy).__name__}; for flwr.server.strategy use MedustoreFedAvg")
        if store.read_only:
            raise ValueError("the archive is open read-only: open it with mode 'a' or 'r+'")
        self.strategy = strategy
        self.store = store
        self.user_keys = (user_keys,) if isinstance(user_keys, str) else tuple(user_keys)
        self.round_offset = round_offset_of(store, round_offset)
        self.weighted_by_key = weighted_by_key or _find(strategy, "weighted_by_key",
                                                        "num-examples")
        self.arrayrecord_key = _find(strategy, "arrayrecord_key", "arrays")
        self.recorded: dict[int, RoundSummary] = {}
        self._sent: dict[int, dict[str, np.ndarray]] = {}

    def __repr__(self) -> str:
        return f"MedustoreStrategy({self.strategy!r}, {self.store.location!r})"

    def archive_round(self, server_round: int) -> int:
        """The archive round Flower's ``server_round`` is recorded as."""
        return self.round_offset + int(server_round)

    def summary(self) -> None:
        """Log the recording settings, then the wrapped strategy's summary."""
        log(INFO, "\t├──> medustore archive: %s", self.store.location)
        log(INFO, "\t│\t├── Users keyed by: %s, else node id",
            ", ".join(repr(k) for k in self.user_keys))
        log(INFO, "\t│\t├── Weighted by: '%s'", self.weighted_by_key)
        log(INFO, "\t│\t└── Server round r recorded as round %d + r", self.round_offset)
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Keep the global arrays sent this round, then configure as the wrapped strategy."""
        check_names(self.store, arrays.keys(), "the global ArrayRecord")
        self._sent = {server_round: flower_template(arrays)}  # only the round in flight
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate with the wrapped strategy; record the round if it produced arrays."""
        replies = list(replies)  # read twice: by the wrapped strategy, then here
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        sent = self._sent.pop(server_round, None)
        if arrays is None or sent is None:
            return arrays, without_key(metrics, self.user_keys)  # nothing applied, nothing kept
        clients = []
        for msg in replies:
            if msg.has_error() or not msg.content.array_records:
                continue
            content = msg.content
            records = content.array_records
            record = records.get(self.arrayrecord_key) or next(iter(records.values()))
            user = user_id_from(content, msg.metadata.src_node_id, self.user_keys)
            clients.append((user, flower_template(record),
                            metric_value(content, self.weighted_by_key)))
        summary = record_clients(self.store, self.archive_round(server_round), clients, sent)
        if summary is not None:
            self.recorded[server_round] = summary
            log(INFO, "medustore: server round %d recorded as round %d (%d users, %d B)",
                server_round, summary.round, summary.participants, summary.nbytes)
        return arrays, without_key(metrics, self.user_keys)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Configure evaluation as the wrapped strategy."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Aggregate evaluation as the wrapped strategy."""
        return self.strategy.aggregate_evaluate(server_round, replies)
