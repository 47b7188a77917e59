"""The click group behind the ``medustore`` command."""

from __future__ import annotations

import click

from medustore import __version__


@click.group()
@click.version_option(__version__, prog_name="medustore")
def main() -> None:
    """medustore: compressed storage of federated-learning updates, built to unlearn."""
