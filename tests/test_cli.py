"""The ``medustore`` commands inspect, unlearn, export and verify: in-process (click's
CliRunner) and as real subprocesses (``python -m medustore``), on small format-2 archives
built here. The checks of `medustore.verify` itself live in test_verify.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner, Result
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import medustore
from medustore import replay
from medustore.archive.export import export
from medustore.cli import main
from medustore.cli._common import (
    EXIT_INCOMPLETE,
    EXIT_NOT_ARCHIVE,
    EXIT_USAGE,
    EXIT_VERSION_NOT_KEPT,
    parse_storage_options,
)
from medustore.cli.unlearn import read_weights

PRESETS = ("full", "lattice", "medu")
USERS = [0, 1, 2, 3, "mallory"]
ROUNDS = [0, 1, 3, 4]  # round 2 skipped on purpose: rows and rounds differ
ERROR = "medustore: error: "
FORMAT1_ZIP = Path(__file__).parent / "fixtures" / "format1" / "format1-archive.zip"
#: Keeps every round's version, so that --as-of-round finds them.
KEEP_ALL = medustore.Retention(keep_versions=len(ROUNDS) + 1)

INSPECT_KEYS = {
    "archive", "format", "medustore_version", "versions", "model", "rounds", "users",
    "records", "policy", "codecs", "accumulators", "bytes", "bits_per_stored_param",
    "bits_per_history_param", "ratio_vs_float32", "unlearning_error", "per_round", "per_user",
}
UNLEARN_KEYS = {"archive", "as_of_round", "users", "rounds", "alpha", "output", "method",
                "budget", "complete"}


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"layer.weight": rng.normal(size=(8, 12)).astype(np.float32),
            "layer.bias": rng.normal(size=12).astype(np.float32)}


def build(location: Path | str, policy: str, users: list = USERS, seed: int = 0,
          accumulators: bool = False) -> Path | str:
    """A 4-round archive; ``mallory`` (when present) sends large updates in rounds 1 and 3."""
    rng = np.random.default_rng(seed)
    model = _model(rng)
    with medustore.open(location, "w", model=model, policy=policy, accumulators=accumulators,
                        retention=KEEP_ALL) as store:
        for i, t in enumerate(ROUNDS):
            taking_part = [u for j, u in enumerate(users) if (i + j) % 4 != 3
                           or u == "mallory" and t in (1, 3)]
            updates = {u: {k: (rng.normal(size=v.shape) * (5.0 if u == "mallory" else 1.0))
                           .astype(np.float32) for k, v in model.items()} for u in taking_part}
            weights = {u: float(rng.integers(10, 100)) for u in taking_part}
            store.record_round(t, updates, weights=weights)
    return location


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archives")
    made = {p: build(root / p, p, seed=i) for i, p in enumerate(PRESETS)}
    made["str_ids"] = build(root / "str_ids", "full", users=["3", "alice", "bob"], seed=7)
    made["acc"] = build(root / "acc", "medu", seed=8, accumulators=True)
    return made


@pytest.fixture(scope="module")
def exported(archives: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
             ) -> dict[str, Path]:
    """Plain snapshots of the lattice archive: a directory, a zip, and a ``zip -r`` zip."""
    root = tmp_path_factory.mktemp("exports")
    out = {"dir": export(archives["lattice"], root / "snap"),
           "zip": export(archives["lattice"], root / "snap.zip")}
    out["zip_r"] = zip_r(out["dir"], root / "zip_r.zip")
    return out


def zip_r(folder: Path, dest: Path) -> Path:
    """What ``cd parent && zip -r dest folder`` writes: entries prefixed by the folder's
    name, directory entries included."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(folder, folder.name + "/")
        for path in sorted(folder.rglob("*")):
            zf.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}"
                     + ("/" if path.is_dir() else ""))
    return dest


def cli(*args: object) -> Result:
    """Run the command in-process; any exception other than an exit is a test failure."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def assert_error(result: Result | subprocess.CompletedProcess, code: int) -> str:
    """The command failed with ``code`` and exactly one error line on stderr."""
    rc = result.exit_code if isinstance(result, Result) else result.returncode
    err = result.stderr
    assert rc == code, (rc, result.stdout, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR), err
    assert "Traceback" not in err
    return lines[0]


def expected_unlearn(archive: Path, users: list, **kw: object) -> dict[str, np.ndarray]:
    as_of = kw.pop("as_of_round", None)
    with medustore.open(archive, as_of_round=as_of) as store, warnings.catch_warnings():
        warnings.simplefilter("ignore", medustore.IncompleteUnlearningWarning)
        return store.unlearn(users, out="numpy", **kw)


def assert_weights(path: Path, want: dict[str, np.ndarray]) -> None:
    got = read_weights(str(path))
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])


def all_records(location: Path | str) -> np.ndarray:
    """Every stored record of an archive, decoded, in record order."""
    with medustore.open(location) as store:
        n = store.index.n_records
        return np.stack([store.reader.record(i) for i in range(n)])


def raw_keys(location: Path | str) -> dict[str, bytes]:
    """Every key of an archive's current version and its stored (coded) bytes."""
    with medustore.open(location) as store:
        arr = store.reader.arrays["model"]
        src, prefix = arr.store, arr.path[: -len("model")]

        async def read() -> dict[str, bytes]:
            proto = default_buffer_prototype()
            keys = [k async for k in src.list() if k.startswith(prefix) and not
                    k.endswith("/")]
            return {k[len(prefix):]: (await src.get(k, prototype=proto)).to_bytes()
                    for k in keys}

        return sync(read())


