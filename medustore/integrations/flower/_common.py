"""What both Flower wrappers share: user ids, templates, round offsets, recording a round."""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from medustore.store import UpdateStore, UserId

__all__ = [
    "DEFAULT_USER_KEYS",
    "arrays_from_store",
    "flower_template",
    "record_clients",
    "round_offset_of",
    "stable_id",
    "user_id_from",
]

#: Where a client's stable id is looked up, in this order (first found wins): the partition
#: id Flower's simulation gives each node (``context.node_config["partition-id"]``), then the
#: ``user_id`` older versions of this integration read.
DEFAULT_USER_KEYS: tuple[str, ...] = ("partition-id", "user_id")

_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def stable_id(value: Any, what: str = "user id") -> UserId:
    """A user id as the archive stores it: ints (and integer-valued floats, and canonical
    integer strings such as ``"3"``) become int, other strings stay str."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int or a str, got {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        if float(value).is_integer():
            return int(value)
        raise ValueError(f"{what} {value!r} is not an integer")
    if isinstance(value, str):
        return int(value) if _INT_TEXT.fullmatch(value) and str(int(value)) == value else value
    raise TypeError(f"{what} must be an int or a str, got {value!r} ({type(value).__name__})")


def _lookup(records: Any, key: str) -> tuple[bool, Any]:
    if isinstance(records, RecordDict):
        for group in (records.metric_records, records.config_records):
            for record in group.values():
                if key in record:
                    return True, record[key]
        return False, None
    if isinstance(records, Mapping) and key in records:
        return True, records[key]
    return False, None


def user_id_from(records: Any, node_id: Any, keys: Sequence[str] = DEFAULT_USER_KEYS
                 ) -> UserId:
    """The stable id of a client from its reply.

    ``records`` is the content of a Message-API train reply (a ``RecordDict``: its
    ``MetricRecord`` entries are searched first, then its ``ConfigRecord`` entries) or the
    metrics dict of a legacy ``FitRes``. The first of ``keys`` found gives the id; without
    one, the Flower node id (an int; a legacy ``cid`` made of digits becomes that int).
    """
    for key in keys:
        found, value = _lookup(records, key)
        if found:
            return stable_id(value, f"{key!r} of node {node_id}")
    return stable_id(node_id, "node id")


def flower_template(arrays: Any, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """A model template (``{name: array}``) for `medustore.open` from Flower's arrays.

    ``arrays`` is an ``ArrayRecord`` (its keys are the names: a PyTorch ``state_dict``'s
    when built with ``ArrayRecord(model.state_dict())``), a legacy ``Parameters``, or a list
    of arrays, named ``names`` or ``p0, p1, ...``.
    """
    if isinstance(arrays, ArrayRecord):
        if names is not None:
            raise ValueError("an ArrayRecord names its arrays itself: leave names out")
        return {key: np.asarray(arr.numpy()) for key, arr in arrays.items()}
    if hasattr(arrays, "tensors") and hasattr(arrays, "tensor_type"):  # legacy Parameters
        from flwr.common import parameters_to_ndarrays

        arrays = parameters_to_ndarrays(arrays)
    arrays = [np.asarray(a) for a in arrays]
    names = list(names) if names is not None else [f"p{i}" for i in range(len(arrays))]
    if len(names) != len(arrays):
        raise ValueError(f"{len(names)} names for {len(arrays)} parameter arrays")
    return dict(zip(names, arrays, strict=True))


def arrays_from_store(store: UpdateStore) -> ArrayRecord:
    """The archive's latest global model as an ``ArrayRecord`` (keys as in its layout): the
    model a run resuming into the archive should start from."""
    latest = store.latest(out="numpy")
    if not isinstance(latest, dict):
        raise ValueError("this archive was created from a flat vector: its tensors have no "
                         "names to give an ArrayRecord")
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in latest.items()})


def round_offset_of(store: UpdateStore, round_offset: int | None) -> int:
    """``round_offset`` if given, else the archive's last committed round (0 if none)."""
    if round_offset is not None:
        if isinstance(round_offset, bool) or not isinstance(round_offset, numbers.Integral) \
                or round_offset < 0:
            raise ValueError(f"round_offset must be an int >= 0, got {round_offset!r}")
        return int(round_offset)
    last = store.index.last_round
    return 0 if last is None else int(last)


def tensor_names(store: UpdateStore) -> list[str]:
    return [t.name for t in store.layout.tensors]


def check_names(store: UpdateStore, names: Iterable[str], what: str) -> None:
    """Refuse arrays whose names are not the archive's tensors, saying how to fix it."""
    got, want = list(names), tensor_names(store)
    if sorted(got) != sorted(want):
        raise ValueError(
            f"{what} has arrays {got}, the archive's model has tensors {want}: create the "
            "archive from the same model (medustore.open(path, 'w', "
            "model=flower_template(initial_arrays)) or model=net.state_dict())")


def record_clients(store: UpdateStore, round: int,
                   clients: Iterable[tuple[UserId, Mapping[str, Any], float]],
                   sent: Mapping[str, np.ndarray]) -> Any:
    """Record one round: each client's ``(user, local arrays, weight)`` against ``sent``."""
    updates: dict[UserId, dict[str, np.ndarray]] = {}
    weights: dict[UserId, float] = {}
    for user, local, weight in clients:
        if user in updates:
            raise ValueError(
                f"two clients of round {round} report the same user id {user!r}: ids must be "
                "unique per client (see medustore.integrations.flower.user_id_from)")
        check_names(store, local, f"round {round}, user {user!r}")
        updates[user] = {k: np.asarray(local[k], dtype=np.float64)
                         - np.asarray(sent[k], dtype=np.float64) for k in sent}
        weights[user] = float(weight)
    if not updates:
        return None
    return store.record_round(round, updates, weights=weights, global_before=dict(sent))


def metric_value(records: RecordDict, key: str) -> Any:
    """``key`` of the reply's MetricRecord (the one FedAvg weighs with)."""
    for record in records.metric_records.values():
        if key in record:
            return record[key]
    raise ValueError(f"a train reply has no {key!r} metric to weigh its update with")


def without_key(metrics: MetricRecord | None, keys: Sequence[str]) -> MetricRecord | None:
    """The aggregated metrics without the id keys (an averaged partition id means nothing)."""
    if metrics is None:
        return None
    for key in keys:
        if key in metrics:
            del metrics[key]
    return metrics

