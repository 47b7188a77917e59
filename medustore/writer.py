"""Recording a round: `plan_round` (pure: validate and compute) then `write_round` (write).

Everything that can be refused is refused by `plan_round`, before anything is written: bad
round numbers, weights whose sum or quotients leave the float range, updates whose
differentials, aggregate or next model overflow the stored precision, accumulator terms
that overflow. `write_round` then appends the round's rows inside a transaction that
commits whole or not at all.
"""

from __future__ import annotations

import asyncio
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from medustore.archive import postings
from medustore.archive.reader import ATTR, chunk_key
from medustore.archive.table import TABLE, codec_args
from medustore.index import ArchiveIndex, Settings, chain, parse_round, parse_user, user_text
from medustore.layout import ModelLayout
from medustore.segments import chunk_segments

__all__ = ["Ahead", "RoundPlan", "RoundSummary", "initial_tables", "plan_round",
           "write_round"]


@dataclass(frozen=True)
class RoundSummary:
    """What `UpdateStore.record_round` wrote."""

    round: int
    participants: int
    stored: int
    #: encoded bytes of the round's records (None for a pipelined round: not written yet)
    nbytes: int | None

    def __iter__(self):  # unpacks like the tuple it used to be
        return iter((self.round, self.participants, self.stored, self.nbytes))


@dataclass(frozen=True, eq=False)
class RoundPlan:
    """A validated round, ready to write (participants sorted by user column)."""

    round: int
    users: tuple[Any, ...]
    cols: np.ndarray
    new_users: tuple[Any, ...]
    weights: np.ndarray
    dvecs: tuple[np.ndarray, ...]
    dnorm: np.ndarray
    keep: np.ndarray
    znorm: np.ndarray
    evar: np.ndarray
    hbar: np.ndarray
    anorm: float
    agg_evar: float
    model: np.ndarray
    initial: np.ndarray | None
    acc_terms: tuple[np.ndarray, ...] | None


#: Largest ratio of one user's weight to the rest of its round's. Unlearning that user scales
#: its stored differential by this ratio, so rounding in the differential (float64 while the
#: round is planned, float32 once stored) is amplified by it: past 2**24 the answer could be
#: wrong by more than the update itself.
MAX_WEIGHT_RATIO = float(2**24)


def _parse_updates(layout: ModelLayout, updates: Any) -> tuple[list[Any], list[np.ndarray]]:
    if _is_module(updates):
        raise TypeError("updates must map users to updates, got a torch module; local models "
                        "go in record_round(t, models={user: model})")
    pairs = updates.items() if isinstance(updates, Mapping) else updates
    if not isinstance(pairs, Iterable):
        raise TypeError("updates must be a mapping or (user, update) pairs")
    users, vecs, seen = [], [], set()
    for item in pairs:
        try:
            user, update = item
        except (TypeError, ValueError):
            raise TypeError("updates must be a mapping or (user, update) pairs") from None
        u = parse_user(user)
        if _is_module(update):
            raise TypeError(f"update of user {u!r} is a torch module, not an update: pass "
                            "local models as record_round(t, models={user: model}) (the "
                            "store subtracts the global model), or updates w_local - w_global")
        if u in seen:
            raise ValueError(f"user {u!r} appears twice in this round")
        seen.add(u)
        users.append(u)
        vecs.append(layout.flatten(update, f"update of user {u!r}"))
    if not users:
        raise ValueError("a round needs at least one user's update")
    return users, vecs


def local_updates(layout: ModelLayout, models: Mapping[Any, Any],
                  w_before: np.ndarray) -> dict[Any, np.ndarray]:
    """``{user: w_local - w_global}`` from local models (modules, state_dicts or arrays)."""
    if not isinstance(models, Mapping):
        raise TypeError("models must map users to their local models")
    out = {}
    for user, model in models.items():
        u = parse_user(user)
        local = layout.flatten(model, f"local model of user {u!r}", dtype=np.float64)
        out[u] = local - w_before  # in float64: the difference of close float32 values
    return out


