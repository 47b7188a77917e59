"""Archives on S3 (``s3://bucket/prefix``), against moto's S3 server on 127.0.0.1.

On object storage there is no writer lock: a stale writer is refused by the commit itself
(Icechunk's conditional update of the branch), and nothing of its round shows. A reader
keeps its version while writers commit; a deleted object is damage, never zeros.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from _fl import History, check_answers, make_round, race_commits, writer_history

import medustore
from medustore import ConcurrentWriteError, DamagedArchiveError, Retention

M = 300  # records of 1200 bytes: objects of their own (smaller chunks live in manifests)


def _create(location: str, options: dict, h: History, **kwargs) -> None:
    with medustore.open(location, "w", model=h.w0, policy="full", accumulators=True,
                        storage_options=options, **kwargs) as store:
        for r in h.rounds:
            store.record_round(r.t, r.updates, weights=r.weights)


def test_create_record_reopen_unlearn(s3_archive: tuple[str, dict]) -> None:
    location, options = s3_archive
    h = writer_history(31, M, 3)
    _create(location, options, h)
    with medustore.open(location, "r", storage_options=options) as store:
        check_answers(store, h)
        assert store.location == location
    with medustore.open(location, "a", storage_options=options) as store:
        r = make_round(32, 3, ["a", "new"], M)
        store.record_round(r.t, r.updates, weights=r.weights)
        h.rounds.append(r)
    with medustore.open(location, "r", storage_options=options) as store:
        check_answers(store, h)
    with pytest.raises(FileExistsError, match=re.escape(location)):  # no silent replace
        medustore.open(location, "w", model=h.w0, storage_options=options)


def test_reader_keeps_its_version_while_a_writer_commits(s3_archive: tuple[str, dict]
                                                          ) -> None:
    location, options = s3_archive
    h = writer_history(33, M, 5)
    _create(location, options, History(h.w0, h.rounds[:2]))
    reader = medustore.open(location, "r", storage_options=options)
    check_answers(reader, History(h.w0, h.rounds[:2]))
    before = (reader.rounds, reader.users, reader.latest("flat"), reader.record(1, "b"),
              reader.unlearn("b", out="flat"))
    with medustore.open(location, "a", storage_options=options) as writer:
        for r in h.rounds[2:]:
            writer.record_round(r.t, r.updates, weights=r.weights)
            now = (reader.rounds, reader.users, reader.latest("flat"), reader.record(1, "b"),
                   reader.unlearn("b", out="flat"))
            assert now[:2] == before[:2]
            for a, b in zip(now[2:], before[2:], strict=True):
                np.testing.assert_array_equal(a, b)
    check_answers(reader, History(h.w0, h.rounds[:2]))  # unchanged, records too
    reader.close()
    with medustore.open(location, "r", storage_options=options) as fresh:
        check_answers(fresh, h)


def test_stale_writer_is_refused(s3_archive: tuple[str, dict]) -> None:
    location, options = s3_archive
    h = writer_history(34, M, 2)
    _create(location, options, h)
    a = medustore.open(location, "a", storage_options=options)
    b = medustore.open(location, "a", storage_options=options)  # no lock on S3
    r = make_round(35, 2, ["a", "b"], M)
    a.record_round(r.t, r.updates, weights=r.weights)
    h.rounds.append(r)
    stale = make_round(36, 3, ["c", "intruder"], M)
    with pytest.raises(ConcurrentWriteError, match=re.escape(location)):
        b.record_round(stale.t, stale.updates, weights=stale.weights)
    with medustore.open(location, "r", storage_options=options) as store:
        check_answers(store, h)
        assert "intruder" not in store.users
    b.close()
    a.close()


def test_writers_racing_to_commit(s3_archive: tuple[str, dict]) -> None:
    # Both start round 2 from the same version; a commits while b is committing: b's
    # commit (a conditional update of the branch on S3) is refused whole.

    location, options = s3_archive
    h = writer_history(37, M, 2)
    _create(location, options, h)
    a = medustore.open(location, "a", storage_options=options)
    b = medustore.open(location, "a", storage_options=options)
    r = make_round(38, 2, ["a", "x"], M)
    loser = make_round(39, 2, ["b", "y"], M)
    race_commits(a, b, r, loser, location)
    h.rounds.append(r)
    with medustore.open(location, "r", storage_options=options) as store:
        check_answers(store, h)
        assert "y" not in store.users
    b.close()
    a.close()


def _reads(location: str, options: dict) -> dict[tuple, object]:
    """Open the archive and make every data read of it: each record, aggregate,
    accumulator, w_0 and w_T; the value, or the `DamagedArchiveError` it raised (the
    opening's, under ``("open",)``, when the index itself does not read)."""
    try:
        store = medustore.open(location, "r", storage_options=options)
    except DamagedArchiveError as err:
        return {("open",): err}
    out: dict[tuple, object] = {}
    calls = {("initial",): lambda: store.initial("flat"),
             ("latest",): lambda: store.latest("flat")}
    for t in store.rounds:
        calls["aggregate", t] = lambda t=t: store.aggregate(t)
        for u in store.users:
            if t in store.participation(u):
                calls["record", t, u] = lambda t=t, u=u: store.record(t, u)
    for u in store.users:
        calls["acc", u] = lambda u=u: store.accumulator(u)
    with store:
        for key, call in calls.items():
            try:
                out[key] = call()
            except DamagedArchiveError as err:
                out[key] = err
    return out


def test_deleted_chunk_object_is_damage_never_zeros(s3_archive: tuple[str, dict],
                                                    s3_client) -> None:
    location, options = s3_archive
    h = writer_history(40, M, 3)
    # Compacting on close leaves the objects of the latest version only: each one is
    # needed by some read.
    _create(location, options, h, retention=Retention(grace=0))
    bucket, prefix = location[len("s3://"):].split("/", 1)
    with medustore.open(location, "r", storage_options=options) as store:
        check_answers(store, h)
    good = _reads(location, options)
    assert not any(isinstance(v, Exception) for v in good.values())
    listing = s3_client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/chunks/")
    bodies = {o["Key"]: s3_client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
              for o in listing["Contents"]}
    assert len(bodies) >= len(good)  # every data row is an object (and an index table)
    # Object names are random; their contents are not: order them by content.
    keys = sorted(bodies, key=lambda k: hashlib.sha256(bodies[k]).digest())
    for key in np.random.default_rng(40).choice(keys, size=3, replace=False):
        s3_client.delete_object(Bucket=bucket, Key=key)
        try:
            got = _reads(location, options)
        finally:
            s3_client.put_object(Bucket=bucket, Key=key, Body=bodies[key])
        damaged = [k for k, v in got.items() if isinstance(v, DamagedArchiveError)]
        assert len(damaged) == 1, (key, damaged)  # the one read that needs the object
        for k, v in got.items():  # every other read is what it was
            if k not in damaged:
                np.testing.assert_array_equal(v, good[k], err_msg=f"{key}: {k}")
    with medustore.open(location, "r", storage_options=options) as store:
        check_answers(store, h)  # restored


def test_unknown_storage_option_is_named() -> None:
    good = {"endpoint_url": "http://127.0.0.1:1", "allow_http": True}
    for bad in ("endpoint", "aws_access_key_id", "verify"):
        with pytest.raises(ValueError, match=f"'{bad}'"):
            medustore.open("s3://bucket/prefix", "r", storage_options={**good, bad: "x"})
    with pytest.raises(ValueError, match="s3://"):  # options of a local path
        medustore.open("some/path", "r", storage_options=good)
