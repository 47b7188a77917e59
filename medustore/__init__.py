"""medustore: compressed, indexed storage of federated-learning updates, built to unlearn.

    import medustore
    with medustore.open("run.zarr", "w", model=model.state_dict(), policy="medu") as store:
        store.record_round(t, {user: update}, weights={user: n_samples})
    with medustore.open("run.zarr") as store:
        weights = store.unlearn(["mallory"], out="state_dict")
"""

from medustore.errors import MedustoreError, NotAnArchiveError, ReadOnlyError, UnknownUserError
from medustore.layout import ModelLayout
from medustore.policy import PRESETS, MeduPolicy
from medustore.replay import ErrorBudget, IncompleteUnlearningWarning
from medustore.store import FORMAT_VERSION, UpdateStore, open_store

open = open_store  # noqa: A001 - the library's front door, like zarr.open

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "PRESETS",
    "ErrorBudget",
    "IncompleteUnlearningWarning",
    "MedustoreError",
    "MeduPolicy",
    "ModelLayout",
    "NotAnArchiveError",
    "ReadOnlyError",
    "UnknownUserError",
    "UpdateStore",
    "open",
]
