"""`export`: a plain Zarr v3 snapshot of one version of an archive (a directory or a zip).

The copy is byte for byte: every key of the version's root group (metadata documents, index
tables and the coded chunks) is read and written as stored, so lossy records are never
decoded and coded again. The result is a read-only archive: ``medustore.open(out)`` gives
the same answers as the version it was taken from, and plain ``zarr`` opens its arrays
(medustore's codecs register through entry points).

The snapshot is written beside ``out`` under a temporary name, checked (its index must load
and hash to the source's digest) and only then renamed into place, so a failed export
leaves ``out`` as it was.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zarr
import zarr.storage
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from medustore.errors import DamagedArchiveError

__all__ = ["export"]

#: Keys read concurrently (each a coded chunk of at most one model's size).
BATCH = 32


def export(store_or_location: Any, out: str | os.PathLike, *, as_of_round: int | None = None,
           storage_options: Mapping[str, Any] | None = None,
           overwrite: bool = False) -> Path:
    """Write one version of an archive as a plain Zarr v3 store.

    Parameters
    ----------
    store_or_location
        An open `UpdateStore` (its version is exported), or any location `medustore.open`
        takes.
    out
        The snapshot to write: a directory, or a zip file when it ends in ``.zip``.
    as_of_round
        With a location: export the version committed by this round.
    storage_options
        With an ``s3://`` location: passed to `medustore.open`.
    overwrite
        Replace an existing ``out`` (otherwise `FileExistsError`).

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    FileExistsError
        ``out`` exists and ``overwrite`` is false.
    ValueError
        ``out`` is the source archive, holds it or lies inside it.
    """
    out = Path(out).expanduser()
    _check_target(out, overwrite)
    if hasattr(store_or_location, "reader"):
        if as_of_round is not None or storage_options:
            raise ValueError("as_of_round and storage_options apply to a location; an open "
                             "store exports the version it holds")
        return _export_store(store_or_location, out)
    from medustore.store import open_store  # the store module builds on this package

    with open_store(store_or_location, "r", as_of_round=as_of_round,
                    storage_options=storage_options) as store:
        return _export_store(store, out)


def _check_target(out: Path, overwrite: bool) -> None:
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another name or replace it "
                              "(overwrite=True, `medustore export --force`)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {out.parent}")


def _source_path(location: str) -> Path | None:
    """The local path of an archive location, or None for memory:// and s3://."""
    for scheme in ("file://", "zip://"):
        if location.startswith(scheme):
            location = location[len(scheme):]
    return None if "://" in location else Path(location).expanduser().resolve()


def _check_not_source(out: Path, location: str) -> None:
    source = _source_path(location)
    target = out.resolve()
    if source is not None and (source == target or source in target.parents
                               or target in source.parents):
        raise ValueError(f"export target {out} is or overlaps the source archive {location}")


def _export_store(store: Any, out: Path) -> Path:
    _check_not_source(out, store.location)
    src, prefix = _snapshot_store(store.reader)
    as_zip = out.suffix.lower() == ".zip"
    # A hidden sibling: same filesystem, so the final rename is atomic. Zip temporaries keep
    # the suffix, so the check below opens them as zip archives.
    tmp = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}{'.zip' if as_zip else ''}"
    try:
        _write(src, prefix, tmp, as_zip)
        _check_copy(tmp, store)
        _replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return out


def _snapshot_store(reader: Any) -> tuple[Store, str]:
    """The zarr store of the reader's version and the archive group's key prefix ("" or the
    top folder of a ``zip -r`` archive, with its slash)."""
    arr = reader.arrays["model"]
    prefix = arr.path[: -len("model")]
    return arr.store, prefix


def _write(src: Store, prefix: str, tmp: Path, as_zip: bool) -> int:
    if as_zip:
        # ZIP_STORED: the chunks are already compressed; each key is written once.
        dst: Store = zarr.storage.ZipStore(tmp, mode="w")
    else:
        dst = zarr.storage.LocalStore(tmp, read_only=False)
    try:
        return sync(_copy(src, dst, prefix))
    finally:
        dst.close()


async def _copy(src: Store, dst: Store, prefix: str) -> int:
    """Copy every key under ``prefix`` (stripped) from ``src`` to ``dst``; the number of
    keys. Keys are written in sorted order, so a zip's layout does not depend on timing."""
    listing = src.list_prefix(prefix) if prefix else src.list()
    # Zip directory entries ("folder/") are no keys.
    keys = sorted([k async for k in listing if not k.endswith("/")])
    proto = default_buffer_prototype()
    for start in range(0, len(keys), BATCH):
        batch = keys[start:start + BATCH]
        bufs = await asyncio.gather(*(_get(src, k, proto) for k in batch))
        for key, buf in zip(batch, bufs, strict=True):
            await dst.set(key[len(prefix):], buf)
    return len(keys)


async def _get(src: Store, key: str, proto: Any) -> Any:
    """The stored bytes of ``key``; `DamagedArchiveError` naming it when they do not read."""
    try:
        buf = await src.get(key, prototype=proto)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - any other failure to read stored bytes is damage
        raise DamagedArchiveError(f"key {key} does not read: {type(err).__name__}: "
                                  f"{' '.join(str(err).split())}") from err
    if buf is None:
        raise DamagedArchiveError(f"key {key} is listed but missing")
    return buf


def _check_copy(tmp: Path, store: Any) -> None:
    """The copy must open as an archive whose index is the source's (same digest)."""
    from medustore.store import open_store

    with open_store(tmp, "r") as copy:
        same = (copy.index.digest == store.index.digest
                and copy.index.counts() == store.index.counts())
    if not same:
        raise DamagedArchiveError(f"the exported copy of {store.location} does not read back "
                                  "with the source's index")


def _replace(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``, replacing what is there only once the new copy is whole."""
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
