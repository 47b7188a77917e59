"""Dask-distributed replay (`medustore.distributed`): the answer is the local one, bit for bit.

A LocalCluster of 2 worker processes (one thread each) replays archives on a local path and
on moto's S3 server; every answer must equal the local `unlearn` / `reconstruct` exactly
(same float64 accumulation, same order of terms, coordinate by coordinate). Models span
several chunks, the last one partial, so slices cut the model in several places.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from _fl import History, make_history, memory_url, record

import medustore
from medustore import DamagedArchiveError, IncompleteUnlearningWarning, MeduPolicy, Retention
from medustore.archive.reader import chunk_key
from medustore.replay import reconstruct, unlearn

distributed = pytest.importorskip("distributed", reason="needs medustore[dask]")
from medustore import distributed as mdist  # noqa: E402

M = 1100        # 5 chunks of 256 (the last one partial); 1 KB chunks are objects of their own
CHUNK = 256
FULL = replace(medustore.PRESETS["full"], chunk_size=CHUNK)
# Lossy records and aggregates, and a stage 1 that drops records (the replay then warns).
LOSSY = MeduPolicy(keep_top=2, lattice="E8", bits=4.0, aggregate_bits=8.0, chunk_size=CHUNK,
                   seed=7, name="lossy")
PARTS = [["a", "b", "c"], ["a", "c", "d"], ["b"], ["a", "b", "c", "d"], ["c", "e"],
         ["a", "d", "e"]]


def history(seed: int) -> History:
    # Round 2 has "b" alone: removing "b" subtracts that round's aggregate.
    return make_history(seed, M, PARTS, rounds=[0, 1, 3, 4, 6, 7])


def build(location: str, policy: MeduPolicy, seed: int, **kw) -> History:
    h = history(seed)
    with medustore.open(location, "w", model=h.w0, policy=policy, **kw) as store:
        record(store, h)
    return h


@pytest.fixture(scope="module")
def client() -> Iterator[distributed.Client]:
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                                  memory_limit="1GiB", dashboard_address=None,
                                  silence_logs=40) as cluster, \
            distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for name, policy, acc in (("full", FULL, True), ("lossy", LOSSY, False)):
        out[name] = root / name
        build(str(out[name]), policy, seed=len(name), accumulators=acc)
    return out


def same(got: np.ndarray, want: np.ndarray) -> None:
    """Bit for bit: same dtype, shape and bytes."""
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes(), float(np.max(np.abs(got - want)))


UNLEARN_CASES = [
    {"users": "a"},                                            # the exact accumulator (full)
    {"users": "a", "exact_accumulator": False},
    {"users": ["b", "d"]},                                     # round 3: b's aggregate
    {"users": ["b"], "rounds": "3:"},
    {"users": ["c", "a"], "rounds": (1, 7), "alpha": 0.3},
    {"users": ["a", "b", "c", "d", "e"], "alpha": 0.05},       # every round loses everyone
    {"users": "e", "rounds": slice(None, 7), "alpha": 1.5},
]


def local_and_distributed(store, client, case: dict, **kw) -> tuple[np.ndarray, np.ndarray]:
    case = dict(case)
    users = case.pop("users")
    with warnings.catch_warnings(record=True) as w_local:
        warnings.simplefilter("always")
        want = unlearn(store, users, out="flat", **case)
    with warnings.catch_warnings(record=True) as w_dist:
        warnings.simplefilter("always")
        if kw:
            got = mdist.unlearn(store, users, client=client, out="flat", **case, **kw)
        else:
            got = unlearn(store, users, client=client, out="flat", **case)
    # The same warning (records the policy dropped), word for word.
    assert [str(x.message) for x in w_dist if x.category is IncompleteUnlearningWarning] == \
        [str(x.message) for x in w_local if x.category is IncompleteUnlearningWarning]
    return got, want


@pytest.mark.parametrize("name", ["full", "lossy"])
def test_unlearn_equals_local_bit_for_bit(archives, client, name: str) -> None:
    with medustore.open(archives[name]) as store:
        assert store.reader.n_chunks() == 5
        warned = 0
        for case in UNLEARN_CASES:
            if name == "lossy" and case.get("exact_accumulator") is False:
                continue
            got, want = local_and_distributed(store, client, case)
            same(got, want)
            warned += store.error_budget(case["users"], rounds=case.get("rounds"),
                                         alpha=case.get("alpha", 0.0)).records_missing > 0
        # One chunk per task (5 tasks, at most 4 in flight) against the default slicing.
        got, want = local_and_distributed(store, client, UNLEARN_CASES[4], slice_values=CHUNK)
        same(got, want)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IncompleteUnlearningWarning)  # compared above
            got = unlearn(store, ["a", "b"], client=client)  # out="numpy": the same tensors
            same(got, unlearn(store, ["a", "b"]))
    assert (warned > 0) == (name == "lossy")


@pytest.mark.parametrize("name", ["full", "lossy"])
def test_reconstruct_equals_local_bit_for_bit(archives, client, name: str) -> None:
    with medustore.open(archives[name]) as store:
        for t in (0, 1, 2, 4, 5, 7, 8, 100):  # forwards from w_0 and backwards from w_T
            same(reconstruct(store, t, out="flat", client=client),
                 reconstruct(store, t, out="flat"))
        same(mdist.reconstruct(store, 4, "flat", client=client, slice_values=1),
             reconstruct(store, 4, out="flat"))


def test_workers_read_the_callers_version(tmp_path: Path, client) -> None:
    h = history(11)
    path = tmp_path / "versions"
    with medustore.open(path, "w", model=h.w0, policy=FULL,
                        retention=Retention(keep_versions=10)) as store:
        record(store, History(h.w0, h.rounds[:3]))
        held = medustore.open(path, "r")  # holds the version after round 3
        record(store, History(h.w0, h.rounds[3:]))
    with held, medustore.open(path, "r", as_of_round=4) as past, medustore.open(path) as now:
        assert len({held.snapshot_id, past.snapshot_id, now.snapshot_id}) == 3
        for store in (held, past, now):
            same(unlearn(store, ["a", "c"], client=client, out="flat"),
                 unlearn(store, ["a", "c"], out="flat"))
            same(reconstruct(store, 2, out="flat", client=client),
                 reconstruct(store, 2, out="flat"))
        assert unlearn(held, "a", out="flat").tobytes() != unlearn(now, "a", out="flat").tobytes()


def _chunk_object(store, files: dict[str, bytes], name: str, lead: tuple[int, ...],
                  k: int) -> str:
    """The storage object holding chunk ``k`` of array ``name`` at ``lead``: the one whose
    bytes are that chunk's stored bytes."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    arr = store.reader.arrays[name]
    raw = sync(arr.store_path.store.get(chunk_key(arr, (*lead, k)),
                                        default_buffer_prototype())).to_bytes()
    hits = [key for key, body in files.items() if body == raw]
    assert len(hits) == 1, (name, lead, k, len(hits))
    return hits[0]


