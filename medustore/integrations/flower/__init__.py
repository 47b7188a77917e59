"""Record a Flower run into a medustore archive, so that its clients can be unlearned later.

Two wrappers, one per Flower strategy API:

- `MedustoreStrategy` wraps any strategy of Flower's Message API
  (``flwr.serverapp.strategy``: ``FedAvg``, ``FedProx``, the differential-privacy wrappers,
  ...) the way Flower's own wrappers do: ``MedustoreStrategy(FedAvg(...), store)``. It records
  each round that the wrapped strategy's ``aggregate_train`` aggregated.
- `MedustoreFedAvg` is the legacy ``flwr.server.strategy.FedAvg`` (``configure_fit`` /
  ``aggregate_fit``), for apps still on Flower's compat layer.

Both record, for each client of a round, its returned arrays minus the global arrays it was
sent, weighted as the strategy weighs it (``num-examples``), with tensors named as the
archive's layout names them (the ``ArrayRecord`` keys, i.e. a PyTorch ``state_dict``'s).

Users are keyed by a stable id (see `user_id_from`): the ``partition-id`` the client
reports in its train reply (a metric, or an entry of a ``ConfigRecord``), else its Flower
node id, as an int. Integer-valued ids are stored as ints, so ``store.unlearn(3)`` and
``medustore unlearn ARCHIVE --user 3`` name the same user.

A run into an archive that already holds rounds (mode ``"a"``) continues them: Flower's
server round ``r`` is recorded as round ``last_round + r``.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "medustore.integrations.flower needs Flower: pip install 'medustore[flower]'"
    ) from err

from medustore.integrations.flower._common import (
    DEFAULT_USER_KEYS,
    arrays_from_store,
    flower_template,
    user_id_from,
)
from medustore.integrations.flower.legacy import MedustoreFedAvg
from medustore.integrations.flower.strategy import MedustoreStrategy

__all__ = [
    "DEFAULT_USER_KEYS",
    "MedustoreFedAvg",
    "MedustoreStrategy",
    "arrays_from_store",
    "flower_template",
    "user_id_from",
]
