"""`upgrade`: convert a format-1 archive (plain Zarr, medustore 0.1) into format 2.

Coded chunks are copied byte for byte (records and aggregates keep their exact lattice
bytes: decoding and coding again would add a second quantisation), the index tables are
rebuilt from format 1's dense side arrays, and the whole conversion is one commit of a new
archive. Format 1 never wrote a chunk whose values all equal the fill value (0); such a
record chunk is accepted only where the record's byte count says nothing is missing, and
written out explicitly (format 2 never leaves a chunk implicit).
"""

from __future__ import annotations

import asyncio
import math
import sys
from typing import Any

import numpy as np
import zarr
from tqdm.auto import tqdm
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from medustore.archive import postings
from medustore.archive.reader import FORMAT_VERSION, chunk_key
from medustore.archive.repository import Repository
from medustore.archive.storage import parse_location
from medustore.errors import DamagedArchiveError, NotAnArchiveError, UnsupportedFormatError
from medustore.index import ArchiveIndex, Settings, chain, parse_user, user_text
from medustore.layout import ModelLayout
from medustore.policy import MeduPolicy
from medustore.writer import create_arrays, link_row, write_meta

__all__ = ["upgrade"]


def _open_format1(location: Any) -> tuple[zarr.Group, dict]:
    loc = parse_location(location)
    if loc.kind != "plain":
        raise UnsupportedFormatError(f"{location!s} is not a format-1 archive (a plain Zarr "
                                     "directory or zip)")
    try:
        group = zarr.open_group(loc.store, path=loc.group_path, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        raise NotAnArchiveError(f"no medustore archive at {location!s}") from err
    meta = group.attrs.get("medustore")
    if not isinstance(meta, dict) or meta.get("format") != 1:
        version = meta.get("format") if isinstance(meta, dict) else None
        raise UnsupportedFormatError(f"{location!s} is not a format-1 archive (format "
                                     f"{version!r})")
    return group, meta


def _committed_rows(group: zarr.Group) -> np.ndarray:
    committed = group["committed"][:]
    n = 0
    while n < committed.size and committed[n] >= 0:
        n += 1  # rows commit in order: anything after the first gap was interrupted
    return committed[:n].astype(np.int64)


async def _copy(src: Any, dst: Any, pairs: list[tuple[str, str]]) -> list[bool]:
    proto = default_buffer_prototype()

    async def one(a: str, b: str) -> bool:
        buf = await src.get(a, prototype=proto)
        if buf is None:
            return False
        await dst.set(b, buf)
        return True

    return list(await asyncio.gather(*(one(a, b) for a, b in pairs)))


def upgrade(old: Any, new: Any, *, progress: bool | None = None) -> int:
    """Convert the format-1 archive at ``old`` into a new format-2 archive at ``new``.

    Returns the number of rounds converted. ``new`` must not exist yet.

    Raises
    ------
    UnsupportedFormatError
        ``old`` is not a format-1 archive.
    DamagedArchiveError
        A chunk that format 1's byte counts say exists is missing (nothing is guessed).
    """
    group, meta = _open_format1(old)
    layout = ModelLayout.from_json(meta["layout"])
    policy = MeduPolicy.from_json(meta["policy"])
    accumulators = bool(meta.get("accumulators", False))
    rounds = _committed_rows(group)
    R, m = rounds.size, layout.size
    old_users = [parse_user(u) for u in meta["users"]]
    nu = len(old_users)
    side = {name: (group[name][:R, :nu] if R and nu else np.zeros((R, nu)))
            for name in ("weight", "stored", "dnorm", "znorm", "evar", "nbytes")}
    part = ~np.isnan(side["weight"])
    # Columns in order of first participation (format 1 may hold columns of users whose
    # first round never committed: they are dropped).
    first = np.where(part.any(axis=0), part.argmax(axis=0), R)
    order = [int(c) for c in np.argsort(first, kind="stable") if first[c] < R]
    new_col = {c: i for i, c in enumerate(order)}
    users = [old_users[c] for c in order]
    model_dtype = "f8" if group["initial"].dtype == np.float64 else "f4"
    chunk = int(group["updates"].chunks[-1])
    settings = Settings(FORMAT_VERSION, layout, policy, accumulators, chunk, model_dtype)
    k = math.ceil(m / chunk)

    loc = parse_location(new, create=True)
    repo = Repository.create(loc, replace=False)
    try:
        session = repo.initial_transaction()
        dst = zarr.open_group(session.store, mode="w")
        create_arrays(dst, settings, {"record": policy.record_serializer(),
                                      "aggregate": policy.aggregate_serializer()},
                      group["initial"][:])
        rounds_rows, facts_rows, entry_rows, efact_rows, pairs = [], [], [], [], []
        zero_records: list[int] = []
        digest = settings.digest0()
        links: list[np.ndarray] = []
        n_rec, seen = 0, 0
        anorm = group["anorm"][:R] if "anorm" in group else np.zeros(R)
        agg_evar = group["agg_evar"][:R]
        src_upd = group["updates"]
        present = set(sync(_list(group.store, src_upd.path)))
        bar = tqdm(total=R, desc="upgrading", unit="round", leave=False,
                   disable=progress is False or (progress is None and not sys.stderr.isatty()))
        for row in range(R):
            cols = sorted((c for c in np.flatnonzero(part[row])), key=lambda c: new_col[c])
            ent, efacts = [], []
            for c in cols:
                stored = bool(side["stored"][row, c])
                rec = n_rec if stored else -1
                if stored:
                    keys = [chunk_key(src_upd, (row, int(c), j)) for j in range(k)]
                    have = [key in present for key in keys]
                    for j, key in enumerate(keys):
                        if have[j]:
                            pairs.append((key, f"records/c/{rec}/{j}"))
                    if not all(have):
                        zero_records.append(rec)
                        on_disk = sum(int(sync(group.store.getsize(key)))
                                      for key, h in zip(keys, have, strict=True) if h)
                        if on_disk != int(side["nbytes"][row, c]):
                            raise DamagedArchiveError(
                                f"{old!s}: round {int(rounds[row])}, user "
                                f"{old_users[c]!r}: record chunk missing")
                    n_rec += 1
                ent.append([new_col[c], rec, int(side["nbytes"][row, c]) if stored else 0])
                efacts.append([side["weight"][row, c], side["dnorm"][row, c],
                               side["znorm"][row, c] if stored else 0.0,
                               side["evar"][row, c] if stored else 0.0])
            after = max([seen, *(new_col[c] + 1 for c in cols)])
            r_row = np.array([int(rounds[row]), len(cols), after], dtype=np.int64)
            f_row = np.array([float(anorm[row]), float(agg_evar[row])])
            e = np.array(ent, dtype=np.int64).reshape(-1, 3)
            ef = np.array(efacts, dtype=np.float64).reshape(-1, 4)
            digest = chain(digest, r_row, f_row, e, ef,
                           [user_text(u) for u in users[seen:after]])
            links.append(link_row(digest))
            seen = after
            rounds_rows.append(r_row)
            facts_rows.append(f_row)
            entry_rows.append(e)
            efact_rows.append(ef)
            if policy.keep_aggregates:
                pairs.extend((chunk_key(group["aggregate"], (row, j)), f"aggregate/c/{row}/{j}")
                             for j in range(k))
            bar.update()
        bar.close()
        index = ArchiveIndex.from_tables(
            settings, users, np.array(rounds_rows).reshape(-1, 3),
            np.array(facts_rows).reshape(-1, 2), np.concatenate(entry_rows or [np.zeros(
                (0, 3), np.int64)]), np.concatenate(efact_rows or [np.zeros((0, 4))]),
            digest.hex())
        arrays = {name: dst[name].with_config({"write_empty_chunks": True})
                  for name in dst.array_keys()}
        for name, rows in (("rounds", index.tables()[0]), ("round_facts", index.tables()[1]),
                           ("entries", index.tables()[2]),
                           ("entry_facts", index.tables()[3])):
            arrays[name].resize(rows.shape)
            if rows.size:
                arrays[name][...] = rows
        arrays["links"].resize((R, 4))
        if R:
            arrays["links"][...] = np.stack(links)
        postings.write_runs(dst, R, index.start, index.user_keys()[index.entry_user])
        arrays["users"].resize((len(users),))
        if users:
            arrays["users"][:] = np.array([user_text(u) for u in users], dtype=object)
        arrays["records"].resize((n_rec, m))
        if "aggregate" in arrays:
            arrays["aggregate"].resize((R, m))
        for rec in zero_records:  # whole zero chunks format 1 left implicit
            arrays["records"][rec, :] = 0.0
        copied = sync(_copy(group.store, session.store, pairs))
        for (src_key, _), ok in zip(pairs, copied, strict=True):
            if not ok and not src_key.startswith(f"{src_upd.path}/"):
                # An aggregate chunk format 1 left implicit: zeros, as format 1 reads it.
                row, j = (int(x) for x in src_key.split("/")[-2:])
                arrays["aggregate"][row, j * chunk:(j + 1) * chunk] = 0.0
        if R:
            arrays["model"][:] = group["model"][R - 1, :]
        if accumulators:
            _copy_accumulators(group, arrays["acc"], order, R)
        write_meta(dst, settings, index)
        session.commit(f"upgrade from format 1 ({R} rounds)",
                       metadata={"medustore": {"round": int(rounds[-1]) if R else None}})
    finally:
        repo.close()
    return R


def _copy_accumulators(group: zarr.Group, acc: zarr.Array, order: list[int], R: int) -> None:
    acc.resize((len(order), acc.shape[1]))
    marks = group["acc_row"][:]
    for new, old in enumerate(order):
        valid = [s for s in (0, 1) if 0 <= marks[old, s] < R]
        acc[new, :] = (group["acc"][old, max(valid, key=lambda s: marks[old, s]), :]
                       if valid else 0.0)


async def _collect(store: Any, prefix: str) -> list[str]:
    return [key async for key in store.list_prefix(prefix)]


def _list(store: Any, path: str) -> Any:
    return _collect(store, f"{path}/")

