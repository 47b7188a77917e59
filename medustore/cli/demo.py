"""``medustore demo``: a backdoored federated run on the digits, recorded and unlearned."""

from __future__ import annotations

import textwrap
from typing import Any

import click

from medustore.cli._common import (
    EXIT_USAGE,
    CliError,
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
    method = c.get("method", "replay")
    verb = "recovered" if method == "recover" else "unlearned"
    cr = c.get("client_rounds", 0)
    how = f", {cr} client round{'s' if cr != 1 else ''}" if method == "recover" and cr else ""
    labels = {
        "poisoned": "poisoned (w_T)",
        "retrain": "retrain from scratch",
        "unlearned_full": f"{verb} from full{how}",
        "unlearned_compressed": f"{verb} from {policy}{how}",
    }
    k = c.get("recovery_rounds", 0)
    if k:
        plus = f" + {k} recovery round{'s' if k != 1 else ''}"
        labels.update({
            "retrain_recovered": f"retrain{plus}",
            "unlearned_full_recovered": f"{verb} from full{plus}",
            "unlearned_compressed_recovered": f"{verb} from {policy}{plus}",
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
        *(_recovery_lines(summary) if method == "recover" else [
            f"L2 distance from {policy} unlearning to full unlearning:",
            f"  predicted  {p['deterministic']:.4g} (deterministic) + 3 x {p['rms']:.4g} "
            f"(lattice rms) = {p['bound_3sigma']:.4g}",
            f"  measured   {e['measured_l2']:.4g}"]),
        f"  for scale: full {'recovery' if method == 'recover' else 'unlearning'} to retrain "
        f"{e['full_vs_retrain_l2']:.4g}, poisoned to retrain {e['poisoned_vs_retrain_l2']:.4g}",
        "",
        f"{summary['seconds']:.1f} s"
        + (f"; archives kept in {summary['out']}" if summary["out"] else ""),
    ]
    return "\n".join(lines)


def _recovery_lines(summary: dict[str, Any]) -> list[str]:
    """What recovery used, per archive, and how far it is from the closed form."""
    c, e = summary["config"], summary["error"]
    rec = summary.get("recovery", {})
    closed = summary.get("closed_form", {})
    names = {"full": "full", "compressed": c["policy"]}
    lines = ["Recovery (no error bound; the closed form's models for scale):"]
    for key, name in names.items():
        r = rec.get(key)
        if r is None:
            continue
        cf = closed.get(f"unlearned_{key}")
        cf_text = (f"; closed form {cf['clean_accuracy']:.1%} clean, "
                   f"{cf['backdoor_success']:.1%} backdoor" if cf else "")
        fired = "; safeguards fired" if r.get("warnings") else ""
        lines.append(f"  {name}: {r['rounds_estimated']} rounds estimated, "
                     f"{r['client_rounds']} client rounds of {r['retrain_client_rounds']} "
                     f"for retraining, L2 to the closed form {r['l2_to_closed_form']:.4g}"
                     f"{cf_text}{fired}")
    lines.append(f"L2 distance from {c['policy']} recovery to full recovery: "
                 f"{e['measured_l2']:.4g} (closed form: "
                 f"{e.get('closed_form_measured_l2', float('nan')):.4g})")
    return lines


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
@click.option("--method", default="replay", show_default=True,
              type=click.Choice(["replay", "recover"]),
              help="Unlearning reported: 'replay', the closed form with its error bound; "
                   "'recover', training replayed without the malicious users, the others' "
                   "updates estimated from the archive (no bound).")
@click.option("--client-rounds", default=0, show_default=True, type=click.IntRange(0),
              help="With --method recover: the last N rounds are trained by the remaining "
                   "users for real (final tuning); 0 asks nothing of them.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Keep the archives (full.zarr, compressed.zarr) in this folder "
                   "[default: a temporary folder, removed]. Archives already there are "
                   "not overwritten without --force.")
@click.option("--force", is_flag=True,
              help="With --out: overwrite the archives of an earlier run.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the summary as one JSON document on stdout, nothing else.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars on stderr [default: when stderr is a terminal].")
def demo_command(as_json: bool, out: str | None, force: bool, progress: bool | None,
                 **options: Any) -> None:
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
    --method recover reports recovery instead: training replayed from w_0 without the
    malicious users, the others' updates estimated from the archive (--client-rounds asks
    them to train the last rounds for real).
    """
    try:
        from medustore.demo.run import DemoConfig, existing_archives, run_demo
    except ImportError as err:
        raise click.ClickException(f"{_EXTRA} ({err})") from None
    if out is not None and not force:
        found = existing_archives(out)
        if found:
            verb = "exists" if len(found) == 1 else "exist"
            raise CliError(f"{', '.join(map(str, found))} already {verb}; pass --force to "
                           "overwrite", EXIT_USAGE)
    with command_errors():
        config = DemoConfig(**options)
        summary = run_demo(config, out=out, progress=progress, force=force)
    if as_json:
        echo_json(summary)
    else:
        click.echo(format_summary(summary))
