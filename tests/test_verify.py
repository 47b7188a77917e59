"""`medustore.verify` and ``medustore verify`` on format-2 archives: clean archives verify OK;
every deleted or damaged object is reported (or refused when the archive opens) and never
turns into a different answer; plain Zarr exports name each missing chunk; edits of the
index or the settings outside medustore are refused."""

from __future__ import annotations

import json
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import icechunk
import numpy as np
import pytest
import zarr
import zarr.storage
from click.testing import CliRunner, Result
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import medustore
from medustore.cli import main
from medustore.errors import DamagedArchiveError
from medustore.verify import VerifyReport, verify

USERS: list[Any] = [0, 1, 2, "mallory"]  # int and str ids side by side
ROUNDS = [0, 1, 3]  # round 2 skipped on purpose: rows and rounds differ
ERROR = "medustore: error: "


def _model(rng: np.random.Generator, zeros: bool = False) -> dict[str, np.ndarray]:
    # 1,200 parameters: record and aggregate chunks exceed Icechunk's 512-byte inlining, so
    # they are objects of their own under chunks/.
    shapes = {"layer.weight": (24, 48), "layer.bias": (48,)}
    return {k: (np.zeros(s) if zeros else rng.normal(size=s)).astype(np.float32)
            for k, s in shapes.items()}


def build(path: Path, policy: Any, users: list[Any] = USERS, seed: int = 0,
          accumulators: bool = False, zeros: bool = False) -> Path:
    """A 3-round archive, compacted so that every object belongs to its latest version."""
    rng = np.random.default_rng(seed)
    model = _model(rng, zeros)
    with medustore.open(path, "w", model=model, policy=policy,
                        accumulators=accumulators) as store:
        for i, t in enumerate(ROUNDS):
            part = [u for j, u in enumerate(users) if (i + j) % 4 != 3 or u == "mallory"]
            updates = {u: {k: (rng.normal(size=v.shape) * (5.0 if u == "mallory" else 1.0))
                           .astype(np.float32) for k, v in model.items()} for u in part}
            store.record_round(t, updates, weights={u: float(rng.integers(10, 100))
                                                    for u in part})
        store.compact(grace=0)
    return path


def export(src: Path, dst: Path) -> Path:
    """A plain Zarr copy of the latest version of ``src`` (every key of its session)."""
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(src)))
    source = repo.readonly_session(branch="main").store
    target = zarr.storage.LocalStore(dst)
    proto = default_buffer_prototype()

    async def copy() -> None:
        async for key in source.list():
            await target.set(key, await source.get(key, proto))

    sync(copy())
    return dst


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archives")
    made = {p: build(root / p, p, seed=i) for i, p in enumerate(("full", "lattice", "medu"))}
    made["acc"] = build(root / "acc", "medu", seed=8, accumulators=True)
    made["str_ids"] = build(root / "str_ids", "full", users=["3", "alice", "bob"], seed=7)
    made["int_ids"] = build(root / "int_ids", "lattice", users=[5, 6, 7], seed=9)
    made["plain"] = export(made["acc"], root / "plain")
    return made


@pytest.fixture
def copy(archives: dict[str, Path], tmp_path: Path) -> Callable[[str, str], Path]:
    """A private copy of a module archive, safe to damage."""

    def make(name: str, tag: str = "") -> Path:
        dest = tmp_path / f"{name}{tag}"
        shutil.copytree(archives[name], dest)
        return dest

    return make


