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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click
import zarr

from medustore.errors import MedustoreError, NotAnArchiveError, ReadOnlyError, UnknownUserError
from medustore.store import UpdateStore, UserId, open_store

__all__ = [
    "EXIT_DAMAGED",
    "EXIT_IO",
    "EXIT_NOT_ARCHIVE",
    "EXIT_OK",
    "EXIT_UNKNOWN_USER",
    "EXIT_USAGE",
    "CliError",
    "DamagedArchiveError",
    "MedustoreCommand",
    "command_errors",
    "echo_json",
    "format_kv",
    "format_table",
    "human_bytes",
    "open_archive",
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

_PREFIX = "medustore: error: "
_HINT = "run 'medustore verify ARCHIVE' to locate the damage"


class CliError(click.ClickException):
    """An error shown as one line, ``medustore: error: <message>``, with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(" ".join(str(message).split()))  # one line, whatever the source
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(_PREFIX + self.format_message(), file=file, err=file is None)


class DamagedArchiveError(MedustoreError):
    """Reading the archive failed: a chunk or a metadata document is damaged."""


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
    except NotAnArchiveError as err:
        raise CliError(str(err), EXIT_NOT_ARCHIVE) from None
    except DamagedArchiveError as err:
        raise CliError(str(err), EXIT_DAMAGED) from None
    except ReadOnlyError as err:
        raise CliError(str(err), EXIT_IO) from None
    except (ValueError, TypeError, MedustoreError) as err:
        raise CliError(str(err), EXIT_USAGE) from None
    except OSError as err:
        raise CliError(_os_message(err), EXIT_IO) from None


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


@contextmanager
def open_archive(location: str) -> Iterator[UpdateStore]:
    """Open an archive read-only, with one-line errors for every way that can fail."""
    if _is_local_path(location) and not os.path.exists(location):
        raise CliError(f"no such file or directory: {location}", EXIT_NOT_ARCHIVE)
    try:
        store = open_store(location, "r")
    except NotAnArchiveError as err:
        raise CliError(str(err), EXIT_NOT_ARCHIVE) from None
    except zarr.errors.ContainsArrayError:
        raise CliError(f"{location} is a zarr array, not a medustore archive",
                       EXIT_NOT_ARCHIVE) from None
    except PermissionError as err:
        raise CliError(_os_message(err), EXIT_IO) from None
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


def _has_medustore_attrs(location: str) -> bool:
    try:
        return "medustore" in zarr.open_group(location, mode="r").attrs
    except Exception:  # noqa: BLE001 - any failure means "cannot tell": not an archive
        return False


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