def _is_module(obj: Any) -> bool:
    return any(c.__module__.startswith("torch.nn") for c in type(obj).__mro__)


def _parse_weights(users: list[Any], weights: Mapping[Any, float] | None) -> np.ndarray:
    if weights is None:
        return np.ones(len(users))
    given = {parse_user(u): w for u, w in weights.items()}
    missing = [u for u in users if u not in given]
    extra = [u for u in given if u not in set(users)]
    if missing or extra:
        raise ValueError(f"weights do not match the round's users (missing {missing}, "
                         f"extra {extra})")
    p = np.empty(len(users))
    for i, u in enumerate(users):
        w = given[u]
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not (
                math.isfinite(w) and w > 0):
            raise ValueError(f"weight of user {u!r} must be finite and > 0, got {w!r}")
        p[i] = float(w)
    with np.errstate(over="ignore"):
        total = float(p.sum())
    if not math.isfinite(total):
        raise ValueError(f"the round's weights sum past the float range ({total}); scale them "
                         "down (only their ratios matter)")
    if (p / total == 0).any():
        i = int(np.flatnonzero(p / total == 0)[0])
        raise ValueError(f"the weight of user {users[i]!r} ({p[i]!r}) is so small against the "
                         f"round's total ({total!r}) that its share underflows to 0; scale the "
                         "weights to a narrower range")
    if p.size > 1:
        rest = total - p
        for i in np.flatnonzero(rest <= total * 1e-9):  # the subtraction may have cancelled
            rest[i] = float(np.delete(p, i).sum())
        ratio = p / rest
        if (ratio > MAX_WEIGHT_RATIO).any():
            i = int(np.argmax(ratio))
            raise ValueError(
                f"the weight of user {users[i]!r} is {ratio[i]:.3g} times the rest of the "
                f"round's (more than {MAX_WEIGHT_RATIO:.3g}): removing it later would multiply "
                "float rounding by that much; scale the weights to a narrower range")
    return p


