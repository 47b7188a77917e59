"""numcodecs' buffer contract: with a ``dtype`` setting the codecs take raw bytes.

numcodecs' conformance helpers (``numcodecs.tests.common``: `check_encode_decode`,
`check_config`, `check_repr`) feed a codec the same values as a numpy array, ``bytes``,
``bytearray`` and ``array.array('b')``, decode from each buffer type and into ``out``
buffers of several kinds (a numpy array, a ``bytearray``). `LatticeCodec` and
`DiffThresholdCodec` read raw buffers as the float dtype of their ``dtype`` setting (as
numcodecs' own lossy ``Quantize`` does) and refuse float data of another dtype.

The codecs are lossy, so the helpers are called the way numcodecs calls them for
``Quantize``: ``check_encode_decode(arr, codec, precision=p)``, which compares with
``assert_array_almost_equal(decimal=p)``, i.e. ``|decoded - arr| < 1.5 * 10**-p``. The
settings make that a guarantee, not luck: with an absolute ``step`` ``s`` every value's
error is at most ``s`` (the subtractive-dither error lies in the lattice's Voronoi cell of
cell size ``s``: covering radius 0.5 s on Z, 0.62 s on A2, 0.84 s on D4, s on E8), plus the
rounding of the decoded value to the dtype; thresholding adds at most ``threshold`` on the
zeroed entries. ``step=1e-3`` on float32/64 gives ``precision=3``; float16 data (spacing
1/16 near 200) gets ``step=1e-2`` and ``precision=1``. The lossless `DiffThresholdCodec`
(no inner codec) is checked exactly (``precision=None``).

numcodecs 0.17 no longer ships ``numcodecs.tests.common``: the three helpers are restated
below from numcodecs 0.16 and run always; the originals run too where they can be imported.
"""

from __future__ import annotations

import array
import json
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numcodecs
import numpy as np
import pytest
import zarr
from _numcodecs_checks import check_config as vendored_check_config
from numcodecs.compat import ensure_bytes, ensure_ndarray
from numpy.testing import assert_array_almost_equal, assert_array_equal

import medustore
from medustore.codecs import DiffThresholdCodec, LatticeCodec
from medustore.codecs.zarr3 import DiffThresholdZarrCodec, LatticeZarrCodec

NAMES = {"LatticeCodec": LatticeCodec, "DiffThresholdCodec": DiffThresholdCodec}


# ------------------------------------------------- numcodecs' helpers (restated from 0.16)


def _compare_arrays(arr: np.ndarray, res: object, precision: int | None = None) -> None:
    res = ensure_ndarray(res).view(arr.dtype)
    res = res.reshape(arr.shape, order="F" if arr.flags.f_contiguous else "C")
    if precision is None:
        assert_array_equal(arr, res)
    else:
        assert_array_almost_equal(arr, res, decimal=precision)


def _check_encode_decode(arr: np.ndarray, codec: numcodecs.abc.Codec,
                         precision: int | None = None) -> None:
    """numcodecs' ``check_encode_decode``: encode from any buffer type, decode from any
    buffer type and into a numpy array and a bytearray."""
    for buf in (arr, arr.tobytes(order="A"), bytearray(arr.tobytes(order="A")),
                array.array("b", arr.tobytes(order="A"))):
        enc = codec.encode(buf)
        _compare_arrays(arr, codec.decode(enc), precision)
    enc_bytes = ensure_bytes(enc)
    for buf in (enc_bytes, bytearray(enc_bytes), array.array("b", enc_bytes),
                np.frombuffer(enc_bytes, dtype="u1")):
        _compare_arrays(arr, codec.decode(buf), precision)
    out = np.empty_like(arr)
    codec.decode(enc_bytes, out=out)
    _compare_arrays(arr, out, precision)
    out = bytearray(arr.nbytes)
    codec.decode(enc_bytes, out=out)
    _compare_arrays(arr, out, precision)


def _check_repr(stmt: str) -> None:
    """numcodecs' ``check_repr``: the repr is the statement that built the codec."""
    assert repr(eval(stmt, dict(NAMES))) == stmt


