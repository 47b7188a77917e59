"""``medustore inspect``: what an archive holds, what it costs, and how exact unlearning is."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import click
import numpy as np

from medustore import __version__
from medustore.cli._common import (
    EXIT_DAMAGED,
    EXIT_NOT_ARCHIVE,
    CliError,
    MedustoreCommand,
    archive_options,
    command_errors,
    echo_json,
    fmt_float,
    format_kv,
    format_table,
    human_bytes,
    open_archive,
    reading,
    user_text,
)
from medustore.index import ArchiveIndex
from medustore.replay import error_budget
from medustore.store import UpdateStore
from medustore.tensor_error import tensor_errors

__all__ = ["archive_summary", "folder_listing", "format_folder", "format_summary",
           "inspect_command"]

#: ``k`` of the error bound shown: ``deterministic + k * rms``.
BOUND_K = 3.0


def _codec_text(codecs: list[dict]) -> str:
    """``name(key=value, ...)`` for each codec of a zarr v3 pipeline, joined by ``+``."""

    def one(name: str, config: dict) -> str:
        args = []
        for key, value in config.items():
            if value is None:
                continue
            if isinstance(value, dict):  # a nested numcodecs config
                inner = dict(value)
                value = one(str(inner.pop("id", "?")), inner)
            args.append(f"{key}={value}")
        return f"{name}({', '.join(args)})"

    return " + ".join(one(c["name"], c.get("configuration") or {}) for c in codecs)


def _bits(nbytes: float, params: float) -> float | None:
    return 8.0 * nbytes / params if params else None


def _codecs(store: UpdateStore, name: str) -> list[dict] | None:
    """The zarr v3 codec pipeline of array ``name``, or None when the archive has none."""
    arr = store.reader.arrays.get(name)
    return None if arr is None else list(arr.metadata.to_dict()["codecs"])


def _per_round(index: ArchiveIndex, m: int) -> list[dict[str, Any]]:
    rows = index.entry_rows()
    stored = index.entry_record >= 0
    n = index.n_rounds
    n_stored = np.bincount(rows, weights=stored, minlength=n).astype(int)
    nbytes = np.bincount(rows, weights=np.where(stored, index.entry_nbytes, 0), minlength=n)
    return [{"round": int(t), "participants": int(index.start[i + 1] - index.start[i]),
             "stored": int(n_stored[i]), "bytes": int(nbytes[i]),
             "bits_per_param": _bits(nbytes[i], n_stored[i] * m)}
            for i, t in enumerate(index.rounds)]


def _per_user(index: ArchiveIndex, m: int, bound: dict[Any, float]) -> list[dict[str, Any]]:
    rows, user = index.entry_rows(), index.entry_user
    stored = index.entry_record >= 0
    n = len(index.users)
    took = np.bincount(user, minlength=n)
    n_stored = np.bincount(user, weights=stored, minlength=n).astype(int)
    nbytes = np.bincount(user, weights=np.where(stored, index.entry_nbytes, 0), minlength=n)
    first = np.full(n, index.n_rounds)
    last = np.full(n, -1)
    np.minimum.at(first, user, rows)
    np.maximum.at(last, user, rows)
    return [{"user": u, "rounds": int(took[j]), "stored": int(n_stored[j]),
             "bytes": int(nbytes[j]), "bits_per_param": _bits(nbytes[j], n_stored[j] * m),
             "first": int(index.rounds[first[j]]) if took[j] else None,
             "last": int(index.rounds[last[j]]) if took[j] else None,
             "error_bound": bound.get(u)}
            for j, u in enumerate(index.users)]


def _versions(store: UpdateStore, as_of_round: int | None) -> dict[str, Any]:
    """Which version is read and which versions the archive keeps."""
    plain = store.snapshot_id is None  # a plain Zarr snapshot (an export) has no versions
    return {"storage": "plain zarr snapshot" if plain else "icechunk repository",
            "snapshot": store.snapshot_id, "as_of_round": as_of_round,
            "kept": [] if plain else store.versions()}


def _bounds(store: UpdateStore) -> dict[Any, float]:
    """Each participating user's error bound for removing that user alone (index only)."""
    index = store.index
    took = np.bincount(index.entry_user, minlength=len(index.users))
    return {u: error_budget(store, [u]).bound(BOUND_K)
            for j, u in enumerate(index.users) if took[j]}


