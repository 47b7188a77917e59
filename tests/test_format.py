"""Archive formats: format-1 archives are refused with the way forward, format-2 bytes keep
reading as they did (a golden archive), and a newer format is refused.

Fixtures: tests/fixtures/format1 (written by medustore 0.1) and tests/fixtures/format2
(written by its make_fixture.py: a plain Zarr export of a small deterministic run, with the
answers it gave).
"""

from __future__ import annotations

import importlib.util
import json
import warnings
import zipfile
from pathlib import Path

import icechunk
import numpy as np
import pytest
import zarr
from _fl import export_zip, tree_digest

import medustore
from medustore import NotAnArchiveError, UnsupportedFormatError

FIXTURES = Path(__file__).parent / "fixtures"
FORMAT1 = FIXTURES / "format1" / "format1-archive.zip"
FORMAT2 = FIXTURES / "format2"


def _model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((4, 8), "f4"), "b": np.zeros(4, "f4")}


# ---------------------------------------------------------------------------- format 1


@pytest.fixture
def format1(tmp_path: Path) -> Path:
    """The golden format-1 archive, unzipped (a plain Zarr directory)."""
    path = tmp_path / "old.zarr"
    with zipfile.ZipFile(FORMAT1) as zf:
        zf.extractall(path)
    return path


def _says_format1(err: pytest.ExceptionInfo) -> None:
    text = str(err.value)
    assert "format-1" in text, text
    assert "medustore upgrade" in text, text


@pytest.mark.parametrize("mode", ["r", "r+", "a"])
def test_format1_directory_is_refused(format1: Path, mode: str) -> None:
    before = tree_digest(format1)
    for _ in range(2):  # a refused writer leaves no lock behind: the second try says the same
        with pytest.raises(UnsupportedFormatError) as err:
            medustore.open(format1, mode, model=_model())
        _says_format1(err)
    assert tree_digest(format1) == before


def test_format1_directory_is_not_created_over(format1: Path) -> None:
    # "w-" creates only where nothing is: the old archive is refused, never touched.
    before = tree_digest(format1)
    with pytest.raises((FileExistsError, UnsupportedFormatError)):
        medustore.open(format1, "w-", model=_model())
    assert tree_digest(format1) == before


@pytest.mark.parametrize("mode", ["r", "r+"])
@pytest.mark.parametrize("form", ["path", "url"])
def test_format1_zip_is_refused(tmp_path: Path, mode: str, form: str) -> None:
    zipped = tmp_path / "old.zip"
    zipped.write_bytes(FORMAT1.read_bytes())
    location = zipped if form == "path" else f"zip://{zipped}"
    with pytest.raises(UnsupportedFormatError) as err:
        medustore.open(location, mode)
    _says_format1(err)
    assert zipped.read_bytes() == FORMAT1.read_bytes()


def test_mode_w_replaces_a_format1_archive(format1: Path) -> None:
    assert (format1 / "committed" / "zarr.json").is_file()
    rng = np.random.default_rng(0)
    update = {k: (0.1 * rng.standard_normal(v.shape)).astype("f4") for k, v in _model().items()}
    with medustore.open(format1, "w", model=_model(), policy="full") as store:
        assert store.rounds == [] and store.users == []
        store.record_round(0, {"alice": update})
    with medustore.open(format1, "r") as store:
        assert store.rounds == [0] and store.users == ["alice"]
        np.testing.assert_array_equal(store.latest()["w"], update["w"])
        assert store.snapshot_id is not None  # a versioned (Icechunk) archive now
    # Nothing of the old layout is left at the top of the directory.
    assert not (format1 / "zarr.json").exists() and not (format1 / "committed").exists()


# ---------------------------------------------------------------------------- format 2 golden


