"""The demo: a backdoored FedAvg run recorded into two archives, then unlearned.

`run_demo` trains, records every round into an archive with the chosen policy and,
side by side, into one with the ``full`` policy (the uncompressed reference), retrains from
scratch without the malicious users, unlearns them from both archives, and returns a summary
(a JSON-ready dict), which ``medustore demo`` prints as a table or as JSON.

Optionally (``recovery_rounds`` > 0) each unlearned model is then trained for a few more
FedAvg rounds by the remaining users, the calibration step of FedEraser-style methods; to
compare like with like, the retrained and the poisoned models get the same extra rounds.
Unlike the unlearning itself, these rounds need the remaining users to take part again.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import tempfile
import time
import warnings
from collections.abc import Collection, Hashable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

import medustore
from medustore.demo.data import Dataset, assign_users, load_digits_dataset, poison
from medustore.demo.federated import FedConfig, State, client_update, fedavg
from medustore.demo.model import accuracy, backdoor_success, make_model
from medustore.policy import parse_policy

__all__ = ["METHODS", "DemoConfig", "evaluate", "exact_round",
           "gap_note", "make_users", "recover", "run_demo", "seed_everything"]

#: Unlearning methods the demo reports: the closed form, or recovery from the archive.
METHODS = ("replay", "recover")


@dataclass(frozen=True)
class DemoConfig:
    """Everything that defines a demo run; the same config gives the same numbers.

    Attributes
    ----------
    users : int
        Number of users, malicious ones included.
    rounds : int
        FedAvg rounds.
    split : {"iid", "dirichlet"}
        How the honest users' data is split; ``alpha`` is the Dirichlet concentration.
    participation : float
        Share of the users drawn each round.
    malicious : int
        Number of malicious users (ids ``0 .. malicious-1``).
    malicious_share : float
        Share of the training data the malicious users hold together (default 0.1: with
        20 users, twice an honest user's share). With an even 1/20 share the backdoor
        stays weak under FedAvg here (35% success with the other defaults, seed 0).
    poison_fraction : float
        Share of each malicious user's samples that get the trigger and the target label.
    target : int
        The class the trigger maps to.
    local_epochs, batch_size, lr
        Local SGD of every user, malicious or not.
    policy : str
        Preset of the compressed archive (``"medu"``, ``"lattice"``, ``"full"``).
    seed : int
        Root seed: data split, poisoning, model initialisation, participants, batches.
    recovery_rounds : int
        FedAvg rounds the remaining users train after unlearning (rounds ``rounds ..
        rounds + recovery_rounds - 1`` of the same schedule), reported as extra models
        next to the raw unlearned ones; 0 skips them. The closed form keeps the honest
        users' later updates, which partly compensated for the attack, and ends below
        retraining on clean accuracy (81.3% against 95.6% with the defaults); two rounds
        bring it to 94.9% (retraining plus the same two rounds: 95.8%). In the four runs
        of docs/results.md (IID seeds 0-2, Dirichlet seed 0) two rounds end within 0.9
        point of retraining plus two, with the backdoor still gone; one round leaves up
        to 1.1 points, three close the gap, and the poisoned model given the same rounds
        keeps its backdoor.
    method : {"replay", "recover"}
        How the unlearned models are computed: ``"replay"``, the closed form (exact
        replay of the stored updates without the malicious users, with its error bound);
        ``"recover"``, `medustore.recover` (training replayed from ``w_0`` without them, the
        remaining users' updates estimated at the new model from the archive; no bound).
    client_rounds : int
        With ``"recover"``: the last ``client_rounds`` rounds of the replay are trained by
        the remaining users for real (FedRecover's final tuning), from the recovered model,
        with the run's own batches; 0 asks nothing of them.
    """

    users: int = 20
    rounds: int = FedConfig.rounds
    split: str = "iid"
    alpha: float = 0.5
    participation: float = FedConfig.participation
    malicious: int = 1
    malicious_share: float = 0.1
    poison_fraction: float = 0.5
    target: int = 0
    local_epochs: int = FedConfig.local_epochs
    batch_size: int = FedConfig.batch_size
    lr: float = FedConfig.lr
    policy: str = "medu"
    seed: int = FedConfig.seed
    recovery_rounds: int = 2
    method: str = "replay"
    client_rounds: int = 0

    def __post_init__(self) -> None:
        self.fed()  # validates the schedule
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.client_rounds, bool) or not isinstance(
                self.client_rounds, int) or self.client_rounds < 0:
            raise ValueError(f"client_rounds must be an int >= 0, got {self.client_rounds!r}")
        if self.client_rounds and self.method != "recover":
            raise ValueError("client_rounds applies to method 'recover' only")
        if self.client_rounds > self.rounds:
            raise ValueError(f"client_rounds ({self.client_rounds}) exceeds the rounds "
                             f"({self.rounds})")
        if isinstance(self.recovery_rounds, bool) or not isinstance(
                self.recovery_rounds, int) or self.recovery_rounds < 0:
            raise ValueError(f"recovery_rounds must be an int >= 0, got {self.recovery_rounds!r}")
        if self.split not in ("iid", "dirichlet"):
            raise ValueError(f"split must be 'iid' or 'dirichlet', got {self.split!r}")
        if not 1 <= self.malicious < self.users:
            raise ValueError(f"malicious must be in [1, users - 1], got {self.malicious}")
        if not 0.0 < self.malicious_share < 1.0:
            raise ValueError(f"malicious_share must be in (0, 1), got {self.malicious_share}")
        if not 0.0 < self.poison_fraction <= 1.0:
            raise ValueError(f"poison_fraction must be in (0, 1], got {self.poison_fraction}")
        if not 0 <= self.target < 10:
            raise ValueError(f"target must be a digit class 0..9, got {self.target}")
        if self.policy not in medustore.PRESETS:
            raise ValueError(f"policy must be one of {', '.join(medustore.PRESETS)}, "
                             f"got {self.policy!r}")

    def fed(self) -> FedConfig:
        """The FedAvg schedule of this run."""
        return FedConfig(
            rounds=self.rounds,
            local_epochs=self.local_epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            participation=self.participation,
            seed=self.seed,
        )


def seed_everything(seed: int, threads: int = 1) -> None:
    """Seed python, numpy and torch, and make torch deterministic.

    The demo draws from its own seeded generators; this guards whatever else draws from
    the global ones. One thread: on a model this small more threads only add overhead.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds the legacy global stream on purpose
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def make_users(config: DemoConfig, train: Dataset) -> dict[int, Dataset]:
    """Each user's local data, the malicious users' (ids ``0 .. malicious-1``) poisoned."""
    parts = assign_users(
        train.y,
        config.users,
        n_malicious=config.malicious,
        malicious_share=config.malicious_share,
        split=config.split,
        alpha=config.alpha,
        seed=config.seed,
    )
    users = {u: train.subset(index) for u, index in enumerate(parts)}
    for u in range(config.malicious):
        users[u] = poison(users[u], config.poison_fraction, config.target, seed=config.seed + u)
    return users


def _flat(state: State) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in state.values()])


def _distance(a: State, b: State) -> float:
    return float(torch.linalg.vector_norm(_flat(a) - _flat(b)))


def evaluate(model: nn.Module, state: State, test: Dataset, target: int) -> dict[str, float]:
    """Clean accuracy and backdoor success of the weights ``state`` (``model`` is a
    workspace: its weights are overwritten)."""
    model.load_state_dict(state)
    return {
        "clean_accuracy": accuracy(model, test),
        "backdoor_success": backdoor_success(model, test, target),
    }


def recover(model: nn.Module, state: State, users: Mapping[Hashable, Dataset],
            config: DemoConfig, exclude: Collection[Hashable],
            progress: bool | None = None) -> State:
    """``config.recovery_rounds`` more FedAvg rounds from ``state`` without ``exclude``.

    They are rounds ``config.rounds ..`` of the run's own schedule (participants and batch
    orders), so recovering the retrained model gives exactly retraining for
    ``rounds + recovery_rounds`` rounds. ``model`` gives the architecture only.
    """
    if config.recovery_rounds == 0:
        return {k: v.clone() for k, v in state.items()}
    start = copy.deepcopy(model)
    start.load_state_dict(state)
    fed = dataclasses.replace(config.fed(), rounds=config.recovery_rounds)
    return fedavg(start, users, fed, exclude=exclude, progress=progress, desc="recovering",
                  first_round=config.rounds)


def exact_round(model: nn.Module, users: Mapping[Hashable, Dataset],
                config: DemoConfig) -> Any:
    """The ``exact_round`` callback of `medustore.recover.recover` for this run: the
    remaining users train from the recovered model with the batches of that round of the
    run's schedule, as `fedavg` would have them train. ``model`` gives the architecture."""
    workspace = copy.deepcopy(model)
    fed = config.fed()

    def train(t: int, weights: dict[str, np.ndarray], who: list[Hashable]) -> dict:
        state = {k: torch.from_numpy(np.asarray(v)).to(torch.float32)
                 for k, v in weights.items()}
        return {u: {k: v.numpy() for k, v in
                    client_update(workspace, state, users, u, t, fed).items()}
                for u in who}

    return train


def gap_note(summary: dict[str, Any], threshold: float = 0.01) -> str | None:
    """One sentence on the gap in clean accuracy between unlearning from the full archive
    (the exact closed form) and retraining from scratch, when it exceeds ``threshold``."""
    models = summary["models"]
    full = models["unlearned_full"]["clean_accuracy"]
    retrain = models["retrain"]["clean_accuracy"]
    gap = 100.0 * (retrain - full)
    if abs(gap) <= 100.0 * threshold:
        return None
    if summary["config"].get("method", "replay") == "recover":
        k = summary["config"].get("client_rounds", 0)
        spent = (f" with {k} client round{'s' if k != 1 else ''}" if k
                 else " without asking any client")
        return (f"Recovery from the full archive{spent} ends {abs(gap):.1f} points "
                f"{'below' if gap > 0 else 'above'} retraining on clean accuracy: it "
                "estimates the remaining users' updates at the new model from the archive, "
                "so it comes with no bound.")
    if gap < 0:
        return (f"Unlearning from the full archive ends {-gap:.1f} points above retraining "
                "on clean accuracy: the closed form does not retrain, it removes the "
                "malicious stored updates and keeps everything else, so it need not land "
                "where retraining does.")
    k = summary["config"].get("recovery_rounds", 0)
    recovered = models.get("unlearned_full_recovered")
    after = ""
    if k and recovered is not None:
        after = (f"; {k} recovery round{'s' if k != 1 else ''} with the remaining users bring "
                 f"it to {recovered['clean_accuracy']:.1%} (retraining plus the same rounds: "
                 f"{models['retrain_recovered']['clean_accuracy']:.1%})")
    who = "user's" if summary["config"].get("malicious", 2) == 1 else "users'"
    return (f"Unlearning from the full archive is {gap:.1f} points below retraining on clean "
            f"accuracy although it is exact: the closed form subtracts the malicious {who} "
            "updates but keeps the honest users' later updates, which had partly compensated "
            "for the attack, so this gap comes from the unlearning rule, not from "
            f"compression{after}.")


class _Unlearned(NamedTuple):
    """What one archive gave: the unlearned weights and what the archive says of itself."""

    weights: State
    nbytes: int
    stored: int
    budget: medustore.ErrorBudget
    policy: str
    report: Any = None  # the RecoveryReport with method "recover"


def _unlearn(path: Path, users: list[int], progress: bool | None, method: str = "replay",
             exact: Any = None, client_rounds: int = 0) -> _Unlearned:
    from medustore.recover import RecoveryWarning, recover

    with medustore.open(path, "r") as store, warnings.catch_warnings():
        # Records the policy dropped are accounted for in the budget returned with them;
        # recovery's safeguards are in its report.
        warnings.simplefilter("ignore", medustore.IncompleteUnlearningWarning)
        warnings.simplefilter("ignore", RecoveryWarning)
        report = None
        if method == "recover":
            done = recover(store, users, out="state_dict", progress=progress,
                           exact_round=exact if client_rounds else None,
                           final=client_rounds)
            weights, report = done.model, done.report
        else:
            weights = store.unlearn(users, out="state_dict", progress=progress)
        return _Unlearned(
            weights=weights,
            nbytes=store.nbytes_stored(),
            stored=int(store.side("stored").sum()),
            budget=store.error_budget(users),
            policy=store.policy.describe(),
            report=report,
        )


ARCHIVES = ("full.zarr", "compressed.zarr")


def existing_archives(out: str | Path) -> list[Path]:
    """The demo's archives already in ``out`` (what ``--out`` would overwrite)."""
    return [Path(out) / name for name in ARCHIVES if (Path(out) / name).exists()]


def run_demo(
    config: DemoConfig = DemoConfig(),
    out: str | Path | None = None,
    progress: bool | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Run the demo and return its summary.

    Parameters
    ----------
    config : DemoConfig
        The run.
    out : path, optional
        Directory that keeps the two archives (``full.zarr``, ``compressed.zarr``);
        default: a temporary directory removed afterwards.
    progress : bool or None
        Progress bars on stderr; ``None``: only when stderr is a terminal.
    force : bool
        Overwrite archives a previous run left in ``out``; without it, `FileExistsError`.

    Returns
    -------
    dict
        JSON-ready: ``config``, ``parameters``, ``malicious_users``, ``models`` (clean
        accuracy and backdoor success of each model; with ``recovery_rounds`` > 0 also
        ``retrain_recovered``, ``unlearned_full_recovered``,
        ``unlearned_compressed_recovered`` and ``poisoned_recovered``, each model after the
        recovery rounds), ``storage`` (bytes and ratios), ``error`` (the budget the
        compressed archive predicted and the distances measured), ``note`` (the sentence
        of `gap_note`, or None), ``seconds`` and ``out``. The ``unlearned_*`` models are
        those of ``config.method``; with ``"recover"``, ``recovery`` holds each archive's
        `RecoveryReport` (as JSON) and ``closed_form`` the closed form's models, for scale.
    """
    if out is not None and not force:
        found = existing_archives(out)
        if found:
            raise FileExistsError(
                f"{', '.join(map(str, found))} already exist; the demo would overwrite them "
                "(pass force=True, or --force on the command line)")
    start = time.perf_counter()
    seed_everything(config.seed)
    train, test = load_digits_dataset(seed=config.seed)
    users = make_users(config, train)
    malicious = list(range(config.malicious))
    model = make_model(config.seed)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = sum(v.numel() for v in w0.values())

    with ExitStack() as stack:
        if out is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medustore-demo-")))
        else:
            root = Path(out)
            root.mkdir(parents=True, exist_ok=True)
        paths = {"full": root / "full.zarr", "compressed": root / "compressed.zarr"}
        # The dither key follows the run's seed: the same command writes the same bytes.
        policies = {k: parse_policy(name).evolve(seed=config.seed, name=name)
                    for k, name in (("full", "full"), ("compressed", config.policy))}
        records = 0

        def on_round(t: int, updates: dict[Hashable, State],
                     weights: dict[Hashable, float]) -> None:
            nonlocal records
            records += len(updates)
            for store in stores.values():
                store.record_round(t, updates, weights=weights)

        with ExitStack() as writing:
            stores = {
                k: writing.enter_context(medustore.open(p, "w", model=w0, policy=policies[k]))
                for k, p in paths.items()
            }
            w_poisoned = fedavg(model, users, config.fed(), on_round, progress=progress,
                                desc="training")
            for store in stores.values():
                # The demo is the archives' only user: no reader holds an old version, so
                # every replaced version can go now (a server keeps the default grace).
                store.compact(grace=0)
        w_retrain = fedavg(model, users, config.fed(), exclude=malicious, progress=progress,
                           desc="retraining")

        exact = exact_round(model, users, config) if config.client_rounds else None
        done = {k: _unlearn(p, malicious, progress, config.method, exact,
                            config.client_rounds) for k, p in paths.items()}
        closed = ({k: _unlearn(p, malicious, progress) for k, p in paths.items()}
                  if config.method == "recover" else None)

    full, compressed = done["full"], done["compressed"]
    evaluated = {"poisoned": w_poisoned, "retrain": w_retrain,
                 "unlearned_full": full.weights, "unlearned_compressed": compressed.weights}
    if config.recovery_rounds:
        # Every model gets the same rounds with the same users: the malicious ones stay
        # out, as they would once detected (for the poisoned model too: the control that
        # shows what the extra rounds do without unlearning).
        evaluated.update({f"{name}_recovered": recover(model, evaluated[name], users, config,
                                                       exclude=malicious, progress=progress)
                          for name in ("poisoned", "retrain", "unlearned_full",
                                       "unlearned_compressed")})
    models = {name: evaluate(model, state, test, config.target)
              for name, state in evaluated.items()}
    peers = records * n_params * 4
    summary = {
        "config": dataclasses.asdict(config),
        "parameters": n_params,
        "malicious_users": malicious,
        "models": models,
        "storage": {
            "records": records,
            "records_stored": {"full": full.stored, "compressed": compressed.stored},
            "peers_float32_bytes": peers,
            "full_bytes": full.nbytes,
            "compressed_bytes": compressed.nbytes,
            "compression_ratio": peers / compressed.nbytes,
            "compression_ratio_vs_full": full.nbytes / compressed.nbytes,
            "policy": compressed.policy,
        },
        "error": {
            "predicted": compressed.budget.to_json(),
            "measured_l2": _distance(compressed.weights, full.weights),
            "full_vs_retrain_l2": _distance(full.weights, w_retrain),
            "poisoned_vs_retrain_l2": _distance(w_poisoned, w_retrain),
        },
    }
    summary["method"] = config.method
    if closed is not None:
        summary["recovery"] = {k: d.report.to_json() for k, d in done.items()}
        summary["closed_form"] = {f"unlearned_{k}": evaluate(model, d.weights, test,
                                                             config.target)
                                  for k, d in closed.items()}
        summary["error"]["closed_form_measured_l2"] = _distance(closed["compressed"].weights,
                                                                closed["full"].weights)
    summary["note"] = gap_note(summary)
    summary["seconds"] = time.perf_counter() - start
    summary["out"] = None if out is None else str(Path(out))
    return summary