def archive_summary(store: UpdateStore, *, top: int | None = None, budgets: bool = True,
                    name: str | None = None, as_of_round: int | None = None) -> dict[str, Any]:
    """Everything ``inspect`` shows, as a JSON-ready dict with stable keys.

    Parameters
    ----------
    store
        An open archive.
    top
        Keep only the ``top`` rounds and users with the most stored bytes in the tables.
    budgets
        Compute each user's error budget (from the index alone, no decoding).
    name
        How to name the archive (default: its location).
    as_of_round
        The round the archive was opened as of, for the ``versions`` entry.
    """
    index, layout, policy = store.index, store.layout, store.policy
    m = layout.size
    rounds = store.rounds
    stored = index.entry_record >= 0
    n_part, n_stored = index.n_entries, int(stored.sum())
    record_bytes = int(index.entry_nbytes[stored].sum())
    total_bytes = store.nbytes_stored()
    history = n_part * m * 4
    bound = _bounds(store) if budgets else {}
    model_norm = float(np.linalg.norm(store.reader.model().astype(np.float64)))
    worst = max(bound, key=bound.__getitem__) if bound else None
    per_round, per_user = _per_round(index, m), _per_user(index, m, bound)
    if top is not None:
        per_round = sorted(per_round, key=lambda r: -r["bytes"])[:top]
        per_user = sorted(per_user, key=lambda r: -r["bytes"])[:top]

    return {
        "archive": name if name is not None else store.location,
        "format": index.settings.format,
        "medustore_version": __version__,
        "versions": _versions(store, as_of_round),
        "model": {"tensors": len(layout.tensors), "params": m, "flat": layout.flat,
                  "dtypes": sorted({str(np.dtype(t.dtype)) for t in layout.tensors}),
                  "chunk_params": index.settings.chunk},
        "rounds": {"count": len(rounds), "first": rounds[0] if rounds else None,
                   "last": rounds[-1] if rounds else None},
        "users": {"count": len(index.users)},
        "records": {"stored": n_stored, "participations": n_part},
        "policy": {"name": policy.name, "description": policy.describe(),
                   "config": policy.to_json()},
        "codecs": {"records": _codecs(store, "records"),
                   "aggregate": _codecs(store, "aggregate")},
        "accumulators": store.has_accumulators,
        "bytes": {"stored": total_bytes, "records": record_bytes, "float32_history": history},
        "bits_per_stored_param": _bits(record_bytes, n_stored * m),
        "bits_per_history_param": _bits(total_bytes, n_part * m),
        "ratio_vs_float32": history / total_bytes if total_bytes and history else None,
        "unlearning_error": {
            "k": BOUND_K, "users": len(bound),
            "median": float(np.median(list(bound.values()))) if bound else None,
            "max": bound[worst] if worst is not None else None,
            "max_user": worst, "model_norm": model_norm},
        "per_round": per_round,
        "per_user": per_user,
    }


def tensor_summary(store: UpdateStore) -> dict[str, list[dict] | None]:
    """Per-tensor coding error of the stored records and aggregates (`tensor_errors`)."""
    out: dict[str, list[dict] | None] = {}
    for name in ("records", "aggregate"):
        lossy = name in store.reader.arrays and (
            store.index.n_records if name == "records" else store.index.n_rounds)
        out[name] = ([e.to_json() for e in tensor_errors(store, name)] if lossy else None)
    return out


def format_tensors(tensors: dict[str, list[dict] | None]) -> str:
    """The ``--tensors`` table: one row per tensor, records and aggregates side by side."""
    rec, agg = tensors["records"] or [], tensors["aggregate"] or []
    by_name = {r["tensor"]: r for r in agg}
    rows = []
    for r in rec or agg:
        a = by_name.get(r["tensor"], {}) if rec else r
        rows.append([r["tensor"], f"{r['params']:,}",
                     fmt_float(r["noise_rms"], ".3g") if rec else "-",
                     fmt_float(r["relative"], ".3g") if rec else "-",
                     fmt_float(a.get("noise_rms"), ".3g"), fmt_float(a.get("relative"), ".3g")])
    if not rows:
        return "No stored records or aggregates: no coding error to show."
    return format_table(["tensor", "params", "record noise rms", "record rel. error",
                         "aggregate noise rms", "aggregate rel. error"], rows,
                        right=[False] + [True] * 5)


