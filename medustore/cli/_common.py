"""Shared pieces of the commands: exit codes, one-line errors, opening archives, formatting.

Every command reports a failure as one line on stderr, ``medustore: error: <message>``, and
exits with one of the codes below; a traceback means a bug in medustore.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import icechunk
import zarr

from medustore.archive.storage import parse_location
from medustore.errors import (
    DamagedArchiveError,
    MedustoreError,
    NotAnArchiveError,
    ReadOnlyError,
    UnknownUserError,
    VersionNotKeptError,
    first_line,
)
from medustore.store import UpdateStore, UserId, open_store

__all__ = [
    "EXIT_DAMAGED",
    "EXIT_INCOMPLETE",
    "EXIT_IO",
    "EXIT_NOT_ARCHIVE",
    "EXIT_OK",
    "EXIT_UNKNOWN_USER",
    "EXIT_USAGE",
    "EXIT_VERSION_NOT_KEPT",
    "CliError",
    "DamagedArchiveError",
    "MedustoreCommand",
    "archive_options",
    "command_errors",
    "echo_json",
    "format_kv",
    "format_table",
    "human_bytes",
    "open_archive",
    "parse_storage_options",
    "reading",
    "resolve_user",
    "user_text",
    "warn",
]

EXIT_OK = 0
#: The archive is damaged (a chunk does not decode, side arrays disagree), or `verify` found
#: problems.
EXIT_DAMAGED = 1
#: Bad command line: unknown option, missing argument, bad value (round window, alpha, output
#: file type).
EXIT_USAGE = 2
#: The path does not exist, or holds no medustore archive (or one of a newer format).
EXIT_NOT_ARCHIVE = 3
#: A user id the archive has never seen.
EXIT_UNKNOWN_USER = 4
#: The operating system refused a read or write (permissions, disk full, missing folder).
EXIT_IO = 5
#: ``--as-of-round T``: the archive keeps no version as of round T (retention expired it,
#: the round was never committed, or the archive is a plain Zarr snapshot).
EXIT_VERSION_NOT_KEPT = 6
#: ``unlearn --strict``: the archive's policy did not store some records of the removed users,
#: so the answer would only be approximate (within the error budget); nothing was written.
EXIT_INCOMPLETE = 7

_PREFIX = "medustore: error: "
_HINT = "run 'medustore verify ARCHIVE' to locate the damage"


class CliError(click.ClickException):
    """An error shown as one line, ``medustore: error: <message>``, with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever the source
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(_PREFIX + self.format_message(), file=file, err=file is None)


