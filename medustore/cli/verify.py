"""``medustore verify``: decode every chunk and check the archive's index; exit 1 on damage."""

from __future__ import annotations

import click

from medustore.cli._common import (
    EXIT_DAMAGED,
    MedustoreCommand,
    command_errors,
    echo_json,
    format_kv,
    open_archive,
    reading,
    user_text,
)
from medustore.verify import Problem, VerifyReport, verify

__all__ = ["format_report", "verify_command"]


def _problem_line(p: Problem) -> str:
    where = [] if p.round is None else [f"round {p.round}"]
    if p.user is not None:
        where.append(f"user {user_text(p.user)}")
    if p.chunk is not None:
        where.append(f"chunk {p.chunk}")
    head = ", ".join(where)
    return f"  {head + ': ' if head else ''}{p.array}: {p.kind}: {p.message}"


def format_report(report: VerifyReport) -> str:
    """The text ``verify`` prints: what was checked, each problem, each note, the verdict."""
    lines = [format_kv([
        ("Archive", report.location),
        ("Rounds", str(report.rounds)),
        ("Users", str(report.users)),
        ("Records", f"{report.records:,} stored, {report.record_chunks:,} chunks decoded"),
        ("Aggregates", f"{report.aggregate_chunks:,} chunks decoded"),
        ("Model", f"{report.model_chunks:,} chunks decoded (initial and latest)"),
        *([("Accumulators", f"{report.accumulator_chunks:,} chunks decoded")]
          if report.accumulator_chunks else []),
    ])]
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


@click.command("verify", cls=MedustoreCommand)
@click.argument("archive")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as one JSON document.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars on stderr (default: when stderr is a terminal).")
def verify_command(archive: str, as_json: bool, progress: bool | None) -> None:
    """Decode every chunk of ARCHIVE and check it against the index.

    Records, aggregates, w_0, the latest model and accumulators must decode to finite values
    of the right size; side arrays must agree (committed rounds increasing, weights positive
    where users took part, byte counts and norms matching the chunks). Each problem is named
    by round, user and chunk.

    Exit status: 0 when the archive is sound, 1 when anything is damaged or missing.
    """
    with command_errors(), open_archive(archive) as store:
        with reading("verifying"):
            report = verify(store, progress=progress)
    report.location = archive
    if as_json:
        echo_json(report.to_json())
    else:
        click.echo(format_report(report))
    if not report.ok:
        click.get_current_context().exit(EXIT_DAMAGED)