def _map(fn: Any, items: Any) -> list:
    """``[fn(x) for x in items]`` on the writer's threads (one pool per process, for
    planning and coding alike; numpy and pcodec release the GIL)."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    return list(_pool().map(fn, items))


def _spans(m: int) -> list[slice]:
    """The model cut in one piece per coder thread (64 KiB-aligned)."""
    step = -(-m // _CODERS)
    step = -(-step // 8192) * 8192
    return [slice(a, min(a + step, m)) for a in range(0, m, step)]


#: Writer threads (planning a round, coding its chunks): one per core, as the replay
#: decodes.
_CODERS = max(2, min(4, os.cpu_count() or 2))
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=_CODERS, thread_name_prefix="medustore-writer")
    return _POOL


def _overflow(x: np.ndarray, dtype: Any) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):
        return not bool(np.isfinite(x.astype(dtype)).all())


class Ahead:
    """What planning needs of an index, counting rounds planned but not yet committed
    (pipelined rounds): last round, user columns, counts. Rounds commit in plan order, so
    the columns given to new users here are the ones their commit gives them."""

    def __init__(self, index: ArchiveIndex) -> None:
        self._index = index
        self.settings, self.layout, self.policy = index.settings, index.layout, index.policy
        self.last_round, self.n_rounds, self.n_users = (index.last_round, index.n_rounds,
                                                        index.n_users)
        self._new: dict[Any, int] = {}

    def find(self, user: Any) -> int | None:
        col = self._index.find(user)
        return col if col is not None else self._new.get(parse_user(user))

    def planned(self, plan: RoundPlan) -> None:
        """Count ``plan`` as if committed."""
        self.last_round = plan.round
        self.n_rounds += 1
        for u in plan.new_users:
            self._new[u] = self.n_users
            self.n_users += 1


def plan_round(index: ArchiveIndex | Ahead, round: Any, updates: Any,
               weights: Mapping[Any, float] | None, w_before: np.ndarray) -> RoundPlan:
    """Validate a round and compute everything it stores (nothing is written)."""
    settings, layout, pol = index.settings, index.layout, index.policy
    t = parse_round(round)
    last = index.last_round
    if last is not None and t <= last:
        raise ValueError(f"round {t} is not above the last committed round {last}; rounds "
                         "must be recorded in increasing order")
    users, vecs = _parse_updates(layout, updates)
    p = _parse_weights(users, weights)
    known = {u: index.find(u) for u in users}
    new = [u for u in users if known[u] is None]
    col_of = {u: index.n_users + new.index(u) if known[u] is None else known[u]
              for u in users}
    order = np.argsort([col_of[u] for u in users], kind="stable")
    users = [users[i] for i in order]
    vecs = [vecs[i] for i in order]
    p = p[order]
    cols = np.array([col_of[u] for u in users], dtype=np.int64)

    P = float(p.sum())
    hbar = np.zeros(layout.size, dtype=np.float64)

    def accumulate(span: slice) -> None:  # element-wise: any split gives the same sums
        part = hbar[span]
        term = np.empty(part.size)
        for pu, h in zip(p, vecs, strict=True):
            np.multiply(h[span], pu / P, out=term, dtype=np.float64)  # float32 would round
            part += term

    _map(accumulate, _spans(layout.size))
    # hbar is a convex combination of float32 updates: it cannot overflow float32.

    def differential(h: np.ndarray) -> tuple[np.ndarray, float]:
        with np.errstate(over="ignore", invalid="ignore"):
            d = np.subtract(h, hbar, dtype=np.float64).astype(np.float32)
        return d, (float(np.linalg.norm(d.astype(np.float64))) if np.isfinite(d).all()
                   else math.nan)

    dvecs, dnorms = zip(*_map(differential, vecs), strict=True)
    for u, d in zip(users, dvecs, strict=True):
        if not np.isfinite(d).all():
            raise ValueError(f"the differential of user {u!r} (update minus the round's "
                             "aggregate) overflows float32; the updates are too large")
    dnorm = np.array(dnorms)
    anorm = float(np.linalg.norm(hbar))
    if not (np.isfinite(dnorm).all() and math.isfinite(anorm)):
        raise ValueError("the round's updates are too large: their norms overflow float64")
    keep = pol.select(users, p, dnorm, anorm)
    segments = chunk_segments(layout, settings.chunk)
    znorm, evar = np.zeros(len(users)), np.zeros(len(users))
    kept = np.flatnonzero(keep)
    for i, (ev, zn, _) in zip(kept, _map(lambda i: pol.expected_error(dvecs[i], segments),
                                        kept), strict=True):
        evar[i], znorm[i] = ev, zn

    model = w_before + hbar
    if _overflow(model, settings.model_dtype):
        raise ValueError(f"the next global model (w_t + aggregate) overflows "
                         f"{np.dtype(settings.model_dtype)}")
    hbar32 = hbar.astype(np.float32)
    agg_evar = (pol.expected_aggregate_error(hbar32, segments) if pol.keep_aggregates
                else 0.0)
    acc_terms = None
    if settings.accumulators:
        terms = []
        for i, d in enumerate(dvecs):
            rest = float(np.delete(p, i).sum())  # P - p_i would cancel to 0 for a huge p_i
            with np.errstate(over="ignore", invalid="ignore"):
                term = hbar if rest <= 0 else (p[i] / rest) * d.astype(np.float64)
            if not np.isfinite(term).all():
                raise ValueError(f"the accumulator term of user {users[i]!r} overflows: its "
                                 "weight dwarfs the rest of the round's")
            terms.append(term)
        acc_terms = tuple(terms)
    return RoundPlan(
        round=t, users=tuple(users), cols=cols, new_users=tuple(new), weights=p,
        dvecs=tuple(dvecs), dnorm=dnorm, keep=keep, znorm=znorm, evar=evar, hbar=hbar32,
        anorm=anorm, agg_evar=float(agg_evar), model=model.astype(settings.model_dtype),
        initial=w_before.astype(settings.model_dtype) if index.n_rounds == 0 else None,
        acc_terms=acc_terms)


# ---------------------------------------------------------------------- writing


def _grow(arr: zarr.Array, rows: int) -> None:
    arr.resize((rows, *arr.shape[1:]))


def write_round(group: zarr.Group, index: ArchiveIndex, plan: RoundPlan,
                read_acc: Any) -> tuple[ArchiveIndex, int]:
    """Append ``plan`` to the writable root ``group``; returns the new index and the
    encoded bytes of the round's records. ``read_acc(col)`` reads an accumulator row."""
    settings = index.settings
    arrays = {s.name: group[s.name].with_config({"write_empty_chunks": True})
              for s in TABLE if s.exists(settings.flags())}
    R, E, N, U = index.n_rounds, index.n_entries, index.n_records, len(index.users)
    n, k = len(plan.users), int(plan.keep.sum())
    U2 = U + len(plan.new_users)

    # Records first: their encoded sizes go into the index rows.
    rec = arrays["records"]
    _grow(rec, N + k)
    record_ids = np.full(n, -1, dtype=np.int64)
    nbytes = np.zeros(n, dtype=np.int64)
    kept = np.flatnonzero(plan.keep)
    record_ids[kept] = N + np.arange(k)
    if k:
        sizes = write_rows(group.store, rec, N, [plan.dvecs[i] for i in kept],
                           index.policy.record_codec(), index.layout, settings.chunk)
        nbytes[kept] = sizes

    rounds_row = np.array([[plan.round, n, U2]], dtype=np.int64)
    facts_row = np.array([[plan.anorm, plan.agg_evar]])
    entries = np.stack([plan.cols, record_ids, nbytes], axis=1).astype(np.int64)
    efacts = np.stack([plan.weights, plan.dnorm, plan.znorm, plan.evar], axis=1)
    for name, rows, start in (("rounds", rounds_row, R), ("round_facts", facts_row, R),
                              ("entries", entries, E), ("entry_facts", efacts, E)):
        _grow(arrays[name], start + rows.shape[0])
        arrays[name][start:start + rows.shape[0], :] = rows
    new_text = [user_text(u) for u in plan.new_users]
    if new_text:
        _grow(arrays["users"], U2)
        arrays["users"][U:U2] = np.array(new_text, dtype=object)
    if "aggregate" in arrays:
        _grow(arrays["aggregate"], R + 1)
        write_rows(group.store, arrays["aggregate"], R, [plan.hbar],
                   index.policy.aggregate_codec(), index.layout, settings.chunk)
    if plan.acc_terms is not None:
        acc = arrays["acc"]
        _grow(acc, U2)
        for i, col in enumerate(plan.cols):
            col = int(col)
            base = read_acc(col) if col < U else 0.0
            acc[col, :] = base + plan.acc_terms[i]
    if plan.initial is not None:
        arrays["initial"][:] = plan.initial
    arrays["model"][:] = plan.model

    digest = chain(bytes.fromhex(index.digest), rounds_row[0], facts_row[0], entries, efacts,
                   new_text)
    new_index = index.appended(rounds_row, facts_row, entries, efacts, plan.new_users,
                               digest.hex())
    if settings.sparse:
        _grow(arrays["links"], R + 1)
        arrays["links"][R, :] = link_row(digest)
        write_postings(group, new_index)
    write_meta(group, settings, new_index)
    return new_index, int(nbytes.sum())


