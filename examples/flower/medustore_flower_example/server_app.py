"""The ServerApp: FedAvg wrapped in `MedustoreStrategy`, recording into an archive.

The archive is opened in mode ``"a"``: the first run creates it from the initial model, a
later run resumes from the archive's latest model and continues its round numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result

import medustore
from medustore.integrations.flower import MedustoreStrategy, arrays_from_store
from medustore_flower_example.task import Net, evaluate, initial_model, load_test

DEFAULTS: dict[str, Any] = {
    "archive": "flower-run.zarr",  # where the rounds are recorded
    "num-server-rounds": 3,
    "min-clients": 2,              # wait for this many clients, and train on all of them
    "policy": "full",              # medustore policy: full, lattice or medu
    "accumulators": True,          # exact one-user unlearning
    "seed": 0,
    "lr": 0.5,
    "local-epochs": 2,
    "batch-size": 32,
    "max-examples": 0,             # 0: a client's whole partition
}


def run_server(grid: Grid, settings: dict[str, Any]) -> Result:
    """Run FedAvg for ``settings["num-server-rounds"]`` rounds, recording each one."""
    s = {**DEFAULTS, **settings}
    seed = int(s["seed"])
    with medustore.open(s["archive"], "a", model=initial_model(seed).state_dict(),
                        policy=s["policy"], accumulators=bool(s["accumulators"])) as store:
        # w_0 for a new archive; the model the last run ended with when resuming.
        initial_arrays = arrays_from_store(store)
        n = int(s["min-clients"])
        fedavg = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                        min_available_nodes=n)
        strategy = MedustoreStrategy(fedavg, store)
        x_test, y_test = load_test(seed)

        def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model = Net()
            model.load_state_dict(arrays.to_torch_state_dict())
            loss, acc = evaluate(model, x_test, y_test)
            return MetricRecord({"loss": loss, "accuracy": acc})

        train_config = ConfigRecord({k: s[k] for k in
                                     ("seed", "lr", "local-epochs", "batch-size",
                                      "max-examples")})
        return strategy.start(grid=grid, initial_arrays=initial_arrays,
                              num_rounds=int(s["num-server-rounds"]),
                              train_config=train_config, evaluate_fn=central_evaluate)


def make_server_app(on_result: Callable[[Result], None] | None = None,
                    **settings: Any) -> ServerApp:
    """A ServerApp with these settings (keys of `DEFAULTS`, ``_`` or ``-``); the run config
    (``flwr run --run-config``) overrides them."""
    base = {k.replace("_", "-"): v for k, v in settings.items()}
    unknown = set(base) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_server(grid, {**base, **dict(context.run_config)})
        if on_result is not None:
            on_result(result)

    return server


app = make_server_app()