class MedustoreCommand(click.Command):
    """A click command whose usage errors are one line (exit 2) instead of click's block."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as err:
            message = err.format_message().rstrip(".")
            message = message[:1].lower() + message[1:]
            path = err.ctx.command_path if err.ctx else (info_name or self.name)
            raise CliError(f"{message} (see '{path} --help')", EXIT_USAGE) from None


@contextmanager
def command_errors() -> Iterator[None]:
    """Map medustore's errors, ValueError and OSError to one-line errors and exit codes.

    Damage found while reading arrives as `DamagedArchiveError` (see `reading`); a ValueError
    reaching this boundary is a bad argument (exit 2).
    """
    try:
        yield
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except UnknownUserError as err:
        raise CliError(str(err).strip("'\""), EXIT_UNKNOWN_USER) from None
    except VersionNotKeptError as err:
        raise CliError(str(err), EXIT_VERSION_NOT_KEPT) from None
    except NotAnArchiveError as err:
        raise CliError(str(err), EXIT_NOT_ARCHIVE) from None
    except DamagedArchiveError as err:
        raise CliError(_damage_message(str(err)), EXIT_DAMAGED) from None
    except ReadOnlyError as err:
        raise CliError(str(err), EXIT_IO) from None
    except icechunk.IcechunkError as err:  # the repository's own files failed to read
        raise CliError(_damage_message(f"reading the archive failed: {first_line(err)}"),
                       EXIT_DAMAGED) from None
    except (ValueError, TypeError, MedustoreError) as err:
        raise CliError(str(err), EXIT_USAGE) from None
    except OSError as err:
        raise CliError(_os_message(err), EXIT_IO) from None


def _damage_message(message: str) -> str:
    """``damaged archive: ...; run 'medustore verify ...'`` (each part once)."""
    if not message.startswith("damaged archive"):
        message = f"damaged archive: {message}"
    return message if "medustore verify" in message else f"{message}; {_HINT}"


def _os_message(err: OSError) -> str:
    if err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    return str(err) or type(err).__name__


@contextmanager
def reading(what: str = "reading the archive") -> Iterator[None]:
    """Turn failures while reading (a codec's ValueError or RuntimeError, arithmetic on
    damaged values) into `DamagedArchiveError`."""
    try:
        yield
    except MedustoreError:
        raise
    except (ValueError, RuntimeError, LookupError, ArithmeticError,
            zarr.errors.BaseZarrError) as err:
        # Damaged side arrays can hold any value: a division by zero is damage too.
        detail = str(err).strip("'\"") or type(err).__name__
        raise DamagedArchiveError(f"damaged archive: {what} failed: {detail}; {_HINT}") from None


def _is_local_path(location: str) -> bool:
    return "://" not in location


def _check_local(location: str) -> None:
    """Refuse a local path that cannot hold an archive before the storage layer sees it
    (opening a missing path would create it; a plain file is no repository)."""
    if not _is_local_path(location):
        return
    if not os.path.exists(location):
        raise CliError(f"no such file or directory: {location}", EXIT_NOT_ARCHIVE)
    if os.path.isfile(location) and not (location.endswith(".zip")
                                         and zipfile.is_zipfile(location)):
        raise CliError(f"{location} is a file, not a medustore archive (an archive is a "
                       "directory, or a .zip written by 'medustore export')", EXIT_NOT_ARCHIVE)


def _check_storage_options(location: str, storage_options: dict[str, str]) -> None:
    """Bad ``--storage-option`` keys or values are usage errors, found before any I/O."""
    if not storage_options:
        return
    if not location.startswith("s3://"):
        raise CliError(f"--storage-option applies to s3:// archives, not {location!r}",
                       EXIT_USAGE)
    try:
        parse_location(location, storage_options=storage_options)
    except (ValueError, TypeError) as err:
        raise CliError(f"--storage-option: {err}", EXIT_USAGE) from None


@contextmanager
def open_archive(location: str, *, as_of_round: int | None = None,
                 storage_options: dict[str, str] | None = None) -> Iterator[UpdateStore]:
    """Open an archive read-only, with one-line errors for every way that can fail.

    Parameters
    ----------
    location
        A path, ``memory://NAME``, ``s3://bucket/prefix`` or a plain Zarr snapshot (a
        directory or ``.zip`` written by ``medustore export``).
    as_of_round
        Open the version committed by this round (`VersionNotKeptError` -> exit
        `EXIT_VERSION_NOT_KEPT`).
    storage_options
        For ``s3://`` archives (``--storage-option KEY=VALUE``).
    """
    _check_local(location)
    _check_storage_options(location, storage_options or {})
    try:
        store = open_store(location, "r", as_of_round=as_of_round,
                           storage_options=storage_options or None)
    except VersionNotKeptError as err:
        raise CliError(str(err), EXIT_VERSION_NOT_KEPT) from None
    except NotAnArchiveError as err:
        raise CliError(str(err), EXIT_NOT_ARCHIVE) from None
    except DamagedArchiveError as err:
        raise CliError(_damage_message(str(err)), EXIT_DAMAGED) from None
    except zarr.errors.ContainsArrayError:
        raise CliError(f"{location} is a zarr array, not a medustore archive",
                       EXIT_NOT_ARCHIVE) from None
    except PermissionError as err:
        raise CliError(_os_message(err), EXIT_IO) from None
    except icechunk.IcechunkError as err:
        raise _repository_error(location, err) from None
    except (ValueError, RuntimeError, KeyError, OSError, zarr.errors.BaseZarrError) as err:
        detail = str(err).strip("'\"") or type(err).__name__
        if _has_medustore_attrs(location):
            if isinstance(err, KeyError):
                detail = f"array {detail!r} is missing or unreadable"
            raise CliError(f"damaged archive: cannot open {location}: {detail}; {_HINT}",
                           EXIT_DAMAGED) from None
        raise CliError(f"cannot read {location} as a medustore archive: {detail}",
                       EXIT_NOT_ARCHIVE) from None
    try:
        yield store
    finally:
        store.close()


def _repository_error(location: str, err: Exception) -> CliError:
    """An Icechunk failure: on object storage usually the connection or the credentials;
    locally, a repository whose files are damaged."""
    detail = first_line(err)
    if location.startswith("s3://"):
        return CliError(f"cannot read {location}: {detail}", EXIT_IO)
    return CliError(f"damaged archive: cannot open {location}: {detail}; {_HINT}",
                    EXIT_DAMAGED)


def _has_medustore_attrs(location: str) -> bool:
    try:
        return "medustore" in zarr.open_group(location, mode="r").attrs
    except Exception:  # noqa: BLE001 - any failure means "cannot tell": not an archive
        return False


#: A storage option's name (the s3 options are identifiers).
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
F = TypeVar("F", bound=Callable[..., Any])


def parse_storage_options(items: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` texts as a dict (values stay text: the storage layer converts them).

    Raises
    ------
    ValueError
        An item without ``=``, with an empty or malformed key, or a key given twice.
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key):
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        if key in out:
            raise ValueError(f"{key} given twice")
        out[key] = value
    return out


def _storage_options_callback(ctx: click.Context, param: click.Parameter,
                              value: tuple[str, ...]) -> dict[str, str]:
    try:
        return parse_storage_options(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


def archive_options(command: F) -> F:
    """Add ``--as-of-round T`` and ``--storage-option KEY=VALUE`` (repeatable) to a command.

    The command receives ``as_of_round`` (int or None) and ``storage_options`` (a dict)
    and passes both to `open_archive`.
    """
    command = click.option(
        "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
        callback=_storage_options_callback,
        help="Option of an s3:// archive (repeatable): region, endpoint_url, allow_http, "
             "access_key_id, secret_access_key, session_token, anonymous, from_env, "
             "force_path_style, requester_pays.")(command)
    command = click.option(
        "--as-of-round", "as_of_round", type=click.IntRange(min=0), metavar="T",
        help="Read the archive as it was right after round T was committed (the version "
             "must still be kept; exit 6 otherwise).")(command)
    return command


_INT_TEXT = re.compile(r"[+-]?[0-9]+")


def resolve_user(store: UpdateStore, text: str) -> UserId:
    """The archive's user id written as ``text``: int ``3`` if the archive has it, else str
    ``"3"``; a non-canonical integer (``03``) prefers an exact str match."""
    known = set(store.users)
    as_int = int(text) if _INT_TEXT.fullmatch(text) else None
    order: list[UserId | None] = [as_int, text] if str(as_int) == text else [text, as_int]
    for candidate in order:
        if candidate is not None and candidate in known:
            return candidate
    shown = ", ".join(user_text(u) for u in store.users[:10])
    more = f" and {len(store.users) - 10} more" if len(store.users) > 10 else ""
    raise UnknownUserError(f"unknown user {text!r}: the archive's users are "
                           f"{shown or 'none'}{more}")


def user_text(user: UserId) -> str:
    """A user id for display: str ids that look like integers are quoted (``'3'``)."""
    if isinstance(user, str) and (_INT_TEXT.fullmatch(user) or not user.strip()):
        return repr(user)
    return str(user)


def warn(message: str) -> None:
    """One warning line on stderr."""
    click.echo("medustore: warning: " + " ".join(message.split()), err=True)


# ---------------------------------------------------------------------- formatting


def human_bytes(n: float) -> str:
    """``1.23 MiB``-style size (binary units, three significant digits)."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024.0
        if n < 1024 or unit == "PiB":
            break
    digits = 0 if n >= 100 else 1 if n >= 10 else 2
    return f"{n:.{digits}f} {unit}"


def fmt_float(x: float | None, spec: str = ".4g") -> str:
    """A float for tables: ``-`` when unknown."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def format_kv(pairs: Sequence[tuple[str, str]]) -> str:
    """An aligned ``key : value`` block (like zarr's ``Array.info``)."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k:<{width}} : {v}" for k, v in pairs)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 right: Sequence[bool] | None = None) -> str:
    """A plain-text table: a header, a rule, one line per row; ``right`` aligns columns."""
    right = list(right) if right is not None else [True] * len(headers)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w)
                         for c, w, r in zip(cells, widths, right, strict=True)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def echo_json(data: Any) -> None:
    """One JSON document on stdout (NaN and infinities become null)."""
    click.echo(json.dumps(_finite(data), indent=2, allow_nan=False))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (progress bars show only then)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