def cli(*args: object) -> Result:
    """Run the command in-process; any exception other than an exit is a test failure."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def check(path: Path) -> VerifyReport:
    with medustore.open(path) as store:
        return verify(store, progress=False)


def objects(archive: Path) -> list[str]:
    """Every object file under the repository's chunks/ and manifests/ folders."""
    return sorted(str(p.relative_to(archive)) for folder in ("chunks", "manifests")
                  for p in (archive / folder).iterdir() if p.is_file())


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, min(len(data), len(data) // 3 + 16)):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


def answers(path: Path) -> dict[str, Any]:
    """``latest`` and ``unlearn`` of mallory (by replay and, where kept, by accumulator):
    each an exact answer, or the DamagedArchiveError class."""
    out: dict[str, Any] = {}
    with medustore.open(path) as store, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # policies that drop records warn on unlearning
        calls = {"latest": store.latest,
                 "replay": lambda: store.unlearn("mallory", exact_accumulator=False)}
        if store.has_accumulators:
            calls["accumulator"] = lambda: store.unlearn("mallory", exact_accumulator=True)
        for name, call in calls.items():
            try:
                out[name] = call()
            except DamagedArchiveError:
                out[name] = DamagedArchiveError
    return out


def assert_same_or_refused(got: dict[str, Any], intact: dict[str, Any], what: str) -> None:
    for name, value in got.items():
        if value is DamagedArchiveError:
            continue
        for tensor, want in intact[name].items():
            np.testing.assert_array_equal(value[tensor], want, err_msg=f"{what}: {name}")


# ---------------------------------------------------------------------- clean archives


@pytest.mark.parametrize("name", ["full", "lattice", "medu", "acc", "str_ids", "int_ids",
                                  "plain"])
def test_clean(archives: dict[str, Path], name: str) -> None:
    with medustore.open(archives[name]) as store:
        report = verify(store, progress=False)
        stored, users = int(store.side("stored").sum()), len(store.users)
        aggregates = len(store.rounds) if store.policy.keep_aggregates else 0
        accumulators = users if store.has_accumulators else 0
    assert report.ok, report.problems
    assert report.notes == []
    assert (report.rounds, report.users, report.records) == (len(ROUNDS), users, stored)
    assert report.record_chunks == stored and report.model_chunks == 2
    assert report.aggregate_chunks == aggregates
    assert report.accumulator_chunks == accumulators

    result = cli("verify", archives[name])
    assert result.exit_code == 0, result.stdout
    assert result.stdout.rstrip().endswith("result: OK")
    data = json.loads(cli("verify", archives[name], "--json").stdout)
    assert data["ok"] is True and data["problems"] == []
    assert data["chunks"]["records"] == stored


def test_zero_initial_model_is_not_damage(tmp_path: Path) -> None:
    archive = build(tmp_path / "zeros", "lattice", zeros=True)
    with medustore.open(archive) as store:
        assert not store.reader.initial().any()
    report = check(archive)
    assert report.ok, report.problems


def test_records_over_several_chunks(tmp_path: Path) -> None:
    """A record split over chunks: each is decoded, and a deleted one is named by index."""
    policy = medustore.MeduPolicy(lattice="E8", bits=4.0, aggregate_bits=8.0, chunk_size=256,
                                  name="small-chunks")
    archive = build(tmp_path / "chunked", policy, accumulators=True)
    report = check(archive)
    assert report.ok, report.problems
    k = 5  # ceil(1200 / 256)
    assert report.record_chunks == report.records * k
    assert report.model_chunks == 2 * k and report.accumulator_chunks == len(USERS) * k

    plain = export(archive, tmp_path / "chunked-plain")
    with medustore.open(plain) as store:
        e = int(np.flatnonzero(store.index.entry_record == 1)[0])
        t = int(store.index.rounds[store.index.entry_rows()[e]])
        u = store.index.users[int(store.index.entry_user[e])]
    (plain / "records" / "c" / "1" / "2").unlink()
    problems = check(plain).problems
    assert [(p.array, p.round, p.user, p.chunk, p.kind) for p in problems] == [
        ("records", t, u, 2, "missing")]


# ---------------------------------------------------------------------- Icechunk objects


def _damage_each(copy: Callable[[str, str], Path], name: str,
                 damage: Callable[[Path], None], files: list[str]) -> Iterator[tuple[str, Path]]:
    for i, rel in enumerate(files):
        archive = copy(name, f"-{i}")
        damage(archive / rel)
        yield rel, archive


@pytest.mark.parametrize("name", ["acc", "full", "lattice"])
def test_deleted_objects(archives: dict[str, Path], copy, name: str) -> None:
    """Deleting any chunk or manifest object: verify reports it (or open refuses the
    archive), and reads either raise DamagedArchiveError or give the intact answers."""
    intact = answers(archives[name])
    escaped = []  # reads that let Icechunk's own error through instead of refusing
    for rel, archive in _damage_each(copy, name, Path.unlink, objects(archives[name])):
        try:
            report = check(archive)
        except DamagedArchiveError:
            result = cli("verify", archive)
            assert result.exit_code == 1, (rel, result.stdout)
            assert "result: DAMAGED" in result.stdout
            continue
        except icechunk.IcechunkError:
            escaped.append(f"open: {rel}")
            assert cli("verify", archive).exit_code == 1, rel
            continue
        assert not report.ok, rel
        try:
            got = answers(archive)
        except icechunk.IcechunkError:
            escaped.append(f"read: {rel}")
            continue
        assert_same_or_refused(got, intact, rel)
        shutil.rmtree(archive)
    assert not escaped, f"IcechunkError instead of DamagedArchiveError: {escaped}"


@pytest.mark.parametrize("name", ["acc", "full", "lattice"])
def test_flipped_chunk_objects(archives: dict[str, Path], copy, name: str) -> None:
    """A damaged chunk object is corrupt: refused at open (index tables) or reported by
    verify, and reads never give a different model."""
    intact = answers(archives[name])
    chunks = [f for f in objects(archives[name]) if f.startswith("chunks")]
    assert chunks
    for rel, archive in _damage_each(copy, name, flip_bytes, chunks):
        try:
            report = check(archive)
        except DamagedArchiveError:
            continue
        assert any(p.kind == "corrupt" for p in report.problems), (rel, report.problems)
        assert_same_or_refused(answers(archive), intact, rel)
        shutil.rmtree(archive)


def test_garbage_is_a_note(copy) -> None:
    """Chunks an interrupted write left behind are garbage: a note, not damage."""
    archive = copy("acc")
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(archive)))
    session = repo.writable_session("main")
    group = zarr.open_group(session.store, mode="r+")
    group["acc"][0, :] = np.random.default_rng(1).normal(size=group["acc"].shape[1])
    del group, session  # never committed
    report = check(archive)
    assert report.ok, report.problems
    assert len(report.notes) == 1 and report.notes[0].startswith("garbage: 1 object(s)")


