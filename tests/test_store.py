"""`UpdateStore`: opening modes, reopening in a fresh process, input validation that never
writes, reads, torch / numpy / flat models, and locations (directories, ``file://``,
``memory://``, plain Zarr exports in a directory or a zip)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from _fl import (
    export_zip,
    helpers_dir,
    make_history,
    memory_url,
    record,
    rel_err,
    replay,
    seeded_dither,
    snapshot,
)

import medustore
from medustore import NotAnArchiveError, ReadOnlyError, UnknownUserError

RTOL = 1e-6


def dict_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(4, 5)).astype(np.float32),
            "b": rng.normal(size=5).astype(np.float32)}


def dict_update(rng: np.random.Generator, scale: float = 0.1) -> dict[str, np.ndarray]:
    return {"w": (scale * rng.normal(size=(4, 5))).astype(np.float32),
            "b": (scale * rng.normal(size=5)).astype(np.float32)}


@pytest.fixture(scope="module")
def archive_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed ``full`` archive of a 25-parameter dict model with two rounds."""
    path = tmp_path_factory.mktemp("template") / "run.zarr"
    rng = np.random.default_rng(1)
    with medustore.open(path, "w", model=dict_model(), policy="full") as store:
        store.record_round(0, {"a": dict_update(rng), "b": dict_update(rng)},
                           weights={"a": 1.0, "b": 3})
        store.record_round(2, [(7, dict_update(rng)), ("a", dict_update(rng))])
    return path


@pytest.fixture
def archive(archive_template: Path, tmp_path: Path) -> Path:
    """A private copy of the template archive."""
    return Path(shutil.copytree(archive_template, tmp_path / "run.zarr"))


# ---------------------------------------------------------------------------- modes


def test_modes_on_an_existing_archive(archive: Path) -> None:
    before = snapshot(archive)
    with pytest.raises(FileExistsError, match="mode 'w'"):
        medustore.open(archive, "w-", model=dict_model())
    assert snapshot(archive) == before
    for mode in ("r", "r+", "a"):
        with medustore.open(archive, mode) as store:  # no model needed to open
            assert store.rounds == [0, 2]
            assert store.users == ["a", "b", 7]
            assert store.read_only is (mode == "r")
            assert store.policy.name == "full"
    assert snapshot(archive) == before
    with medustore.open(archive, "w", model=np.zeros(3), policy="lattice") as store:
        assert store.rounds == [] and store.users == [] and store.layout.size == 3
        assert store.policy.name == "lattice"


def test_modes_on_a_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "none.zarr"
    for mode in ("r", "r+"):
        with pytest.raises(NotAnArchiveError):
            medustore.open(missing, mode)
        assert not missing.exists()  # a read creates nothing
    with medustore.open(tmp_path / "new.zarr", "w-", model=dict_model()) as store:
        assert store.policy.name == "medu"  # the default policy
    with pytest.raises(ValueError, match="mode"):
        medustore.open(missing, "x")  # type: ignore[arg-type]
    assert not missing.exists()


def test_mode_a_creates_at_a_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "none.zarr"
    with pytest.raises(ValueError, match="model"):
        medustore.open(missing, "a")
    with medustore.open(missing, "a", model=dict_model(), policy="full") as store:
        assert store.rounds == []


def test_foreign_data_is_never_wiped(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "other.zarr", mode="w")
    group.create_array("x", shape=(3,), dtype="f4")[:] = 1.0
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("keep me")
    for path in (tmp_path / "other.zarr", plain):
        before = snapshot(path)
        for mode in ("r", "r+"):
            with pytest.raises(NotAnArchiveError):
                medustore.open(path, mode)
        # A zarr group is read as a (plain) archive and refused as not one; a folder of
        # other files is no repository, and "a" would create one there: refused too.
        with pytest.raises(NotAnArchiveError if path.name == "other.zarr" else FileExistsError):
            medustore.open(path, "a", model=dict_model())
        with pytest.raises(FileExistsError):
            medustore.open(path, "w-", model=dict_model())
        assert snapshot(path) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    with medustore.open(empty, "a", model=dict_model()) as store:
        assert store.rounds == []


