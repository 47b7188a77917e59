"""``medustore unlearn``: write the model with some users removed, and say how exact it is."""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import click
import numpy as np

from medustore import replay
from medustore.cli._common import (
    EXIT_INCOMPLETE,
    EXIT_USAGE,
    CliError,
    MedustoreCommand,
    archive_options,
    command_errors,
    echo_json,
    format_kv,
    human_bytes,
    open_archive,
    reading,
    resolve_user,
    stderr_is_terminal,
    user_text,
    warn,
)
from medustore.replay import ErrorBudget, IncompleteUnlearningWarning, Plan, parse_window
from medustore.store import UpdateStore, UserId

__all__ = ["FORMATS", "read_weights", "unlearn_command", "write_weights"]

#: Output formats by file suffix. Neither can hold pickled objects.
FORMATS = {".safetensors": "safetensors", ".npz": "npz"}
#: Name of the single tensor written for a model recorded as a bare flat vector.
FLAT_NAME = "weights"
#: Missing participations listed by name in the warning (the JSON lists all).
_SHOWN_MISSING = 10
#: Names `np.savez` takes as its own arguments: such tensors cannot go in an .npz.
_NPZ_RESERVED = {"file", "allow_pickle"}


def output_format(path: str) -> str:
    """``"safetensors"`` or ``"npz"`` from the file suffix, or a usage error."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise CliError(f"output {path!r} must end in .safetensors or .npz "
                       "(pickle-based formats are never written)", EXIT_USAGE)
    return fmt


def write_weights(arrays: dict[str, np.ndarray], path: str, fmt: str,
                  metadata: dict[str, str]) -> None:
    """Write ``arrays`` atomically: a temporary file in the same folder, then a rename.

    ``.safetensors`` keeps ``metadata`` in its header; ``.npz`` is written with `np.savez`
    (no object arrays, so no pickles) and is read back with ``allow_pickle=False``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".medustore-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if fmt == "safetensors":
                from safetensors.numpy import save

                fh.write(save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                              metadata=metadata))
            else:
                np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_weights(path: str) -> dict[str, np.ndarray]:
    """Read weights written by `write_weights` (never unpickles)."""
    if output_format(path) == "safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _check_names(store: UpdateStore, fmt: str) -> None:
    if fmt == "npz":
        clash = sorted(_NPZ_RESERVED & {t.name for t in store.layout.tensors})
        if clash:
            raise CliError(f"tensor name(s) {clash} cannot be written to .npz (np.savez "
                           "reserves them); write .safetensors", EXIT_USAGE)


def _check_output(path: str, fmt: str) -> None:
    """Fail before any work when the output cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"output folder does not exist: {folder}", EXIT_USAGE)
    if os.path.isdir(path):
        raise CliError(f"output {path!r} is a folder", EXIT_USAGE)
    if fmt == "safetensors":
        try:
            import safetensors.numpy  # noqa: F401
        except ImportError:
            raise CliError("writing .safetensors needs the safetensors package "
                           "(pip install safetensors); or write .npz", EXIT_USAGE) from None


def _plan_rounds(store: UpdateStore, p: Plan, window: str | None) -> list[int]:
    """Rounds of the plan's window; a usage error when a window holds none."""
    rounds = [int(store.index.rounds[row]) for row in p.rows]
    if window is not None and not rounds:
        raise CliError(f"round window {window!r} holds no round of this archive "
                       f"(it holds {store.index.rounds_text()})", EXIT_USAGE)
    return rounds


def _missing_text(budget: ErrorBudget) -> str:
    shown = ", ".join(f"round {t} user {user_text(u)}"
                      for t, u in budget.missing[:_SHOWN_MISSING])
    more = len(budget.missing) - _SHOWN_MISSING
    return shown + (f" and {more} more" if more > 0 else "")


def _budget_text(budget: ErrorBudget) -> str:
    if budget.exact:
        return "0 (exact: every record is stored losslessly)"
    return (f"{budget.bound(3.0):.4g} = deterministic {budget.deterministic:.4g} "
            f"+ 3 x rms {budget.rms:.4g}")


def _budget_json(budget: ErrorBudget) -> dict[str, Any]:
    return {**budget.to_json(), "missing": [[t, u] for t, u in budget.missing]}


