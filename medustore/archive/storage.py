"""Where an archive lives: parse a location into Icechunk storage or a plain Zarr store.

Format-2 archives are Icechunk repositories: a local directory, ``memory://NAME`` (one
process) or ``s3://bucket/prefix``. Plain Zarr snapshots written by ``medustore export``
(a directory or a ``.zip``) are read-only archives of the same layout.
"""

from __future__ import annotations

import os
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import icechunk
import zarr
import zarr.storage

from medustore.errors import NotAnArchiveError

__all__ = ["Location", "parse_location"]

# Icechunk warns on every open that its local storage is unsafe for simultaneous commits;
# medustore serialises local commits with a lock file, so the warning would only mislead.
if "ICECHUNK_LOG" not in os.environ:
    icechunk.set_logs_filter("error")

_MEMORY: dict[str, icechunk.Storage] = {}
_MEMORY_LOCK = threading.Lock()

#: ``storage_options`` keys accepted for ``s3://`` locations (icechunk.s3_storage's own).
S3_OPTIONS = {
    "region": str, "endpoint_url": str, "allow_http": bool, "access_key_id": str,
    "secret_access_key": str, "session_token": str, "anonymous": bool, "from_env": bool,
    "force_path_style": bool, "requester_pays": bool,
}


@dataclass(frozen=True)
class Location:
    """A parsed archive location.

    Attributes
    ----------
    kind
        ``"local"``, ``"memory"`` or ``"s3"`` (Icechunk repositories) or ``"plain"`` (a
        Zarr v3 directory or zip, read-only).
    text
        The location as the user wrote it, for messages.
    path
        The local directory (``"local"``) or the plain store's path.
    """

    kind: str
    text: str
    path: Path | None = None
    storage: Any = None   # icechunk.Storage, for repositories
    store: Any = None     # a zarr store, for plain archives
    group_path: str = ""  # the archive's group inside a plain store (zip -r adds a folder)

    @property
    def is_repository(self) -> bool:
        return self.kind != "plain"


def _s3_options(options: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        if key not in S3_OPTIONS:
            raise ValueError(f"unknown storage option {key!r} for s3:// archives; known: "
                             f"{', '.join(sorted(S3_OPTIONS))}")
        kind = S3_OPTIONS[key]
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"storage option {key}={value!r}: expected true or false")
            value = value.lower() in ("true", "1", "yes")
        if not isinstance(value, kind):
            raise TypeError(f"storage option {key} must be {kind.__name__}, got {value!r}")
        out[key] = value
    return out


def _memory_storage(name: str, create: bool) -> icechunk.Storage | None:
    with _MEMORY_LOCK:
        if create:
            _MEMORY[name] = icechunk.in_memory_storage()
        return _MEMORY.get(name)


def _zip_group(path: Path) -> str:
    """The folder of a zip that holds the archive: "" or the one top folder of ``zip -r``."""
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
    if "zarr.json" in names:
        return ""
    tops = {n.split("/", 1)[0] for n in names if n.endswith("/zarr.json") and n.count("/") == 1}
    return tops.pop() if len(tops) == 1 else ""


def parse_location(location: Any, *, storage_options: Mapping[str, Any] | None = None,
                   create: bool = False) -> Location:
    """Parse ``location`` (path, ``file://``, ``memory://``, ``s3://``, ``zip://``, a ``.zip``
    path, an ``icechunk.Storage``, or a zarr store holding a plain archive)."""
    options = dict(storage_options or {})
    if isinstance(location, icechunk.Storage):
        return Location("s3" if options else "local", repr(location), storage=location)
    if isinstance(location, zarr.abc.store.Store):
        return Location("plain", str(location), store=location)
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
    if not isinstance(location, str):
        raise TypeError(f"an archive location is a path or URL, got {type(location).__name__}")
    text = location
    if location.startswith("s3://"):
        bucket, _, prefix = location[len("s3://"):].partition("/")
        if not bucket:
            raise ValueError(f"{text}: an s3 location is s3://bucket/prefix")
        storage = icechunk.s3_storage(bucket=bucket, prefix=prefix.strip("/") or None,
                                      **_s3_options(options))
        return Location("s3", text, storage=storage)
    if options:
        raise ValueError(f"storage_options apply to s3:// locations, not {text!r}")
    if location.startswith("memory://"):
        name = location[len("memory://"):]
        return Location("memory", text, storage=_memory_storage(name, create))
    if location.startswith("zip://"):
        location = location[len("zip://"):]
        if create:
            raise ValueError(
                "zip archives are read-only (zip entries cannot be rewritten in place); "
                "write to a directory and `medustore export` it to a .zip")
        return _zip_location(text, Path(location))
    if location.startswith("file://"):
        location = location[len("file://"):]
    path = Path(location).expanduser()
    if path.suffix == ".zip" and path.is_file():
        if create:
            raise ValueError(f"{text} is a zip file: zip archives are read-only")
        return _zip_location(text, path)
    if path.is_file():
        raise NotAnArchiveError(f"{text} is a file, not a medustore archive (an archive is a "
                                "directory, or a .zip written by `medustore export`)")
    if not create and (path / "zarr.json").is_file():
        return Location("plain", text, path=path,
                        store=zarr.storage.LocalStore(path, read_only=True))
    return Location("local", text, path=path.resolve(),
                    storage=icechunk.local_filesystem_storage(str(path.resolve())))


def _zip_location(text: str, path: Path) -> Location:
    if not path.is_file():
        raise FileNotFoundError(f"no such zip file: {path}")
    store = zarr.storage.ZipStore(path, mode="r")
    return Location("plain", text, path=path, store=store, group_path=_zip_group(path))