def test_read_only_refuses_writes(archive: Path) -> None:
    before = snapshot(archive)
    rng = np.random.default_rng(5)
    with medustore.open(archive, "r") as store:
        latest = store.latest("flat")
        with pytest.raises(ReadOnlyError):
            store.record_round(3, {"a": dict_update(rng)})
        with pytest.raises(PermissionError):  # ReadOnlyError is a PermissionError
            store.record_round(9, {"zz": dict_update(rng)})
        assert store.rounds == [0, 2]
        np.testing.assert_array_equal(store.latest("flat"), latest)
        store.unlearn("a")  # reads still work
    assert snapshot(archive) == before


# ---------------------------------------------------------------------------- fresh process


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": helpers_dir()}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.filterwarnings("ignore::medustore.IncompleteUnlearningWarning")
@pytest.mark.parametrize("policy", ["full", "medu"])
def test_reopen_in_a_new_process_reads_the_same(tmp_path: Path, policy: str) -> None:
    path = tmp_path / "run.zarr"
    h = make_history(3, 300, [["a", "b", "c"], ["b", 4], ["a", 4, "c"]])
    with seeded_dither(3), medustore.open(path, "w", model=h.w0, policy=policy) as store:
        record(store, h)
        pairs = [(t, u) for t in store.rounds for u in store.users
                 if store.record(t, u) is not None]
        want = {
            "unlearn_a": store.unlearn("a", out="flat"),
            "unlearn_b4": store.unlearn(["b", 4], rounds="1:", out="flat"),
            "reconstruct_1": store.reconstruct(1, out="flat"),
            "latest": store.latest("flat"),
            "records": np.stack([store.record(t, u) for t, u in pairs]),
            "aggregate_1": store.aggregate(1),
            "weight": store.side("weight"),
        }
        budget = store.error_budget("a").to_json()
    out = tmp_path / "out.npz"
    printed = _run(f"""
        import json, warnings, numpy as np, medustore
        warnings.simplefilter("ignore")
        with medustore.open({str(path)!r}, "r") as s:
            got = {{
                "unlearn_a": s.unlearn("a", out="flat"),
                "unlearn_b4": s.unlearn(["b", 4], rounds="1:", out="flat"),
                "reconstruct_1": s.reconstruct(1, out="flat"),
                "latest": s.latest("flat"),
                "records": np.stack([s.record(t, u) for t, u in {pairs!r}]),
                "aggregate_1": s.aggregate(1),
                "weight": s.side("weight"),
            }}
            np.savez({str(out)!r}, **got)
            print(json.dumps({{"rounds": s.rounds, "users": s.users,
                               "policy": s.policy.to_json(),
                               "budget": s.error_budget("a").to_json()}}))
        """)
    meta = json.loads(printed)
    assert meta["rounds"] == [0, 1, 2] and meta["users"] == ["a", "b", "c", 4]
    assert meta["policy"] == medustore.PRESETS[policy].to_json()
    assert meta["budget"] == budget
    with np.load(out) as got:
        assert set(got.files) == set(want)
        for key, value in want.items():
            # Decoding is deterministic: the dither seeds are in the chunks.
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    if policy == "full":
        assert rel_err(want["unlearn_a"], replay(h, ["a"])) <= RTOL


def test_a_process_without_medustore_code_decodes_records(tmp_path: Path) -> None:
    # Plain zarr (over Icechunk, and over an exported zip) finds the codecs through entry
    # points: the reading code never imports medustore itself.
    path = tmp_path / "run.zarr"
    h = make_history(4, 200, [["a", "b"]])
    with seeded_dither(4), medustore.open(path, "w", model=h.w0, policy="lattice") as store:
        record(store, h)
        want = store.record(0, "b")
        idx = store.index
        rec = int(idx.entry_record[idx.entry(idx.row(0), idx.column("b"))])
        zipped = export_zip(store, tmp_path / "run.zip")
    out = tmp_path / "rec.npz"
    _run(f"""
        import icechunk, numpy as np, zarr
        repo = icechunk.Repository.open(icechunk.local_filesystem_storage({str(path)!r}))
        g = zarr.open_group(repo.readonly_session(branch="main").store, mode="r")
        z = zarr.open_group(zarr.storage.ZipStore({str(zipped)!r}, mode="r"), mode="r")
        np.savez({str(out)!r}, repo=g["records"][{rec}, :], zip=z["records"][{rec}, :])
        """)
    with np.load(out) as got:
        np.testing.assert_array_equal(got["repo"], want)
        np.testing.assert_array_equal(got["zip"], want)


