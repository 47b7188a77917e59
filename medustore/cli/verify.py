"""``medustore verify``: decode every chunk and check the archive's index; exit 1 on damage."""

from __future__ import annotations

from typing import Any

import click
import icechunk

from medustore.cli._common import (
    EXIT_DAMAGED,
    CliError,
    MedustoreCommand,
    archive_options,
    command_errors,
    echo_json,
    format_kv,
    open_archive,
    reading,
    user_text,
)
from medustore.errors import DamagedArchiveError
from medustore.verify import Problem, VerifyReport, refused_report, verify

__all__ = ["format_report", "verify_command"]

#: Start of the hint `open_archive` appends to damage errors: it names this very command.
_HINT = "; run 'medustore verify"


def _problem_line(p: Problem) -> str:
    where = [] if p.round is None else [f"round {p.round}"]
    if p.user is not None:
        where.append(f"user {user_text(p.user)}")
    if p.chunk is not None:
        where.append(f"chunk {p.chunk}")
    head = ", ".join(where)
    return f"  {head + ': ' if head else ''}{p.array}: {p.kind}: {p.message}"


def _counts(report: VerifyReport) -> str:
    """The aligned block of what was checked."""
    return format_kv([
        ("Archive", report.location),
        ("Rounds", str(report.rounds)),
        ("Users", str(report.users)),
        ("Records", f"{report.records:,} stored, {report.record_chunks:,} chunks decoded"),
        ("Aggregates", f"{report.aggregate_chunks:,} chunks decoded"),
        ("Model", f"{report.model_chunks:,} chunks decoded (initial and latest)"),
        *([("Accumulators", f"{report.accumulator_chunks:,} chunks decoded")]
          if report.accumulator_chunks else []),
    ])


def format_report(report: VerifyReport) -> str:
    """The text ``verify`` prints: what was checked, each problem, each note, the verdict."""
    if any(p.array == "archive" for p in report.problems):
        # Refused when opened: nothing was read, so there are no counts to show.
        lines = [format_kv([("Archive", report.location), ("Opened", "no: refused")])]
    else:
        lines = [_counts(report)]
    if report.notes:
        lines.append(f"notes ({len(report.notes)}):")
        lines.extend(f"  {n}" for n in report.notes)
    if report.problems:
        lines.append(f"problems ({len(report.problems)}):")
        lines.extend(_problem_line(p) for p in report.problems)
        n = len(report.problems)
        lines.append(f"result: DAMAGED ({n} problem{'s' * (n != 1)})")
    else:
        lines.append("result: OK")
    return "\n".join(lines)


def _verify(archive: str, progress: bool | None, **open_args: Any) -> tuple[
        VerifyReport, str | None]:
    """The report of ``archive``, and the message of a refusal to open it (None if opened).

    Opening refuses a damaged index, layout or policy (`DamagedArchiveError`, or the
    one-line error `open_archive` makes of it), and Icechunk raises its own error when an
    object its metadata needs is gone. Those are what verify exists to report, so they
    become a DAMAGED report instead of only an error line.
    """
    try:
        with open_archive(archive, **open_args) as store, reading("verifying"):
            return verify(store, progress=progress), None
    except CliError as err:
        if err.exit_code != EXIT_DAMAGED:
            raise
        message = err.format_message().split(_HINT)[0]  # the hint names this very command
    except (DamagedArchiveError, icechunk.IcechunkError) as err:
        message = refused_report(archive, err).problems[0].message
    message = message.removeprefix("damaged archive: ")
    return refused_report(archive, message), message


@click.command("verify", cls=MedustoreCommand)
@click.argument("archive")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as one JSON document.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars on stderr (default: when stderr is a terminal).")
@archive_options
def verify_command(archive: str, as_json: bool, progress: bool | None,
                   as_of_round: int | None, storage_options: dict[str, str]) -> None:
    """Decode every chunk of ARCHIVE and check it against the index.

    Every chunk an answer can read (stored records, aggregates, w_0, the latest model,
    accumulators) must be present and decode to finite values of the right size; records
    must match their byte counts and norms in the index. Each problem is named by array,
    round, user and chunk; leftover chunks and uncollected garbage are harmless notes. An
    archive whose index does not open (damaged, or edited outside medustore) is DAMAGED.

    Exit status: 0 when the archive is sound, 1 when anything is damaged or missing.
    """
    with command_errors():
        report, refused = _verify(archive, progress, as_of_round=as_of_round,
                                  storage_options=storage_options)
    report.location = archive
    if as_json:
        echo_json(report.to_json())
    else:
        click.echo(format_report(report))
    if refused is not None:
        # Also the one-line error every command prints for an archive it cannot open.
        raise CliError(f"damaged archive: {refused}", EXIT_DAMAGED)
    if not report.ok:
        click.get_current_context().exit(EXIT_DAMAGED)
