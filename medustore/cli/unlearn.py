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

from medustore.cli._common import (
    EXIT_USAGE,
    CliError,
    MedustoreCommand,
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
from medustore.replay import ErrorBudget, IncompleteUnlearningWarning, parse_window
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


def _window_rows(store: UpdateStore, window: str | None) -> list[int]:
    """Rounds of the archive inside ``window``; a usage error when there are none."""
    start, stop = parse_window(window)
    rounds = [t for t in store.rounds if (start is None or t >= start)
              and (stop is None or t < stop)]
    if window is not None and not rounds:
        held = (f"{len(store.rounds)} rounds, {store.rounds[0]}..{store.rounds[-1]}"
                if store.rounds else "no rounds")
        raise CliError(f"round window {window!r} holds no round of this archive "
                       f"(it holds {held})", EXIT_USAGE)
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


def _budget_json(budget: ErrorBudget, exact_acc: bool) -> dict[str, Any]:
    data = {**budget.to_json(), "missing": [[t, u] for t, u in budget.missing]}
    if exact_acc:
        data.update(deterministic=0.0, rms=0.0, bound_3sigma=0.0, exact=True)
    return data


def _arrays(store: UpdateStore, weights: Any) -> dict[str, np.ndarray]:
    if store.layout.flat:
        return {FLAT_NAME: np.asarray(weights)}
    return {name: np.asarray(a) for name, a in weights.items()}


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
def unlearn_command(archive: str, user_args: tuple[str, ...], window: str | None, alpha: float,
                    output: str, progress: bool | None, as_json: bool) -> None:
    """Remove users from the model recorded in ARCHIVE and write the weights to FILE.

    Prints the error budget: an L2 bound on the distance to the exact replay (deterministic
    part from records the policy did not store, plus 3 x the RMS of the lattice noise).
    Records the policy dropped are reported on stderr, never silently ignored.
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
        with open_archive(archive) as store:
            _check_names(store, fmt)
            users: list[UserId] = list(dict.fromkeys(resolve_user(store, u) for u in user_args))
            rounds = _window_rows(store, window)
            with reading("computing the error budget"):
                budget = store.error_budget(users, rounds=window, alpha=alpha)
            # The exact accumulator answers one user over all rounds without alpha.
            exact_acc = (store.has_accumulators and len(users) == 1 and window is None
                         and alpha == 0.0)
            if budget.records_missing and not exact_acc:
                warn(f"{budget.records_missing} participation(s) of the removed users were not "
                     f"stored by the archive's policy ({store.policy.name}): "
                     f"{_missing_text(budget)}; the weights may differ from exact unlearning "
                     f"by up to {budget.deterministic:.4g} (L2) plus lattice noise of RMS "
                     f"{budget.rms:.4g}")
            show = stderr_is_terminal() if progress is None else progress
            with reading("decoding records"), warnings.catch_warnings():
                # Reported above, with the records by name.
                warnings.simplefilter("ignore", IncompleteUnlearningWarning)
                weights = store.unlearn(users, rounds=window, alpha=alpha, out="numpy",
                                        progress=show, exact_accumulator=exact_acc)
            arrays = _arrays(store, weights)
            meta = {"medustore.archive": str(archive),
                    "medustore.users": json.dumps(users),
                    "medustore.rounds": window or ":",
                    "medustore.alpha": repr(alpha),
                    "medustore.error_budget": json.dumps(_budget_json(budget, exact_acc))}
            write_weights(arrays, output, fmt, meta)
            size = os.path.getsize(output)
            n_params = store.layout.size
            took = budget.rounds
            span = (f"{rounds[0]}..{rounds[-1]}" if rounds else "none")

    if as_json:
        echo_json({
            "archive": str(archive), "users": users,
            "rounds": {"window": window, "first": rounds[0] if rounds else None,
                       "last": rounds[-1] if rounds else None, "count": len(rounds),
                       "with_participation": took},
            "alpha": alpha,
            "output": {"path": output, "format": fmt, "tensors": len(arrays),
                       "params": n_params, "bytes": size},
            "method": "accumulator" if exact_acc else "replay",
            "budget": _budget_json(budget, exact_acc),
            "complete": exact_acc or budget.records_missing == 0})
        return
    records = f"{budget.records_used} used"
    if exact_acc:
        records = "none read: the exact per-user accumulator answers"
    elif budget.records_missing:
        records += f", {budget.records_missing} not stored (see the warning above)"
    if not took:
        records += "; the users took no part in these rounds: the weights are w_T"
    click.echo(format_kv([
        ("Removed", ", ".join(user_text(u) for u in users)),
        ("Rounds", f"{span} ({len(rounds)} rounds, the removed users took part in {took}"
                   f"{'; alpha ' + format(alpha, 'g') if alpha else ''})"),
        ("Records", records),
        ("Error budget", "0 (exact per-user accumulator)" if exact_acc
         else _budget_text(budget) + " (L2)"),
        ("Output", f"{output} ({fmt}, {len(arrays)} tensor{'s' * (len(arrays) != 1)}, "
                   f"{n_params:,} parameters, {human_bytes(size)})"),
    ]))
