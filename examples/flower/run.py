"""Run the example through Flower's simulation engine, then unlearn one client.

    python examples/flower/run.py --archive flower-run.zarr --clients 4 --rounds 3
    python examples/flower/run.py --archive flower-run.zarr --rounds 2   # resumes: rounds 4-5
    medustore unlearn flower-run.zarr --user 2 -o without-2.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the example's package


def simulate(archive: str | os.PathLike, *, clients: int = 4, rounds: int = 3,
             num_cpus: int | None = None, on_result: Any = None, **settings: Any) -> None:
    """Run the ServerApp and ``clients`` ClientApps in Flower's simulation engine, recording
    into ``archive``. Each ClientApp takes one CPU; Ray gets ``num_cpus`` of them (default:
    one per client, at most the machine's), so that many clients train at once."""
    from flwr.simulation import run_simulation
    from medustore_flower_example.client_app import app as client_app
    from medustore_flower_example.server_app import make_server_app

    server_app = make_server_app(on_result=on_result, archive=str(archive),
                                 num_server_rounds=rounds, min_clients=clients, **settings)
    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": num_cpus or min(clients, os.cpu_count() or 1)}})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", default="flower-run.zarr")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policy", default="full", choices=["full", "lattice", "medu"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unlearn", type=int, metavar="PARTITION_ID", default=None,
                        help="after the run, remove this client and report the accuracy")
    args = parser.parse_args(argv)

    simulate(args.archive, clients=args.clients, rounds=args.rounds, policy=args.policy,
             seed=args.seed)

    from medustore_flower_example.task import Net, evaluate, load_test

    import medustore

    with medustore.open(args.archive) as store:
        users = sorted(store.users, key=lambda u: (isinstance(u, str), u))
        print(f"{args.archive}: rounds {store.rounds}, users {users}")
        x, y = load_test(args.seed)
        model = Net()
        model.load_state_dict(store.latest(out="state_dict"))
        print(f"global model: accuracy {evaluate(model, x, y)[1]:.3f}")
        if args.unlearn is not None:
            model.load_state_dict(store.unlearn(args.unlearn, out="state_dict"))
            print(f"without partition {args.unlearn}: accuracy {evaluate(model, x, y)[1]:.3f}")


if __name__ == "__main__":
    main()