def _upstream() -> SimpleNamespace:
    common = pytest.importorskip("numcodecs.tests.common",
                                 reason="numcodecs >= 0.17 ships no test helpers")
    mp = pytest.MonkeyPatch()
    for name, cls in NAMES.items():  # its check_repr evals in its own module's namespace
        mp.setattr(common, name, cls, raising=False)
    return SimpleNamespace(check_encode_decode=common.check_encode_decode,
                           check_config=common.check_config, check_repr=common.check_repr,
                           undo=mp.undo)


@pytest.fixture(params=["numcodecs", "restated"])
def helpers(request: pytest.FixtureRequest):
    if request.param == "numcodecs":
        found = _upstream()
        yield found
        found.undo()
    else:
        yield SimpleNamespace(check_encode_decode=_check_encode_decode,
                              check_config=vendored_check_config, check_repr=_check_repr)


# ---------------------------------------------------------------- data and codecs

# numcodecs' Quantize test arrays (C and F order, 1 to 3 dimensions), float64 and float32
ARRAYS = {
    "linspace-f8": np.linspace(100, 200, 1000, dtype="<f8"),
    "normal-f8": np.random.default_rng(0).normal(0, 1, 1000).astype("<f8"),
    "linspace-2d-C-f8": np.linspace(100, 200, 1000, dtype="<f8").reshape(100, 10),
    "linspace-2d-F-f8": np.linspace(100, 200, 1000, dtype="<f8").reshape(100, 10, order="F"),
    "linspace-3d-f8": np.linspace(100, 200, 1000, dtype="<f8").reshape(10, 10, 10),
    "linspace-2d-F-f4": np.linspace(100, 200, 1000, dtype="<f4").reshape(100, 10, order="F"),
    "normal-f4": np.random.default_rng(1).normal(0, 1, 999).astype("<f4"),
}


def lossy_codecs(dtype: str) -> dict[str, tuple[numcodecs.abc.Codec, int]]:
    """``name: (codec, precision)`` for data of ``dtype`` (see the module docstring)."""
    step, precision = (1e-2, 1) if dtype == "<f2" else (1e-3, 3)
    codecs: dict[str, numcodecs.abc.Codec] = {
        f"lattice-{name}": LatticeCodec(name, step=step, dtype=dtype)
        for name in ("Z", "A2", "D4", "E8")}
    codecs["threshold-E8"] = DiffThresholdCodec(
        threshold=step, inner=LatticeCodec("E8", step=step), dtype=dtype)
    codecs["threshold-relative-A2"] = DiffThresholdCodec(
        relative=1e-6, inner=LatticeCodec("A2", step=step, dtype=dtype), dtype=dtype)
    return {name: (codec, precision) for name, codec in codecs.items()}


CASES = [pytest.param(arr, codec, precision, id=f"{name}-{cname}")
         for name, arr in ARRAYS.items()
         for cname, (codec, precision) in lossy_codecs(arr.dtype.str).items()]
CASES += [pytest.param(arr, DiffThresholdCodec(dtype=arr.dtype.str), None,
                       id=f"{name}-threshold-lossless") for name, arr in ARRAYS.items()]
F2 = np.linspace(100, 200, 1000, dtype="<f2").reshape(50, 20, order="F")
CASES += [pytest.param(F2, codec, precision, id=f"linspace-2d-F-f2-{cname}")
          for cname, (codec, precision) in lossy_codecs("<f2").items()]


@pytest.mark.parametrize(("arr", "codec", "precision"), CASES)
def test_check_encode_decode(helpers: SimpleNamespace, arr: np.ndarray,
                             codec: numcodecs.abc.Codec, precision: int | None) -> None:
    helpers.check_encode_decode(arr, codec, precision=precision)


CONFIG_CODECS = [
    LatticeCodec(dtype="<f4"),
    LatticeCodec("Z", step=1e-3, dtype="float64"),
    LatticeCodec("E8", bits=6, seed=7, key=3, dtype=np.float16),
    LatticeCodec("D4", bits=2.5),  # no dtype: as before
    DiffThresholdCodec(dtype="<f8"),
    DiffThresholdCodec(threshold=0.1, inner=LatticeCodec("A2", step=0.01), dtype="<f4"),
    DiffThresholdCodec(relative=0.5, inner=LatticeCodec("E8", bits=3, dtype="<f2"),
                       dtype="<f2"),
    DiffThresholdCodec(relative=0.5, inner=LatticeCodec("E8", bits=3, dtype="<f4")),
]