def _arrays(store: UpdateStore, weights: Any) -> dict[str, np.ndarray]:
    if store.layout.flat:
        return {FLAT_NAME: np.asarray(weights)}
    return {name: np.asarray(a) for name, a in weights.items()}


def _incomplete(p: Plan) -> bool:
    """Whether the replay lacks records of the removed users (the accumulator needs none)."""
    return p.method == "replay" and p.budget.records_missing > 0


def _missing_head(store: UpdateStore, p: Plan) -> str:
    return (f"{p.budget.records_missing} participation(s) of the removed users were not "
            f"stored by the archive's policy ({store.policy.name}): {_missing_text(p.budget)}")


def _warn_missing(store: UpdateStore, p: Plan) -> None:
    """Name the records the replay cannot use (the accumulator needs none)."""
    budget = p.budget
    if _incomplete(p):
        warn(f"{_missing_head(store, p)}; the weights may differ from exact unlearning "
             f"by up to {budget.deterministic:.4g} (L2) plus lattice noise of RMS "
             f"{budget.rms:.4g}")


def _refuse_incomplete(store: UpdateStore, p: Plan) -> None:
    """``--strict``: fail (exit `EXIT_INCOMPLETE`) before decoding or writing anything."""
    if _incomplete(p):
        raise CliError(f"--strict: {_missing_head(store, p)}; the answer would only be "
                       f"approximate (error budget {_budget_text(p.budget)}, L2); "
                       "nothing was written", EXIT_INCOMPLETE)


def _run(store: UpdateStore, p: Plan, progress: bool | None) -> Any:
    show = stderr_is_terminal() if progress is None else progress
    with reading("decoding records"), warnings.catch_warnings():
        # Reported by _warn_missing, with the records by name.
        warnings.simplefilter("ignore", IncompleteUnlearningWarning)
        return replay.run(store, p, out="numpy", progress=show)


def _summary_json(archive: str, p: Plan, rounds: list[int], window: str | None,
                  output: dict[str, Any], as_of_round: int | None) -> dict[str, Any]:
    return {
        "archive": archive, "as_of_round": as_of_round, "users": list(p.users),
        "rounds": {"window": window, "first": rounds[0] if rounds else None,
                   "last": rounds[-1] if rounds else None, "count": len(rounds),
                   "with_participation": p.budget.rounds},
        "alpha": p.alpha, "output": output, "method": p.method,
        "budget": _budget_json(p.budget), "complete": p.budget.records_missing == 0}


def _result_text(p: Plan, policy: str) -> str:
    """Exact or approximate, in plain words: the summary's ``Result`` line."""
    budget = p.budget
    if p.method == "accumulator":
        return "exact (the per-user accumulator)"
    if budget.exact:
        return "exact (every record used is stored losslessly)"
    if budget.records_missing:
        total = budget.records_missing + budget.records_used
        return (f"APPROXIMATE: {budget.records_missing} of {total} participation(s) of the "
                f"removed users were not stored by the policy ({policy}); the weights lie "
                f"within the error budget, {budget.bound(3.0):.4g} (L2), of exact unlearning "
                "(--strict refuses instead)")
    return (f"approximate: the records are lossy-coded; the weights lie within the error "
            f"budget, {budget.bound(3.0):.4g} (L2), of exact unlearning")


def _summary_text(p: Plan, rounds: list[int], output: dict[str, Any],
                  as_of_round: int | None, policy: str) -> str:
    budget = p.budget
    if p.method == "accumulator":
        records = "none read: the exact per-user accumulator answers"
    else:
        records = f"{budget.records_used} used"
        if budget.records_missing:
            records += (f", {budget.records_missing} participation(s) not stored by the "
                        "policy (listed in the warning above)")
    if not budget.rounds:
        records += "; the users took no part in these rounds: the weights are w_T"
    span = f"{rounds[0]}..{rounds[-1]}" if rounds else "none"
    alpha = f"; alpha {p.alpha:g}" if p.alpha else ""
    n = output["tensors"]
    pairs = [
        ("Removed", ", ".join(user_text(u) for u in p.users)),
        ("Rounds", f"{span} ({len(rounds)} rounds, the removed users took part in "
                   f"{budget.rounds}{alpha})"),
        *([("Version", f"as of round {as_of_round}")] if as_of_round is not None else []),
        ("Method", "exact per-user accumulator" if p.method == "accumulator"
         else "replay of the stored records"),
        ("Records", records),
        ("Result", _result_text(p, policy)),
        ("Error budget", "0 (exact per-user accumulator)" if p.method == "accumulator"
         else _budget_text(budget) + " (L2)"),
        ("Output", f"{output['path']} ({output['format']}, {n} tensor{'s' * (n != 1)}, "
                   f"{output['params']:,} parameters, {human_bytes(output['bytes'])})"),
    ]
    return format_kv(pairs)