# ---------------------------------------------------------------------- plain exports


def _chunk_files(plain: Path) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for p in plain.rglob("*"):
        if p.is_file() and p.name != "zarr.json":
            array, _, coords = str(p.relative_to(plain)).partition("/c/")
            out.append((str(p.relative_to(plain)), array,
                        tuple(int(x) for x in coords.split("/"))))
    return sorted(out)


def _need(store: medustore.UpdateStore, array: str, lead: tuple[int, ...]) -> tuple[
        Callable[[], Any], int | None, Any]:
    """A read that needs the chunk of ``array`` at ``lead``, and its round and user."""
    idx = store.index
    if array == "records":
        e = int(np.flatnonzero(idx.entry_record == lead[0])[0])
        user = idx.users[int(idx.entry_user[e])]
        t = int(idx.rounds[idx.entry_rows()[e]])
        return lambda: store.unlearn(user, exact_accumulator=False), t, user
    if array == "aggregate":
        return lambda: store.reader.aggregate(lead[0]), int(idx.rounds[lead[0]]), None
    if array == "acc":
        user = idx.users[lead[0]]
        return lambda: store.unlearn(user, exact_accumulator=True), None, user
    if array == "model":
        return store.latest, idx.last_round, None
    return store.initial, None, None


def test_plain_export_deleted_chunks(archives: dict[str, Path], copy) -> None:
    """Each chunk file of a plain export, deleted in turn: the reads that need it raise,
    verify names it as missing. Opening reads the per-round tables and round 0's rows
    (each index table's only chunk here): a missing one is refused at open; a missing
    user-run chunk by the first lookup, and verify reports it."""
    seen = set()
    for i, (rel, array, coords) in enumerate(_chunk_files(archives["plain"])):
        archive = copy("plain", f"-{i}")
        (archive / rel).unlink()
        seen.add(array)
        if array in ("rounds", "round_facts", "links", "entries", "entry_facts", "users"):
            with pytest.raises(DamagedArchiveError, match=array):
                medustore.open(archive)
            continue
        if array == "postings":
            with medustore.open(archive) as store:
                with pytest.raises(DamagedArchiveError, match="user index"):
                    store.unlearn(USERS[0])  # takes part in every round: in every run
                assert not verify(store, progress=False).ok
            continue
        lead, chunk = coords[:-1], coords[-1]
        with medustore.open(archive) as store, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read, t, u = _need(store, array, lead)
            with pytest.raises(DamagedArchiveError, match=f"array {array}"):
                read()
            problems = verify(store, progress=False).problems
        assert [(p.kind, p.array, p.round, p.user, p.chunk) for p in problems] == [
            ("missing", array, t, u, chunk)], rel
        shutil.rmtree(archive)
    assert seen == {"records", "aggregate", "initial", "model", "acc", "rounds",
                    "round_facts", "links", "entries", "entry_facts", "users", "postings"}