def _damage_is_named(store, client, **kw) -> str:
    """Local and distributed unlearning of "c" both raise the same `DamagedArchiveError`."""
    with pytest.raises(DamagedArchiveError) as local:
        unlearn(store, ["c", "e"], out="flat")
    with pytest.raises(DamagedArchiveError) as dist:
        mdist.unlearn(store, ["c", "e"], client=client, out="flat", **kw)
    assert str(dist.value) == str(local.value)
    return str(dist.value)


def test_damaged_chunk_is_named(tmp_path: Path, client) -> None:
    path = tmp_path / "damaged"
    build(str(path), FULL, seed=21, retention=Retention(grace=0))
    files = {str(p): p.read_bytes() for p in (path / "chunks").rglob("*") if p.is_file()}
    with medustore.open(path) as store:
        row = store.index.row(4)
        e = next(e for e in range(store.index.n_entries)
                 if store.index.entry_rows()[e] == row
                 and store.index.users[store.index.entry_user[e]] == "c")
        rec = int(store.index.entry_record[e])
        victim = _chunk_object(store, files, "records", (rec,), 3)
        same(unlearn(store, ["c", "e"], client=client, out="flat"),
             unlearn(store, ["c", "e"], out="flat"))
        Path(victim).unlink()
        message = _damage_is_named(store, client)
        assert "record of user 'c' in round 4" in message
        assert re.search(r"records/c/\d+/3\b", message) or "does not read" in message
        # The slice without the lost chunk still reads: only the task that needs it fails.
        Path(victim).write_bytes(files[victim])
        same(unlearn(store, ["c", "e"], client=client, out="flat"),
             unlearn(store, ["c", "e"], out="flat"))


def test_memory_archive_is_refused(client) -> None:
    h = history(5)
    url = memory_url("dist")
    with medustore.open(url, "w", model=h.w0, policy=FULL) as store:
        record(store, History(h.w0, h.rounds[:2]))
        with pytest.raises(ValueError, match="memory://.*dask workers cannot read it"):
            unlearn(store, "a", client=client)
        with pytest.raises(ValueError, match="memory://"):
            reconstruct(store, 1, client=client)
    with pytest.raises(TypeError, match="dask.distributed.Client"):
        mdist.unlearn(store, "a", client=object())


@pytest.mark.parametrize("name", ["full", "lossy"])
def test_s3_archive(s3_archive: tuple[str, dict], s3_client, client, name: str) -> None:
    location, options = s3_archive
    build(location, FULL if name == "full" else LOSSY, seed=31, storage_options=options,
          retention=Retention(grace=0))
    with medustore.open(location, "r", storage_options=options) as store:
        for case in UNLEARN_CASES:
            if case.get("exact_accumulator") is False:
                continue
            got, want = local_and_distributed(store, client, case, storage_options=options)
            same(got, want)
        for t in (1, 4, 7):
            same(mdist.reconstruct(store, t, "flat", client=client, storage_options=options),
                 reconstruct(store, t, out="flat"))
        if name == "lossy":
            return  # its coded chunks are small enough to live inside Icechunk's manifests
        # A deleted chunk object is damage on the workers too, named as locally.
        bucket, prefix = location[len("s3://"):].split("/", 1)
        listing = s3_client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/chunks/")
        files = {o["Key"]: s3_client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
                 for o in listing["Contents"]}
        agg = _chunk_object(store, files, "aggregate", (store.index.row(6),), 1)
        s3_client.delete_object(Bucket=bucket, Key=agg)
        # Removing "c" and "e" removes every participant of round 6: its aggregate is read.
        message = _damage_is_named(store, client, storage_options=options)
        assert "aggregate of round 6" in message
