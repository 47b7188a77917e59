"""``medustore export``: write one version of an archive as a plain Zarr v3 snapshot."""

from __future__ import annotations

import os
from pathlib import Path

import click

from medustore.archive.export import export
from medustore.cli._common import (
    EXIT_USAGE,
    CliError,
    MedustoreCommand,
    archive_options,
    command_errors,
    format_kv,
    human_bytes,
    open_archive,
)

__all__ = ["export_command"]


def _check_out(out: str, force: bool) -> None:
    """Fail before reading anything when OUT cannot be written."""
    path = Path(out).expanduser()
    if not path.parent.is_dir():
        raise CliError(f"output folder does not exist: {path.parent}", EXIT_USAGE)
    if (path.exists() or path.is_symlink()) and not force:
        raise CliError(f"{out} already exists; choose another name or replace it with "
                       "--force", EXIT_USAGE)


def _size(path: Path) -> tuple[int, int]:
    """``(files, bytes)`` of a directory, or ``(1, bytes)`` of a file."""
    if path.is_file():
        return 1, path.stat().st_size
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


@click.command("export", cls=MedustoreCommand)
@click.argument("archive")
@click.argument("out")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@archive_options
def export_command(archive: str, out: str, force: bool, as_of_round: int | None,
                   storage_options: dict[str, str]) -> None:
    """Write one version of ARCHIVE to OUT as a plain Zarr v3 snapshot.

    OUT is a directory, or a zip file when it ends in .zip. The chunks are copied byte for
    byte (nothing is decoded). The snapshot is a read-only archive: every command and
    medustore.open read it, and zarr alone opens its arrays.
    """
    with command_errors():
        _check_out(out, force)
        with open_archive(archive, as_of_round=as_of_round,
                          storage_options=storage_options) as store:
            # Not under `reading`: the copy decodes nothing, and names damage itself.
            path = export(store, out, overwrite=force)
            rounds = store.index.rounds_text()
            version = ("latest" if as_of_round is None else f"as of round {as_of_round}")
            if store.snapshot_id is not None:
                version += f" (snapshot {store.snapshot_id})"
        files, size = _size(path)
    kind = "zip file" if path.is_file() else f"directory, {files:,} files"
    click.echo(format_kv([
        ("Archive", archive),
        ("Version", f"{version}, {rounds}"),
        ("Output", f"{os.fspath(out)} (plain Zarr v3 {kind}; a read-only archive)"),
        ("Size", f"{human_bytes(size)} ({size:,} bytes)"),
    ]))