# ---------------------------------------------------------------------------- bad input


def _bad(rng: np.random.Generator) -> dict[str, Any]:
    good = dict_update(rng)
    return {
        "shape": ({"a": {**good, "w": np.zeros((5, 4), np.float32)}}, None, ValueError,
                  r"'w'.*shape"),
        "complex": ({"a": {**good, "b": np.zeros(5, np.complex64)}}, None, TypeError,
                    r"'b'.*dtype"),
        "object": ({"a": {**good, "b": np.array([object()] * 5)}}, None, TypeError,
                   r"'b'.*dtype"),
        "complex-flat": ({"a": np.zeros(25, np.complex128)}, None, TypeError, "dtype"),
        "flat-size": ({"a": np.zeros(24, np.float32)}, None, ValueError, "25"),
        "missing": ({"a": {"w": good["w"]}}, None, ValueError, r"missing tensor.*'b'"),
        "extra": ({"a": {**good, "z": np.zeros(1)}}, None, ValueError,
                  r"unexpected tensor.*'z'"),
        "not-array": ({"a": "update"}, None, TypeError, "update of user 'a'"),
        "nan": ({"a": good, "eve": {**good, "b": np.array([0, 0, np.nan, 0, 0], np.float32)}},
                None, ValueError, r"'eve'.*NaN or infinite.*'b'"),
        "inf": ({"new": {**good, "w": np.full((4, 5), np.inf, np.float32)}}, None, ValueError,
                r"'new'.*'w'"),
        "-inf-last-user": ([("a", good), ("b", good), (9, {**good, "b": -np.inf * np.ones(5)})],
                           None, ValueError, r"user 9.*'b'"),
        "overflow": ({"a": {**good, "b": np.full(5, 1e300)}}, None, ValueError, r"'b'"),
        "duplicate-pairs": ([("a", good), ("b", good), ("a", good)], None, ValueError,
                            "twice"),
        "duplicate-int-types": ([(7, good), (np.int64(7), good)], None, ValueError, "twice"),
        "empty-dict": ({}, None, ValueError, "at least one"),
        "empty-pairs": ([], None, ValueError, "at least one"),
        "not-pairs": ([("a",)], None, TypeError, "pairs"),
        "not-pairs-scalar": ([3], None, TypeError, "pairs"),
        "user-float": ({1.5: good}, None, TypeError, "user ids"),
        "user-none": ({None: good}, None, TypeError, "user ids"),
        "user-bool": ({True: good}, None, TypeError, "user ids"),
        "user-tuple": ([(("a", 1), good)], None, TypeError, "user ids"),
        "weight-nan": ({"a": good}, {"a": math.nan}, ValueError, "weight of user 'a'"),
        "weight-inf": ({"a": good}, {"a": math.inf}, ValueError, "weight"),
        "weight-zero": ({"a": good, "b": good}, {"a": 1.0, "b": 0.0}, ValueError,
                        "weight of user 'b'"),
        "weight-negative": ({"a": good}, {"a": -2}, ValueError, "weight"),
        "weight-bool": ({"a": good}, {"a": True}, ValueError, "weight"),
        "weight-str": ({"a": good}, {"a": "1"}, ValueError, "weight"),
        "weights-missing": ({"a": good, "b": good}, {"a": 1.0}, ValueError, r"missing \['b'\]"),
        "weights-extra": ({"a": good}, {"a": 1.0, "c": 1.0}, ValueError, r"extra \['c'\]"),
    }