@click.command("unlearn", cls=MedustoreCommand)
@click.argument("archive")
@click.option("-u", "--user", "user_args", multiple=True, required=True, metavar="ID",
              help="User to remove (repeat for several). '3' is the integer 3 if the "
                   "archive has it, else the string '3'.")
@click.option("--rounds", "window", metavar="A:B",
              help="Remove only the rounds A <= t < B ('A:' or ':B' leave an end open).")
@click.option("--alpha", type=float, default=0.0, show_default=True,
              help="Fast-FedUL skew factor (0: the plain closed form).")
@click.option("-o", "--output", required=True, metavar="FILE",
              help="Where to write the weights: FILE.safetensors or FILE.npz.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar on stderr (default: when stderr is a terminal).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary on stdout (warnings still go to stderr).")
@click.option("--strict", is_flag=True,
              help="Fail (exit 7, nothing written) when the policy did not store some "
                   "records of the removed users, instead of writing the approximate answer.")
@archive_options
def unlearn_command(archive: str, user_args: tuple[str, ...], window: str | None, alpha: float,
                    output: str, progress: bool | None, as_json: bool, strict: bool,
                    as_of_round: int | None, storage_options: dict[str, str]) -> None:
    """Remove users from the model recorded in ARCHIVE and write the weights to FILE.

    Prints the replay's plan (method: the exact per-user accumulator or the replay of the
    stored records) and its error budget: an L2 bound on the distance to the exact replay
    (deterministic part from records the policy did not store, plus 3 x the RMS of the
    lattice noise). Records the policy dropped are reported on stderr and in the summary,
    never silently ignored; with --strict they are an error (exit 7) and nothing is written.
    """
    with command_errors():
        fmt = output_format(output)
        if not math.isfinite(alpha) or alpha < 0:
            raise CliError(f"--alpha must be finite and >= 0, got {alpha:g}", EXIT_USAGE)
        try:  # a malformed window is a usage error, found before opening anything
            parse_window(window)
        except ValueError as err:
            raise CliError(f"--rounds: {err} (use A:B for the rounds A <= t < B)",
                           EXIT_USAGE) from None
        _check_output(output, fmt)
        with open_archive(archive, as_of_round=as_of_round,
                          storage_options=storage_options) as store:
            _check_names(store, fmt)
            users: list[UserId] = list(dict.fromkeys(resolve_user(store, u) for u in user_args))
            with reading("planning the replay"):
                p = replay.plan(store, users, rounds=window, alpha=alpha)
            rounds = _plan_rounds(store, p, window)
            if strict:
                _refuse_incomplete(store, p)
            _warn_missing(store, p)
            policy = store.policy.name
            arrays = _arrays(store, _run(store, p, progress))
            meta = {"medustore.archive": str(archive),
                    "medustore.as_of_round": "" if as_of_round is None else str(as_of_round),
                    "medustore.users": json.dumps(list(p.users)),
                    "medustore.rounds": window or ":",
                    "medustore.alpha": repr(alpha),
                    "medustore.method": p.method,
                    "medustore.error_budget": json.dumps(_budget_json(p.budget))}
            write_weights(arrays, output, fmt, meta)
            written = {"path": output, "format": fmt, "tensors": len(arrays),
                       "params": store.layout.size, "bytes": os.path.getsize(output)}
    if as_json:
        echo_json(_summary_json(str(archive), p, rounds, window, written, as_of_round))
    else:
        click.echo(_summary_text(p, rounds, written, as_of_round, policy))
