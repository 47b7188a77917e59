"""The exceptions medustore raises on purpose (the CLI maps each to an exit code)."""

__all__ = ["MedustoreError", "NotAnArchiveError", "ReadOnlyError", "UnknownUserError"]


class MedustoreError(Exception):
    """Base class of medustore's own errors."""


class NotAnArchiveError(MedustoreError, ValueError):
    """The location holds no medustore archive (or one of an unsupported format)."""


class ReadOnlyError(MedustoreError, PermissionError):
    """A write was attempted on an archive opened read-only."""


class UnknownUserError(MedustoreError, LookupError):
    """A user id that the archive has never seen."""