BAD_CASES = list(_bad(np.random.default_rng(0)))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_raises_and_writes_nothing(archive: Path, case: str) -> None:
    updates, weights, error, pattern = _bad(np.random.default_rng(2))[case]
    before = snapshot(archive)
    with medustore.open(archive, "r+") as store:
        latest, digest = store.latest("flat"), store.index.digest
        with pytest.raises(error, match=pattern):
            store.record_round(5, updates, weights=weights)
        # Nothing changed, in memory or on disk, and the store still takes a good round.
        assert store.rounds == [0, 2] and store.users == ["a", "b", 7]
        assert store.index.digest == digest
        assert snapshot(archive) == before
        rng = np.random.default_rng(3)
        good = {"a": dict_update(rng), "c": dict_update(rng)}
        store.record_round(5, good)
        agg = (good["a"]["w"].astype(np.float64) + good["c"]["w"]) / 2
        np.testing.assert_allclose(store.latest()["w"], latest[:20].reshape(4, 5) + agg,
                                   rtol=1e-6, atol=1e-7)
    with medustore.open(archive, "r") as store:
        assert store.rounds == [0, 2, 5] and store.users == ["a", "b", 7, "c"]


@pytest.mark.parametrize("t", [2, 1, 0, -1, True, 3.0, "4", None])
def test_bad_round_numbers(archive: Path, t: Any) -> None:
    before = snapshot(archive)
    rng = np.random.default_rng(4)
    with medustore.open(archive, "r+") as store:
        with pytest.raises(ValueError, match="round"):
            store.record_round(t, {"a": dict_update(rng)})
        assert store.rounds == [0, 2]
    assert snapshot(archive) == before


def test_bad_global_before(archive: Path) -> None:
    before = snapshot(archive)
    rng = np.random.default_rng(4)
    bad = {**dict_model(), "b": np.array([np.nan] * 5, np.float32)}
    with medustore.open(archive, "r+") as store:
        with pytest.raises(ValueError, match="global_before"):
            store.record_round(3, {"a": dict_update(rng)}, global_before=bad)
    assert snapshot(archive) == before


# ---------------------------------------------------------------------------- reads


def test_reads_and_index(archive: Path) -> None:
    with medustore.open(archive, "r") as store:
        assert store.participation("a") == [0, 2]
        assert store.participation(7) == [2]
        assert store.participation("b") == [0]
        with pytest.raises(UnknownUserError, match="'nobody'"):
            store.participation("nobody")
        with pytest.raises(ValueError, match="round 1"):
            store.record(1, "a")
        w = store.side("weight")
        assert w.shape == (2, 3)
        np.testing.assert_array_equal(w[0], [1.0, 3.0, np.nan])
        np.testing.assert_array_equal(w[1], [1.0, np.nan, 1.0])
        assert store.side("stored").tolist() == [[1, 1, 0], [1, 0, 1]]
        assert store.record(2, "b") is None  # did not take part
        # d = h - hbar: the weighted differentials of a round sum to zero.
        d_a, d_b = store.record(0, "a"), store.record(0, "b")
        assert np.abs(1.0 * d_a + 3.0 * d_b).max() < 1e-6
        np.testing.assert_allclose(store.side("dnorm")[0, :2],
                                   [np.linalg.norm(d_a), np.linalg.norm(d_b)], rtol=1e-6)
        rec = store.record(0, "a", out="numpy")
        assert set(rec) == {"w", "b"} and rec["w"].shape == (4, 5)
        by_round, by_user = store.nbytes_by_round(), store.nbytes_by_user()
        assert set(by_round) == {0, 2} and set(by_user) == {"a", "b", 7}
        assert sum(by_round.values()) == sum(by_user.values()) > 0
        assert by_user["a"] > 0
        assert store.nbytes_stored() > sum(by_round.values())
        assert "rounds=2" in repr(store) and "users=3" in repr(store)
        assert list(store.iter_rows()) == [(0, 0), (1, 2)]


