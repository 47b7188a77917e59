"""The ``medustore`` command line (click)."""

from medustore.cli.main import main

__all__ = ["main"]