def link_row(digest: bytes) -> np.ndarray:
    """A 32-byte digest as the 4 int64 of a ``links`` row."""
    return np.frombuffer(digest, dtype="<i8").astype(np.int64)


def write_postings(group: zarr.Group, index: ArchiveIndex) -> None:
    """The user run that ``index``'s last round completes (`medustore.archive.postings`)."""
    R = index.n_rounds
    k = (R & -R).bit_length() - 1
    lo, hi = postings.run_rows(R, k)
    e0, e1 = int(index.start[lo]), int(index.start[hi])
    keys = index.user_keys()[index.entry_user[e0:e1]]
    postings.write_run(group, R, postings.build_run(keys, e0))


def write_rows(store: Any, arr: zarr.Array, first: int, rows: list[np.ndarray],
               codec: Any, layout: ModelLayout, chunk: int) -> np.ndarray:
    """Write ``rows`` into ``arr`` from row ``first`` on; the encoded bytes of each row.

    Lossy rows are coded here, chunk by chunk, each chunk with its tensor-aligned segments
    (a codec called by zarr sees no chunk coordinates, hence no tensor boundaries), and
    stored under the chunks' keys; the chunks describe themselves, so zarr decodes them.
    Lossless rows go through zarr (one block write: whole chunks only).
    """
    n_chunks = math.ceil(layout.size / chunk)
    keys = [chunk_key(arr, (first + j, c)) for j in range(len(rows)) for c in range(n_chunks)]
    if codec is None:
        arr[first:first + len(rows), :] = np.stack(rows)
        return np.asarray(sync(_sizes(store, keys)), dtype=np.int64).reshape(
            len(rows), n_chunks).sum(axis=1)
    segments = chunk_segments(layout, chunk)

    def encode(job: tuple[int, int]) -> bytes:
        j, c = job
        part = np.zeros(chunk, dtype=np.float32)  # zarr's fill value pads the last chunk
        piece = rows[j][c * chunk:(c + 1) * chunk]
        part[:piece.size] = piece
        return codec.encode(part, segments=segments[c])

    # numpy and pcodec release the GIL
    blobs = _map(encode, [(j, c) for j in range(len(rows)) for c in range(n_chunks)])
    sync(_put(store, keys, blobs))
    return np.array([len(b) for b in blobs], dtype=np.int64).reshape(
        len(rows), n_chunks).sum(axis=1)