def test_replay_takes_any_source_with_index_and_reader(archive: Path) -> None:
    from medustore import replay as rp

    class Source:
        def __init__(self, index: Any, reader: Any) -> None:
            self.index, self.reader = index, reader

    with medustore.open(archive, "r") as store:
        src = Source(store.index, store.reader)
        np.testing.assert_array_equal(rp.unlearn(src, "a", out="flat"),
                                      store.unlearn("a", out="flat"))
        np.testing.assert_array_equal(rp.reconstruct(src, 2, out="flat"),
                                      store.reconstruct(2, out="flat"))
        p = rp.plan(src, ["b", 7])
        assert p.method == "replay" and p.users == ("b", 7)
        np.testing.assert_array_equal(rp.run(src, p, out="flat"),
                                      store.unlearn(["b", 7], out="flat"))
        assert rp.error_budget(src, "a") == store.error_budget("a")


def test_a_reader_keeps_the_version_it_opened(archive: Path) -> None:
    rng = np.random.default_rng(8)
    with medustore.open(archive, "r") as reader:
        latest, digest = reader.latest("flat"), reader.index.digest
        unlearned = reader.unlearn("a", out="flat")
        with medustore.open(archive, "r+") as writer:
            writer.record_round(5, {"a": dict_update(rng), "zz": dict_update(rng)})
            assert writer.rounds == [0, 2, 5]
        # The reader answers from its version whatever was committed since.
        assert reader.rounds == [0, 2] and reader.users == ["a", "b", 7]
        assert reader.index.digest == digest
        np.testing.assert_array_equal(reader.latest("flat"), latest)
        np.testing.assert_array_equal(reader.unlearn("a", out="flat"), unlearned)
    with medustore.open(archive, "r") as store:
        assert store.rounds == [0, 2, 5] and store.users == ["a", "b", 7, "zz"]
        assert store.index.digest != digest


