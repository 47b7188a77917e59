"""The ``medustore`` commands inspect, unlearn and verify: in-process (click's CliRunner) and
as real subprocesses (``python -m medustore``), on small archives built here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

import medustore
from medustore.cli import main
from medustore.cli.unlearn import read_weights
from medustore.verify import verify

PRESETS = ("full", "lattice", "medu")
USERS = [0, 1, 2, 3, "mallory"]
ROUNDS = [0, 1, 3, 4]  # round 2 skipped on purpose: rows and rounds differ
ERROR = "medustore: error: "

INSPECT_KEYS = {
    "archive", "format", "medustore_version", "model", "rounds", "users", "records", "policy",
    "codecs", "accumulators", "bytes", "bits_per_stored_param", "bits_per_history_param",
    "ratio_vs_float32", "unlearning_error", "per_round", "per_user",
}


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"layer.weight": rng.normal(size=(8, 12)).astype(np.float32),
            "layer.bias": rng.normal(size=12).astype(np.float32)}


def build(path: Path, policy: str, users: list = USERS, seed: int = 0,
          accumulators: bool = False) -> Path:
    """A 4-round archive; ``mallory`` (when present) sends large updates in rounds 1 and 3."""
    rng = np.random.default_rng(seed)
    model = _model(rng)
    with medustore.open(path, "w", model=model, policy=policy,
                        accumulators=accumulators) as store:
        for i, t in enumerate(ROUNDS):
            taking_part = [u for j, u in enumerate(users) if (i + j) % 4 != 3
                           or u == "mallory" and t in (1, 3)]
            updates = {u: {k: (rng.normal(size=v.shape) * (5.0 if u == "mallory" else 1.0))
                           .astype(np.float32) for k, v in model.items()} for u in taking_part}
            weights = {u: float(rng.integers(10, 100)) for u in taking_part}
            store.record_round(t, updates, weights=weights)
    return path


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("archives")
    made = {p: build(root / f"{p}.zarr", p, seed=i) for i, p in enumerate(PRESETS)}
    made["str_ids"] = build(root / "str_ids.zarr", "full", users=["3", "alice", "bob"], seed=7)
    made["acc"] = build(root / "acc.zarr", "medu", seed=8, accumulators=True)
    return made


@pytest.fixture
def copy(archives: dict[str, Path], tmp_path: Path):
    """A private copy of a module archive, safe to damage."""

    def make(name: str) -> Path:
        dest = tmp_path / f"{name}.zarr"
        shutil.copytree(archives[name], dest)
        return dest

    return make


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


def record_chunk(archive: Path, round: int, user: object) -> Path:
    with medustore.open(archive) as store:
        row, col = store.rounds.index(round), store.users.index(user)
        assert store.side("stored")[row, col] == 1
    return archive / "updates" / "c" / str(row) / str(col) / "0"


def stored_pair(archive: Path, user: object = "mallory") -> tuple[int, object]:
    """A (round, user) whose record is stored."""
    with medustore.open(archive) as store:
        col = store.users.index(user)
        row = int(np.flatnonzero(store.side("stored")[:, col] == 1)[0])
        return store.rounds[row], user


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 16):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


def expected_unlearn(archive: Path, users: list, **kw: object) -> dict[str, np.ndarray]:
    with medustore.open(archive) as store, warnings.catch_warnings():
        warnings.simplefilter("ignore", medustore.IncompleteUnlearningWarning)
        return store.unlearn(users, out="numpy", **kw)


# ---------------------------------------------------------------------- inspect


@pytest.mark.parametrize("preset", PRESETS)
def test_inspect_text(archives: dict[str, Path], preset: str) -> None:
    result = cli("inspect", archives[preset])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    keys = [line.split(" : ")[0].strip() for line in lines]
    for key in ("Format", "Model", "Rounds", "Users", "Records", "Policy", "Record codec",
                "Aggregate codec", "Bytes stored", "Bits/stored param", "Float32 history",
                "Ratio vs float32", "Unlearning error"):
        assert key in keys, result.stdout
    assert len({line.index(" : ") for line in lines}) == 1  # aligned
    text = result.stdout
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


@pytest.mark.parametrize("preset", PRESETS)
def test_inspect_json(archives: dict[str, Path], preset: str) -> None:
    result = cli("inspect", archives[preset], "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)  # nothing but the document on stdout
    assert set(data) == INSPECT_KEYS
    with medustore.open(archives[preset]) as store:
        W, S = store.side("weight"), store.side("stored")
        assert data["rounds"] == {"count": 4, "first": 0, "last": 4}
        assert data["users"] == {"count": len(USERS)}
        assert data["records"] == {"stored": int(S.sum()),
                                   "participations": int((~np.isnan(W)).sum())}
        assert data["model"]["params"] == store.layout.size == 108
        assert data["bytes"]["stored"] == store.nbytes_stored()
        assert data["bytes"]["float32_history"] == data["records"]["participations"] * 108 * 4
        assert data["ratio_vs_float32"] == pytest.approx(
            data["bytes"]["float32_history"] / data["bytes"]["stored"])
        assert data["policy"]["description"] == store.policy.describe()
        assert data["codecs"]["records"] == list(
            store._a["updates"].metadata.to_dict()["codecs"])
        bounds = [store.error_budget([u]).bound() for u in store.users]
        assert data["unlearning_error"]["median"] == pytest.approx(float(np.median(bounds)))
        assert data["unlearning_error"]["max"] == pytest.approx(max(bounds))
        assert [r["round"] for r in data["per_round"]] == ROUNDS
        assert [u["user"] for u in data["per_user"]] == store.users  # ids keep their type
        assert sorted(store.users, key=str) == sorted(USERS, key=str)
        assert sum(r["bytes"] for r in data["per_round"]) == data["bytes"]["records"]
    if preset == "full":
        assert data["unlearning_error"]["max"] == 0.0


def test_inspect_json_top(archives: dict[str, Path]) -> None:
    data = json.loads(cli("inspect", archives["medu"], "--json", "--top", "1").stdout)
    assert set(data) == INSPECT_KEYS
    assert len(data["per_round"]) == len(data["per_user"]) == 1


# ---------------------------------------------------------------------- unlearn


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_unlearn_writes_weights(archives: dict[str, Path], tmp_path: Path, preset: str,
                                suffix: str) -> None:
    out = tmp_path / f"w{suffix}"
    result = cli("unlearn", archives[preset], "--user", "mallory", "--user", "1", "-o", out)
    assert result.exit_code == 0, result.stderr
    got = read_weights(str(out))
    want = expected_unlearn(archives[preset], ["mallory", 1])
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_array_equal(got[name], want[name])
    if suffix == ".npz":
        with np.load(out, allow_pickle=False) as data:
            assert sorted(data.files) == sorted(want)
    assert "Error budget" in result.stdout and "Output" in result.stdout


def test_unlearn_window_alpha_json(archives: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    result = cli("unlearn", archives["lattice"], "-u", "2", "--rounds", "1:4",
                 "--alpha", "0.1", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"archive", "users", "rounds", "alpha", "output", "method", "budget",
                         "complete"}
    assert data["users"] == [2] and data["alpha"] == 0.1 and data["method"] == "replay"
    assert data["rounds"]["window"] == "1:4" and data["rounds"]["count"] == 2
    with medustore.open(archives["lattice"]) as store:
        budget = store.error_budget([2], rounds="1:4", alpha=0.1).to_json()
    assert {k: data["budget"][k] for k in budget} == pytest.approx(budget)
    want = expected_unlearn(archives["lattice"], [2], rounds="1:4", alpha=0.1)
    got = read_weights(str(out))
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_unlearn_reports_missing_records(archives: dict[str, Path], tmp_path: Path) -> None:
    with medustore.open(archives["medu"]) as store:
        budget = store.error_budget([0])
    assert budget.records_missing > 0  # medu keeps one user in four
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


def test_unlearn_exact_accumulator(archives: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "w.npz"
    result = cli("unlearn", archives["acc"], "-u", "0", "-o", out, "--json")
    assert result.exit_code == 0 and result.stderr == ""
    data = json.loads(result.stdout)
    assert data["method"] == "accumulator" and data["budget"]["exact"] is True
    want = expected_unlearn(archives["acc"], [0])
    for name, value in read_weights(str(out)).items():
        np.testing.assert_array_equal(value, want[name])


def test_user_ids_int_or_str(archives: dict[str, Path], tmp_path: Path) -> None:
    ints = json.loads(cli("unlearn", archives["full"], "-u", "3", "-o", tmp_path / "a.npz",
                          "--json").stdout)
    assert ints["users"] == [3]
    strs = json.loads(cli("unlearn", archives["str_ids"], "-u", "3", "-o",
                          tmp_path / "b.npz", "--json").stdout)
    assert strs["users"] == ["3"]
    want = expected_unlearn(archives["str_ids"], ["3"])
    for name, value in read_weights(str(tmp_path / "b.npz")).items():
        np.testing.assert_array_equal(value, want[name])


def test_unlearn_never_pickles(archives: dict[str, Path], tmp_path: Path) -> None:
    for name in ("w.pt", "w.pkl", "w"):
        result = cli("unlearn", archives["full"], "-u", "1", "-o", tmp_path / name)
        assert "must end in .safetensors or .npz" in assert_error(result, 2)
        assert not (tmp_path / name).exists()


# ---------------------------------------------------------------------- verify


@pytest.mark.parametrize("name", [*PRESETS, "str_ids", "acc"])
def test_verify_clean(archives: dict[str, Path], name: str) -> None:
    result = cli("verify", archives[name])
    assert result.exit_code == 0, result.stdout
    assert result.stdout.rstrip().endswith("result: OK")
    with medustore.open(archives[name]) as store:
        report = verify(store)
    assert report.ok and report.records == int(store.side("stored").sum())
    assert report.record_chunks == report.records


@pytest.mark.parametrize("preset", PRESETS)
def test_verify_corrupt_record(copy, preset: str) -> None:
    archive = copy(preset)
    t, u = stored_pair(archive)
    flip_bytes(record_chunk(archive, t, u))
    result = cli("verify", archive)
    assert result.exit_code == 1
    assert f"round {t}, user mallory" in result.stdout
    assert "result: DAMAGED" in result.stdout
    data = json.loads(cli("verify", archive, "--json").stdout)
    assert data["ok"] is False
    assert {(p["round"], p["user"], p["array"]) for p in data["problems"]} == {
        (t, u, "updates")}


@pytest.mark.parametrize("preset", PRESETS)
def test_verify_deleted_record(copy, preset: str) -> None:
    archive = copy(preset)
    t, u = stored_pair(archive)
    record_chunk(archive, t, u).unlink()
    result = cli("verify", archive)
    assert result.exit_code == 1
    line = next(x for x in result.stdout.splitlines() if f"round {t}, user mallory" in x)
    assert "missing" in line


def test_verify_swapped_record_chunk(copy) -> None:
    """A valid chunk in the wrong place decodes fine: the index (nbytes, dnorm) catches it."""
    archive = copy("full")
    with medustore.open(archive) as store:
        row = 0
        cols = np.flatnonzero(store.side("stored")[row] == 1)[:2]
        a, b = (store.users[int(c)] for c in cols)
    shutil.copyfile(record_chunk(archive, 0, a), record_chunk(archive, 0, b))
    result = cli("verify", archive, "--json")
    assert result.exit_code == 1
    problems = json.loads(result.stdout)["problems"]
    assert {(p["round"], p["user"]) for p in problems} == {(0, b)}
    assert problems[0]["kind"] == "mismatch"


def test_verify_side_arrays(copy) -> None:
    archive = copy("lattice")
    import zarr

    # Round 3 (row 2) claims to be round 0: committed rounds no longer increase.
    zarr.open_array(archive / "committed", mode="r+")[2] = 0
    nbytes = zarr.open_array(archive / "nbytes", mode="r+")
    nbytes[1, :] = 0  # byte counts of row 1 lost
    result = cli("verify", archive, "--json")
    assert result.exit_code == 1
    problems = json.loads(result.stdout)["problems"]
    assert any(p["array"] == "committed" for p in problems)
    nbytes = [p for p in problems if p["array"] == "updates" and p["kind"] == "mismatch"]
    assert nbytes and all(p["round"] == 1 for p in nbytes)


def test_verify_corrupt_aggregate_and_model(copy) -> None:
    archive = copy("lattice")
    flip_bytes(archive / "aggregate" / "c" / "1" / "0")
    (archive / "initial" / "c" / "0").unlink()
    result = cli("verify", archive)
    assert result.exit_code == 1
    text = result.stdout
    assert "round 1, chunk 0: aggregate: corrupt" in text
    assert "chunk 0: initial: missing" in text


# ---------------------------------------------------------------------- errors


def test_error_not_an_archive(tmp_path: Path, archives: dict[str, Path]) -> None:
    (tmp_path / "file.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    import zarr

    zarr.open_group(tmp_path / "group.zarr", mode="w")
    zarr.create_array(tmp_path / "array.zarr", shape=(3,), dtype="f4")
    for path in ("nowhere", "file.txt", "empty", "group.zarr", "array.zarr"):
        for args in (["inspect"], ["verify"], ["unlearn", "-u", "1", "-o",
                                               tmp_path / "w.npz"]):
            line = assert_error(cli(args[0], tmp_path / path, *args[1:]), 3)
            assert str(tmp_path / path) in line or path in line


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


def test_error_damaged_chunk(copy, tmp_path: Path) -> None:
    archive = copy("lattice")
    t, u = stored_pair(archive)
    flip_bytes(record_chunk(archive, t, u))
    line = assert_error(cli("unlearn", archive, "-u", "mallory", "-o", tmp_path / "w.npz"), 1)
    assert "damaged archive" in line and "medustore verify" in line
    assert not (tmp_path / "w.npz").exists()
    flip_bytes(archive / "weight" / "c" / "0" / "0")
    assert_error(cli("inspect", archive), 1)
    (archive / "updates" / "zarr.json").unlink()
    for command in ("inspect", "verify"):
        assert "damaged archive" in assert_error(cli(command, archive), 1)


# ---------------------------------------------------------------------- subprocesses


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medustore", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_subprocess_inspect_unlearn_verify(archives: dict[str, Path], copy,
                                           tmp_path: Path) -> None:
    inspected = run("inspect", archives["medu"], "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert set(json.loads(inspected.stdout)) == INSPECT_KEYS

    out = tmp_path / "w.safetensors"
    unlearned = run("unlearn", archives["medu"], "--user", "mallory", "-o", out)
    assert unlearned.returncode == 0, unlearned.stderr
    assert "Traceback" not in unlearned.stderr
    want = expected_unlearn(archives["medu"], ["mallory"])
    for name, value in read_weights(str(out)).items():
        np.testing.assert_array_equal(value, want[name])

    assert run("verify", archives["medu"]).returncode == 0
    damaged = copy("medu")
    t, u = stored_pair(damaged)
    flip_bytes(record_chunk(damaged, t, u))
    verified = run("verify", damaged)
    assert verified.returncode == 1
    assert f"round {t}, user mallory" in verified.stdout


def test_subprocess_errors(archives: dict[str, Path], tmp_path: Path) -> None:
    assert_error(run("inspect", tmp_path / "nowhere"), 3)
    assert_error(run("unlearn", archives["full"], "-u", "eve", "-o", tmp_path / "w.npz"), 4)
    assert_error(run("unlearn", archives["full"], "-u", "1", "--rounds", "3:1", "-o",
                     tmp_path / "w.npz"), 2)
    assert_error(run("unlearn", archives["full"], "-o", tmp_path / "w.npz"), 2)


def test_verify_interrupted_round_is_harmless(copy) -> None:
    """Chunks of a round that crashed before its commit are notes, not damage."""
    archive = copy("lattice")

    class Crash:
        """The ``committed`` array, except that writing it fails."""

        def __init__(self, array: object) -> None:
            self._array = array

        def __getattr__(self, name: str) -> object:
            return getattr(self._array, name)

        def __getitem__(self, key: object) -> object:
            return self._array[key]

        def __setitem__(self, key: object, value: object) -> None:
            raise RuntimeError("simulated crash before the commit")

    rng = np.random.default_rng(3)
    with medustore.open(archive, "r+") as store:
        store._a["committed"] = Crash(store._a["committed"])
        updates = {u: {k: rng.normal(size=v.shape).astype(np.float32)
                       for k, v in store.initial().items()} for u in (0, "new")}
        with pytest.raises(RuntimeError, match="simulated"):
            store.record_round(9, updates)
    result = cli("verify", archive, "--json")
    assert result.exit_code == 0, result.stdout
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["problems"] == []
    assert any("interrupted round" in note for note in data["notes"])


def test_verify_chunked_records_and_frozen_slices(tmp_path: Path) -> None:
    """Records split over chunks; a frozen tensor leaves all-zero chunks that zarr never
    writes: verify accepts them, and names a deleted chunk by its index."""
    policy = medustore.MeduPolicy(lattice="E8", bits=4.0, aggregate_bits=8.0, chunk_size=64,
                                  name="small-chunks")
    rng = np.random.default_rng(11)
    model = {"frozen": rng.normal(size=64).astype(np.float32),
             "w": rng.normal(size=(8, 10)).astype(np.float32)}
    archive = tmp_path / "chunked.zarr"
    with medustore.open(archive, "w", model=model, policy=policy, accumulators=True) as store:
        for t in range(3):
            store.record_round(t, {u: {"frozen": np.zeros(64, np.float32),
                                       "w": rng.normal(size=(8, 10)).astype(np.float32)}
                                   for u in ("a", "b", "c")})
    assert not (archive / "updates" / "c" / "1" / "1" / "0").exists()  # the frozen slice
    result = cli("verify", archive)
    assert result.exit_code == 0, result.stdout
    assert ": 9 stored, 18 chunks decoded" in result.stdout

    (archive / "updates" / "c" / "1" / "1" / "2").unlink()
    data = json.loads(cli("verify", archive, "--json").stdout)
    assert data["ok"] is False
    assert [(p["round"], p["user"], p["chunk"], p["kind"]) for p in data["problems"]] == [
        (1, "b", 2, "missing")]
