"""The click group behind the ``medustore`` command."""

from __future__ import annotations

import click

from medustore import __version__


@click.group()
@click.version_option(__version__, prog_name="medustore")
def main() -> None:
    """medustore: compressed storage of federated-learning updates, built to unlearn."""


from medustore.cli.demo import demo_command  # noqa: E402
from medustore.cli.export import export_command  # noqa: E402
from medustore.cli.inspect import inspect_command  # noqa: E402
from medustore.cli.unlearn import unlearn_command  # noqa: E402
from medustore.cli.upgrade import upgrade_command  # noqa: E402
from medustore.cli.verify import verify_command  # noqa: E402

main.add_command(demo_command)
main.add_command(export_command)
main.add_command(inspect_command)
main.add_command(unlearn_command)
main.add_command(upgrade_command)
main.add_command(verify_command)