def test_round_summary(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    with medustore.open(tmp_path / "r.zarr", "w", model=dict_model(),
                        policy=medustore.MeduPolicy(keep_top=2)) as store:
        s = store.record_round(4, {u: dict_update(rng) for u in "abcde"})
        assert (s.round, s.participants, s.stored) == (4, 5, 2)
        assert s.nbytes == sum(store.nbytes_by_round().values()) > 0


def test_global_before_sets_the_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    w0 = dict_model(1)
    server = {k: v + 1 for k, v in w0.items()}
    with medustore.open(tmp_path / "r.zarr", "w", model=w0, policy="full") as store:
        u = dict_update(rng)
        store.record_round(0, {"a": u}, global_before=server)
        np.testing.assert_allclose(store.latest()["w"], server["w"] + u["w"], rtol=1e-6)
        np.testing.assert_array_equal(store.initial()["b"], server["b"])


# ---------------------------------------------------------------------------- model kinds


def test_flat_vector_model(tmp_path: Path) -> None:
    h = make_history(8, 50, [["a", "b"], ["a"]])
    with medustore.open(tmp_path / "r.zarr", "w", model=h.w0.astype(np.float32),
                        policy="full") as store:
        record(store, h)
        out = store.unlearn("b")
        assert isinstance(out, np.ndarray) and out.shape == (50,) and out.dtype == np.float32
        assert rel_err(out, replay(h, ["b"])) <= RTOL
        assert store.latest().dtype == np.float32


def test_numpy_dict_model_outputs(archive: Path) -> None:
    with medustore.open(archive, "r") as store:
        out = store.unlearn("b")
        assert list(out) == ["w", "b"]
        assert out["w"].shape == (4, 5) and out["w"].dtype == np.float32
        flat = store.unlearn("b", out="flat")
        assert flat.shape == (25,)
        np.testing.assert_array_equal(out["w"].reshape(-1), flat[:20].astype(np.float32))


def _net() -> Any:
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(6, 4)
            self.bn = torch.nn.BatchNorm1d(4)
            self.out = torch.nn.Linear(4, 2).double()

    return Net()


@pytest.mark.parametrize("template", ["module", "state_dict"])
def test_torch_models_round_trip(tmp_path: Path, template: str) -> None:
    # Not a module-level importorskip: that would skip every test below, numpy ones too.
    torch = pytest.importorskip("torch", reason="torch models need torch (not installed)")
    torch.manual_seed(0)
    net = _net()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    gen = torch.Generator().manual_seed(1)

    def update() -> dict[str, Any]:
        return {k: (0.1 * torch.randn(v.shape, generator=gen)).to(v.dtype)
                if v.dtype.is_floating_point else torch.zeros_like(v) for k, v in sd.items()}

    rounds = [{u: update() for u in ("a", "b", "c")}, {u: update() for u in ("a", "c")}]
    with medustore.open(tmp_path / "r.zarr", "w", model=net if template == "module" else sd,
                        policy="full") as store:
        for t, ups in enumerate(rounds):
            store.record_round(t, ups, weights={u: 1.0 + i for i, u in enumerate(ups)})
    with medustore.open(tmp_path / "r.zarr", "r") as store:
        got = store.unlearn("b", out="state_dict")
        assert list(got) == list(sd)
        for k, v in sd.items():
            assert isinstance(got[k], torch.Tensor)
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        _net().load_state_dict(got)
        with pytest.raises(ValueError, match="out='state_dict'"):  # one name for torch output
            store.unlearn("b", out="torch")
    # The reference, in float64 from the raw torch updates.
    w = {k: v.double() for k, v in sd.items()}
    for ups in rounds:
        users = [u for u in ups if u != "b"]
        weights = {u: 1.0 + i for i, u in enumerate(ups)}
        P = sum(weights[u] for u in users)
        for k in w:
            w[k] += sum(weights[u] * ups[u][k].double() for u in users) / P
    for k, v in sd.items():
        if v.dtype.is_floating_point:
            assert torch.allclose(got[k].double(), w[k], rtol=1e-5, atol=1e-6), k
        else:
            assert torch.equal(got[k], v), k


# ---------------------------------------------------------------- locations


def _small_run(location: str) -> np.ndarray:
    rng = np.random.default_rng(21)
    with medustore.open(location, "w", model=np.zeros(64, np.float32), policy="full") as s:
        for t in range(3):
            s.record_round(t, {u: rng.normal(size=64).astype(np.float32) for u in (1, 2, 3)})
        return s.unlearn(2, out="flat")


def test_file_and_memory_urls(tmp_path: Path) -> None:
    for location in (f"file://{tmp_path}/run.zarr", memory_url("locations")):
        expected = _small_run(location)
        with medustore.open(location) as store:
            assert store.rounds == [0, 1, 2]
            np.testing.assert_array_equal(store.unlearn(2, out="flat"), expected)


def test_memory_archives_are_separate_and_w_replaces() -> None:
    a, b = memory_url("a"), memory_url("b")
    _small_run(a)
    with pytest.raises(NotAnArchiveError):
        medustore.open(b, "r")
    with medustore.open(a, "w", model=np.zeros(3), policy="full") as store:
        assert store.rounds == [] and store.layout.size == 3
    with medustore.open(a, "r") as store:
        assert store.rounds == [] and store.layout.size == 3


def test_exported_zip_and_directory_are_read_only(tmp_path: Path) -> None:
    expected = _small_run(str(tmp_path / "run.zarr"))
    with medustore.open(tmp_path / "run.zarr") as store:
        digest, latest = store.index.digest, store.latest("flat")
        zipped = export_zip(store, tmp_path / "run.zip")
    plain = tmp_path / "plain"
    with zipfile.ZipFile(zipped) as zf:
        zf.extractall(plain)
    for location in (f"zip://{zipped}", zipped, plain):
        with medustore.open(location) as store:
            assert store.rounds == [0, 1, 2] and store.index.digest == digest
            assert store.snapshot_id is None
            np.testing.assert_array_equal(store.latest("flat"), latest)
            np.testing.assert_array_equal(store.unlearn(2, out="flat"), expected)
            with pytest.raises(ReadOnlyError):
                store.record_round(3, {1: np.zeros(64, np.float32)})
    before = snapshot(plain)
    for location in (f"zip://{zipped}", zipped, plain):
        with pytest.raises(ReadOnlyError, match="read-only"):
            medustore.open(location, "r+")
    for location in (f"zip://{zipped}", zipped):
        with pytest.raises(ValueError, match="read-only"):
            medustore.open(location, "w", model=np.zeros(64, np.float32))
    assert snapshot(plain) == before