def _fixture_module():
    spec = importlib.util.spec_from_file_location("format2_fixture",
                                                  FORMAT2 / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: index1: the first format-2 archives (no round links or user runs); index2: today's.
GOLDEN = ("index1", "index2")


def _expected(folder: str) -> dict:
    return json.loads((FORMAT2 / folder / "format2-expected.json").read_text())


def _check_golden(store: medustore.UpdateStore, folder: str) -> None:
    expected = _expected(folder)
    assert store.index.digest == expected["digest"]
    assert store.index.settings.to_json() == expected["settings"]
    assert store.index.settings.format == expected["format"] == medustore.FORMAT_VERSION
    assert store.index.settings.index == int(folder[-1])
    assert store.rounds == expected["rounds"]
    assert store.users == expected["users"]
    forget = expected["forget"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", medustore.IncompleteUnlearningWarning)
        unlearned = store.unlearn(forget, out="flat")
    for got, name in ((store.latest("flat"), "format2-latest.npy"),
                      (unlearned, "format2-unlearn-bob.npy"),
                      (store.record(*expected["record_of"]), "format2-record.npy")):
        want = np.load(FORMAT2 / folder / name, allow_pickle=False)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert store.error_budget(forget).to_json() == expected["budget"]


@pytest.mark.parametrize("folder", GOLDEN)
@pytest.mark.parametrize("form", ["path", "url"])
def test_golden_format2_archive_reads_as_saved(form: str, folder: str) -> None:
    archive = FORMAT2 / folder / "format2-archive.zip"
    before = archive.read_bytes()
    location = archive if form == "path" else f"zip://{archive}"
    with medustore.open(location) as store:
        assert store.read_only and store.snapshot_id is None
        _check_golden(store, folder)
    assert archive.read_bytes() == before


@pytest.mark.parametrize("folder", GOLDEN)
def test_golden_format2_unzipped_directory_reads_as_saved(tmp_path: Path, folder: str) -> None:
    with zipfile.ZipFile(FORMAT2 / folder / "format2-archive.zip") as zf:
        zf.extractall(tmp_path / "golden")
    with medustore.open(tmp_path / "golden") as store:
        _check_golden(store, folder)


def test_golden_index1_and_index2_answer_alike() -> None:
    # One run written in both index layouts: the same rounds, users and answers.
    a, b = _expected("index1"), _expected("index2")
    for key in ("rounds", "users", "forget", "record_of", "budget"):
        assert a[key] == b[key], key
    for name in ("format2-latest.npy", "format2-unlearn-bob.npy", "format2-record.npy"):
        np.testing.assert_array_equal(np.load(FORMAT2 / "index1" / name),
                                      np.load(FORMAT2 / "index2" / name))


def test_golden_run_recorded_again_gives_the_same_archive(tmp_path: Path) -> None:
    # The fixture's run, recorded by today's writer: same index (digest), same answers,
    # and its export holds the same keys as the golden zip.
    fixture = _fixture_module()
    with fixture.record_run(tmp_path / "run") as store:
        _check_golden(store, "index2")
        keys = set(fixture.version_keys(store))
    with zipfile.ZipFile(FORMAT2 / "index2" / "format2-archive.zip") as zf:
        assert keys == set(zf.namelist())


# ---------------------------------------------------------------------------- newer formats


def _small_archive(path: Path) -> None:
    rng = np.random.default_rng(1)
    with medustore.open(path, "w", model=np.zeros(8, np.float32), policy="full") as store:
        store.record_round(0, {"a": rng.normal(size=8).astype(np.float32)})


def _set_format(path: Path, value: object) -> None:
    """Commit a root ``medustore`` attribute saying ``format: value`` (through Icechunk)."""
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(path)))
    session = repo.writable_session("main")
    group = zarr.open_group(session.store, mode="r+")
    meta = dict(group.attrs["medustore"])
    meta["format"] = value
    group.attrs["medustore"] = meta
    session.commit(f"format {value!r}")


@pytest.mark.parametrize("mode", ["r", "r+", "a"])
def test_a_newer_format_is_refused(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "new.zarr"
    _small_archive(path)
    _set_format(path, medustore.FORMAT_VERSION + 1)
    before = tree_digest(path)
    for _ in range(2):  # the refused writer released its lock
        with pytest.raises(UnsupportedFormatError, match=r"format 3\b.*upgrade medustore"):
            medustore.open(path, mode)
    assert tree_digest(path) == before
    # UnsupportedFormatError is a NotAnArchiveError (the CLI maps both to one exit code).
    assert issubclass(UnsupportedFormatError, NotAnArchiveError)


@pytest.mark.parametrize("value", ["2", None, 2.5])
def test_a_malformed_format_is_refused(tmp_path: Path, value: object) -> None:
    path = tmp_path / "odd.zarr"
    _small_archive(path)
    _set_format(path, value)
    with pytest.raises(UnsupportedFormatError, match=r"upgrade medustore"):
        medustore.open(path, "r")


def test_a_newer_format_export_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.zarr"
    _small_archive(path)

    def format3(key: str, data: bytes) -> bytes:
        if key != "zarr.json":
            return data
        doc = json.loads(data)
        doc["attributes"]["medustore"]["format"] = 3
        return json.dumps(doc).encode()

    with medustore.open(path) as store:
        zipped = export_zip(store, tmp_path / "run.zip", edit=format3)
    with pytest.raises(UnsupportedFormatError, match=r"upgrade medustore"):
        medustore.open(zipped)