@pytest.mark.parametrize("codec", CONFIG_CODECS, ids=repr)
def test_check_config(helpers: SimpleNamespace, codec: numcodecs.abc.Codec) -> None:
    helpers.check_config(codec)


REPRS = [
    "LatticeCodec(lattice='Z', bits=None, step=0.001, seed=None, dtype='<f8')",
    "LatticeCodec(lattice='E8', bits=6.0, step=None, seed=7, key=3, dtype='<f2')",
    "LatticeCodec(lattice='A2', bits=4.0, step=None, seed=None)",
    "DiffThresholdCodec(threshold=None, relative=0.0, inner=None, dtype='<f4')",
    "DiffThresholdCodec(threshold=0.001, relative=None, inner=LatticeCodec(lattice='D4', "
    "bits=None, step=0.001, seed=None, dtype='<f8'), dtype='<f8')",
    "DiffThresholdCodec(threshold=0.5, relative=None, inner=None)",
]


@pytest.mark.parametrize("stmt", REPRS)
def test_check_repr(helpers: SimpleNamespace, stmt: str) -> None:
    helpers.check_repr(stmt)


# ---------------------------------------------------------------- raw buffers


def buffers(x: np.ndarray) -> dict[str, object]:
    """The bytes of ``x`` as every kind of buffer numcodecs may pass."""
    raw = x.tobytes(order="A")
    typed = {2: "h", 4: "f", 8: "d"}[x.itemsize]  # array.array of the same float type
    out = {"bytes": raw, "bytearray": bytearray(raw), "memoryview": memoryview(raw),
           "memoryview-cast": memoryview(bytearray(raw)).cast("B"),
           "array-b": array.array("b", raw), "uint8": np.frombuffer(raw, dtype=np.uint8),
           "int-view": x.reshape(-1, order="A").view(f"<i{x.itemsize}")}
    if x.itemsize != 2:  # array.array has no float16: its "h" is an integer type
        out["array-float"] = array.array(typed, raw)
    return out


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8"])
@pytest.mark.parametrize("make", [
    lambda dt: LatticeCodec("D4", bits=4, seed=11, dtype=dt),
    lambda dt: LatticeCodec("E8", step=0.05, key=5, dtype=dt),  # seed from the bytes
    lambda dt: DiffThresholdCodec(relative=0.5, inner=LatticeCodec("A2", bits=5, seed=2),
                                  dtype=dt),
    lambda dt: DiffThresholdCodec(threshold=0.3, dtype=dt),
], ids=["lattice-seed", "lattice-key", "threshold-lattice", "threshold-lossless"])
def test_buffers_encode_like_the_array(make: Callable, dtype: str) -> None:
    codec = make(dtype)
    x = np.random.default_rng(4).normal(0, 1, (24, 10)).astype(dtype)
    expected = bytes(codec.encode(x))
    assert bytes(make(None).encode(x)) == expected  # the setting changes no byte
    for name, buf in buffers(x).items():
        assert bytes(codec.encode(buf)) == expected, name
    # F order: values in memory order, as its bytes would be read
    xf = np.asfortranarray(x)
    assert bytes(codec.encode(xf)) == bytes(codec.encode(xf.tobytes(order="A")))
    # Big-endian float data holds the same values: accepted, coded as little-endian.
    assert bytes(codec.encode(x.astype(np.dtype(dtype).newbyteorder(">")))) == expected


@pytest.mark.parametrize("codec", [LatticeCodec("Z", step=0.1, dtype="<f4"),
                                   DiffThresholdCodec(threshold=0.1, dtype="<f4")], ids=repr)
def test_wrong_byte_length(codec: numcodecs.abc.Codec) -> None:
    for raw in (b"\0" * 7, bytearray(5), np.zeros(3, dtype=np.uint16)):
        with pytest.raises(ValueError, match=r"dtype='<f4' \(4 bytes per value\)"):
            codec.encode(raw)
    assert codec.decode(codec.encode(b"")).size == 0  # no bytes: no values


@pytest.mark.parametrize("codec", [LatticeCodec("Z", step=0.1, dtype="<f4"),
                                   DiffThresholdCodec(threshold=0.1, dtype="<f4")], ids=repr)
