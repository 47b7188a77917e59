"""Local training and FedAvg, with a per-round callback; independent of the store.

One round ``t``: the participants ``C_t`` are drawn from ALL users (so a run that excludes
some users keeps the schedule of the run that did not, and sees ``C_t \\ F``); each
participant ``u`` trains a copy of ``w_t`` on its data and sends ``h_t^u = w_t^u - w_t``; the
server sets ``w_{t+1} = w_t + sum_u p_u h_t^u / sum_u p_u`` with ``p_u`` the user's number
of samples. This is the rule the store's unlearning replays.

The participants of round ``t`` are drawn from a seed derived from ``(seed, t, 0)``, a user's
batch order from ``(seed, t, 1 + position of the user)``: one user's stream does not depend
on who else trains, so retraining from scratch without a user reuses every other user's
batches.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medustore.demo.data import Dataset

__all__ = ["FedConfig", "OnRound", "State", "client_update", "fedavg", "local_update",
           "participants"]

State = dict[str, torch.Tensor]
#: ``on_round(t, updates, weights)``: the round's updates ``h_t^u`` and weights ``p_u``.
OnRound = Callable[[int, dict[Hashable, State], dict[Hashable, float]], None]


@dataclass(frozen=True)
class FedConfig:
    """Schedule and local optimiser of a FedAvg run.

    Attributes
    ----------
    rounds : int
        Number of rounds ``T``.
    local_epochs : int
        Passes over its data each participant makes per round.
    batch_size : int
        Mini-batch size of local SGD.
    lr : float
        Learning rate of local SGD.
    participation : float
        Share of the users drawn each round (at least one).
    seed : int
        Root seed of the participants and of every batch order.
    """

    rounds: int = 30
    local_epochs: int = 5
    batch_size: int = 16
    lr: float = 0.1
    participation: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ValueError("rounds, local_epochs and batch_size must be >= 1")
        if not 0.0 < self.participation <= 1.0:
            raise ValueError(f"participation must be in (0, 1], got {self.participation}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def _seed(*key: int) -> int:
    """A 63-bit seed derived from integers, stable across runs and platforms."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)


def participants(n_users: int, t: int, config: FedConfig) -> list[int]:
    """Sorted positions of the users drawn in round ``t``."""
    k = max(1, round(config.participation * n_users))
    if k == n_users:
        return list(range(n_users))
    rng = np.random.default_rng(_seed(config.seed, t, 0))
    return sorted(rng.choice(n_users, size=k, replace=False).tolist())


def local_update(
    model: nn.Module,
    global_state: State,
    data: Dataset,
    config: FedConfig,
    generator: torch.Generator,
) -> State:
    """Train ``model`` from ``global_state`` on ``data``; return ``w_local - w_global``.

    ``model`` is a workspace: its weights are overwritten.
    """
    model.load_state_dict(global_state)
    model.train()
    params = list(model.parameters())
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    for _ in range(config.local_epochs):
        for batch in torch.randperm(len(y), generator=generator).split(config.batch_size):
            grads = torch.autograd.grad(
                nn.functional.cross_entropy(model(x[batch]), y[batch]), params
            )
            # Plain SGD by hand: torch.optim's per-step bookkeeping costs more than the
            # step itself on a model this small.
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(g, alpha=config.lr)
    with torch.no_grad():
        return {k: v.detach() - global_state[k] for k, v in model.state_dict().items()}


def client_update(
    model: nn.Module,
    global_state: State,
    users: Mapping[Hashable, Dataset],
    user: Hashable,
    t: int,
    config: FedConfig,
) -> State:
    """The update ``user`` sends in round ``t`` when training from ``global_state``: the
    same batches as in `fedavg`'s round ``t`` (its stream depends on ``(seed, t, position
    of the user in users)`` only). ``model`` is a workspace."""
    i = list(users).index(user)
    generator = torch.Generator().manual_seed(_seed(config.seed, t, i + 1))
    return local_update(model, global_state, users[user], config, generator)


def fedavg(
    model: nn.Module,
    users: Mapping[Hashable, Dataset],
    config: FedConfig,
    on_round: OnRound | None = None,
    exclude: Collection[Hashable] = (),
    progress: bool | None = None,
    desc: str = "FedAvg",
    first_round: int = 0,
) -> State:
    """Run FedAvg from the weights of ``model``; return the final global weights ``w_T``.

    Parameters
    ----------
    model : torch.nn.Module
        Architecture and initial weights ``w_0`` (float32); left unchanged.
    users : Mapping
        Each user's id and local data; the order fixes each user's random stream.
    config : FedConfig
        Schedule and local optimiser.
    on_round : callable, optional
        Called after each round that had a participant with ``(t, updates, weights)``:
        ``updates[u] = h_t^u`` (a state_dict of tensors, same layout as ``model``) and
        ``weights[u] = p_u``.
    exclude : collection
        Users that never train (retraining from scratch without them); the schedule of the
        others is unchanged. A round whose participants are all excluded leaves the model
        as it is.
    progress : bool or None
        Show a progress bar on stderr; ``None``: only when stderr is a terminal.
    desc : str
        Label of the progress bar.
    first_round : int
        Number of the first round: the run is rounds ``first_round .. first_round +
        config.rounds - 1``, with their participants and batch orders. A run that starts
        from the weights another run ended with (``model`` holding them) and ``first_round``
        set to that run's length continues it exactly as a longer run would have.

    Returns
    -------
    dict of str to torch.Tensor
        The final global state_dict.
    """
    unknown = set(exclude) - set(users)
    if unknown:
        raise KeyError(f"excluded users not among the users: {sorted(map(str, unknown))}")
    ids = list(users)
    workspace = copy.deepcopy(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    disable = None if progress is None else not progress
    if first_round < 0:
        raise ValueError(f"first_round must be >= 0, got {first_round}")
    rounds = range(first_round, first_round + config.rounds)
    for t in tqdm(rounds, desc=desc, unit="round", disable=disable, leave=False):
        updates: dict[Hashable, State] = {}
        weights: dict[Hashable, float] = {}
        for i in participants(len(ids), t, config):
            user = ids[i]
            if user in exclude:
                continue
            updates[user] = client_update(workspace, state, users, user, t, config)
            weights[user] = float(len(users[user]))
        if not updates:
            continue
        total = sum(weights.values())
        # Sum in float64 so the aggregate does not depend on the order of the users.
        for k, w in state.items():
            mean = sum(weights[u] * updates[u][k].double() for u in updates) / total
            state[k] = w + mean.to(w.dtype)
        if on_round is not None:
            on_round(t, updates, weights)
    return state
