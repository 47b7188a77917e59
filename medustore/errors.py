"""The exceptions medustore raises on purpose (the CLI maps each to an exit code)."""

__all__ = [
    "first_line",
    "ConcurrentWriteError",
    "DamagedArchiveError",
    "MedustoreError",
    "NotAnArchiveError",
    "ReadOnlyError",
    "UnknownUserError",
    "UnsupportedFormatError",
    "VersionNotKeptError",
]


class MedustoreError(Exception):
    """Base class of medustore's own errors."""


class NotAnArchiveError(MedustoreError, ValueError):
    """The location holds no medustore archive."""


class UnsupportedFormatError(NotAnArchiveError):
    """The location holds a medustore archive of a format this version does not read."""


class ReadOnlyError(MedustoreError, PermissionError):
    """A write was attempted on an archive opened read-only."""


class UnknownUserError(MedustoreError, LookupError):
    """A user id that the archive has never seen."""


class DamagedArchiveError(MedustoreError):
    """Something the answer depends on is missing, unreadable or inconsistent.

    The message names what is damaged (array, round, user, chunk); nothing is ever read as
    zeros or guessed in its place.
    """


class ConcurrentWriteError(MedustoreError):
    """Another writer holds the archive, or committed since this writer last read it."""


class VersionNotKeptError(MedustoreError, LookupError):
    """The archive no longer keeps (or never had) the version asked for."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message, without the frame marks of Icechunk's
    multi-line errors (the rest is a span trace); the type's name if it says nothing."""
    lines = (ln.strip().lstrip("x\u00d7|`-").strip() for ln in str(err).splitlines())
    return next((ln for ln in lines if ln), type(err).__name__)