async def _sizes(store: Any, keys: list[str]) -> list[int]:
    return list(await asyncio.gather(*(store.getsize(key) for key in keys)))


async def _put(store: Any, keys: list[str], blobs: list[bytes]) -> None:
    proto = default_buffer_prototype()
    await asyncio.gather(*(store.set(key, proto.buffer.from_bytes(blob))
                           for key, blob in zip(keys, blobs, strict=True)))


def write_meta(group: zarr.Group, settings: Settings, index: ArchiveIndex) -> None:
    """The ``medustore`` attribute: settings, counts and the index digest."""
    group.attrs[ATTR] = {**settings.to_json(), "counts": index.counts(),
                         "digest": index.digest}


def initial_tables(settings: Settings) -> ArchiveIndex:
    """The index of an archive with no round yet."""
    empty_i = np.zeros((0, 3), dtype=np.int64)
    empty_f = np.zeros((0, 2))
    return ArchiveIndex.from_tables(settings, (), empty_i, empty_f, empty_i,
                                    np.zeros((0, 4)), settings.digest0().hex())


def create_arrays(group: zarr.Group, settings: Settings, serializers: Mapping[str, Any],
                  initial: np.ndarray) -> ArchiveIndex:
    """Lay out a new archive in ``group`` (every declared array, empty) with ``w_0``."""
    index = initial_tables(settings)
    counts, m = index.counts(), settings.layout.size
    chunk = settings.chunk
    for s in TABLE:
        if not s.exists(settings.flags()):
            continue
        group.create_array(
            s.name, shape=s.shape(counts, m), chunks=s.chunk_shape(chunk),
            dtype=s.numpy_dtype(settings.model_dtype), fill_value=s.fill(),
            dimension_names=s.dims, config={"write_empty_chunks": True},
            **codec_args(s, serializers))
    if settings.sparse:
        postings.create(group)
    init = initial.astype(settings.model_dtype)
    group["initial"].with_config({"write_empty_chunks": True})[:] = init
    group["model"].with_config({"write_empty_chunks": True})[:] = init
    write_meta(group, settings, index)
    return index