def test_other_float_dtype_is_refused(codec: numcodecs.abc.Codec) -> None:
    """Float data of another dtype is refused, not cast: a cast would silently change the
    precision of what is stored (float64 -> float32) or of what decodes (float16 ->
    float32); typed float buffers are refused likewise, never reinterpreted."""
    x = np.linspace(-1, 1, 16)
    for data in (x, x.astype(np.float16), array.array("d", x), memoryview(x)):
        with pytest.raises(TypeError, match=r"dtype='<f4'.*astype\('<f4'\)"):
            codec.encode(data)
    assert codec.decode(codec.encode(x.astype(np.float32))).dtype == np.float32


def test_strided_buffer_is_refused_float_array_copied() -> None:
    codec = LatticeCodec("Z", step=0.1, seed=1, dtype="<f4")
    with pytest.raises(ValueError, match="contiguous"):
        codec.encode(np.zeros(16, dtype=np.int32)[::2])
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    assert codec.encode(x[::2]) == codec.encode(x[::2].copy())


def test_without_dtype_raw_bytes_are_refused_as_before() -> None:
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    for codec in (LatticeCodec(), DiffThresholdCodec()):
        with pytest.raises(TypeError, match="set the codec's `dtype`"):
            codec.encode(x.tobytes())
        assert codec.decode(codec.encode(x)).dtype == np.float32  # inferred


@pytest.mark.parametrize("bad", [">f4", "i4", "f16", "c8", object, "nonsense", 4])
def test_invalid_dtype_setting(bad: object) -> None:
    for cls in (LatticeCodec, DiffThresholdCodec):
        with pytest.raises(ValueError, match="`dtype` must be None"):
            cls(dtype=bad)


def test_inner_dtype_must_agree() -> None:
    with pytest.raises(ValueError, match="disagrees with its inner codec"):
        DiffThresholdCodec(inner=LatticeCodec(dtype="<f4"), dtype="<f8")
    # An inner codec's dtype alone reads the survivors, which keep the chunk's dtype.
    codec = DiffThresholdCodec(inner=LatticeCodec(step=0.1, dtype="<f4"))
    codec.encode(np.ones(8, dtype=np.float32))
    with pytest.raises(TypeError, match="LatticeCodec has dtype='<f4'"):
        codec.encode(np.ones(8, dtype=np.float64))


@pytest.mark.parametrize("codec", [LatticeCodec("A2", step=1e-3, seed=3, dtype="<f8"),
                                   DiffThresholdCodec(threshold=1e-3, dtype="<f8")], ids=repr)
def test_decode_into_any_writable_buffer(codec: numcodecs.abc.Codec) -> None:
    x = np.random.default_rng(2).normal(0, 1, 40)
    enc = codec.encode(x)
    expected = codec.decode(enc).tobytes()
    for out in (bytearray(x.nbytes), memoryview(bytearray(x.nbytes)),
                array.array("b", bytes(x.nbytes)), np.empty(x.nbytes, dtype=np.uint8),
                np.empty((5, 8)), np.empty((5, 8), order="F")):
        codec.decode(enc, out=out)
        # the values in the buffer's memory order
        assert ensure_ndarray(out).reshape(-1, order="A").tobytes() == expected
    with pytest.raises(ValueError, match="`out` is read-only"):
        codec.decode(enc, out=bytes(x.nbytes))
    with pytest.raises(TypeError, match="`out` must be a writable array or buffer"):
        codec.decode(enc, out=[0.0] * 40)


# ---------------------------------------------------------------- configs and metadata


def test_config_round_trip_and_spellings() -> None:
    for spelling in ("<f4", "f4", "float32", np.float32, np.dtype("float32")):
        codec = LatticeCodec("E8", step=0.5, dtype=spelling)
        assert codec.dtype == "<f4" and codec.get_config()["dtype"] == "<f4"
        assert codec == LatticeCodec("E8", step=0.5, dtype="<f4")
        assert codec != LatticeCodec("E8", step=0.5)
    for codec in CONFIG_CODECS:
        config = json.loads(json.dumps(codec.get_config()))
        rebuilt = type(codec).from_config({k: v for k, v in config.items() if k != "id"})
        assert rebuilt == codec and hash(rebuilt) == hash(codec)
        assert rebuilt.dtype == codec.dtype
        assert eval(repr(codec), dict(NAMES)) == codec