def record_path(snapshot: Path, round: int, user: object) -> Path:
    """The chunk file of a stored record in an exported directory."""
    with medustore.open(snapshot) as store:
        idx = store.index
        e = idx.entry(idx.row(round), idx.column(user))
        assert e is not None and idx.entry_record[e] >= 0
        return snapshot / "records" / "c" / str(int(idx.entry_record[e])) / "0"


def stored_pair(archive: Path, user: object = "mallory") -> tuple[int, object]:
    """A (round, user) whose record is stored."""
    with medustore.open(archive) as store:
        col = store.index.column(user)
        for row, t in store.iter_rows():
            e = store.index.entry(row, col)
            if e is not None and store.index.entry_record[e] >= 0:
                return t, user
    raise AssertionError(f"no stored record of {user!r}")


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 16):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------- inspect


@pytest.mark.parametrize("preset", PRESETS)
def test_inspect_text(archives: dict[str, Path], preset: str) -> None:
    result = cli("inspect", archives[preset])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    keys = [line.split(" : ")[0].strip() for line in lines]
    for key in ("Format", "Storage", "Version", "Versions kept", "Model", "Rounds", "Users",
                "Records", "Policy", "Record codec", "Aggregate codec", "Bytes stored",
                "Bits/stored param", "Float32 history", "Ratio vs float32",
                "Unlearning error"):
        assert key in keys, result.stdout
    assert len({line.index(" : ") for line in lines}) == 1  # aligned
    text = result.stdout
    assert "Format             : 2 " in text
    assert "Storage            : icechunk repository" in text
    assert "Versions kept      : 4: after rounds 0, 1, 3, 4" in text
    assert "2 tensors, 108 parameters" in text
    assert "Rounds             : 4 (0..4)" in text
    assert medustore.PRESETS[preset].describe() in text


def test_inspect_tables_and_top(archives: dict[str, Path]) -> None:
    result = cli("inspect", archives["lattice"], "--rounds", "--users")
    assert result.exit_code == 0
    rounds_table = result.stdout.split("\n\n")[1].splitlines()
    assert rounds_table[0].split() == ["round", "participants", "stored", "bytes", "bits/param"]
    assert [r.split()[0] for r in rounds_table[2:]] == [str(t) for t in ROUNDS]
    users_table = result.stdout.split("\n\n")[2].splitlines()
    with medustore.open(archives["lattice"]) as store:
        assert [r.split()[0] for r in users_table[2:]] == [str(u) for u in store.users]

    top = cli("inspect", archives["lattice"], "--top", "2")
    tables = top.stdout.split("\n\n")[1:]
    assert len(tables) == 2 and all(len(t.splitlines()) == 4 for t in tables)
    sizes = [int(r.split()[3].replace(",", "")) for r in tables[0].splitlines()[2:]]
    assert sizes == sorted(sizes, reverse=True)


def _as_json(obj: object) -> object:
    return json.loads(json.dumps(obj))