def test_zipped_export_with_folder_entries(archives: dict[str, Path], tmp_path: Path) -> None:
    """``zip -r`` puts the archive in a top folder and adds an entry per folder."""
    plain = archives["plain"]
    archive = tmp_path / "plain.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(plain.rglob("*")):
            name = f"top/{p.relative_to(plain)}"
            if p.is_dir():
                zf.writestr(f"{name}/", b"")
            else:
                zf.write(p, name)
    report = check(archive)
    assert report.ok and report.notes == [], (report.problems, report.notes)
    assert report.records == check(plain).records > 0


def test_plain_export_leftovers_are_notes(copy) -> None:
    archive = copy("plain")
    (archive / "records" / "c" / "99").mkdir()
    shutil.copyfile(archive / "records" / "c" / "0" / "0",
                    archive / "records" / "c" / "99" / "0")
    (archive / "stray").mkdir()
    (archive / "stray" / "zarr.json").write_text("{}")
    report = check(archive)
    assert report.ok, report.problems
    assert any(n.startswith("records: 1 chunk(s) beyond the archive's counts")
               for n in report.notes)
    assert any("outside the archive's declared arrays: stray" in n for n in report.notes)

    (archive / "records" / "junk").write_bytes(b"x")
    problems = check(archive).problems
    assert [(p.kind, p.array) for p in problems] == [("unexpected", "records")]


def test_plain_export_swapped_record(archives: dict[str, Path], tmp_path: Path) -> None:
    """A valid chunk in the wrong place decodes: the index (nbytes, dnorm) catches it.

    Lossless records: a lossy record's norm is only known within its coding noise, so a
    swap between two records of about the same norm can pass there."""
    archive = export(archives["full"], tmp_path / "full-plain")
    shutil.copyfile(archive / "records" / "c" / "0" / "0", archive / "records" / "c" / "1"
                    / "0")
    with medustore.open(archive) as store:
        e = int(np.flatnonzero(store.index.entry_record == 1)[0])
        where = (int(store.index.rounds[store.index.entry_rows()[e]]),
                 store.index.users[int(store.index.entry_user[e])])
    result = cli("verify", archive, "--json")
    assert result.exit_code == 1
    problems = json.loads(result.stdout)["problems"]
    assert [(p["round"], p["user"], p["array"], p["kind"]) for p in problems] == [
        (*where, "records", "mismatch")]


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_cli_names_the_damaged_record(copy, damage: str) -> None:
    archive = copy("plain")
    with medustore.open(archive) as store:
        col = store.index.column("mallory")
        e = int(np.flatnonzero((store.index.entry_user == col)
                               & (store.index.entry_record >= 0))[0])
        rec, t = int(store.index.entry_record[e]), int(store.index.rounds[
            store.index.entry_rows()[e]])
    path = archive / "records" / "c" / str(rec) / "0"
    if damage == "flip":
        flip_bytes(path)
    else:
        path.unlink()
    result = cli("verify", archive)
    assert result.exit_code == 1
    line = next(x for x in result.stdout.splitlines() if f"round {t}, user mallory" in x)
    assert ("corrupt" if damage == "flip" else "missing") in line
    assert "result: DAMAGED (1 problem)" in result.stdout
    data = json.loads(cli("verify", archive, "--json").stdout)
    assert data["ok"] is False
    assert {(p["round"], p["user"], p["array"]) for p in data["problems"]} == {
        (t, "mallory", "records")}


