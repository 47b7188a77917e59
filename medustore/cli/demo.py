"""``medustore demo``: a backdoored federated run on the digits, recorded and unlearned."""

from __future__ import annotations

import textwrap
from typing import Any

import click

from medustore.cli._common import (
    MedustoreCommand,
    command_errors,
    echo_json,
    format_table,
    human_bytes,
)
from medustore.policy import PRESETS

__all__ = ["demo_command", "format_summary"]

_WIDTH = 92  # wrap of the sentences under the table
_EXTRA = "medustore demo needs torch and scikit-learn: pip install 'medustore[demo]'"


def format_summary(summary: dict[str, Any]) -> str:
    """The demo's summary as the tables the command prints."""
    c, s, e = summary["config"], summary["storage"], summary["error"]
    p = e["predicted"]
    policy = c["policy"]
    labels = {
        "poisoned": "poisoned (w_T)",
        "retrain": "retrain from scratch",
        "unlearned_full": "unlearned from full",
        "unlearned_compressed": f"unlearned from {policy}",
    }
    k = c.get("recovery_rounds", 0)
    if k:
        plus = f" + {k} recovery round{'s' if k != 1 else ''}"
        labels.update({
            "retrain_recovered": f"retrain{plus}",
            "unlearned_full_recovered": f"unlearned from full{plus}",
            "unlearned_compressed_recovered": f"unlearned from {policy}{plus}",
            "poisoned_recovered": f"poisoned{plus} (no unlearning)",
        })
    shown = [key for key in labels if key in summary["models"]]
    models = format_table(
        ["model", "clean acc", "backdoor"],
        [[labels[key], f"{summary['models'][key]['clean_accuracy']:.1%}",
          f"{summary['models'][key]['backdoor_success']:.1%}"] for key in shown],
        right=[False, True, True],
    )
    note = summary.get("note")
    peers = s["peers_float32_bytes"]
    storage = format_table(
        ["records kept by", "bytes", "ratio", "records"],
        [
            ["peers (float32 lists)", human_bytes(peers), "1.0x", str(s["records"])],
            ["full archive", human_bytes(s["full_bytes"]), f"{peers / s['full_bytes']:.1f}x",
             str(s["records_stored"]["full"])],
            [f"{policy} archive", human_bytes(s["compressed_bytes"]),
             f"{s['compression_ratio']:.1f}x", str(s["records_stored"]["compressed"])],
        ],
        right=[False, True, True, True],
    )
    lines = [
        f"digits, {c['users']} users ({c['malicious']} malicious: trigger -> class "
        f"{c['target']}), {c['split']} split, {c['rounds']} rounds, participation "
        f"{c['participation']:g}, {summary['parameters']} parameters, seed {c['seed']}",
        "",
        models,
        *(textwrap.wrap(note, _WIDTH) if note else []),
        *(textwrap.wrap(f"Recovery rounds: the remaining users train {k} more FedAvg round"
                        f"{'s' if k != 1 else ''} from each model (they must take part "
                        "again, unlike in the unlearning itself).", _WIDTH) if k else []),
        "",
        storage,
        f"policy {s['policy']}",
        "",
        f"L2 distance from {policy} unlearning to full unlearning:",
        f"  predicted  {p['deterministic']:.4g} (deterministic) + 3 x {p['rms']:.4g} "
        f"(lattice rms) = {p['bound_3sigma']:.4g}",
        f"  measured   {e['measured_l2']:.4g}",
        f"  for scale: full unlearning to retrain {e['full_vs_retrain_l2']:.4g}, "
        f"poisoned to retrain {e['poisoned_vs_retrain_l2']:.4g}",
        "",
        f"{summary['seconds']:.1f} s"
        + (f"; archives kept in {summary['out']}" if summary["out"] else ""),
    ]
    return "\n".join(lines)


@click.command("demo", cls=MedustoreCommand)
@click.option("--users", default=20, show_default=True, type=click.IntRange(2),
              help="Number of users, malicious ones included.")
@click.option("--rounds", default=30, show_default=True, type=click.IntRange(1),
              help="FedAvg rounds.")
@click.option("--split", default="iid", show_default=True,
              type=click.Choice(["iid", "dirichlet"]), help="How the data is split.")
@click.option("--alpha", default=0.5, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Dirichlet concentration (smaller: more label skew).")
@click.option("--participation", default=1.0, show_default=True,
              type=click.FloatRange(0, 1, min_open=True), help="Share of users drawn per round.")
@click.option("--malicious", default=1, show_default=True, type=click.IntRange(1),
              help="Number of backdoor users (ids 0..N-1).")
@click.option("--malicious-share", default=0.1, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of the training data the malicious users hold together.")
@click.option("--poison-fraction", default=0.5, show_default=True,
              type=click.FloatRange(0, 1, min_open=True),
              help="Share of a malicious user's samples given the trigger and target label.")
@click.option("--target", default=0, show_default=True, type=click.IntRange(0, 9),
              help="Class the trigger maps to.")
@click.option("--local-epochs", default=5, show_default=True, type=click.IntRange(1),
              help="Local epochs per round.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1),
              help="Local SGD mini-batch size.")
@click.option("--lr", default=0.1, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Local SGD learning rate.")
@click.option("--policy", default="medu", show_default=True, type=click.Choice(list(PRESETS)),
              help="Policy of the compressed archive (the other one is always 'full').")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0),
              help="Root seed of the data split, poisoning, initialisation and batches.")
@click.option("--recovery-rounds", default=2, show_default=True, type=click.IntRange(0),
              help="After unlearning, FedAvg rounds the remaining users train from each "
                   "model (retrained and poisoned models too, for a fair comparison), shown "
                   "as extra rows; 0: none.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Keep the archives (full.zarr, compressed.zarr) in this folder "
                   "[default: a temporary folder, removed].")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as one JSON document on stdout, nothing else.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars on stderr [default: when stderr is a terminal].")
def demo_command(as_json: bool, out: str | None, progress: bool | None, **options: Any) -> None:
    """Train a federated model with a backdoored user, record it, unlearn that user.

    FedAvg on scikit-learn's digits (offline, PyTorch on CPU). Every round is recorded into
    an archive with the chosen policy and into a 'full' one; the malicious users are then
    unlearned from both, and the model is retrained from scratch without them. Prints clean
    accuracy and backdoor success of each model, the archives' sizes against float32
    storage, and the error the compressed archive predicted against the one measured.

    Closed-form unlearning keeps the honest users' later updates, which partly compensated
    for the attack, so it can end below retraining on clean accuracy; --recovery-rounds
    adds rows for a few more FedAvg rounds of the remaining users after unlearning (a
    calibration step that, unlike the unlearning, needs those users to take part again).
    """
    try:
        from medustore.demo.run import DemoConfig, run_demo
    except ImportError as err:
        raise click.ClickException(f"{_EXTRA} ({err})") from None
    with command_errors():
        config = DemoConfig(**options)
        summary = run_demo(config, out=out, progress=progress)
    if as_json:
        echo_json(summary)
    else:
        click.echo(format_summary(summary))