def _pct(x: float, of: float) -> str:
    if not of > 0:
        return "-"
    pct = 100.0 * x / of
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.1f}%" if pct >= 1 else f"{pct:.2g}%"


def _version_text(v: dict[str, Any]) -> str:
    if v["snapshot"] is None:
        return "the only one (a plain snapshot, written by 'medustore export')"
    what = "latest" if v["as_of_round"] is None else f"as of round {v['as_of_round']}"
    return f"{what} (snapshot {v['snapshot']})"


#: Kept versions listed by round in the text (the JSON lists all).
_SHOWN_VERSIONS = 10


def _kept_text(v: dict[str, Any]) -> str:
    if v["snapshot"] is None:
        return "-"
    kept = v["kept"]
    if not kept:
        return "none of a round (no round committed yet)"
    shown = ", ".join(map(str, kept[-_SHOWN_VERSIONS:]))
    older = len(kept) - _SHOWN_VERSIONS
    return (f"{len(kept)}: after round{'s' * (len(kept) != 1)} "
            f"{'... ' if older > 0 else ''}{shown} (read one with --as-of-round T)")


def format_summary(s: dict[str, Any], *, rounds_table: bool = False,
                   users_table: bool = False) -> str:
    """The text ``inspect`` prints for `archive_summary` ``s``."""
    r, rec, b, err = s["rounds"], s["records"], s["bytes"], s["unlearning_error"]
    model = s["model"]
    span = f" ({r['first']}..{r['last']})" if r["count"] else ""
    share = f" ({100.0 * rec['stored'] / rec['participations']:.1f}%)" if rec[
        "participations"] else ""
    pol = s["policy"]
    agg = s["codecs"]["aggregate"]
    agg_codec = "- (aggregates not kept)" if agg is None else _codec_text(agg)
    pairs = [
        ("Archive", str(s["archive"])),
        ("Format", f"{s['format']} (read by medustore {s['medustore_version']})"),
        ("Storage", s["versions"]["storage"]),
        ("Version", _version_text(s["versions"])),
        ("Versions kept", _kept_text(s["versions"])),
        ("Model", f"{model['tensors']} tensor{'s' * (model['tensors'] != 1)}, "
                  f"{model['params']:,} parameters ({', '.join(model['dtypes'])})"),
        ("Chunk", f"{model['chunk_params']:,} parameters"),
        ("Rounds", f"{r['count']}{span}"),
        ("Users", f"{s['users']['count']}"),
        ("Records", f"{rec['stored']:,} stored of {rec['participations']:,} "
                    f"participations{share}"),
        ("Policy", pol["description"]),
        ("Record codec", _codec_text(s["codecs"]["records"])),
        ("Aggregate codec", agg_codec),
        ("Accumulators", "yes (exact single-user unlearning)" if s["accumulators"] else "no"),
        ("Bytes stored", f"{human_bytes(b['stored'])} ({b['stored']:,} bytes)"),
        ("  of which records", f"{human_bytes(b['records'])} ({b['records']:,} bytes)"),
        ("Bits/stored param", f"{fmt_float(s['bits_per_stored_param'], '.3g')} "
                              "(records only)"),
        ("Float32 history", f"{human_bytes(b['float32_history'])} ({rec['participations']:,} "
                            f"participations x {model['params']:,} params x 4 B)"),
        ("Ratio vs float32", "-" if s["ratio_vs_float32"] is None
         else f"{s['ratio_vs_float32']:.3g}x (all bytes; "
              f"{fmt_float(s['bits_per_history_param'], '.3g')} bits/param)"),
    ]
    if err["users"] and err["max"] == 0:
        pairs.append(("Unlearning error", "0 for every user (exact: every record stored "
                                          "losslessly)"))
    elif err["users"]:
        pairs.append(("Unlearning error", (
            f"median {err['median']:.4g}, max {err['max']:.4g} (user "
            f"{user_text(err['max_user'])}): L2 bound, deterministic + {err['k']:g} rms, "
            "one user removed")))
        pairs.append(("  relative", f"{_pct(err['median'], err['model_norm'])}, "
                                    f"{_pct(err['max'], err['model_norm'])} of ||w_T|| = "
                                    f"{err['model_norm']:.4g}"))
    else:
        pairs.append(("Unlearning error", "-"))
    parts = [format_kv(pairs)]
    if rounds_table:
        parts.append(format_table(
            ["round", "participants", "stored", "bytes", "bits/param"],
            [[str(x["round"]), str(x["participants"]), str(x["stored"]), f"{x['bytes']:,}",
              fmt_float(x["bits_per_param"], ".3g")] for x in s["per_round"]]))
    if users_table:
        parts.append(format_table(
            ["user", "rounds", "stored", "first", "last", "bytes", "bits/param", "error bound"],
            [[user_text(x["user"]), str(x["rounds"]), str(x["stored"]),
              "-" if x["first"] is None else str(x["first"]),
              "-" if x["last"] is None else str(x["last"]), f"{x['bytes']:,}",
              fmt_float(x["bits_per_param"], ".3g"), fmt_float(x["error_bound"])]
             for x in s["per_user"]],
            right=[False] + [True] * 7))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------- folders


