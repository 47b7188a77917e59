"""medustore: compressed, indexed storage of federated-learning updates, built to unlearn.

    import medustore
    with medustore.open("run.zarr", "w", model=model.state_dict(), policy="medu") as store:
        store.record_round(t, {user: update}, weights={user: n_samples})
    with medustore.open("run.zarr") as store:
        weights = store.unlearn(["mallory"], out="state_dict")
"""

from medustore.archive.repository import Retention
from medustore.errors import (
    ConcurrentWriteError,
    DamagedArchiveError,
    MedustoreError,
    NotAnArchiveError,
    ReadOnlyError,
    UnknownUserError,
    UnsupportedFormatError,
    VersionNotKeptError,
)
from medustore.index import ArchiveIndex
from medustore.layout import ModelLayout
from medustore.policy import PRESETS, MeduPolicy
from medustore.recover import RecoverOptions, Recovery, RecoveryReport, RecoveryWarning
from medustore.replay import ErrorBudget, IncompleteUnlearningWarning, Plan
from medustore.store import FORMAT_VERSION, UpdateStore, open_store

open = open_store  # noqa: A001 - the library's front door, like zarr.open

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "PRESETS",
    "ArchiveIndex",
    "ConcurrentWriteError",
    "DamagedArchiveError",
    "ErrorBudget",
    "IncompleteUnlearningWarning",
    "MedustoreError",
    "MeduPolicy",
    "ModelLayout",
    "NotAnArchiveError",
    "Plan",
    "ReadOnlyError",
    "RecoverOptions",
    "Recovery",
    "RecoveryReport",
    "RecoveryWarning",
    "Retention",
    "UnknownUserError",
    "UnsupportedFormatError",
    "UpdateStore",
    "VersionNotKeptError",
    "open",
]