# ---------------------------------------------------------------------- metadata edits


def _edit(archive: Path, change: Callable[[zarr.Group], None]) -> None:
    """Change the archive through zarr in a new Icechunk commit (outside medustore)."""
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(archive)))
    session = repo.writable_session("main")
    change(zarr.open_group(session.store, mode="r+"))
    session.commit("edited outside medustore")


def _rename_user(group: zarr.Group) -> None:
    group["users"][1] = json.dumps("eve")


def _edit_attr(path: tuple[str, ...], value: Any) -> Callable[[zarr.Group], None]:
    def change(group: zarr.Group) -> None:
        meta = json.loads(json.dumps(group.attrs["medustore"]))
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        group.attrs["medustore"] = meta

    return change


def _reweigh_last_entry(group: zarr.Group) -> None:
    facts = group["entry_facts"]
    facts[-1, 0] = facts[-1, 0] * 2.0


def test_edited_round_is_refused_by_reads_and_verify(copy) -> None:
    # A reader checks a round's participations against that round's link when it first
    # reads them: an edit of the last round opens, is refused there, and verify reports it.
    archive = copy("medu")
    _edit(archive, _reweigh_last_entry)
    with medustore.open(archive) as store:
        store.latest()  # reads that need no participation rows still work
        for read in (lambda: store.error_budget(USERS[0]), lambda: store.unlearn(USERS[0]),
                     lambda: store.side("weight")):
            with pytest.raises(DamagedArchiveError, match="link"):
                read()
    result = cli("verify", archive)
    assert result.exit_code == 1
    assert "result: DAMAGED (1 problem)" in result.stdout and "link" in result.stdout
    data = json.loads(cli("verify", archive, "--json").stdout)
    assert [(p["kind"], p["array"]) for p in data["problems"]] == [("invalid", "archive")]


@pytest.mark.parametrize("change", [
    _rename_user,
    _edit_attr(("layout", "tensors", 0, "name"), "renamed.weight"),
    _edit_attr(("policy", "bits"), 2.0),
    _edit_attr(("policy", "kappa"), 0.5),
], ids=["users", "layout", "policy-bits", "policy-kappa"])
def test_edited_index_is_refused(copy, change: Callable[[zarr.Group], None]) -> None:
    archive = copy("medu")
    _edit(archive, change)
    with pytest.raises(DamagedArchiveError, match="digest"):
        medustore.open(archive)
    result = cli("verify", archive)
    assert result.exit_code == 1
    assert "result: DAMAGED (1 problem)" in result.stdout and "digest" in result.stdout
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERROR + "damaged archive")
    data = json.loads(cli("verify", archive, "--json").stdout)
    assert data["ok"] is False
    assert [(p["kind"], p["array"]) for p in data["problems"]] == [("invalid", "archive")]


def test_edited_counts_are_refused(copy) -> None:
    archive = copy("lattice")
    _edit(archive, _edit_attr(("counts", "entry"), 2))
    with pytest.raises(DamagedArchiveError, match="entries"):
        medustore.open(archive)
    assert cli("verify", archive).exit_code == 1