def _looks_like_archive(path: Path) -> bool:
    """Whether ``path`` may hold an archive, from its names alone (nothing is opened): an
    Icechunk repository, a Zarr group carrying medustore's attributes (a plain snapshot, or
    a format-1 archive), or a zip file."""
    if path.name.startswith("."):  # hidden: temporary names of exports in progress
        return False
    if path.is_file():
        return path.suffix.lower() == ".zip" and zipfile.is_zipfile(path)
    if not path.is_dir():
        return False
    if (path / "snapshots").is_dir() and any(
            (path / marker).exists() for marker in ("repo", "config.yaml", "refs")):
        return True
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(meta, dict) and meta.get("node_type") == "group"
            and "medustore" in (meta.get("attributes") or {}))


def _folder_entry(path: Path) -> dict[str, Any] | None:
    """One archive of a folder for the listing; None when it turns out not to be one."""
    entry: dict[str, Any] = {"name": path.name, "path": str(path), "format": None,
                             "storage": None, "rounds": None, "first": None, "last": None,
                             "users": None, "bytes": None, "problem": None}
    try:
        with open_archive(str(path)) as store, reading():
            rounds = store.rounds
            entry.update(
                format=store.index.settings.format,
                storage="plain zarr snapshot" if store.snapshot_id is None
                else "icechunk repository",
                rounds=len(rounds), first=rounds[0] if rounds else None,
                last=rounds[-1] if rounds else None, users=len(store.users),
                bytes=store.nbytes_stored())
    except CliError as err:
        message = err.format_message()
        if err.exit_code == EXIT_NOT_ARCHIVE and "format-1" in message:
            entry.update(format=1, storage="plain zarr (medustore 0.1)",
                         problem=f"convert it with 'medustore upgrade {path} NEW_ARCHIVE'")
        elif err.exit_code == EXIT_NOT_ARCHIVE:
            return None  # an Icechunk repository or zip of something else
        else:
            entry["problem"] = message
            if err.exit_code == EXIT_DAMAGED:
                entry["problem"] = f"{message.split(';')[0]}; run 'medustore verify {path}'"
    except Exception as err:  # noqa: BLE001 - one archive must not hide the others
        detail = " ".join((str(err) or type(err).__name__).split())
        entry["problem"] = detail if detail.startswith("damaged archive") else \
            f"damaged archive: {detail}"
    if entry["bytes"] is None:
        entry["bytes"] = _du(path)
    return entry


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def folder_listing(folder: str) -> dict[str, Any] | None:
    """The archives directly inside local folder ``folder``, as a JSON-ready dict with keys
    ``folder`` and ``archives`` (each: ``name``, ``path``, ``format``, ``storage``,
    ``rounds``, ``first``, ``last``, ``users``, ``bytes``, ``problem``); None when it holds
    none. Only names are looked at first; each candidate is then opened read-only."""
    try:
        children = sorted(Path(folder).iterdir(), key=lambda p: p.name)
    except OSError:
        return None
    found = [e for p in children if _looks_like_archive(p)
             for e in [_folder_entry(p)] if e is not None]
    return {"folder": folder, "archives": found} if found else None


