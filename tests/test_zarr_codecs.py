"""Zarr: v3 arrays through the ArrayBytesCodec adapters, v2 arrays through numcodecs, and
both read back by a fresh interpreter that finds the codecs through entry points only."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
from importlib.metadata import entry_points
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import zarr

import medustore
from medustore.codecs import DiffThresholdCodec, LatticeCodec
from medustore.codecs.zarr3 import (
    DiffThresholdZarrCodec,
    LatticeZarrCodec,
    NumcodecsArrayBytesCodec,
)
from medustore.testing import (
    LATTICE_FIELDS,
    THRESHOLD_FIELDS,
    check_lattice_guarantee,
    edit_field,
    lattice_header,
    make_array,
)

SHAPE, CHUNKS = (6, 50), (4, 32)  # edge chunks in both dimensions

V3 = {  # name: (dtype, serializer)
    "lattice-Z-f4": ("f4", {"name": "medustore.lattice",
                            "configuration": {"lattice": "Z", "bits": 5, "seed": 1}}),
    "lattice-A2-f8": ("f8", {"name": "medustore.lattice",
                             "configuration": {"lattice": "A2", "step": 0.05, "seed": 2}}),
    "lattice-D4-f2": ("f2", {"name": "medustore.lattice",
                             "configuration": {"lattice": "D4", "bits": 6, "seed": 3}}),
    "lattice-E8-f4": ("f4", {"name": "medustore.lattice",
                             "configuration": {"lattice": "E8", "bits": 3, "seed": 4}}),
    "threshold-f4": ("f4", {"name": "medustore.diffthreshold",
                            "configuration": {"threshold": 0.5}}),
    "threshold-lattice-f8": ("f8", {"name": "medustore.diffthreshold", "configuration": {
        "relative": 0.5, "inner": {"id": "medustore.lattice", "lattice": "E8", "bits": 4,
                                   "seed": 5}}}),
}
V2 = {  # name: (filters, compressor)
    "v2-compressor": (None, LatticeCodec("D4", bits=6, seed=6)),
    "v2-filter": ([DiffThresholdCodec(threshold=0.5)], None),
    "v2-filter-zstd": ([LatticeCodec("A2", bits=4, seed=7)], numcodecs.Zstd(level=1)),
    "v2-nested": ([DiffThresholdCodec(threshold=0.2, inner=LatticeCodec("E8", bits=5, seed=8))],
                  numcodecs.Zstd(level=1)),
}
ADAPTERS = {"medustore.lattice": (LatticeZarrCodec, LatticeCodec),
            "medustore.diffthreshold": (DiffThresholdZarrCodec, DiffThresholdCodec)}


def data(dtype: str, seed: int = 0) -> np.ndarray:
    return make_array("gaussian", SHAPE, dtype, 1.0, seed=seed)


def _codec_of(serializer: dict) -> numcodecs.abc.Codec:
    return numcodecs.get_codec({"id": serializer["name"], **serializer["configuration"]})


def _chunk_slices() -> list[tuple[tuple[int, int], tuple[slice, slice]]]:
    out = []
    for i in range(-(-SHAPE[0] // CHUNKS[0])):
        for j in range(-(-SHAPE[1] // CHUNKS[1])):
            out.append(((i, j), (slice(i * CHUNKS[0], min((i + 1) * CHUNKS[0], SHAPE[0])),
                                 slice(j * CHUNKS[1], min((j + 1) * CHUNKS[1], SHAPE[1])))))
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """Arrays written once per module; returns their folder and what this process reads."""
    root = tmp_path_factory.mktemp("zarr")
    read: dict[str, np.ndarray] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, (dtype, serializer) in V3.items():
            a = zarr.create_array(root / f"{name}.zarr", shape=SHAPE, chunks=CHUNKS,
                                  dtype=dtype, serializer=serializer, compressors=None)
            a[:] = data(dtype)
            read[name] = a[:]
        for name, (filters, compressor) in V2.items():
            a = zarr.create_array(root / f"{name}.zarr", shape=SHAPE, chunks=CHUNKS,
                                  dtype="f4", zarr_format=2, filters=filters,
                                  compressors=compressor)
            a[:] = data("f4")
            read[name] = a[:]
    ours = [w for w in caught if issubclass(w.category, DeprecationWarning)
            and Path(medustore.__file__).parent in Path(w.filename).parents]
    assert not ours, [str(w.message) for w in ours]
    return root, read


# ---------------------------------------------------------------- in process


@pytest.mark.parametrize("name", sorted(V3))
def test_v3_chunks_are_codec_chunks(stores: tuple[Path, dict], name: str) -> None:
    root, read = stores
    dtype, serializer = V3[name]
    codec = _codec_of(serializer)
    meta = json.loads((root / f"{name}.zarr" / "zarr.json").read_text())
    assert meta["codecs"] == [{"name": serializer["name"], "configuration": {
        k: v for k, v in codec.get_config().items() if k != "id"}}]
    codec = _codec_of(serializer)
    x = data(dtype)
    assert read[name].dtype == np.dtype(dtype) and read[name].shape == SHAPE
    for (i, j), region in _chunk_slices():
        raw = (root / f"{name}.zarr" / "c" / str(i) / str(j)).read_bytes()
        chunk = codec.decode(raw).reshape(CHUNKS)  # edge chunks are stored padded
        valid = chunk[: region[0].stop - region[0].start, : region[1].stop - region[1].start]
        np.testing.assert_array_equal(valid, read[name][region])
        padded = np.zeros(CHUNKS, dtype=dtype)  # zarr pads with the fill value, 0
        padded[: valid.shape[0], : valid.shape[1]] = x[region]
        # Fixed seeds: re-encoding the padded chunk reproduces the stored bytes.
        assert codec.encode(padded) == raw
        if isinstance(codec, LatticeCodec):
            check_lattice_guarantee(codec.lattice, padded, chunk, lattice_header(raw).scale)
        elif codec.inner is None:
            np.testing.assert_array_equal(chunk, np.where(np.abs(padded) > 0.5, padded, 0))
        else:
            assert np.all(chunk[np.abs(padded) <= codec.tau(padded)] == 0)


@pytest.mark.parametrize("name", sorted(V2))
def test_v2_arrays(stores: tuple[Path, dict], name: str) -> None:
    root, read = stores
    filters, compressor = V2[name]
    meta = json.loads((root / f"{name}.zarr" / ".zarray").read_text())
    assert meta["zarr_format"] == 2
    stored = meta["compressor"] and numcodecs.get_codec(meta["compressor"])
    assert stored == compressor or (stored is None and compressor is None)
    assert meta["filters"] == (None if filters is None else [f.get_config() for f in filters])
    x = data("f4")
    assert read[name].dtype == np.float32 and read[name].shape == SHAPE
    for (i, j), region in _chunk_slices():
        padded = np.zeros(CHUNKS, dtype="f4")
        padded[: region[0].stop - region[0].start, : region[1].stop - region[1].start] = (
            x[region])
        # The chain by hand (fixed seeds): filters, then the compressor, and back.
        enc = padded
        for f in filters or []:
            enc = f.encode(enc)
        if compressor is not None:
            enc = compressor.encode(enc)
        assert (root / f"{name}.zarr" / f"{i}.{j}").read_bytes() == bytes(enc)
        if compressor is not None:
            enc = compressor.decode(enc)
        for f in reversed(filters or []):
            enc = f.decode(enc)
        chunk = np.frombuffer(bytes(memoryview(enc)), dtype="f4").reshape(CHUNKS)
        np.testing.assert_array_equal(chunk[: padded.shape[0], : padded.shape[1]][
            : region[0].stop - region[0].start, : region[1].stop - region[1].start],
            read[name][region])
    lossy = not (filters and type(filters[0]) is DiffThresholdCodec
                 and filters[0].inner is None)
    assert lossy != np.array_equal(read[name], np.where(np.abs(x) > 0.5, x, 0))


# ---------------------------------------------------------------- a fresh interpreter

_READER = textwrap.dedent("""
    import json, sys, warnings
    assert "medustore" not in sys.modules, "medustore imported before zarr"
    warnings.simplefilter("always")
    import numpy as np
    import zarr
    assert "medustore" not in sys.modules, "importing zarr imported medustore"
    names, out = json.loads(sys.argv[1]), sys.argv[2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in names:
            np.save(f"{out}/{name}.npy", zarr.open_array(f"{name}.zarr", mode="r")[:],
                    allow_pickle=False)
    print(json.dumps({
        "loaded": sorted(m for m in sys.modules if m.startswith("medustore")),
        "deprecations": [f"{w.filename}: {w.message}" for w in caught
                         if issubclass(w.category, DeprecationWarning)],
    }))
""")


def _read_in_fresh_process(root: Path, names: list[str], out: Path) -> dict:
    assert "import medustore" not in _READER and "from medustore" not in _READER
    result = subprocess.run(
        [sys.executable, "-c", _READER, json.dumps(names), str(out)],
        cwd=root, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("names", [sorted(V3), sorted(V2)], ids=["zarr-v3", "zarr-v2"])
def test_fresh_process_reads_via_entry_points(stores: tuple[Path, dict], names: list[str],
                                              tmp_path: Path) -> None:
    # zarr v3 finds the adapters through the zarr.codecs entry points, zarr v2 the numcodecs
    # classes through numcodecs.codecs: each in a process that never imported medustore.
    root, read = stores
    report = _read_in_fresh_process(root, names, tmp_path)
    assert "medustore.codecs" in report["loaded"]
    assert not [d for d in report["deprecations"] if "medustore" in d]
    for name in names:
        got = np.load(tmp_path / f"{name}.npy", allow_pickle=False)
        assert got.dtype == read[name].dtype
        np.testing.assert_array_equal(got, read[name])


def test_entry_points_are_declared() -> None:
    zarr_eps = {ep.name: ep.value for ep in entry_points(group="zarr.codecs")}
    assert zarr_eps["medustore.lattice"] == "medustore.codecs.zarr3:LatticeZarrCodec"
    assert zarr_eps["medustore.diffthreshold"] == "medustore.codecs.zarr3:DiffThresholdZarrCodec"
    nc_eps = {ep.name: ep.value for ep in entry_points(group="numcodecs.codecs")}
    assert nc_eps["medustore.lattice"] == "medustore.codecs.lattice:LatticeCodec"
    assert nc_eps["medustore.diffthreshold"] == "medustore.codecs.threshold:DiffThresholdCodec"


# ---------------------------------------------------------------- the adapters


@pytest.mark.parametrize("serializer", [s for _, s in V3.values()], ids=sorted(V3))
def test_adapter_dict_round_trip(serializer: dict) -> None:
    adapter_cls, codec_cls = ADAPTERS[serializer["name"]]
    adapter = adapter_cls.from_dict(serializer)
    d = adapter.to_dict()
    assert d["name"] == serializer["name"]
    # The configuration is normalised to the codec's full config (JSON, without id).
    assert d["configuration"] == {k: v for k, v in _codec_of(serializer).get_config().items()
                                  if k != "id"}
    assert json.loads(json.dumps(d)) == d
    assert adapter_cls.from_dict(d) == adapter
    assert adapter.codec == _codec_of(serializer)
    assert isinstance(adapter.codec, codec_cls)


def test_adapter_refusals() -> None:
    with pytest.raises(ValueError, match="expected codec name"):
        LatticeZarrCodec.from_dict({"name": "medustore.diffthreshold", "configuration": {}})
    with pytest.raises(ValueError):
        LatticeZarrCodec(lattice="Q3")
    with pytest.raises(ValueError):
        DiffThresholdZarrCodec(threshold=-1.0)
    with pytest.raises(ValueError, match="float"):
        zarr.create_array(zarr.storage.MemoryStore(), shape=(8,), dtype="i4",
                          serializer=LatticeZarrCodec(), compressors=None)


@pytest.mark.parametrize("dtype", ["f2", "f4", "f8"])
def test_memory_store_round_trip(dtype: str) -> None:
    # Whole-array writes and partial reads through zarr's own pipeline.
    x = data(dtype, seed=3)
    a = zarr.create_array(zarr.storage.MemoryStore(), shape=SHAPE, chunks=CHUNKS, dtype=dtype,
                          serializer=DiffThresholdZarrCodec(threshold=0.3), compressors=None)
    a[:] = x
    expected = np.where(np.abs(x.astype(np.float64)) > 0.3, x, 0).astype(dtype)
    np.testing.assert_array_equal(a[:], expected)
    np.testing.assert_array_equal(a[1:5, 10:40], expected[1:5, 10:40])


# ---------------------------------------------------------------- hostile stores


SERIALIZERS = {
    "lattice": (LatticeZarrCodec(lattice="D4", bits=4, seed=11), LatticeCodec("D4", bits=4,
                                                                              seed=11)),
    "threshold": (DiffThresholdZarrCodec(threshold=0.3), DiffThresholdCodec(threshold=0.3)),
}


def _one_chunk_array(root: Path, serializer: NumcodecsArrayBytesCodec) -> zarr.Array:
    a = zarr.create_array(root, shape=(256,), chunks=(128,), dtype="f4", serializer=serializer,
                          compressors=None)
    a[:] = data("f4").reshape(-1)[:256]
    return a


@pytest.mark.parametrize("kind", sorted(SERIALIZERS))
@pytest.mark.parametrize("count", [100, 200, 2**26])
def test_chunk_of_another_size_is_refused(tmp_path: Path, kind: str, count: int) -> None:
    # A chunk replaced by a valid chunk of another size: refused naming both counts, before
    # anything proportional to the claim is allocated (2**26 float32 would be 256 MiB).
    serializer, codec = SERIALIZERS[kind]
    a = _one_chunk_array(tmp_path / "a.zarr", serializer)
    small = codec.encode(make_array("gaussian", (200,), "f4", 1.0, seed=12)[: min(count, 200)])
    fields = (LATTICE_FIELDS if kind == "lattice" else THRESHOLD_FIELDS)
    (tmp_path / "a.zarr" / "c" / "1").write_bytes(edit_field(small, fields, "count", count))
    np.testing.assert_array_equal(a[:128], zarr.open_array(tmp_path / "a.zarr")[:128])
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"holds {count} values but `out` has room for 128"):
            zarr.open_array(tmp_path / "a.zarr", mode="r")[128:]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20


@pytest.mark.parametrize("inner", [{"id": "pickle"}, {"id": "zstd", "level": 1},
                                   {"id": "no.such.codec"}])
def test_store_naming_another_inner_codec_is_refused(tmp_path: Path, inner: dict) -> None:
    # An archive whose metadata names an inner codec other than the lattice cannot be read:
    # the adapter is refused when zarr builds it from zarr.json, before any chunk is read.
    _one_chunk_array(tmp_path / "a.zarr", DiffThresholdZarrCodec(threshold=0.3))
    meta_path = tmp_path / "a.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"][0]["configuration"]["inner"] = inner
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"inner codec '{inner['id']}' is not accepted"):
        zarr.open_array(tmp_path / "a.zarr", mode="r")[:]
    with pytest.raises(ValueError, match="is not accepted"):
        DiffThresholdZarrCodec.from_dict(meta["codecs"][0])


# ---------------------------------------------------------------- format 2: segmented chunks


@pytest.mark.parametrize("kind", ["lattice", "threshold"])
@pytest.mark.parametrize("dtype", ["f4", "f8"])
def test_segmented_chunks_written_by_key_decode_through_zarr(tmp_path: Path, kind: str,
                                                             dtype: str) -> None:
    # The writer encodes each chunk itself with its tensor segments and stores the bytes
    # under the chunk's key; zarr reads them back through the adapter (format 2 chunks are
    # self-describing: nothing about the segments is in the array metadata).
    from test_segments_codec import check_segment_guarantee

    from medustore.codecs.lattice import lattice_info
    from medustore.testing import threshold_header

    inner = LatticeCodec("E8", bits=3, seed=21)
    if kind == "lattice":
        serializer, codec = LatticeZarrCodec(lattice="E8", bits=3, seed=21), inner
    else:
        serializer = DiffThresholdZarrCodec(relative=0.25, inner=inner.get_config())
        codec = DiffThresholdCodec(relative=0.25, inner=inner)
    root = tmp_path / "a.zarr"
    zarr.create_array(root, shape=(300,), chunks=(128,), dtype=dtype,
                      serializer=serializer, compressors=None, fill_value=0)
    rng = np.random.default_rng(5)
    x = (rng.normal(size=300) * np.repeat([1.0, 1e-3, 1e-1], [100, 120, 80])).astype(dtype)
    segments = [(100, 28), (92, 36), (44, 84)]  # the last chunk's padding is a segment
    for i, segs in enumerate(segments):
        part = np.zeros(128, dtype)
        piece = x[128 * i : 128 * (i + 1)]
        part[: piece.size] = piece
        (root / "c").mkdir(exist_ok=True)
        (root / "c" / str(i)).write_bytes(codec.encode(part, segments=segs))
    got = zarr.open_array(root)[:]
    assert got.dtype == np.dtype(dtype) and got.shape == (300,)
    for i, segs in enumerate(segments):
        buf = (root / "c" / str(i)).read_bytes()
        part = np.zeros(128, dtype)
        part[: min(128, 300 - 128 * i)] = x[128 * i : 128 * (i + 1)]
        dec = codec.decode(buf)
        np.testing.assert_array_equal(got[128 * i : 128 * (i + 1)], dec[: 300 - 128 * i])
        if kind == "lattice":
            info = lattice_info(buf)
            assert [n for n, _ in info.segments] == list(segs)
            check_segment_guarantee("E8", part, dec, info)
        else:
            keep, _ = codec.survivors(part, segs)
            assert not dec[~keep].any()
            check_segment_guarantee("E8", part[keep], dec[keep],
                                    lattice_info(threshold_header(buf).inner))