@pytest.mark.parametrize("preset", PRESETS)
def test_inspect_json(archives: dict[str, Path], preset: str) -> None:
    result = cli("inspect", archives[preset], "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # nothing but the document on stdout
    assert set(data) == INSPECT_KEYS
    assert data["format"] == medustore.FORMAT_VERSION == 2
    with medustore.open(archives[preset]) as store:
        idx = store.index
        assert data["versions"] == {"storage": "icechunk repository",
                                    "snapshot": store.snapshot_id, "as_of_round": None,
                                    "kept": ROUNDS}
        assert data["rounds"] == {"count": 4, "first": 0, "last": 4}
        assert data["users"] == {"count": len(USERS)}
        assert data["records"] == {"stored": idx.n_records, "participations": idx.n_entries}
        assert data["model"]["params"] == store.layout.size == 108
        assert data["model"]["chunk_params"] == idx.settings.chunk
        assert data["bytes"]["stored"] == store.nbytes_stored()
        assert data["bytes"]["records"] == sum(store.nbytes_by_round().values())
        assert data["bytes"]["float32_history"] == data["records"]["participations"] * 108 * 4
        assert data["ratio_vs_float32"] == pytest.approx(
            data["bytes"]["float32_history"] / data["bytes"]["stored"])
        assert data["policy"]["description"] == store.policy.describe()
        arrays = store.reader.arrays
        assert data["codecs"]["records"] == _as_json(
            arrays["records"].metadata.to_dict()["codecs"])
        assert data["codecs"]["aggregate"] == _as_json(
            arrays["aggregate"].metadata.to_dict()["codecs"])
        bounds = [replay.error_budget(store, [u]).bound() for u in store.users]
        assert data["unlearning_error"]["median"] == pytest.approx(float(np.median(bounds)))
        assert data["unlearning_error"]["max"] == pytest.approx(max(bounds))
        assert [r["round"] for r in data["per_round"]] == ROUNDS
        assert [r["bytes"] for r in data["per_round"]] == list(store.nbytes_by_round().values())
        assert [u["user"] for u in data["per_user"]] == store.users  # ids keep their type
        assert [u["bytes"] for u in data["per_user"]] == list(store.nbytes_by_user().values())
        assert [u["rounds"] for u in data["per_user"]] == [
            len(store.participation(u)) for u in store.users]
        assert [(u["first"], u["last"]) for u in data["per_user"]] == [
            (store.participation(u)[0], store.participation(u)[-1]) for u in store.users]
        assert sorted(store.users, key=str) == sorted(USERS, key=str)
    if preset == "full":
        assert data["unlearning_error"]["max"] == 0.0


def test_inspect_json_top(archives: dict[str, Path]) -> None:
    data = json.loads(cli("inspect", archives["medu"], "--json", "--top", "1").stdout)
    assert set(data) == INSPECT_KEYS
    assert len(data["per_round"]) == len(data["per_user"]) == 1


def test_inspect_as_of_round(archives: dict[str, Path]) -> None:
    result = cli("inspect", archives["lattice"], "--as-of-round", "1", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    with medustore.open(archives["lattice"], as_of_round=1) as store:
        assert data["versions"]["snapshot"] == store.snapshot_id
        assert data["records"]["stored"] == store.index.n_records
    assert data["versions"]["as_of_round"] == 1 and data["versions"]["kept"] == ROUNDS
    assert data["rounds"] == {"count": 2, "first": 0, "last": 1}
    text = cli("inspect", archives["lattice"], "--as-of-round", "1").stdout
    assert "Version            : as of round 1 (snapshot " in text
    assert "Rounds             : 2 (0..1)" in text


def test_inspect_memory_archive() -> None:
    """``memory://`` archives live in this process: the in-process command reads them."""
    location = build("memory://test-cli-inspect", "full", seed=3)
    data = json.loads(cli("inspect", location, "--json").stdout)
    assert data["archive"] == location and data["rounds"]["count"] == 4


# ---------------------------------------------------------------------- inspect a folder


@pytest.fixture(scope="module")
def results_folder(archives: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                   ) -> Path:
    """A folder like the one ``medustore demo --out DIR`` writes (full.zarr,
    compressed.zarr), plus an exported zip, a format-1 archive and things that are no
    archive (a file, a plain zarr group, an empty folder)."""
    root = tmp_path_factory.mktemp("results")
    shutil.copytree(archives["full"], root / "full.zarr")
    shutil.copytree(archives["medu"], root / "compressed.zarr")
    export(archives["lattice"], root / "snap.zip")
    with zipfile.ZipFile(FORMAT1_ZIP) as zf:
        zf.extractall(root / "old")
    (root / "results.json").write_text("{}")
    zarr.open_group(root / "group.zarr", mode="w")
    (root / "empty").mkdir()
    return root


def test_inspect_folder_lists_archives(results_folder: Path) -> None:
    result = cli("inspect", results_folder)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    text = result.stdout
    assert text.startswith(f"{results_folder} is a folder, not an archive; it holds 4 archives")
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("archive "))
    assert lines[header].split() == ["archive", "format", "storage", "rounds", "users",
                                     "bytes", "note"]
    rows = {line.split()[0]: line for line in lines[header + 2:] if line.strip()
            and not line.startswith("Inspect")}
    assert list(rows) == ["compressed.zarr", "full.zarr", "old", "snap.zip"]  # by name
    for name in ("compressed.zarr", "full.zarr"):
        assert rows[name].split()[1:6] == ["2", "icechunk", "repository", "4", "(0..4)"]
        assert rows[name].split()[6] == str(len(USERS))
    assert "plain zarr snapshot" in rows["snap.zip"]
    assert rows["old"].split()[1] == "1" and "medustore upgrade" in rows["old"]
    assert f"medustore inspect {results_folder / 'compressed.zarr'}" in text


def test_inspect_folder_json(results_folder: Path) -> None:
    result = cli("inspect", results_folder, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"folder", "archives"} and data["folder"] == str(results_folder)
    entries = {e["name"]: e for e in data["archives"]}
    assert list(entries) == ["compressed.zarr", "full.zarr", "old", "snap.zip"]
    for name in ("compressed.zarr", "full.zarr", "snap.zip"):
        e = entries[name]
        with medustore.open(results_folder / name) as store:
            assert e == {"name": name, "path": str(results_folder / name), "format": 2,
                         "storage": "plain zarr snapshot" if name.endswith(".zip")
                         else "icechunk repository",
                         "rounds": len(store.rounds), "first": store.rounds[0],
                         "last": store.rounds[-1], "users": len(store.users),
                         "bytes": store.nbytes_stored(), "problem": None}
    assert entries["old"]["format"] == 1 and entries["old"]["rounds"] is None
    assert "medustore upgrade" in entries["old"]["problem"]


def test_inspect_folder_lists_damaged_archives(archives: dict[str, Path],
                                               tmp_path: Path) -> None:
    shutil.copytree(archives["full"], tmp_path / "good.zarr")
    shutil.copytree(archives["lattice"], tmp_path / "broken.zarr")
    for path in (tmp_path / "broken.zarr" / "manifests").iterdir():
        path.unlink()
    result = cli("inspect", tmp_path)
    assert result.exit_code == 0, result.stderr
    broken = next(line for line in result.stdout.splitlines()
                  if line.startswith("broken.zarr"))
    assert "damaged archive" in broken and "medustore verify" in broken
    assert "context:" not in broken  # no Icechunk span trace
    data = json.loads(cli("inspect", tmp_path, "--json").stdout)
    assert [e["name"] for e in data["archives"]] == ["broken.zarr", "good.zarr"]
    assert data["archives"][1]["problem"] is None


def test_inspect_folder_without_archives(tmp_path: Path) -> None:
    """The old one-line error, exit 3, when the folder holds no archive."""
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    zarr.open_group(tmp_path / "group.zarr", mode="w")
    zarr.create_array(tmp_path / "array.zarr", shape=(3,), dtype="f4")
    (tmp_path / "fake.zip").write_bytes(b"PK not really")
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in ([], ["--json"]):
        line = assert_error(cli("inspect", tmp_path, *args), EXIT_NOT_ARCHIVE)
        assert line == f"{ERROR}no medustore archive at {tmp_path}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created


def test_inspect_folder_as_of_round_names_the_archives(results_folder: Path) -> None:
    line = assert_error(cli("inspect", results_folder, "--as-of-round", "1"),
                        EXIT_NOT_ARCHIVE)
    assert "compressed.zarr, full.zarr, old, snap.zip" in line and "--as-of-round" in line


# ---------------------------------------------------------------------- unlearn


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_unlearn_writes_weights(archives: dict[str, Path], tmp_path: Path, preset: str,
                                suffix: str) -> None:
    out = tmp_path / f"w{suffix}"
    result = cli("unlearn", archives[preset], "--user", "mallory", "--user", "1", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert_weights(out, expected_unlearn(archives[preset], ["mallory", 1]))
    if suffix == ".npz":
        with np.load(out, allow_pickle=False) as data:
            assert sorted(data.files) == sorted(read_weights(str(out)))
    for key in ("Method", "Error budget", "Output"):
        assert f"\n{key} " in "\n" + result.stdout


def test_unlearn_presents_the_plan(archives: dict[str, Path], tmp_path: Path) -> None:
    """Method and budget are the replay's own `Plan`, not re-derived by the command."""
    for name, users in (("lattice", ["mallory"]), ("acc", [0]), ("acc", [0, 1])):
        data = json.loads(cli("unlearn", archives[name], *[f"-u{u}" for u in users], "-o",
                              tmp_path / "w.npz", "--json").stdout)
        with medustore.open(archives[name]) as store:
            p = replay.plan(store, users)
        assert data["method"] == p.method
        assert {k: data["budget"][k] for k in p.budget.to_json()} == pytest.approx(
            p.budget.to_json())
        assert data["rounds"]["count"] == len(p.rows)
        assert data["users"] == list(p.users)


def test_unlearn_window_alpha_json(archives: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    result = cli("unlearn", archives["lattice"], "-u", "2", "--rounds", "1:4",
                 "--alpha", "0.1", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == UNLEARN_KEYS
    assert data["users"] == [2] and data["alpha"] == 0.1 and data["method"] == "replay"
    assert data["rounds"]["window"] == "1:4" and data["rounds"]["count"] == 2
    assert data["as_of_round"] is None
    with medustore.open(archives["lattice"]) as store:
        budget = store.error_budget([2], rounds="1:4", alpha=0.1).to_json()
    assert {k: data["budget"][k] for k in budget} == pytest.approx(budget)
    assert_weights(out, expected_unlearn(archives["lattice"], [2], rounds="1:4", alpha=0.1))


def test_unlearn_as_of_round(archives: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    result = cli("unlearn", archives["lattice"], "-u", "mallory", "--as-of-round", "1",
                 "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["as_of_round"] == 1 and data["rounds"]["last"] == 1
    want = expected_unlearn(archives["lattice"], ["mallory"], as_of_round=1)
    assert_weights(out, want)
    latest = expected_unlearn(archives["lattice"], ["mallory"])
    assert any(not np.array_equal(want[k], latest[k]) for k in want)
    text = cli("unlearn", archives["lattice"], "-u", "mallory", "--as-of-round", "1", "-o",
               out).stdout
    assert "Version      : as of round 1" in text


def test_unlearn_reports_missing_records(archives: dict[str, Path], tmp_path: Path) -> None:
    with medustore.open(archives["medu"]) as store:
        budget = store.error_budget([0])
    assert budget.records_missing > 0  # medu keeps few users per round
    result = cli("unlearn", archives["medu"], "-u", "0", "-o", tmp_path / "w.npz", "--json")
    assert result.exit_code == 0
    warning = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("medustore: warning: ")
    assert f"{budget.records_missing} participation(s)" in warning[0]
    assert "not stored" in warning[0] and f"{budget.deterministic:.4g}" in warning[0]
    data = json.loads(result.stdout)
    assert data["complete"] is False
    assert data["budget"]["records_missing"] == budget.records_missing
    assert [tuple(m) for m in data["budget"]["missing"]] == list(budget.missing)


def test_unlearn_summary_says_approximate(archives: dict[str, Path], tmp_path: Path) -> None:
    """Without --strict the summary itself says how many participations were not stored
    and that the weights are approximate within the budget (not only the warning)."""
    with medustore.open(archives["medu"]) as store:
        budget = store.error_budget([0])
    result = cli("unlearn", archives["medu"], "-u", "0", "-o", tmp_path / "w.npz")
    assert result.exit_code == 0, result.stderr
    summary = {k.strip(): v for k, v in (line.split(" : ", 1)
                                         for line in result.stdout.splitlines())}
    missing, total = budget.records_missing, budget.records_missing + budget.records_used
    assert summary["Records"] == (f"{budget.records_used} used, {missing} "
                                       "participation(s) not stored by the policy (listed "
                                       "in the warning above)")
    result_line = summary["Result"]
    assert result_line.startswith(f"APPROXIMATE: {missing} of {total} participation(s)")
    assert "not stored by the policy (medu)" in result_line
    assert f"within the error budget, {budget.bound(3.0):.4g} (L2)" in result_line
    assert "--strict" in result_line

    exact = cli("unlearn", archives["full"], "-u", "mallory", "-o", tmp_path / "f.npz")
    assert "Result       : exact (every record used is stored losslessly)" in exact.stdout
    lossy = cli("unlearn", archives["lattice"], "-u", "mallory", "-o", tmp_path / "l.npz")
    assert "Result       : approximate: the records are lossy-coded" in lossy.stdout
    assert "APPROXIMATE" not in lossy.stdout and lossy.stderr == ""
    acc = cli("unlearn", archives["acc"], "-u", "0", "-o", tmp_path / "a.npz")
    assert "Result       : exact (the per-user accumulator)" in acc.stdout


@pytest.mark.parametrize("as_json", [False, True])
def test_unlearn_strict_refuses_missing_records(archives: dict[str, Path], tmp_path: Path,
                                                as_json: bool) -> None:
    with medustore.open(archives["medu"]) as store:
        budget = store.error_budget([0])
    assert budget.records_missing > 0
    out = tmp_path / "w.safetensors"
    result = cli("unlearn", archives["medu"], "-u", "0", "-o", out, "--strict",
                 *(["--json"] if as_json else []))
    line = assert_error(result, EXIT_INCOMPLETE)  # one line: no warning besides it
    assert EXIT_INCOMPLETE == 7
    assert result.stdout == ""
    assert f"--strict: {budget.records_missing} participation(s)" in line
    assert "not stored by the archive's policy (medu)" in line and "nothing was written" in line
    assert f"{budget.bound(3.0):.4g}" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []  # not even a temporary file


def test_unlearn_strict_passes_complete_answers(archives: dict[str, Path],
                                                tmp_path: Path) -> None:
    """--strict refuses only records the policy did not store: lossless, lattice-coded and
    accumulator answers, and a window where the user's records are all stored, pass."""
    cases = [("full", ["-u", "mallory"]), ("lattice", ["-u", "mallory"]),
             ("acc", ["-u", "0"])]
    with medustore.open(archives["medu"]) as store:
        stored = [(u, t) for u in store.users for t in store.participation(u)
                  if store.error_budget([u], rounds=(t, t + 1)).records_missing == 0]
    assert stored, "medu keeps some record"
    u, t = stored[0]
    cases.append(("medu", ["-u", str(u), "--rounds", f"{t}:{t + 1}"]))
    for name, args in cases:
        out = tmp_path / f"{name}.npz"
        result = cli("unlearn", archives[name], *args, "-o", out, "--strict", "--json")
        assert result.exit_code == 0, (name, result.stderr)
        assert json.loads(result.stdout)["complete"] is True
        assert out.exists()


def test_unlearn_exact_accumulator(archives: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "w.npz"
    result = cli("unlearn", archives["acc"], "-u", "0", "-o", out, "--json")
    assert result.exit_code == 0 and result.stderr == ""
    data = json.loads(result.stdout)
    assert data["method"] == "accumulator" and data["budget"]["exact"] is True
    assert data["complete"] is True
    assert_weights(out, expected_unlearn(archives["acc"], [0]))
    text = cli("unlearn", archives["acc"], "-u", "0", "-o", out).stdout
    assert "exact per-user accumulator" in text


def test_user_ids_int_or_str(archives: dict[str, Path], tmp_path: Path) -> None:
    ints = json.loads(cli("unlearn", archives["full"], "-u", "3", "-o", tmp_path / "a.npz",
                          "--json").stdout)
    assert ints["users"] == [3]
    strs = json.loads(cli("unlearn", archives["str_ids"], "-u", "3", "-o",
                          tmp_path / "b.npz", "--json").stdout)
    assert strs["users"] == ["3"]
    assert_weights(tmp_path / "b.npz", expected_unlearn(archives["str_ids"], ["3"]))


def test_unlearn_never_pickles(archives: dict[str, Path], tmp_path: Path) -> None:
    for name in ("w.pt", "w.pkl", "w"):
        result = cli("unlearn", archives["full"], "-u", "1", "-o", tmp_path / name)
        assert "must end in .safetensors or .npz" in assert_error(result, 2)
        assert not (tmp_path / name).exists()


# ---------------------------------------------------------------------- export


def test_export_directory(archives: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "snap"
    result = cli("export", archives["lattice"], out)
    assert result.exit_code == 0, result.stderr
    assert "plain Zarr v3 directory" in result.stdout
    assert (out / "zarr.json").is_file()
    # Byte for byte: the coded chunks are copied, never decoded and coded again.
    source = raw_keys(archives["lattice"])
    assert raw_keys(out) == source
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == set(source)


@pytest.mark.parametrize("kind", ["dir", "zip", "zip_r"])
def test_export_answers_like_the_source(archives: dict[str, Path], exported: dict[str, Path],
                                        kind: str) -> None:
    snap = exported[kind]
    with medustore.open(snap) as copy, medustore.open(archives["lattice"]) as source:
        assert copy.read_only and copy.snapshot_id is None
        assert copy.index.digest == source.index.digest
        assert copy.rounds == source.rounds and copy.users == source.users
        for name, value in source.latest().items():
            np.testing.assert_array_equal(copy.latest()[name], value)
        np.testing.assert_array_equal(copy.unlearn(["mallory", 1], out="flat"),
                                      source.unlearn(["mallory", 1], out="flat"))
        for t in source.rounds:
            np.testing.assert_array_equal(copy.aggregate(t), source.aggregate(t))
    np.testing.assert_array_equal(all_records(snap), all_records(archives["lattice"]))
    with pytest.raises(medustore.ReadOnlyError):
        medustore.open(snap, "r+")


@pytest.mark.parametrize("kind", ["dir", "zip", "zip_r"])
def test_commands_read_exports(archives: dict[str, Path], exported: dict[str, Path],
                               tmp_path: Path, kind: str) -> None:
    data = json.loads(cli("inspect", exported[kind], "--json").stdout)
    assert data["versions"] == {"storage": "plain zarr snapshot", "snapshot": None,
                                "as_of_round": None, "kept": []}
    assert data["rounds"]["count"] == 4
    assert "Storage            : plain zarr snapshot" in cli("inspect", exported[kind]).stdout
    out = tmp_path / "w.npz"
    result = cli("unlearn", exported[kind], "-u", "mallory", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert_weights(out, expected_unlearn(archives["lattice"], ["mallory"]))


@pytest.mark.parametrize("kind", ["dir", "zip", "zip_r"])
def test_exports_keep_one_version(exported: dict[str, Path], kind: str) -> None:
    line = assert_error(cli("inspect", exported[kind], "--as-of-round", "1"),
                        EXIT_VERSION_NOT_KEPT)
    assert "plain Zarr snapshot" in line


def test_export_zip_as_of_round(archives: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r1.zip"
    result = cli("export", archives["lattice"], out, "--as-of-round", "1")
    assert result.exit_code == 0, result.stderr
    assert "as of round 1" in result.stdout and "zip file" in result.stdout
    with zipfile.ZipFile(out) as zf:
        names = zf.namelist()
        assert len(names) == len(set(names))  # every key written once
        assert "zarr.json" in names and all(not n.endswith("/") for n in names)
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}
    with medustore.open(out) as copy:
        assert copy.rounds == [0, 1]
    assert raw_keys(out) == raw_keys_of_version(archives["lattice"], 1)


def raw_keys_of_version(archive: Path, round: int) -> dict[str, bytes]:
    with medustore.open(archive, as_of_round=round) as store:
        src = store.reader.arrays["model"].store

        async def read() -> dict[str, bytes]:
            proto = default_buffer_prototype()
            return {k: (await src.get(k, prototype=proto)).to_bytes()
                    async for k in src.list()}

        return sync(read())


def test_export_refuses_to_overwrite(archives: dict[str, Path], tmp_path: Path) -> None:
    for out in (tmp_path / "snap", tmp_path / "snap.zip"):
        assert cli("export", archives["full"], out).exit_code == 0
        before = raw_keys(out)
        line = assert_error(cli("export", archives["lattice"], out), EXIT_USAGE)
        assert "already exists" in line and "--force" in line
        assert raw_keys(out) == before
        result = cli("export", archives["lattice"], out, "--force")
        assert result.exit_code == 0, result.stderr
        assert raw_keys(out) == raw_keys(archives["lattice"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snap", "snap.zip"]  # no leftovers
    # Never over the source itself, even with --force.
    line = assert_error(cli("export", archives["full"], archives["full"], "--force"),
                        EXIT_USAGE)
    assert "overlaps the source" in line
    with medustore.open(archives["full"]) as store:
        assert store.rounds == ROUNDS
    assert_error(cli("export", archives["full"], tmp_path / "no" / "such" / "snap"),
                 EXIT_USAGE)


def test_export_library_from_open_store(archives: dict[str, Path], tmp_path: Path) -> None:
    with medustore.open(archives["medu"], as_of_round=3) as store:
        path = export(store, tmp_path / "r3")
        with pytest.raises(ValueError, match="open store"):
            export(store, tmp_path / "other", as_of_round=1)
    assert path == tmp_path / "r3"
    assert raw_keys(path) == raw_keys_of_version(archives["medu"], 3)
    with pytest.raises(FileExistsError):
        export(archives["medu"], path)
    with pytest.raises(medustore.VersionNotKeptError):
        export(archives["medu"], tmp_path / "r2", as_of_round=2)
    assert not (tmp_path / "r2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r3"]


def test_export_reads_in_fresh_processes(archives: dict[str, Path], exported: dict[str, Path],
                                         tmp_path: Path) -> None:
    """zarr alone opens the snapshot (the codecs register through entry points), and a fresh
    process decodes the same record bytes as the source."""
    plain = ("import sys, numpy as np, zarr\n"
             "g = zarr.open_group(sys.argv[1], mode='r')\n"
             "np.save(sys.argv[2], g['records'][...])\n"
             "print(sorted(g.array_keys()))\n")
    done = subprocess.run([sys.executable, "-c", plain, str(exported["dir"]),
                           str(tmp_path / "plain.npy")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    with medustore.open(archives["lattice"]) as source:
        # the declared arrays, and the user runs (medustore.archive.postings)
        assert eval(done.stdout) == sorted([*source.reader.arrays, "postings"])  # noqa: S307
    want = all_records(archives["lattice"])
    assert np.load(tmp_path / "plain.npy").tobytes() == want.tobytes()

    lib = ("import sys, numpy as np, medustore\n"
           "with medustore.open(sys.argv[1]) as s:\n"
           "    np.save(sys.argv[2], np.stack([s.reader.record(i)"
           " for i in range(s.index.n_records)]))\n")
    for kind in ("zip", "zip_r"):
        done = subprocess.run([sys.executable, "-c", lib, str(exported[kind]),
                               str(tmp_path / f"{kind}.npy")], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert np.load(tmp_path / f"{kind}.npy").tobytes() == want.tobytes()


# ---------------------------------------------------------------------- versions, options


@pytest.mark.parametrize("command", ["inspect", "unlearn", "export", "verify"])
def test_as_of_round_not_kept(archives: dict[str, Path], tmp_path: Path,
                              command: str) -> None:
    extra = {"unlearn": ["-u", "1", "-o", tmp_path / "w.npz"], "export": [tmp_path / "s"]}
    args = [command, archives["full"], *extra.get(command, []), "--as-of-round", "2"]
    line = assert_error(cli(*args), EXIT_VERSION_NOT_KEPT)
    assert "no version as of round 2" in line and "kept: 0, 1, 3, 4" in line
    assert not (tmp_path / "w.npz").exists() and not (tmp_path / "s").exists()
    assert_error(cli(command, archives["full"], *extra.get(command, []), "--as-of-round",
                     "-1"), EXIT_USAGE)


def test_parse_storage_options() -> None:
    assert parse_storage_options([]) == {}
    assert parse_storage_options(["region=eu-west-1", "endpoint_url=http://h:9000/?a=b",
                                  "anonymous=true", "session_token="]) == {
        "region": "eu-west-1", "endpoint_url": "http://h:9000/?a=b", "anonymous": "true",
        "session_token": ""}
    for bad in (["region"], ["=x"], [" =x"], ["a b=c"], ["region=a", "region=b"]):
        with pytest.raises(ValueError):
            parse_storage_options(bad)


@pytest.mark.parametrize("option", ["region", "=eu", "two words=x", "1x=y"])
def test_storage_option_malformed(archives: dict[str, Path], option: str) -> None:
    for command in ("inspect", "verify"):
        line = assert_error(cli(command, "s3://bucket/run", "--storage-option", option),
                            EXIT_USAGE)
        assert "--storage-option" in line and "KEY=VALUE" in line


def test_storage_option_refused(archives: dict[str, Path], tmp_path: Path) -> None:
    """Keys and values are checked before anything is read (no network here)."""
    line = assert_error(cli("inspect", archives["full"], "--storage-option", "region=x"),
                        EXIT_USAGE)
    assert "s3://" in line
    line = assert_error(cli("inspect", "s3://bucket/run", "--storage-option", "colour=red"),
                        EXIT_USAGE)
    assert "unknown storage option 'colour'" in line
    assert_error(cli("unlearn", "s3://bucket/run", "-u", "1", "-o", tmp_path / "w.npz",
                     "--storage-option", "anonymous=perhaps"), EXIT_USAGE)
    assert_error(cli("export", "s3://bucket/run", tmp_path / "s", "--storage-option",
                     "region=a", "--storage-option", "region=b"), EXIT_USAGE)


# ---------------------------------------------------------------------- verify


@pytest.mark.parametrize("name", ["lattice", "acc"])
def test_verify_clean_exits_0(archives: dict[str, Path], name: str) -> None:
    result = cli("verify", archives[name])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert cli("verify", archives[name], "--json").exit_code == 0


@pytest.mark.parametrize("kind", ["dir", "zip", "zip_r"])
def test_verify_accepts_exports(exported: dict[str, Path], kind: str) -> None:
    result = cli("verify", exported[kind])
    assert result.exit_code == 0, (result.stdout, result.stderr)


# ---------------------------------------------------------------------- errors


def test_error_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    zarr.open_group(tmp_path / "group.zarr", mode="w")
    zarr.create_array(tmp_path / "array.zarr", shape=(3,), dtype="f4")
    commands = (["inspect"], ["verify"], ["unlearn", "-u", "1", "-o", tmp_path / "w.npz"],
                ["export", "_", tmp_path / "snap"])
    for path in ("nowhere", "file.txt", "empty", "group.zarr", "array.zarr"):
        for args in commands:
            rest = [a for a in args[1:] if a != "_"]
            line = assert_error(cli(args[0], tmp_path / path, *rest), EXIT_NOT_ARCHIVE)
            assert str(tmp_path / path) in line or path in line
    assert not (tmp_path / "nowhere").exists()  # reading never creates the path
    assert not (tmp_path / "snap").exists()
    assert_error(cli("inspect", "memory://never-made"), EXIT_NOT_ARCHIVE)


@pytest.mark.parametrize("zipped", [False, True])
def test_error_format1_archive(tmp_path: Path, zipped: bool) -> None:
    if zipped:
        archive = tmp_path / "format1.zip"
        shutil.copyfile(FORMAT1_ZIP, archive)
    else:
        archive = tmp_path / "format1"
        with zipfile.ZipFile(FORMAT1_ZIP) as zf:
            zf.extractall(archive)
    commands = (["inspect"], ["verify"], ["unlearn", "-u", "bob", "-o", tmp_path / "w.npz"],
                ["export", tmp_path / "snap"])
    for args in commands:
        line = assert_error(cli(args[0], archive, *args[1:]), EXIT_NOT_ARCHIVE)
        assert "format-1" in line and "medustore upgrade" in line
    assert not (tmp_path / "w.npz").exists() and not (tmp_path / "snap").exists()


def test_error_unknown_user(archives: dict[str, Path], tmp_path: Path) -> None:
    for user in ("99", "eve", "3.0"):
        line = assert_error(cli("unlearn", archives["full"], "-u", user, "-o",
                                tmp_path / "w.npz"), 4)
        assert f"unknown user {user!r}" in line and "mallory" in line
    assert not (tmp_path / "w.npz").exists()


@pytest.mark.parametrize("window", ["5:3", "abc", "1:2:3", "x:", "100:200"])
def test_error_bad_window(archives: dict[str, Path], tmp_path: Path, window: str) -> None:
    assert_error(cli("unlearn", archives["full"], "-u", "1", "--rounds", window, "-o",
                     tmp_path / "w.npz"), 2)


@pytest.mark.parametrize("args", [
    ["--alpha", "-1"], ["--alpha", "nan"], ["--alpha", "x"], [], ["-u", "1"],
    ["-u", "1", "-o", "/no/such/folder/w.npz"],
])
def test_error_usage(archives: dict[str, Path], tmp_path: Path, args: list[str]) -> None:
    full = ["-u", "1", "-o", tmp_path / "w.npz"] if args[:1] == ["--alpha"] else []
    assert_error(cli("unlearn", archives["full"], *full, *args), 2)
    assert_error(cli("inspect"), 2)  # missing ARCHIVE
    assert_error(cli("inspect", archives["full"], "--top", "0"), 2)
    assert_error(cli("export", archives["full"]), 2)  # missing OUT


def test_error_damaged_chunk(exported: dict[str, Path], tmp_path: Path) -> None:
    """Damage in a plain snapshot (whose chunks are files) is one line, exit 1."""
    snap = tmp_path / "snap"
    shutil.copytree(exported["dir"], snap)
    t, u = stored_pair(snap)
    flip_bytes(record_path(snap, t, u))
    line = assert_error(cli("unlearn", snap, "-u", "mallory", "-o", tmp_path / "w.npz"), 1)
    assert "damaged archive" in line and "medustore verify" in line
    assert f"round {t}" in line
    assert not (tmp_path / "w.npz").exists()
    flip_bytes(snap / "entry_facts" / "c" / "0" / "0")
    assert "damaged archive" in assert_error(cli("inspect", snap), 1)
    (snap / "records" / "zarr.json").unlink()
    for command in ("inspect", "export"):
        args = [tmp_path / "out"] if command == "export" else []
        assert "damaged archive" in assert_error(cli(command, snap, *args), 1)
    assert not (tmp_path / "out").exists()


def test_error_damaged_repository(archives: dict[str, Path], tmp_path: Path) -> None:
    """An Icechunk repository missing its manifests: one line, exit 1, no span trace."""
    archive = tmp_path / "broken"
    shutil.copytree(archives["lattice"], archive)
    for path in (archive / "manifests").iterdir():
        path.unlink()
    for args in (["inspect"], ["unlearn", "-u", "1", "-o", tmp_path / "w.npz"],
                 ["export", tmp_path / "snap"]):
        line = assert_error(cli(args[0], archive, *args[1:]), 1)
        assert "damaged archive" in line and "context:" not in line
    assert not (tmp_path / "snap").exists()


# ---------------------------------------------------------------------- subprocesses


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medustore", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning"})


def test_subprocess_commands(archives: dict[str, Path], tmp_path: Path) -> None:
    inspected = run("inspect", archives["medu"], "--json", "--as-of-round", "3")
    assert inspected.returncode == 0, inspected.stderr
    assert set(json.loads(inspected.stdout)) == INSPECT_KEYS

    out = tmp_path / "w.safetensors"
    unlearned = run("unlearn", archives["medu"], "--user", "mallory", "-o", out)
    assert unlearned.returncode == 0, unlearned.stderr
    assert "Traceback" not in unlearned.stderr
    assert_weights(out, expected_unlearn(archives["medu"], ["mallory"]))

    snap = tmp_path / "snap.zip"
    exported = run("export", archives["medu"], snap)
    assert exported.returncode == 0, exported.stderr
    assert raw_keys(snap) == raw_keys(archives["medu"])
    assert run("unlearn", snap, "-u", "mallory", "-o", tmp_path / "z.npz").returncode == 0
    assert_weights(tmp_path / "z.npz", expected_unlearn(archives["medu"], ["mallory"]))


def test_subprocess_verify(archives: dict[str, Path]) -> None:
    verified = run("verify", archives["medu"])
    assert verified.returncode == 0, (verified.stdout, verified.stderr)


def test_subprocess_errors(archives: dict[str, Path], tmp_path: Path) -> None:
    assert_error(run("inspect", tmp_path / "nowhere"), 3)
    assert_error(run("unlearn", archives["full"], "-u", "eve", "-o", tmp_path / "w.npz"), 4)
    assert_error(run("unlearn", archives["full"], "-u", "1", "--rounds", "3:1", "-o",
                     tmp_path / "w.npz"), 2)
    assert_error(run("unlearn", archives["full"], "-o", tmp_path / "w.npz"), 2)
    assert_error(run("inspect", archives["full"], "--as-of-round", "2"), 6)
    assert_error(run("inspect", archives["full"], "--storage-option", "nope"), 2)
    assert_error(run("unlearn", archives["medu"], "-u", "0", "--strict", "-o",
                     tmp_path / "w.npz"), 7)
    assert not (tmp_path / "w.npz").exists()
    f1 = tmp_path / "f1"
    with zipfile.ZipFile(FORMAT1_ZIP) as zf:
        zf.extractall(f1)
    assert "format-1" in assert_error(run("inspect", f1), 3)
