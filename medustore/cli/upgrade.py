"""``medustore upgrade OLD NEW``: convert a format-1 archive into a new format-2 archive."""

from __future__ import annotations

import click

from medustore.archive.upgrade import upgrade
from medustore.cli._common import MedustoreCommand, command_errors

__all__ = ["upgrade_command"]


@click.command("upgrade", cls=MedustoreCommand)
@click.argument("old")
@click.argument("new")
def upgrade_command(old: str, new: str) -> None:
    """Convert the format-1 archive OLD (medustore 0.1) into a new format-2 archive NEW.

    Coded records and aggregates are copied byte for byte, so unlearning from NEW gives
    what OLD gave. OLD is left untouched; NEW must not exist.
    """
    with command_errors():
        rounds = upgrade(old, new)
    click.echo(f"upgraded {old} -> {new}: {rounds} round{'s' * (rounds != 1)}, format 2")