def format_folder(listing: dict[str, Any]) -> str:
    """The text ``inspect`` prints for a folder holding archives."""
    items = listing["archives"]
    n = len(items)
    rows = []
    for e in items:
        span = "-" if e["rounds"] is None else (
            f"{e['rounds']} ({e['first']}..{e['last']})" if e["rounds"] else "0")
        rows.append([e["name"], "-" if e["format"] is None else str(e["format"]),
                     e["storage"] or "-", span,
                     "-" if e["users"] is None else str(e["users"]),
                     human_bytes(e["bytes"]), e["problem"] or ""])
    headers = ["archive", "format", "storage", "rounds", "users", "bytes", "note"]
    right = [False, True, False, True, True, True, False]
    if not any(e["problem"] for e in items):  # no note to show
        headers, right, rows = headers[:-1], right[:-1], [r[:-1] for r in rows]
    table = format_table(headers, rows, right=right)
    first = os.path.join(listing["folder"], items[0]["name"])
    return (f"{listing['folder']} is a folder, not an archive; it holds {n} "
            f"archive{'s' * (n != 1)}:\n\n{table}\n\n"
            f"Inspect one with: medustore inspect {first}")


def _inspect_folder(archive: str, err: CliError, as_of_round: int | None) -> dict | None:
    """The listing when ``archive`` is a local folder holding archives, else None."""
    if err.exit_code != EXIT_NOT_ARCHIVE or "://" in archive or not os.path.isdir(archive):
        return None
    listing = folder_listing(archive)
    if listing is not None and as_of_round is not None:
        names = ", ".join(e["name"] for e in listing["archives"])
        raise CliError(f"{archive} is a folder, not an archive: --as-of-round reads one "
                       f"archive; name one of those it holds ({names})", EXIT_NOT_ARCHIVE)
    return listing


@click.command("inspect", cls=MedustoreCommand)
@click.argument("archive")
@click.option("--rounds", "rounds_table", is_flag=True, help="Add the per-round table.")
@click.option("--users", "users_table", is_flag=True, help="Add the per-user table.")
@click.option("--top", type=click.IntRange(min=1), metavar="N",
              help="Limit the tables to the N rounds / users with the most stored bytes "
                   "(shows both tables unless --rounds or --users is given).")
@click.option("--tensors", "tensors_table", is_flag=True,
              help="Add each tensor's coding error over the stored records and aggregates "
                   "(decodes them all; from the chunks' cell sizes).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document (both tables included) and nothing else.")
@archive_options
def inspect_command(archive: str, rounds_table: bool, users_table: bool, top: int | None,
                    tensors_table: bool, as_json: bool, as_of_round: int | None,
                    storage_options: dict[str, str]) -> None:
    """Summarise ARCHIVE: versions, model, rounds, users, policy, codecs, size and error
    budget.

    The error budget is, over the users, the L2 bound (deterministic + 3 rms) between the
    model unlearned from this archive and the exact replay, for removing that user alone.

    A local folder that is no archive but holds some (such as the one 'medustore demo --out
    DIR' writes) lists them instead: name, format, rounds, users and bytes.
    """
    try:
        with command_errors(), open_archive(archive, as_of_round=as_of_round,
                                            storage_options=storage_options) as store:
            with reading():
                summary = archive_summary(store, top=top, name=archive,
                                          as_of_round=as_of_round)
                if tensors_table:
                    summary["tensors"] = tensor_summary(store)
    except CliError as err:
        listing = _inspect_folder(archive, err, as_of_round)
        if listing is None:
            raise
        if as_json:
            echo_json(listing)
        else:
            click.echo(format_folder(listing))
        return
    if as_json:
        echo_json(summary)
        return
    if top is not None and not (rounds_table or users_table):
        rounds_table = users_table = True
    click.echo(format_summary(summary, rounds_table=rounds_table, users_table=users_table))
    if tensors_table:
        click.echo("\n" + format_tensors(summary["tensors"]))