def test_configs_without_dtype_are_unchanged() -> None:
    """No "dtype" key unless set: configs, zarr metadata and fixtures stay byte-identical."""
    assert LatticeCodec("Z", step=0.5, seed=1).get_config() == {
        "id": "medustore.lattice", "lattice": "Z", "bits": None, "step": 0.5, "seed": 1}
    assert DiffThresholdCodec(threshold=0.5, inner=LatticeCodec("E8")).get_config() == {
        "id": "medustore.diffthreshold", "threshold": 0.5, "relative": None,
        "inner": {"id": "medustore.lattice", "lattice": "E8", "bits": 4.0, "step": None,
                  "seed": None}}
    assert repr(DiffThresholdCodec()) == (
        "DiffThresholdCodec(threshold=None, relative=0.0, inner=None)")
    fixtures = Path(__file__).parent / "fixtures" / "codecs" / "manifest.json"
    for case in json.loads(fixtures.read_text())["cases"]:
        config = case["config"]
        assert json.dumps(numcodecs.get_codec(dict(config)).get_config()) == json.dumps(config)
    assert LatticeZarrCodec(lattice="D4", bits=3).to_dict() == {
        "name": "medustore.lattice",
        "configuration": {"lattice": "D4", "bits": 3.0, "step": None, "seed": None}}


def test_archive_metadata_is_unchanged(tmp_path: Path) -> None:
    """The golden format-2 archive's zarr metadata: its codecs, read and written back by
    today's adapters, give the same JSON (no "dtype" key), as do today's policies."""
    with zipfile.ZipFile(Path(__file__).parent / "fixtures" / "format2" / "index1"
                         / "format2-archive.zip") as zf:
        zf.extractall(tmp_path)
    adapters = {"medustore.lattice": LatticeZarrCodec,
                "medustore.diffthreshold": DiffThresholdZarrCodec}
    found = 0
    for path in tmp_path.rglob("zarr.json"):
        for entry in json.loads(path.read_text()).get("codecs", []):
            if entry["name"] in adapters:
                again = adapters[entry["name"]].from_dict(entry).to_dict()
                assert json.dumps(again) == json.dumps(entry)
                assert "dtype" not in entry["configuration"]
                found += 1
    assert found, "the golden archive holds no medustore codec"
    policy = medustore.MeduPolicy(coord_threshold=0.5, lattice="E8", bits=3, aggregate_bits=4,
                                  seed=5)
    for serializer in (policy.record_serializer(), policy.aggregate_serializer()):
        assert "dtype" not in serializer["configuration"]


def test_zarr_codec_dtype(tmp_path: Path) -> None:
    codec = DiffThresholdZarrCodec(threshold=0.01, dtype="float32")
    assert codec.to_dict()["configuration"]["dtype"] == "<f4"
    assert DiffThresholdZarrCodec.from_dict(codec.to_dict()) == codec
    x = np.random.default_rng(5).normal(0, 1, (6, 50)).astype(np.float32)
    a = zarr.create_array(tmp_path / "v3.zarr", shape=x.shape, chunks=(4, 32), dtype="f4",
                          serializer=LatticeZarrCodec(lattice="Z", step=1e-3, dtype="<f4"))
    a[:] = x
    assert np.abs(a[:] - x).max() <= 0.5e-3 + 1e-6
    with pytest.raises(ValueError, match="dtype='<f4' but this array is float64"):
        zarr.create_array(tmp_path / "bad.zarr", shape=x.shape, chunks=(4, 32), dtype="f8",
                          serializer=LatticeZarrCodec(lattice="Z", step=1e-3, dtype="<f4"))


@pytest.mark.parametrize("order", ["C", "F"])
def test_zarr_v2_memory_order(tmp_path: Path, order: str) -> None:
    """zarr v2 hands the compressor its chunk in the array's memory order and reads the
    decoded bytes back in that order: with ``dtype`` set, values are taken in memory
    order, so order="F" arrays round trip too."""
    x = np.random.default_rng(6).normal(0, 1, (6, 50)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that v2 numcodecs are not in the spec
        a = zarr.create_array(tmp_path / f"v2{order}.zarr", shape=x.shape, chunks=(4, 32),
                              dtype="f4", zarr_format=2, order=order,
                              compressors=LatticeCodec("Z", step=1e-3, dtype="<f4"))
        a[:] = x
        got = a[:]
    assert np.abs(got - x).max() <= 0.5e-3 + 1e-6
