"""``medustore inspect``: what an archive holds, what it costs, and how exact unlearning is."""

from __future__ import annotations

from typing import Any

import click
import numpy as np

from medustore import __version__
from medustore.cli._common import (
    MedustoreCommand,
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
from medustore.replay import error_budget
from medustore.store import UpdateStore

__all__ = ["archive_summary", "format_summary", "inspect_command"]

#: ``k`` of the error bound shown: ``deterministic + k * rms``.
BOUND_K = 3.0


class _CachedSides:
    """An `UpdateStore` view whose side arrays are read once (for many error budgets)."""

    def __init__(self, store: UpdateStore) -> None:
        self._store = store
        self._sides: dict[str, np.ndarray] = {}

    def side(self, name: str) -> np.ndarray:
        if name not in self._sides:
            self._sides[name] = self._store.side(name)
        return self._sides[name]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


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


def archive_summary(store: UpdateStore, *, top: int | None = None, budgets: bool = True,
                    name: str | None = None) -> dict[str, Any]:
    """Everything ``inspect`` shows, as a JSON-ready dict with stable keys.

    Parameters
    ----------
    store
        An open archive.
    top
        Keep only the ``top`` rounds and users with the most stored bytes in the tables.
    budgets
        Compute each user's error budget (reads side arrays only, no decoding).
    name
        How to name the archive (default: its zarr store path).
    """
    layout, policy = store.layout, store.policy
    m = layout.size
    rounds, users = store.rounds, store.users
    W, S, NB = store.side("weight"), store.side("stored"), store.side("nbytes")
    part = ~np.isnan(W)
    stored = S == 1
    n_part, n_stored = int(part.sum()), int(stored.sum())
    record_bytes = int(NB[stored].sum())
    total_bytes = store.nbytes_stored()
    history = n_part * m * 4
    arrays = store._a
    codecs = {name: list(arrays[name].metadata.to_dict()["codecs"])
              for name in ("updates", "aggregate")}

    sides = _CachedSides(store)
    bound: dict[Any, float] = {}
    if budgets:
        for j, u in enumerate(users):
            if part[:, j].any():
                bound[u] = error_budget(sides, [u]).bound(BOUND_K)  # type: ignore[arg-type]
    model_norm = float(np.linalg.norm(store._latest_vec().astype(np.float64)))
    worst = max(bound, key=bound.__getitem__) if bound else None

    per_round = [
        {"round": t, "participants": int(part[i].sum()), "stored": int(stored[i].sum()),
         "bytes": int(NB[i][stored[i]].sum()),
         "bits_per_param": _bits(NB[i][stored[i]].sum(), stored[i].sum() * m)}
        for i, t in enumerate(rounds)]
    per_user = []
    for j, u in enumerate(users):
        took = np.flatnonzero(part[:, j])
        per_user.append({
            "user": u, "rounds": int(took.size), "stored": int(stored[:, j].sum()),
            "bytes": int(NB[:, j][stored[:, j]].sum()),
            "bits_per_param": _bits(NB[:, j][stored[:, j]].sum(), stored[:, j].sum() * m),
            "first": rounds[took[0]] if took.size else None,
            "last": rounds[took[-1]] if took.size else None,
            "error_bound": bound.get(u)})
    if top is not None:
        per_round = sorted(per_round, key=lambda r: -r["bytes"])[:top]
        per_user = sorted(per_user, key=lambda r: -r["bytes"])[:top]

    return {
        "archive": name if name is not None else store.location,
        "format": store._group.attrs["medustore"].get("format"),
        "medustore_version": __version__,
        "model": {"tensors": len(layout.tensors), "params": m, "flat": layout.flat,
                  "dtypes": sorted({str(np.dtype(t.dtype)) for t in layout.tensors}),
                  "chunk_params": int(arrays["updates"].chunks[-1])},
        "rounds": {"count": len(rounds), "first": rounds[0] if rounds else None,
                   "last": rounds[-1] if rounds else None},
        "users": {"count": len(users)},
        "records": {"stored": n_stored, "participations": n_part},
        "policy": {"name": policy.name, "description": policy.describe(),
                   "config": policy.to_json()},
        "codecs": {"records": codecs["updates"], "aggregate": codecs["aggregate"]},
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


def _pct(x: float, of: float) -> str:
    if not of > 0:
        return "-"
    pct = 100.0 * x / of
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.1f}%" if pct >= 1 else f"{pct:.2g}%"


def format_summary(s: dict[str, Any], *, rounds_table: bool = False,
                   users_table: bool = False) -> str:
    """The text ``inspect`` prints for `archive_summary` ``s``."""
    r, rec, b, err = s["rounds"], s["records"], s["bytes"], s["unlearning_error"]
    model = s["model"]
    span = f" ({r['first']}..{r['last']})" if r["count"] else ""
    share = f" ({100.0 * rec['stored'] / rec['participations']:.1f}%)" if rec[
        "participations"] else ""
    pol = s["policy"]
    agg_codec = _codec_text(s["codecs"]["aggregate"])
    if not pol["config"].get("keep_aggregates", True):
        agg_codec += " (aggregates not kept)"
    pairs = [
        ("Archive", str(s["archive"])),
        ("Format", f"{s['format']} (read by medustore {s['medustore_version']})"),
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


@click.command("inspect", cls=MedustoreCommand)
@click.argument("archive")
@click.option("--rounds", "rounds_table", is_flag=True, help="Add the per-round table.")
@click.option("--users", "users_table", is_flag=True, help="Add the per-user table.")
@click.option("--top", type=click.IntRange(min=1), metavar="N",
              help="Limit the tables to the N rounds / users with the most stored bytes "
                   "(shows both tables unless --rounds or --users is given).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document (both tables included) and nothing else.")
def inspect_command(archive: str, rounds_table: bool, users_table: bool, top: int | None,
                    as_json: bool) -> None:
    """Summarise ARCHIVE: model, rounds, users, policy, codecs, size and error budget.

    The error budget is, over the users, the L2 bound (deterministic + 3 rms) between the
    model unlearned from this archive and the exact replay, for removing that user alone.
    """
    with command_errors(), open_archive(archive) as store:
        with reading():
            summary = archive_summary(store, top=top, name=archive)
    if as_json:
        echo_json(summary)
        return
    if top is not None and not (rounds_table or users_table):
        rounds_table = users_table = True
    click.echo(format_summary(summary, rounds_table=rounds_table, users_table=users_table))
